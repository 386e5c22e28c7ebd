//! Metrics and health of the agent, shared between the sync loop (which
//! records) and the HTTP endpoints (which render). Prometheus text format;
//! kube-proxy's `kubeproxy_*` names where one exists, `ferry_*` otherwise;
//! labels are bounded (never a Service name).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

mod own;
use own::{GaugeByLabel, Own};

/// Labels of a sample: bounded values only (never a Service name).
pub type Labels = Vec<(&'static str, String)>;

/// The content type of /metrics: Prometheus text format 0.0.4, as
/// kube-proxy's.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One label.
pub fn label(key: &'static str, value: impl Into<String>) -> Labels {
    vec![(key, value.into())]
}

/// Writes one metric family read at scrape time (for [`Collector`]s):
/// `name` (a counter's without `_total`, which the encoder adds), its
/// help, its type (counter or gauge) and one sample per label set.
pub fn family(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        let sample = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(sample)?,
            _ => ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(sample)?,
        }
    }
    Ok(())
}

/// One unlabelled sample (see [`family`]).
pub fn single(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    v: u64,
) -> std::fmt::Result {
    family(encoder, name, help, kind, [(Labels::new(), v)])
}

/// Gauges set after each sync.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    pub frontends: u64,
    pub backends: u64,
    /// Services with more backends than a frontend holds, and the backends
    /// they leave out.
    pub capped_services: u64,
    pub left_out_backends: u64,
    pub invalid_services: u64,
    pub invalid_slices: u64,
    pub services: u64,
    pub slices: u64,
}

/// The dataplane's status, once it has one.
type DataplaneSlot = Arc<Mutex<Option<Arc<dyn DataplaneStatus>>>>;

/// Adds the installed dataplane's metrics to a scrape.
#[derive(Debug)]
struct DataplaneCollector(DataplaneSlot);

impl Collector for DataplaneCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let status = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match status {
            Some(s) => s.encode(encoder),
            None => Ok(()),
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    own: Own,
    registry: Mutex<Registry>,
    last_sync_unix_ms: AtomicU64,
    /// Unix ms since when a sync has been wanted without a successful one
    /// (0: none pending).
    pending_since_ms: AtomicU64,
    /// Set when the node is being deleted (not reported by the file source).
    node_deleting: AtomicU64,
    /// Set once the first full sync after start is in the dataplane.
    ready: std::sync::atomic::AtomicBool,
    /// The dataplane's own status (mode, metrics, /services), when it has one.
    dataplane: DataplaneSlot,
}

/// What a dataplane adds to the agent's endpoints.
pub trait DataplaneStatus: Send + Sync {
    /// /proxyMode: "ebpf" or "userspace".
    fn mode(&self) -> &'static str;
    /// Its metrics, read at scrape time (see [`family`]).
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> std::fmt::Result;
    /// /services: every frontend with its backends and their state (JSON).
    fn services_json(&self) -> String;
}

impl std::fmt::Debug for dyn DataplaneStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataplaneStatus({})", self.mode())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let own = Own::new();
        let mut registry = Registry::default();
        own.register(&mut registry);
        let dataplane = DataplaneSlot::default();
        registry.register_collector(Box::new(DataplaneCollector(dataplane.clone())));
        Metrics {
            own,
            registry: Mutex::new(registry),
            last_sync_unix_ms: AtomicU64::default(),
            pending_since_ms: AtomicU64::default(),
            node_deleting: AtomicU64::default(),
            ready: std::sync::atomic::AtomicBool::default(),
            dataplane,
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One sync, as the loop reports it.
#[derive(Debug, Clone, Copy)]
pub struct SyncRecord {
    pub ok: bool,
    pub took: Duration,
    pub ops_ok: u64,
    pub ops_failed: u64,
    pub plan_errors: u64,
    pub service_changes: u64,
    pub endpoint_changes: u64,
}

impl Metrics {
    /// A change arrived at `now`: the agent owes a sync.
    pub fn pending(&self, now: SystemTime) {
        let _ = self.pending_since_ms.compare_exchange(
            0,
            unix_ms(now).max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    pub fn record_sync(&self, r: SyncRecord, now: SystemTime) {
        let own = &self.own;
        own.sync_duration.observe(r.took.as_secs_f64());
        let ops = |result| {
            own.map_operations
                .get_or_create_owned(&[("result", result)])
        };
        ops("ok").inc_by(r.ops_ok);
        ops("error").inc_by(r.ops_failed);
        own.plan_errors.inc_by(r.plan_errors);
        own.service_changes.inc_by(r.service_changes);
        own.endpoint_changes.inc_by(r.endpoint_changes);
        let result = if r.ok { "ok" } else { "error" };
        own.syncs.get_or_create(&[("result", result)]).inc();
        if r.ok {
            self.last_sync_unix_ms
                .store(unix_ms(now), Ordering::Relaxed);
            own.last_sync.set(unix_ms(now) as f64 / 1000.0);
            self.pending_since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// An endpoint change that happened at `trigger_ms` (unix ms) is in the
    /// dataplane at `now`.
    pub fn programmed(&self, trigger_ms: i64, now: SystemTime) {
        let latency = (unix_ms(now) as i64 - trigger_ms).max(0) as f64 / 1000.0;
        self.own.programming.observe(latency);
    }

    pub fn set_gauges(&self, g: Gauges) {
        let own = &self.own;
        let set = |f: &GaugeByLabel, kind, v: u64| {
            f.get_or_create(&[("kind", kind)]).set(v as i64);
        };
        set(&own.invalid, "Service", g.invalid_services);
        set(&own.invalid, "EndpointSlice", g.invalid_slices);
        set(&own.objects, "Service", g.services);
        set(&own.objects, "EndpointSlice", g.slices);
        own.frontends.set(g.frontends as i64);
        own.backends.set(g.backends as i64);
        own.capped_services.set(g.capped_services as i64);
        own.left_out_backends.set(g.left_out_backends as i64);
    }

    pub fn set_node_deleting(&self, deleting: bool) {
        self.node_deleting
            .store(u64::from(deleting), Ordering::Relaxed);
    }

    /// kube-proxy's health rule: unhealthy when a sync has been owed for
    /// longer than `timeout` (two sync periods), or the node is being
    /// deleted (`/healthz` only). Returns (healthy, JSON body).
    pub fn health(&self, now: SystemTime, timeout: Duration, healthz: bool) -> (bool, String) {
        let now_ms = unix_ms(now);
        let pending = self.pending_since_ms.load(Ordering::Relaxed);
        let stale = pending != 0 && now_ms.saturating_sub(pending) > timeout.as_millis() as u64;
        let deleting = healthz && self.node_deleting.load(Ordering::Relaxed) != 0;
        let last = self.last_sync_unix_ms.load(Ordering::Relaxed);
        let body = format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"{}}}",
            rfc3339(last),
            rfc3339(now_ms),
            if deleting {
                ",\"nodeEligible\": false"
            } else {
                ""
            }
        );
        (!stale && !deleting, body)
    }

    /// The first full sync after start is in the dataplane: from now on the
    /// agent serves every Service it knows (see [`Metrics::readiness`]).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// /readyz: ready once the first full sync after start has been applied
    /// (so a rolling update that trusts it never leaves a node whose new
    /// agent has not programmed anything yet) and while no sync has been
    /// owed longer than `timeout`. Returns (ready, JSON body).
    pub fn readiness(&self, now: SystemTime, timeout: Duration) -> (bool, String) {
        let synced = self.ready.load(Ordering::Relaxed);
        let (healthy, _) = self.health(now, timeout, false);
        let body = format!(
            "{{\"firstSyncApplied\": {synced},\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"}}",
            rfc3339(self.last_sync_unix_ms.load(Ordering::Relaxed)),
            rfc3339(unix_ms(now))
        );
        (synced && healthy, body)
    }

    /// Installs the dataplane's status (its metrics join ours).
    pub fn set_dataplane(&self, status: Arc<dyn DataplaneStatus>) {
        *self
            .dataplane
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(status);
    }

    pub fn dataplane(&self) -> Option<Arc<dyn DataplaneStatus>> {
        self.dataplane
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether a sync has succeeded since start.
    pub fn synced_once(&self) -> bool {
        self.last_sync_unix_ms.load(Ordering::Relaxed) > 0
    }

    /// Adds a part of the agent with metrics of its own (the LoadBalancer
    /// allocator, the L2 announcer): read at every scrape.
    pub fn add_source(&self, source: Box<dyn Collector>) {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .register_collector(source);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// RFC 3339 UTC with milliseconds, from unix milliseconds.
fn rfc3339(ms: u64) -> String {
    let ts = k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
    format!("{ts:.3}")
}

#[cfg(test)]
mod tests;
