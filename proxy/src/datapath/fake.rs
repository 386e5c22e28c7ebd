//! In-memory maps for tests and the fault injector that wraps any datapath.

use super::{DatapathError, LbMaps};
use crate::plan::{AppliedState, MapOp};

/// The eBPF maps held in memory, with an optional backends capacity so
/// full-map handling can be tested. As on the pinned maps, a frontend's meta
/// ([`MapOp::UpsertMeta`]) is not held: their dumps compare equal.
#[derive(Debug, Default)]
pub struct FakeMaps {
    state: AppliedState,
    max_backends: Option<u32>,
}

impl FakeMaps {
    pub fn with_backend_capacity(capacity: u32) -> FakeMaps {
        FakeMaps {
            state: AppliedState::default(),
            max_backends: Some(capacity),
        }
    }

    pub fn state(&self) -> &AppliedState {
        &self.state
    }
}

impl LbMaps for FakeMaps {
    fn apply(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        if let (MapOp::UpsertBackend { id, .. }, Some(cap)) = (op, self.max_backends) {
            let have = self.state.backends();
            if !have.contains_key(id) && have.len() >= cap as usize {
                return Err(DatapathError::MapFull {
                    map: "backends",
                    capacity: cap,
                });
            }
        }
        if !matches!(op, MapOp::UpsertMeta { .. } | MapOp::DeleteMeta { .. }) {
            self.state.apply(op);
        }
        Ok(())
    }

    fn dump(&self) -> Result<Vec<MapOp>, DatapathError> {
        Ok(self.state.entries())
    }
}

/// Fails each op with a fixed probability (deterministic for a seed).
#[derive(Debug)]
pub struct FaultyMaps<M> {
    inner: M,
    rng: u64,
    /// Out of 1000.
    failure_per_mille: u32,
    pub injected: u64,
}

impl<M: LbMaps> FaultyMaps<M> {
    pub fn new(inner: M, seed: u64, failure_per_mille: u32) -> FaultyMaps<M> {
        FaultyMaps {
            inner,
            rng: seed | 1,
            failure_per_mille,
            injected: 0,
        }
    }

    pub fn inner(&self) -> &M {
        &self.inner
    }

    pub fn set_failure_per_mille(&mut self, p: u32) {
        self.failure_per_mille = p;
    }

    fn roll(&mut self) -> u32 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32 % 1000
    }
}

impl<M: LbMaps> LbMaps for FaultyMaps<M> {
    fn apply(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        if self.roll() < self.failure_per_mille {
            self.injected += 1;
            return Err(DatapathError::Injected(crate::dump::format_op(op)));
        }
        self.inner.apply(op)
    }

    fn dump(&self) -> Result<Vec<MapOp>, DatapathError> {
        self.inner.dump()
    }
}
