//! Metrics and health of the agent, shared between the sync loop (which
//! records) and the HTTP endpoints (which render). Prometheus text format;
//! kube-proxy's `kubeproxy_*` names where one exists, `ferry_*` otherwise;
//! labels are bounded (never a Service name).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The content type of /metrics: Prometheus text format 0.0.4, as
/// kube-proxy's.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Histogram buckets (seconds) of kube-proxy's sync duration metric.
const BUCKETS: [f64; 14] = [
    0.0001, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
    2.048,
];

/// Buckets (seconds) of the network programming latency, as kube-proxy's.
const PROGRAMMING_BUCKETS: [f64; 14] = [
    0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 16.0, 32.0, 64.0, 128.0,
];

#[derive(Debug)]
struct Histogram {
    buckets: &'static [f64; 14],
    counts: [u64; 14],
    sum: f64,
    count: u64,
}

impl Histogram {
    const fn new(buckets: &'static [f64; 14]) -> Histogram {
        Histogram {
            buckets,
            counts: [0; 14],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (i, b) in self.buckets.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.buckets.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Appends one counter sample with its HELP and TYPE lines.
pub fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

/// Appends one gauge sample with its HELP and TYPE lines.
pub fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// Gauges set after each sync.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    pub frontends: u64,
    pub backends: u64,
    pub invalid_services: u64,
    pub invalid_slices: u64,
    pub services: u64,
    pub slices: u64,
}

#[derive(Debug)]
pub struct Metrics {
    sync_duration: Mutex<Histogram>,
    programming: Mutex<Histogram>,
    service_changes: AtomicU64,
    endpoint_changes: AtomicU64,
    last_sync_unix_ms: AtomicU64,
    syncs_ok: AtomicU64,
    syncs_failed: AtomicU64,
    ops_ok: AtomicU64,
    ops_failed: AtomicU64,
    plan_errors: AtomicU64,
    gauges: Mutex<Gauges>,
    /// Unix ms since when a sync has been wanted without a successful one
    /// (0: none pending).
    pending_since_ms: AtomicU64,
    /// Set when the node is being deleted (not reported by the file source).
    node_deleting: AtomicU64,
    /// The dataplane's own status (mode, metrics, /services), when it has one.
    dataplane: Mutex<Option<Arc<dyn DataplaneStatus>>>,
    /// Other parts of the agent with metrics (the LoadBalancer allocator,
    /// the L2 announcer).
    sources: Mutex<Vec<Arc<dyn MetricsSource>>>,
}

/// A part of the agent that adds metrics to /metrics.
pub trait MetricsSource: Send + Sync + std::fmt::Debug {
    /// Appends its metrics (Prometheus text).
    fn render(&self, out: &mut String);
}

/// What a dataplane adds to the agent's endpoints.
pub trait DataplaneStatus: Send + Sync {
    /// /proxyMode: "ebpf" or "userspace".
    fn mode(&self) -> &'static str;
    /// Appends its metrics (Prometheus text).
    fn render(&self, out: &mut String);
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
        Metrics {
            sync_duration: Mutex::new(Histogram::new(&BUCKETS)),
            programming: Mutex::new(Histogram::new(&PROGRAMMING_BUCKETS)),
            service_changes: AtomicU64::default(),
            endpoint_changes: AtomicU64::default(),
            last_sync_unix_ms: AtomicU64::default(),
            syncs_ok: AtomicU64::default(),
            syncs_failed: AtomicU64::default(),
            ops_ok: AtomicU64::default(),
            ops_failed: AtomicU64::default(),
            plan_errors: AtomicU64::default(),
            gauges: Mutex::default(),
            pending_since_ms: AtomicU64::default(),
            node_deleting: AtomicU64::default(),
            dataplane: Mutex::default(),
            sources: Mutex::default(),
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
        if let Ok(mut h) = self.sync_duration.lock() {
            h.observe(r.took.as_secs_f64());
        }
        self.ops_ok.fetch_add(r.ops_ok, Ordering::Relaxed);
        self.ops_failed.fetch_add(r.ops_failed, Ordering::Relaxed);
        self.plan_errors.fetch_add(r.plan_errors, Ordering::Relaxed);
        self.service_changes
            .fetch_add(r.service_changes, Ordering::Relaxed);
        self.endpoint_changes
            .fetch_add(r.endpoint_changes, Ordering::Relaxed);
        if r.ok {
            self.syncs_ok.fetch_add(1, Ordering::Relaxed);
            self.last_sync_unix_ms
                .store(unix_ms(now), Ordering::Relaxed);
            self.pending_since_ms.store(0, Ordering::Relaxed);
        } else {
            self.syncs_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An endpoint change that happened at `trigger_ms` (unix ms) is in the
    /// dataplane at `now`.
    pub fn programmed(&self, trigger_ms: i64, now: SystemTime) {
        let latency = (unix_ms(now) as i64 - trigger_ms).max(0) as f64 / 1000.0;
        if let Ok(mut h) = self.programming.lock() {
            h.observe(latency);
        }
    }

    pub fn set_gauges(&self, g: Gauges) {
        if let Ok(mut have) = self.gauges.lock() {
            *have = g;
        }
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

    /// Installs the dataplane's status (its metrics join ours).
    pub fn set_dataplane(&self, status: Arc<dyn DataplaneStatus>) {
        *self.dataplane.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }

    pub fn dataplane(&self) -> Option<Arc<dyn DataplaneStatus>> {
        self.dataplane
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a sync has succeeded since start.
    pub fn synced_once(&self) -> bool {
        self.last_sync_unix_ms.load(Ordering::Relaxed) > 0
    }

    /// Adds a source of metrics to /metrics.
    pub fn add_source(&self, source: Arc<dyn MetricsSource>) {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(source);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(d) = self.dataplane() {
            d.render(&mut out);
        }
        let sources = self
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for s in sources {
            s.render(&mut out);
        }
        if let Ok(h) = self.sync_duration.lock() {
            h.render(
                &mut out,
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
            );
        }
        if let Ok(h) = self.programming.lock() {
            h.render(
                &mut out,
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
            );
        }
        counter(
            &mut out,
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes",
            self.service_changes.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes",
            self.endpoint_changes.load(Ordering::Relaxed),
        );
        let last = self.last_sync_unix_ms.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds The last time proxy rules were successfully synced\n# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\nkubeproxy_sync_proxy_rules_last_timestamp_seconds {}",
            last as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "# HELP ferry_syncs_total Syncs of the dataplane by result\n# TYPE ferry_syncs_total counter\nferry_syncs_total{{result=\"ok\"}} {}\nferry_syncs_total{{result=\"error\"}} {}",
            self.syncs_ok.load(Ordering::Relaxed),
            self.syncs_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ferry_map_operations_total Map operations by result\n# TYPE ferry_map_operations_total counter\nferry_map_operations_total{{result=\"ok\"}} {}\nferry_map_operations_total{{result=\"error\"}} {}",
            self.ops_ok.load(Ordering::Relaxed),
            self.ops_failed.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "ferry_plan_errors_total",
            "Frontends left out of a sync because a map was full",
            self.plan_errors.load(Ordering::Relaxed),
        );
        let g = self.gauges.lock().map(|g| *g).unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP ferry_invalid_objects Objects skipped as invalid, by kind\n# TYPE ferry_invalid_objects gauge\nferry_invalid_objects{{kind=\"Service\"}} {}\nferry_invalid_objects{{kind=\"EndpointSlice\"}} {}",
            g.invalid_services, g.invalid_slices
        );
        let _ = writeln!(
            out,
            "# HELP ferry_objects Objects known to the agent, by kind\n# TYPE ferry_objects gauge\nferry_objects{{kind=\"Service\"}} {}\nferry_objects{{kind=\"EndpointSlice\"}} {}",
            g.services, g.slices
        );
        gauge(
            &mut out,
            "ferry_frontends",
            "Frontends in the maps",
            g.frontends,
        );
        gauge(
            &mut out,
            "ferry_backends",
            "Backends in the maps",
            g.backends,
        );
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
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn health_turns_bad_when_a_sync_is_owed_too_long() {
        let m = Metrics::default();
        let timeout = Duration::from_secs(60);
        assert!(m.health(at(1_000), timeout, true).0, "nothing owed");
        m.pending(at(1_000));
        assert!(m.health(at(30_000), timeout, true).0);
        assert!(!m.health(at(62_000), timeout, true).0, "owed for 61 s");
        m.record_sync(
            SyncRecord {
                ok: true,
                took: Duration::from_millis(3),
                ops_ok: 5,
                ops_failed: 0,
                plan_errors: 0,
                service_changes: 1,
                endpoint_changes: 2,
            },
            at(62_500),
        );
        let (ok, body) = m.health(at(63_000), timeout, true);
        assert!(ok);
        assert_eq!(
            body,
            "{\"lastUpdated\": \"1970-01-01T00:01:02.500Z\",\"currentTime\": \"1970-01-01T00:01:03.000Z\"}"
        );
        m.set_node_deleting(true);
        assert!(
            !m.health(at(63_000), timeout, true).0,
            "/healthz fails while the node goes"
        );
        assert!(m.health(at(63_000), timeout, false).0, "/livez does not");
    }

    #[test]
    fn renders_kube_proxy_names() {
        let m = Metrics::default();
        m.record_sync(
            SyncRecord {
                ok: true,
                took: Duration::from_millis(3),
                ops_ok: 5,
                ops_failed: 1,
                plan_errors: 0,
                service_changes: 1,
                endpoint_changes: 2,
            },
            at(5_000),
        );
        let text = m.render();
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1"));
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 1"));
        assert!(text.contains("kubeproxy_sync_proxy_rules_endpoint_changes_total 2"));
        assert!(text.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds 5"));
        assert!(text.contains("ferry_map_operations_total{result=\"error\"} 1"));
        m.programmed(3_000, at(5_000));
        let text = m.render();
        assert!(text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"2\"} 1"));
        assert!(text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 0"));
    }
}
