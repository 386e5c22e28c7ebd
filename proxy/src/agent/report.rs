//! What the agent reports after a sync: metrics and readiness, invalid
//! objects (logged and handed to the Event sink once each), capped
//! Services, the L2 announcer's addresses and the healthCheckNodePorts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use crate::health_check::Report;
use crate::metrics::{Gauges, SyncRecord};
use crate::model::ServiceName;

use super::{Agent, SyncReport};

impl Agent {
    /// Warns about (and hands to the Event sink) each invalid object once;
    /// one fixed and broken again is reported again.
    pub(super) fn report_invalid(&mut self) {
        let mut now_invalid = BTreeSet::new();
        for e in self.core.invalid() {
            let key = e.to_string();
            if !self.reported.contains(&key) {
                tracing::warn!(error = %e, "invalid object skipped");
                if let Some(sink) = self.invalid_sink.as_mut() {
                    sink(e);
                }
            }
            now_invalid.insert(key);
        }
        self.reported = now_invalid;
    }

    /// Tells the L2 announcer which addresses this node may announce now.
    pub(super) fn announce(&self) {
        if let Some(tx) = &self.announce {
            let now = crate::ipam::announce::announceable(self.core.desired());
            tx.send_if_modified(|current| {
                let changed = *current != now;
                if changed {
                    *current = now;
                }
                changed
            });
        }
    }

    /// The sync's metrics; the programming latency of the changes it
    /// carried once they are in; readiness after the first full success.
    pub(super) fn record(&mut self, report: &SyncReport, ok: bool, trigger_times_ms: &[i64]) {
        self.metrics.record_sync(
            SyncRecord {
                ok,
                took: report.took,
                ops_ok: report.ops as u64,
                ops_failed: u64::from(!ok),
                plan_errors: report.plan_errors as u64,
                service_changes: report.service_changes as u64,
                endpoint_changes: report.endpoint_changes as u64,
            },
            SystemTime::now(),
        );
        if !ok {
            return;
        }
        let now = SystemTime::now();
        for t in trigger_times_ms {
            self.metrics.programmed(*t, now);
        }
        if report.full && !self.ready {
            self.ready = true;
            self.metrics.set_ready();
            tracing::info!(
                frontends = self.applied.frontends().len(),
                "ready: the first full sync is in the dataplane"
            );
        }
    }

    /// Logs each Service that has more backends than a frontend holds, once
    /// per change of how many it leaves out.
    pub(super) fn report_capped(&mut self) {
        let max = self.cfg.translate.max_backends_per_service;
        let now: BTreeMap<ServiceName, usize> = self
            .core
            .desired()
            .services()
            .iter()
            .filter(|(_, s)| s.left_out > 0)
            .map(|(n, s)| (n.clone(), s.left_out))
            .collect();
        for (name, left_out) in &now {
            if self.capped.get(name) != Some(left_out) {
                tracing::warn!(
                    service = %name,
                    left_out,
                    capacity = max,
                    "more backends than a frontend holds: served by {max} of them, the same on every node"
                );
            }
        }
        self.capped = now;
    }

    pub(super) fn update_health_checks(&mut self) {
        let (healthy, _) = self
            .metrics
            .health(SystemTime::now(), 2 * self.cfg.sync_period, true);
        let wanted = self
            .core
            .desired()
            .services()
            .iter()
            .filter_map(|(name, e)| {
                let h = e.health_check?;
                Some((
                    h.node_port,
                    Report {
                        service: name.clone(),
                        local_endpoints: h.local_endpoints,
                        proxy_healthy: healthy,
                    },
                ))
            })
            .collect();
        let addresses = self.core.node().nodeport_addresses.clone();
        self.health_checks.update(wanted, &addresses);
    }

    pub(super) fn gauges(&self) -> Gauges {
        let (services, slices) = self.core.object_counts();
        let (mut invalid_services, mut invalid_slices) = (0, 0);
        for e in self.core.invalid() {
            if e.kind == "Service" {
                invalid_services += 1;
            } else {
                invalid_slices += 1;
            }
        }
        let capped = self
            .core
            .desired()
            .services()
            .values()
            .filter(|s| s.left_out > 0);
        let (capped_services, left_out_backends) =
            capped.fold((0, 0), |(n, out), s| (n + 1, out + s.left_out as u64));
        Gauges {
            frontends: self.applied.frontends().len() as u64,
            backends: self.applied.backends().len() as u64,
            capped_services,
            left_out_backends,
            invalid_services,
            invalid_slices,
            services: services as u64,
            slices: slices as u64,
        }
    }
}
