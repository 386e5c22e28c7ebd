//! What the userspace dataplane reports: per frontend and backend, for
//! `ferry services`, /services and the metrics.

use super::shared::REFUSED;
use super::table::Frontend;
use super::Shared;
use crate::metrics::DataplaneStatus;
use crate::model::{Action, L4Addr};
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One backend row of `ferry services` (userspace).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    pub address: String,
    pub health: &'static str,
    pub active_connections: u32,
    pub connections_total: u64,
    pub local: bool,
    pub terminating: bool,
}

/// One frontend row of `ferry services` (userspace).
#[derive(Debug, Clone, serde::Serialize)]
pub struct FrontendStatus {
    pub frontend: String,
    pub service: String,
    pub scope: &'static str,
    pub action: &'static str,
    pub algorithm: &'static str,
    pub affinity_timeout: u32,
    pub health_check: String,
    pub served: String,
    pub backends: Vec<BackendStatus>,
}

pub(super) struct Status {
    pub(super) shared: Arc<Shared>,
    pub(super) unserved: Arc<Mutex<BTreeMap<L4Addr, String>>>,
    pub(super) checks: Arc<super::health::CheckStats>,
}

impl Status {
    pub(super) fn rows(&self) -> Vec<FrontendStatus> {
        let table = self.shared.table();
        let unserved = self
            .unserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let now = self.shared.now_ms();
        let mut fronts: Vec<&Arc<Frontend>> = table.frontends.values().collect();
        fronts.sort_by_key(|f| f.key);
        fronts
            .into_iter()
            .map(|f| FrontendStatus {
                frontend: f.key.to_string(),
                service: f
                    .service
                    .as_ref()
                    .map(|s| {
                        if f.port_name.is_empty() {
                            format!("{}/{}", s.namespace, s.name)
                        } else {
                            format!("{}/{}:{}", s.namespace, s.name, f.port_name)
                        }
                    })
                    .unwrap_or_default(),
                scope: f.entry.scope.name(),
                action: f.entry.action.name(),
                algorithm: f.entry.algorithm.name(),
                affinity_timeout: f.entry.affinity_timeout,
                health_check: match &f.probe {
                    None => String::new(),
                    Some(p) => match &p.http_path {
                        None => format!("tcp every {} ms", p.interval_ms),
                        Some(path) => format!("http:{path} every {} ms", p.interval_ms),
                    },
                },
                served: match unserved.get(&f.key) {
                    Some(why) => format!("no: {why}"),
                    None if f.entry.action == Action::Forward => "yes".into(),
                    None => "refused".into(),
                },
                backends: f
                    .slots
                    .iter()
                    .map(|b| BackendStatus {
                        address: b.addr.to_string(),
                        health: b.state.describe(now),
                        active_connections: b.state.active.load(Ordering::Relaxed),
                        connections_total: b.state.connections_total.load(Ordering::Relaxed),
                        local: b.local,
                        terminating: b.terminating,
                    })
                    .collect(),
            })
            .collect()
    }
}

impl DataplaneStatus for Status {
    fn mode(&self) -> &'static str {
        "userspace"
    }

    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        use crate::metrics::{family, label, single};
        use prometheus_client::metrics::MetricType::{Counter, Gauge};
        single(
            &mut enc,
            "ferry_userspace_connections_active",
            "Open TCP connections and UDP sessions.",
            Gauge,
            self.shared.active.load(Ordering::Relaxed),
        )?;
        let s = &self.shared.stats;
        family(
            &mut enc,
            "ferry_userspace_refused",
            "Connections and datagrams refused, by reason.",
            Counter,
            REFUSED
                .iter()
                .map(|(name, why)| (label("reason", *name), s.refused_count(*why))),
        )?;
        for (name, help, v) in self.counters() {
            single(&mut enc, name, help, Counter, v)?;
        }
        for (name, help, kind, v) in self.backend_gauges() {
            single(&mut enc, name, help, kind, v)?;
        }
        Ok(())
    }
    fn services_json(&self) -> String {
        serde_json::to_string_pretty(&self.rows())
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

impl Status {
    /// The userspace dataplane's and its health checks' counters.
    fn counters(&self) -> [(&'static str, &'static str, u64); 9] {
        let s = &self.shared.stats;
        let c = &self.checks;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            (
                "ferry_userspace_connections",
                "TCP connections forwarded to a backend.",
                load(&s.accepted),
            ),
            (
                "ferry_userspace_connect_failures",
                "Failed connects to a backend (each is retried on another).",
                load(&s.connect_failures),
            ),
            (
                "ferry_userspace_idle_timeouts",
                "TCP connections reset after the idle timeout.",
                load(&s.idle_timeouts),
            ),
            (
                "ferry_userspace_udp_sessions",
                "UDP sessions opened.",
                load(&s.udp_sessions_total),
            ),
            (
                "ferry_userspace_bytes",
                "Bytes moved by closed TCP connections, both directions.",
                load(&s.bytes),
            ),
            (
                "ferry_health_check_probes",
                "Active health check probes sent.",
                load(&c.probes_total),
            ),
            (
                "ferry_health_check_failures",
                "Active health check probes that failed.",
                load(&c.probe_failures_total),
            ),
            (
                "ferry_health_check_marked_down",
                "Backends taken out by a failing check.",
                load(&c.marked_down_total),
            ),
            (
                "ferry_health_check_marked_up",
                "Backends brought back by a passing check.",
                load(&c.marked_up_total),
            ),
        ]
    }

    /// Backends by state (each address once), ejections, unserved frontends.
    fn backend_gauges(&self) -> [(&'static str, &'static str, MetricType, u64); 4] {
        let table = self.shared.table();
        let now = self.shared.now_ms();
        let (mut unhealthy, mut ejected, mut ejections) = (0u64, 0u64, 0u64);
        let mut seen = BTreeSet::new();
        for f in table.frontends.values() {
            for b in &f.slots {
                if seen.insert(b.addr) {
                    match b.state.describe(now) {
                        "unhealthy" => unhealthy += 1,
                        "ejected" => ejected += 1,
                        _ => {}
                    }
                    ejections += b.state.ejections_total.load(Ordering::Relaxed);
                }
            }
        }
        let unserved = self
            .unserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len() as u64;
        [
            (
                "ferry_userspace_backends_unhealthy",
                "Backends failing their active health check.",
                MetricType::Gauge,
                unhealthy,
            ),
            (
                "ferry_userspace_backends_ejected",
                "Backends ejected after consecutive connect failures.",
                MetricType::Gauge,
                ejected,
            ),
            (
                "ferry_userspace_ejections",
                "Passive ejections of current backends.",
                MetricType::Counter,
                ejections,
            ),
            (
                "ferry_userspace_frontends_unserved",
                "Frontends that could not be bound.",
                MetricType::Gauge,
                unserved,
            ),
        ]
    }
}
