//! The agent's own metrics: kube-proxy's sync and programming-latency
//! metrics (same names and buckets) and Ferry's counters and gauges,
//! registered once and updated by the sync loop.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Histogram buckets (seconds) of kube-proxy's sync duration metric.
pub(super) const BUCKETS: [f64; 14] = [
    0.0001, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
    2.048,
];

/// Buckets (seconds) of the network programming latency, as kube-proxy's.
const PROGRAMMING_BUCKETS: [f64; 14] = [
    0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 16.0, 32.0, 64.0, 128.0,
];

pub(super) type ByLabel = Family<[(&'static str, &'static str); 1], Counter>;
pub(super) type GaugeByLabel = Family<[(&'static str, &'static str); 1], Gauge>;

/// The agent's own metrics (registered once, updated by the sync loop).
#[derive(Debug)]
pub(super) struct Own {
    pub(super) sync_duration: Histogram,
    pub(super) programming: Histogram,
    pub(super) service_changes: Counter,
    pub(super) endpoint_changes: Counter,
    pub(super) last_sync: Gauge<f64, AtomicU64>,
    pub(super) syncs: ByLabel,
    pub(super) map_operations: ByLabel,
    pub(super) plan_errors: Counter,
    pub(super) invalid: GaugeByLabel,
    pub(super) objects: GaugeByLabel,
    pub(super) frontends: Gauge,
    pub(super) backends: Gauge,
    pub(super) capped_services: Gauge,
    pub(super) left_out_backends: Gauge,
}

impl Own {
    pub(super) fn new() -> Own {
        let own = Own {
            sync_duration: Histogram::new(BUCKETS),
            programming: Histogram::new(PROGRAMMING_BUCKETS),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            last_sync: Gauge::default(),
            syncs: Family::default(),
            map_operations: Family::default(),
            plan_errors: Counter::default(),
            invalid: Family::default(),
            objects: Family::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            capped_services: Gauge::default(),
            left_out_backends: Gauge::default(),
        };
        // Every label value from the start, so a rate never misses its 0.
        for result in ["ok", "error"] {
            own.syncs.get_or_create_owned(&[("result", result)]);
            own.map_operations
                .get_or_create_owned(&[("result", result)]);
        }
        for kind in ["Service", "EndpointSlice"] {
            own.invalid.get_or_create_owned(&[("kind", kind)]);
            own.objects.get_or_create_owned(&[("kind", kind)]);
        }
        own
    }

    /// kube-proxy's sync metrics, then [`Own::register_state`].
    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            self.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            self.programming.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            self.service_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            self.endpoint_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            self.last_sync.clone(),
        );
        self.register_state(r);
    }

    /// Ferry's own counters and the state of the maps and objects.
    fn register_state(&self, r: &mut Registry) {
        r.register(
            "ferry_syncs",
            "Syncs of the dataplane by result",
            self.syncs.clone(),
        );
        r.register(
            "ferry_map_operations",
            "Map operations by result",
            self.map_operations.clone(),
        );
        r.register(
            "ferry_plan_errors",
            "Frontends left out of a sync because a map was full",
            self.plan_errors.clone(),
        );
        r.register(
            "ferry_invalid_objects",
            "Objects skipped as invalid, by kind",
            self.invalid.clone(),
        );
        r.register(
            "ferry_objects",
            "Objects known to the agent, by kind",
            self.objects.clone(),
        );
        r.register(
            "ferry_frontends",
            "Frontends in the maps",
            self.frontends.clone(),
        );
        r.register(
            "ferry_backends",
            "Backends in the maps",
            self.backends.clone(),
        );
        r.register(
            "ferry_capped_services",
            "Services with more backends than a frontend holds (served by a subset)",
            self.capped_services.clone(),
        );
        r.register(
            "ferry_left_out_backends",
            "Backends of capped Services that are not served",
            self.left_out_backends.clone(),
        );
    }
}
