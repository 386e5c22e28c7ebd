//! The sync loop: one owning thread takes source events, keeps the pure
//! pipeline (track, translate, plan) and drives the datapath edge through
//! the bounded-frequency runner. On start it reads the maps back, so a
//! restart reconciles instead of flushing; nothing is pruned before every
//! source has delivered its first snapshot.

mod report;
pub mod runner;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::SystemTime;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::datapath::{apply_ops, DatapathError, LbMaps};
use crate::health_check::HealthCheckServers;
use crate::metrics::Metrics;
use crate::model::{NodeInfo, ServiceName};
use crate::objects::Object;
use crate::parse::{object_name, InvalidObject};
use crate::pipeline::Core;
use crate::plan::{plan_sync, Allocators, AppliedState, PlanConfig, PlanScope};
use crate::source::{ListKind, Listing, SourceEvent};
use crate::track::SyncedGate;
use crate::translate::TranslateConfig;
use runner::{Runner, SyncKind};

/// Settings of the sync loop.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    /// --nodeport-addresses; empty: every node address.
    pub nodeport_cidrs: Vec<IpNet>,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub retry_period: Duration,
    pub sources: Vec<&'static str>,
    /// Serve healthCheckNodePorts on the node addresses.
    pub health_check_servers: bool,
    pub translate: TranslateConfig,
    pub plan: PlanConfig,
}

/// Receives each newly invalid object (see [`Agent::report_invalid_to`]).
pub type InvalidSink = Box<dyn FnMut(&InvalidObject) + Send>;

/// What one sync did, for logs and metrics.
#[derive(Debug, Default, Clone)]
pub struct SyncReport {
    pub full: bool,
    pub services: usize,
    pub service_changes: usize,
    pub endpoint_changes: usize,
    pub ops: usize,
    pub plan_errors: usize,
    pub took: Duration,
}

/// A sync whose map writes stopped at one operation (the rest of the plan
/// is retried by the next, full, sync).
#[derive(Debug, thiserror::Error)]
#[error("{source} (at {op}, after {done} of {total} ops)")]
pub struct SyncError {
    /// The operation that failed, as `ferry explain` prints it.
    pub op: String,
    pub done: usize,
    pub total: usize,
    #[source]
    pub source: Box<DatapathError>,
}

/// The parsed objects of lists still arriving (see [`Listing`]).
#[derive(Debug, Default)]
struct Staged {
    services: Option<Vec<crate::pipeline::ParsedServiceEntry>>,
    slices: Option<Vec<crate::pipeline::ParsedSliceEntry>>,
    nodes: Option<Vec<k8s_openapi::api::core::v1::Node>>,
}

pub struct Agent {
    cfg: AgentConfig,
    core: Core,
    applied: AppliedState,
    alloc: Allocators,
    maps: Box<dyn LbMaps + Send>,
    runner: Runner,
    synced: SyncedGate,
    metrics: Arc<Metrics>,
    health_checks: HealthCheckServers,
    /// Where invalid objects are reported (as Events, in a cluster), and
    /// what was reported already (each object and cause once).
    invalid_sink: Option<InvalidSink>,
    reported: BTreeSet<String>,
    /// Lists being streamed in: parsed as they come, applied at their end.
    staged: Staged,
    /// The first full sync after start is in the dataplane (/readyz).
    ready: bool,
    /// Services served by a subset of their backends, with how many are
    /// left out (as last logged).
    capped: BTreeMap<ServiceName, usize>,
    /// Where the LoadBalancer addresses this node may announce go (L2).
    announce: Option<tokio::sync::watch::Sender<crate::ipam::announce::Announcements>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent on `maps`, with the applied state read back from them (a
    /// restart keeps every entry and ID).
    pub fn new(cfg: AgentConfig, maps: Box<dyn LbMaps + Send>) -> Result<Agent, DatapathError> {
        let started = std::time::Instant::now();
        let applied = AppliedState::restore(maps.dump()?);
        let alloc = Allocators::restore(&cfg.plan, &applied);
        let took_ms = started.elapsed().as_millis();
        let local_node = NodeInfo {
            name: cfg.node_name.clone(),
            zone: None,
            nodeport_addresses: crate::netif::local_addresses(&cfg.nodeport_cidrs),
        };
        tracing::info!(
            frontends = applied.frontends().len(),
            backends = applied.backends().len(),
            node = %cfg.node_name,
            nodeport_addresses = ?local_node.nodeport_addresses,
            took_ms,
            "restored the applied state from the maps"
        );
        Ok(Agent {
            core: Core::new(
                crate::pipeline::DEFAULT_PROXY_NAME,
                local_node.clone(),
                cfg.translate.clone(),
            ),
            runner: Runner::new(cfg.min_sync_period, cfg.sync_period, cfg.retry_period),
            synced: SyncedGate::new(&cfg.sources),
            applied,
            alloc,
            maps,
            metrics: Arc::new(Metrics::default()),
            health_checks: HealthCheckServers::default(),
            invalid_sink: None,
            reported: BTreeSet::new(),
            announce: None,
            ready: false,
            capped: BTreeMap::new(),
            staged: Staged::default(),
            cfg,
        })
    }

    /// Reports each newly invalid object (once per object and cause) to
    /// `sink`, e.g. as a Kubernetes Event.
    pub fn report_invalid_to(&mut self, sink: InvalidSink) {
        self.invalid_sink = Some(sink);
    }

    /// After each sync, publishes the LoadBalancer addresses this node may
    /// announce (for the L2 announcer).
    pub fn announce_to(
        &mut self,
        tx: tokio::sync::watch::Sender<crate::ipam::announce::Announcements>,
    ) {
        self.announce = Some(tx);
    }

    /// The metrics this agent records (shared with the HTTP endpoints).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn core(&self) -> &Core {
        &self.core
    }

    pub fn applied(&self) -> &AppliedState {
        &self.applied
    }

    /// What the datapath's maps hold now.
    pub fn maps_dump(&self) -> Result<Vec<crate::plan::MapOp>, DatapathError> {
        self.maps.dump()
    }

    pub fn handle(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Listing(Listing::Begin(kind)) => {
                match kind {
                    ListKind::Services => self.staged.services = Some(Vec::new()),
                    ListKind::Slices => self.staged.slices = Some(Vec::new()),
                    ListKind::Nodes => self.staged.nodes = Some(Vec::new()),
                }
                return;
            }
            SourceEvent::Listing(Listing::Item(object)) => match self.stage(object) {
                None => return,
                Some(update) => self.apply(update),
            },
            SourceEvent::Listing(Listing::End(kind)) => match kind {
                ListKind::Services => {
                    let items = self.staged.services.take().unwrap_or_default();
                    self.core.replace_parsed_services(items);
                    self.synced.mark_synced("services");
                }
                ListKind::Slices => {
                    let items = self.staged.slices.take().unwrap_or_default();
                    self.core.replace_parsed_slices(items);
                    self.synced.mark_synced("endpointslices");
                }
                ListKind::Nodes => {
                    let items = self.staged.nodes.take().unwrap_or_default();
                    self.set_node_from(&items);
                    self.synced.mark_synced("node");
                }
            },
            SourceEvent::Snapshot {
                source,
                services,
                slices,
                nodes,
            } => {
                self.core.replace_services(&services);
                self.core.replace_slices(&slices);
                self.set_node_from(&nodes);
                self.synced.mark_synced(source);
            }
            SourceEvent::Apply(object) => self.apply(object),
            SourceEvent::Delete(Object::Service(s)) => {
                self.core.delete_service(&object_name(&s.metadata));
            }
            SourceEvent::Delete(Object::EndpointSlice(s)) => {
                self.core.delete_slice(&object_name(&s.metadata));
            }
            SourceEvent::Delete(Object::Node(_)) => {
                // This node is going away: /healthz says so (kube-proxy does
                // the same) and the dataplane is left as it is.
                self.metrics.set_node_deleting(true);
            }
        }
        self.runner.request();
        self.metrics.pending(SystemTime::now());
    }

    /// An object added or changed.
    fn apply(&mut self, object: Object) {
        match object {
            Object::Service(s) => self.core.upsert_service(&s),
            Object::EndpointSlice(s) => self.core.upsert_slice(&s),
            Object::Node(n) => self.set_node_from(std::slice::from_ref(&n)),
        }
    }

    /// One object of a list being streamed: parsed now (its decoded form is
    /// dropped here) and kept for the list's end; None. Outside a list of
    /// its kind it is an update, handed back to be applied.
    fn stage(&mut self, object: Object) -> Option<Object> {
        match object {
            Object::Service(s) if self.staged.services.is_some() => {
                let entry = self.core.parse_service_entry(&s);
                self.staged.services.get_or_insert_default().push(entry);
            }
            Object::EndpointSlice(s) if self.staged.slices.is_some() => {
                let entry = crate::pipeline::Core::parse_slice_entry(&s);
                self.staged.slices.get_or_insert_default().push(entry);
            }
            Object::Node(n) if self.staged.nodes.is_some() => {
                self.staged.nodes.get_or_insert_default().push(*n);
            }
            update => return Some(update),
        }
        None
    }

    /// This node from the Node objects a source delivered (Core keeps it).
    fn set_node_from(&mut self, nodes: &[k8s_openapi::api::core::v1::Node]) {
        let deleting = self.core.set_node_from(nodes, &self.cfg.nodeport_cidrs);
        self.metrics.set_node_deleting(deleting);
    }

    /// Runs a sync now. Before every source synced nothing is done.
    pub fn sync(&mut self, kind: SyncKind) -> Result<SyncReport, SyncError> {
        if !self.synced.all_synced() {
            return Ok(SyncReport::default());
        }
        let start = Instant::now();
        let t = self.core.translate_changes();
        self.report_invalid();
        self.report_capped();
        // Until one has succeeded, every sync is full: the first one the
        // runner asked for may have come before the sources had listed.
        let full = kind == SyncKind::Full || t.full || !self.ready;
        let scope = if full {
            PlanScope::Full
        } else {
            PlanScope::Changes(&t.touched)
        };
        let plan = plan_sync(
            &self.applied,
            self.core.desired(),
            scope,
            &mut self.alloc,
            &self.cfg.plan,
        );
        for e in &plan.errors {
            tracing::warn!(error = %e, "frontend not programmed");
        }
        let done = apply_ops(self.maps.as_mut(), &mut self.applied, &plan.ops);
        self.maps.synced();
        self.announce();
        let report = SyncReport {
            full,
            services: t.services,
            service_changes: t.service_changes,
            endpoint_changes: t.endpoint_changes,
            ops: done.done,
            plan_errors: plan.errors.len(),
            took: start.elapsed(),
        };
        let ok = done.failed.is_none();
        self.record(&report, ok, &t.trigger_times_ms);
        self.metrics.set_gauges(self.gauges());
        if self.cfg.health_check_servers {
            self.update_health_checks();
        }
        match done.failed {
            None => Ok(report),
            Some((op, source)) => Err(SyncError {
                op: crate::dump::format_op(&op),
                done: done.done,
                total: plan.ops.len(),
                source: Box::new(source),
            }),
        }
    }

    /// The loop: events from `rx`, syncs when the runner says so, until
    /// `stop` is set or every source is gone.
    pub fn run(&mut self, rx: &Receiver<SourceEvent>, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if let Some(kind) = self.runner.due(now) {
                let result = self.sync(kind);
                let ok = result.is_ok();
                // A full sync that wrote follows a (re)list: give what the
                // decoded objects held back to the OS now.
                let collect = matches!(&result, Ok(r) if r.full && r.ops > 0);
                match result {
                    Ok(r) if r.ops > 0 || r.plan_errors > 0 => tracing::info!(
                        full = r.full,
                        services = r.services,
                        ops = r.ops,
                        plan_errors = r.plan_errors,
                        took_us = r.took.as_micros() as u64,
                        "synced"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "sync failed; retrying with a full sync"),
                }
                self.runner.done(kind, Instant::now(), ok);
                if collect {
                    crate::memory::release_freed();
                }
                continue;
            }
            // Wake up for the runner or for events, at least every 200 ms to
            // notice `stop`.
            let wait = self.runner.wait(now).min(Duration::from_millis(200));
            match rx.recv_timeout(wait) {
                Ok(event) => {
                    self.handle(event);
                    // Take whatever else is queued before syncing.
                    while let Ok(more) = rx.try_recv() {
                        self.handle(more);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    tracing::warn!("every source stopped");
                    return;
                }
            }
        }
    }
}
