//! The applied stage: what the datapath's maps hold, updated one op at a
//! time only after the datapath reported the op done, and rebuilt from a
//! dump of existing maps after a restart.

use std::collections::BTreeSet;

use crate::model::FastMap;
use std::sync::Arc;

use ipnet::IpNet;

use super::ids::{BackendId, FrontendId};
use super::{BackendEntry, FrontendEntry, FrontendMeta, MapOp};
use crate::model::{BackendAddr, FrontendKey};

/// One frontend's entries across the maps. Parts appear one op at a time,
/// so any of them may be missing while a sync is under way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedFrontend {
    /// The master entry (slot 0): ID, backend count, policy.
    pub entry: Option<FrontendEntry>,
    /// Slots 1..=n, `slots[i]` being slot i+1 (BackendId(0): unset).
    pub slots: Vec<BackendId>,
    /// Its Service, port name and probe ([`MapOp::UpsertMeta`]).
    pub meta: Option<Arc<FrontendMeta>>,
}

/// Contents of every map, plus indexes the plan needs.
#[derive(Debug, Clone, Default)]
pub struct AppliedState {
    pub(super) frontends: FastMap<FrontendKey, AppliedFrontend>,
    pub(super) backends: FastMap<BackendId, BackendEntry>,
    pub(super) backend_ids: FastMap<BackendAddr, BackendId>,
    /// Frontend IDs from the reverse-NAT map.
    pub(super) rev_nat: FastMap<FrontendId, FrontendKey>,
    pub(super) frontend_ids: FastMap<FrontendKey, FrontendId>,
    pub(super) maglev: FastMap<FrontendId, Arc<[BackendId]>>,
    /// The distinct backends each Maglev table names, sorted: tells the plan
    /// whether a table still matches its frontend's backends.
    pub(super) maglev_members: FastMap<FrontendId, Vec<BackendId>>,
    pub(super) source_ranges: FastMap<FrontendId, BTreeSet<IpNet>>,
    /// Entries of the services map: master entries and set slots.
    pub(super) service_entries: usize,
}

impl AppliedState {
    /// Rebuilds the state from the entries found in existing maps: the
    /// same as applying an upsert for each.
    pub fn restore(entries: impl IntoIterator<Item = MapOp>) -> AppliedState {
        let mut s = AppliedState::default();
        for op in entries {
            s.apply(&op);
        }
        s
    }

    /// Entries of the services map: master entries and set slots.
    pub fn service_entries(&self) -> usize {
        self.service_entries
    }

    pub fn frontends(&self) -> &FastMap<FrontendKey, AppliedFrontend> {
        &self.frontends
    }

    pub fn backends(&self) -> &FastMap<BackendId, BackendEntry> {
        &self.backends
    }

    pub fn rev_nat(&self) -> &FastMap<FrontendId, FrontendKey> {
        &self.rev_nat
    }

    pub fn maglev(&self) -> &FastMap<FrontendId, Arc<[BackendId]>> {
        &self.maglev
    }

    pub fn source_ranges(&self) -> &FastMap<FrontendId, BTreeSet<IpNet>> {
        &self.source_ranges
    }

    pub fn backend_id(&self, addr: &BackendAddr) -> Option<BackendId> {
        self.backend_ids.get(addr).copied()
    }

    pub fn frontend_id(&self, key: &FrontendKey) -> Option<FrontendId> {
        self.frontend_ids.get(key).copied()
    }

    /// Highest backend and frontend IDs in use (to restore allocators).
    pub fn highest_ids(&self) -> (Option<u32>, Option<u32>) {
        (
            self.backends.keys().map(|b| b.0).max(),
            self.rev_nat.keys().map(|f| f.0).max(),
        )
    }

    /// Every entry as the upsert that would recreate it, in plan order.
    pub fn entries(&self) -> Vec<MapOp> {
        let mut ops = Vec::new();
        for (id, entry) in sorted(&self.backends) {
            ops.push(MapOp::UpsertBackend {
                id: *id,
                entry: *entry,
            });
        }
        for (id, key) in sorted(&self.rev_nat) {
            ops.push(MapOp::UpsertRevNat {
                id: *id,
                frontend: *key,
            });
        }
        let fronts = sorted(&self.frontends);
        for (key, f) in &fronts {
            for (i, b) in f.slots.iter().enumerate() {
                ops.push(MapOp::UpsertSlot {
                    frontend: **key,
                    slot: slot_number(i),
                    backend: *b,
                });
            }
        }
        for (id, t) in sorted(&self.maglev) {
            ops.push(MapOp::UpsertMaglev {
                id: *id,
                table: t.clone(),
            });
        }
        for (id, set) in sorted(&self.source_ranges) {
            for r in set {
                ops.push(MapOp::UpsertSourceRange { id: *id, range: *r });
            }
        }
        for (key, f) in &fronts {
            if let Some(meta) = &f.meta {
                ops.push(MapOp::UpsertMeta {
                    frontend: **key,
                    meta: meta.clone(),
                });
            }
        }
        for (key, f) in fronts {
            if let Some(entry) = f.entry {
                ops.push(MapOp::UpsertFrontend {
                    frontend: *key,
                    entry,
                });
            }
        }
        ops
    }

    /// Records one op the datapath completed. Every op is idempotent.
    pub fn apply(&mut self, op: &MapOp) {
        match op {
            MapOp::UpsertBackend { .. }
            | MapOp::DeleteBackend { .. }
            | MapOp::UpsertRevNat { .. }
            | MapOp::DeleteRevNat { .. } => self.apply_ids(op),
            MapOp::UpsertMaglev { .. }
            | MapOp::DeleteMaglev { .. }
            | MapOp::UpsertSourceRange { .. }
            | MapOp::DeleteSourceRange { .. } => self.apply_tables(op),
            // No map entry: the datapath ends the pair's flows.
            MapOp::ReleaseFlows { .. } => {}
            _ => self.apply_frontend(op),
        }
    }

    /// Backends and reverse-NAT entries, with their address-to-ID indexes.
    fn apply_ids(&mut self, op: &MapOp) {
        match op {
            MapOp::UpsertBackend { id, entry } => {
                if let Some(old) = self.backends.insert(*id, *entry) {
                    if self.backend_ids.get(&old.addr) == Some(id) {
                        self.backend_ids.remove(&old.addr);
                    }
                }
                self.backend_ids.insert(entry.addr, *id);
            }
            MapOp::DeleteBackend { id } => {
                if let Some(old) = self.backends.remove(id) {
                    if self.backend_ids.get(&old.addr) == Some(id) {
                        self.backend_ids.remove(&old.addr);
                    }
                }
            }
            MapOp::UpsertRevNat { id, frontend } => {
                if let Some(old) = self.rev_nat.insert(*id, *frontend) {
                    if self.frontend_ids.get(&old) == Some(id) {
                        self.frontend_ids.remove(&old);
                    }
                }
                self.frontend_ids.insert(*frontend, *id);
            }
            MapOp::DeleteRevNat { id } => {
                if let Some(old) = self.rev_nat.remove(id) {
                    if self.frontend_ids.get(&old) == Some(id) {
                        self.frontend_ids.remove(&old);
                    }
                }
            }
            _ => {}
        }
    }

    /// Master entries, slots and meta: the parts of one frontend.
    fn apply_frontend(&mut self, op: &MapOp) {
        match op {
            MapOp::UpsertSlot {
                frontend,
                slot,
                backend,
            } => self.set_slot(frontend, *slot, *backend),
            MapOp::DeleteSlot { frontend, slot } => self.clear_slot(frontend, *slot),
            MapOp::UpsertFrontend { frontend, entry } => {
                let f = self.frontends.entry(*frontend).or_default();
                if f.entry.replace(*entry).is_none() {
                    self.service_entries += 1;
                }
            }
            MapOp::DeleteFrontend { frontend } => {
                if let Some(f) = self.frontends.get_mut(frontend) {
                    if f.entry.take().is_some() {
                        self.service_entries -= 1;
                    }
                }
                self.drop_if_empty(frontend);
            }
            MapOp::UpsertMeta { frontend, meta } => {
                self.frontends.entry(*frontend).or_default().meta = Some(meta.clone());
            }
            MapOp::DeleteMeta { frontend } => {
                if let Some(f) = self.frontends.get_mut(frontend) {
                    f.meta = None;
                }
                self.drop_if_empty(frontend);
            }
            _ => {}
        }
    }

    /// Maglev tables and source ranges, by frontend ID.
    fn apply_tables(&mut self, op: &MapOp) {
        match op {
            MapOp::UpsertMaglev { id, table } => {
                self.maglev.insert(*id, table.clone());
                self.maglev_members.insert(*id, sorted_members(table));
            }
            MapOp::DeleteMaglev { id } => {
                self.maglev.remove(id);
                self.maglev_members.remove(id);
            }
            MapOp::UpsertSourceRange { id, range } => {
                self.source_ranges.entry(*id).or_default().insert(*range);
            }
            MapOp::DeleteSourceRange { id, range } => {
                if let Some(set) = self.source_ranges.get_mut(id) {
                    set.remove(range);
                    if set.is_empty() {
                        self.source_ranges.remove(id);
                    }
                }
            }
            _ => {}
        }
    }

    fn set_slot(&mut self, frontend: &FrontendKey, slot: u16, backend: BackendId) {
        let f = self.frontends.entry(*frontend).or_default();
        let idx = usize::from(slot).saturating_sub(1);
        if f.slots.len() <= idx {
            f.slots.resize(idx + 1, BackendId(0));
        }
        if f.slots[idx] == BackendId(0) && backend != BackendId(0) {
            self.service_entries += 1;
        }
        f.slots[idx] = backend;
    }

    /// Empties a slot; trailing empty slots go, and the frontend with them
    /// once nothing of it is left.
    fn clear_slot(&mut self, frontend: &FrontendKey, slot: u16) {
        if let Some(f) = self.frontends.get_mut(frontend) {
            let idx = usize::from(slot).saturating_sub(1);
            if idx < f.slots.len() {
                if f.slots[idx] != BackendId(0) {
                    self.service_entries -= 1;
                }
                f.slots[idx] = BackendId(0);
                while f.slots.last() == Some(&BackendId(0)) {
                    f.slots.pop();
                }
            }
        }
        self.drop_if_empty(frontend);
    }

    fn drop_if_empty(&mut self, key: &FrontendKey) {
        if self
            .frontends
            .get(key)
            .is_some_and(|f| f.entry.is_none() && f.slots.is_empty() && f.meta.is_none())
        {
            self.frontends.remove(key);
        }
    }
}

/// A map's entries in key order.
fn sorted<K: Ord, V>(map: &FastMap<K, V>) -> Vec<(&K, &V)> {
    let mut v: Vec<_> = map.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

/// The distinct IDs of `ids`, sorted.
pub(super) fn sorted_members(ids: &[BackendId]) -> Vec<BackendId> {
    let mut m = ids.to_vec();
    m.sort_unstable();
    m.dedup();
    m
}

/// Slot numbers start at 1 (slot 0 is the master entry).
pub(super) fn slot_number(index: usize) -> u16 {
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}
