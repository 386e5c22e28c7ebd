//! The plan stage: diff(applied, desired) -> ordered map operations.
//! Order: backends, reverse NAT, slots, Maglev tables, source ranges, the
//! frontend's meta (Service, port name, probe), the frontend's master entry
//! (count), then deletions (slots past the new count, removed frontends
//! master-first, unreferenced backends last), so a reader never sees a
//! frontend naming a backend that is not there. The ops are every
//! datapath's only input.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

mod applied;
pub mod ids;
pub mod maglev;
mod order;
mod planner;
mod reserve;

pub use applied::{AppliedFrontend, AppliedState};
pub use ids::{BackendId, FrontendId, IdAllocator};

use std::collections::BTreeSet;

use std::sync::Arc;

use ipnet::IpNet;

use crate::model::{
    Action, Algorithm, BackendAddr, DesiredFrontend, FrontendKey, ProbeSpec, Scope, ServiceName,
};
use crate::translate::{DesiredState, Touched};
pub use planner::stable_layout;
use planner::Planner;

/// A backend's entry in the backends map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendEntry {
    pub addr: BackendAddr,
    pub local: bool,
    pub terminating: bool,
}

/// A frontend's master entry (slot 0 of the services map).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrontendEntry {
    pub id: FrontendId,
    /// Number of backend slots (1..=count).
    pub count: u16,
    pub scope: Scope,
    pub action: Action,
    pub algorithm: Algorithm,
    pub affinity_timeout: u32,
    pub preserve_source: bool,
    /// Source ranges are enforced (the source-range map holds them).
    pub source_ranges: bool,
    /// The frontend whose entry serves this one's node-originated traffic
    /// (see [`crate::model::FrontendPolicy::internal_via`]).
    pub internal_via: Option<FrontendId>,
}

/// A frontend's Service, port name and active health check: what the
/// userspace dataplane reports and probes by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendMeta {
    pub service: ServiceName,
    pub port_name: Arc<str>,
    pub probe: Option<Arc<ProbeSpec>>,
}

impl FrontendMeta {
    /// The meta of a desired frontend.
    pub fn of(f: &DesiredFrontend) -> FrontendMeta {
        FrontendMeta {
            service: f.service.clone(),
            port_name: f.port_name.clone(),
            probe: f.policy.probe.clone(),
        }
    }

    /// Whether this is `f`'s meta (without building one).
    pub fn describes(&self, f: &DesiredFrontend) -> bool {
        self.service == f.service && self.port_name == f.port_name && self.probe == f.policy.probe
    }
}

/// One map operation. Every op is idempotent; deleting a missing key is
/// success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    UpsertBackend {
        id: BackendId,
        entry: BackendEntry,
    },
    UpsertRevNat {
        id: FrontendId,
        frontend: FrontendKey,
    },
    UpsertSlot {
        frontend: FrontendKey,
        slot: u16,
        backend: BackendId,
    },
    UpsertMaglev {
        id: FrontendId,
        table: Arc<[BackendId]>,
    },
    UpsertSourceRange {
        id: FrontendId,
        range: IpNet,
    },
    UpsertFrontend {
        frontend: FrontendKey,
        entry: FrontendEntry,
    },
    DeleteFrontend {
        frontend: FrontendKey,
    },
    /// What a frontend serves, for a datapath that names or probes its
    /// backends (the userspace one). No eBPF map holds it: the BPF
    /// datapath takes it as a no-op, and its dump has none.
    UpsertMeta {
        frontend: FrontendKey,
        meta: Arc<FrontendMeta>,
    },
    DeleteMeta {
        frontend: FrontendKey,
    },
    DeleteSlot {
        frontend: FrontendKey,
        slot: u16,
    },
    DeleteMaglev {
        id: FrontendId,
    },
    DeleteSourceRange {
        id: FrontendId,
        range: IpNet,
    },
    DeleteRevNat {
        id: FrontendId,
    },
    DeleteBackend {
        id: BackendId,
    },
    /// The flows of a UDP frontend to a backend that left it (and stays in
    /// the maps for other frontends) must end now: a datagram flow never
    /// pauses, so it would otherwise keep its old backend. No map entry;
    /// a datapath drops its conntrack state and sockets of the pair. (A
    /// deleted backend's flows end with [`MapOp::DeleteBackend`].)
    ReleaseFlows {
        frontend: FrontendId,
        backend: BackendId,
    },
}

/// Settings of the plan stage.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    /// Maglev table size (prime).
    pub maglev_size: u32,
    /// Capacity of the backends map (IDs 1..=max_backends).
    pub max_backends: u32,
    /// Capacity of the frontends (reverse-NAT) map.
    pub max_frontends: u32,
    /// Capacity of the services map (master entries and backend slots).
    pub max_service_entries: u32,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            maglev_size: maglev::DEFAULT_TABLE_SIZE,
            max_backends: 262_144,
            max_frontends: 65_536,
            max_service_entries: 262_144,
        }
    }
}

/// A frontend the plan could not program, and why (map full).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("frontend {frontend}: {reason}")]
pub struct PlanError {
    pub frontend: FrontendKey,
    pub reason: String,
}

/// The ops of one sync and the frontends it had to leave out.
#[derive(Debug, Default)]
pub struct Plan {
    pub ops: Vec<MapOp>,
    pub errors: Vec<PlanError>,
}

/// Which frontends a plan looks at.
#[derive(Debug, Clone, Copy)]
pub enum PlanScope<'a> {
    /// Every frontend in either state, and every backend (prunes orphans).
    Full,
    /// The frontends and backend addresses a change touched (from the
    /// Services that changed).
    Changes(&'a Touched),
}

/// ID allocators; they live with the sync loop across plans.
#[derive(Debug, Clone)]
pub struct Allocators {
    pub backends: IdAllocator,
    pub frontends: IdAllocator,
}

impl Allocators {
    pub fn new(cfg: &PlanConfig) -> Allocators {
        Allocators {
            backends: IdAllocator::new(cfg.max_backends),
            frontends: IdAllocator::new(cfg.max_frontends),
        }
    }

    /// Allocators that continue after the IDs found in restored maps.
    pub fn restore(cfg: &PlanConfig, applied: &AppliedState) -> Allocators {
        let (b, f) = applied.highest_ids();
        Allocators {
            backends: IdAllocator::restore(cfg.max_backends, b),
            frontends: IdAllocator::restore(cfg.max_frontends, f),
        }
    }
}

/// Computes the ops that take `applied` to `desired` within `scope`.
pub fn plan_sync(
    applied: &AppliedState,
    desired: &DesiredState,
    scope: PlanScope<'_>,
    alloc: &mut Allocators,
    cfg: &PlanConfig,
) -> Plan {
    let keys = frontends_in_scope(applied, desired, scope);
    alloc.backends.start_round();
    alloc.frontends.start_round();
    let mut p = Planner::new(applied, desired, alloc, cfg);
    if matches!(scope, PlanScope::Full) && applied.frontends.is_empty() {
        p.reserve_for_empty_maps(desired);
    }
    for key in &keys {
        match desired.frontend(key) {
            Some(f) => p.frontend(f),
            None => p.remove_frontend(key),
        }
    }
    // Backends that may have lost their last user or changed flags.
    match scope {
        PlanScope::Full => p.candidates.extend(applied.backends.keys().copied()),
        PlanScope::Changes(t) => p.candidates.extend(
            t.backends
                .iter()
                .filter_map(|a| applied.backend_ids.get(a).copied()),
        ),
    }
    p.settle_candidates();
    let Planner {
        upserts,
        deletes,
        errors,
        ..
    } = p;
    let mut ops = upserts.into_ops();
    ops.extend(deletes.into_ops());
    Plan { ops, errors }
}

/// The frontends a plan of `scope` looks at, sorted: every one desired or
/// in the maps, or those the changes touched.
fn frontends_in_scope(
    applied: &AppliedState,
    desired: &DesiredState,
    scope: PlanScope<'_>,
) -> Vec<FrontendKey> {
    match scope {
        PlanScope::Full => {
            let mut all: BTreeSet<FrontendKey> = desired.frontends().keys().copied().collect();
            all.extend(applied.frontends.keys().copied());
            all.extend(applied.frontend_ids.keys().copied());
            all.into_iter().collect()
        }
        PlanScope::Changes(t) => {
            let mut k: Vec<FrontendKey> = t.frontends.clone();
            k.sort();
            k.dedup();
            k
        }
    }
}
