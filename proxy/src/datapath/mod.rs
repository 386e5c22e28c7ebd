//! The datapath edge: the map-operation interface the sync loop drives, and
//! its implementations: pinned eBPF maps ([`BpfMaps`]), an in-memory one
//! ([`FakeMaps`]) and a fault injector ([`FaultyMaps`]). Applying a plan
//! stops at the first failed op, so the ordering guarantees of the plan hold
//! for what did get applied.

mod batch;
mod bpf;
mod encode;
mod fake;
pub mod sockets;
pub mod sweep;

pub(crate) use bpf::typed;
pub use bpf::{BpfMaps, MapCapacities};
pub use fake::{FakeMaps, FaultyMaps};

use crate::plan::{AppliedState, MapOp};

/// Errors of the datapath edge; each names the map and the cause.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("map {map} is full ({capacity} entries)")]
    MapFull { map: &'static str, capacity: u32 },
    #[error("map {map}: {op}: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening pinned map {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("injected fault on {0}")]
    Injected(String),
}

/// The map-operation interface of a datapath.
pub trait LbMaps {
    /// Applies one op. Idempotent; deleting a missing key succeeds.
    fn apply(&mut self, op: &MapOp) -> Result<(), DatapathError>;
    /// Applies `ops` in order until one fails: how many went in, and the
    /// error of the next one. The same as [`LbMaps::apply`] on each, which
    /// is what this default does; a datapath may write runs at once.
    fn apply_all(&mut self, ops: &[MapOp]) -> (usize, Option<DatapathError>) {
        for (i, op) in ops.iter().enumerate() {
            if let Err(e) = self.apply(op) {
                return (i, Some(e));
            }
        }
        (ops.len(), None)
    }
    /// Every entry the maps hold, as the upserts that would recreate them.
    fn dump(&self) -> Result<Vec<MapOp>, DatapathError>;
    /// After each sync's ops: a datapath that serves traffic itself (the
    /// userspace one) takes the state those ops built into use. The ops
    /// are a datapath's only input; this marks where a sync ends.
    fn synced(&mut self) {}
}

/// What [`apply_ops`] did.
#[derive(Debug, Default)]
pub struct Applied {
    pub done: usize,
    /// The op that failed, if any; later ops were not tried.
    pub failed: Option<(MapOp, DatapathError)>,
}

/// Applies `ops` in order, committing each to `applied` after it succeeded;
/// stops at the first failure.
pub fn apply_ops(maps: &mut dyn LbMaps, applied: &mut AppliedState, ops: &[MapOp]) -> Applied {
    let (done, error) = maps.apply_all(ops);
    for op in &ops[..done] {
        applied.apply(op);
    }
    Applied {
        done,
        failed: error.and_then(|e| Some((ops.get(done)?.clone(), e))),
    }
}
