//! The planner: one frontend at a time, its upserts in the reader-safe
//! order, deletions collected for the end (plan_sync drives it).

use std::collections::BTreeSet;
use std::sync::Arc;

use ipnet::IpNet;

use super::applied::{slot_number, sorted_members};
use super::maglev;
use crate::model::{
    Action, Algorithm, BackendAddr, DesiredFrontend, FastMap, FastSet, FrontendKey, Protocol,
};
use crate::translate::DesiredState;

use super::order::{Deletes, Upserts};
use super::{
    Allocators, AppliedState, BackendEntry, BackendId, FrontendEntry, FrontendId, FrontendMeta,
    MapOp, PlanConfig, PlanError,
};

pub(super) struct Planner<'a> {
    pub(super) applied: &'a AppliedState,
    pub(super) desired: &'a DesiredState,
    pub(super) alloc: &'a mut Allocators,
    pub(super) cfg: &'a PlanConfig,
    pub(super) new_backends: FastMap<BackendAddr, BackendId>,
    /// Backends whose upsert is already in the plan.
    pub(super) emitted_backends: FastSet<BackendId>,
    pub(super) new_frontends: FastMap<FrontendKey, FrontendId>,
    /// IDs handed out this plan, built only once the allocators wrap.
    pub(super) taken_backends: Option<FastSet<u32>>,
    pub(super) taken_frontends: Option<FastSet<u32>>,
    /// New frontends whose reverse-NAT upsert is already in the plan.
    pub(super) emitted_frontends: FastSet<FrontendId>,
    pub(super) upserts: Upserts,
    pub(super) deletes: Deletes,
    pub(super) errors: Vec<PlanError>,
    /// Backends whose last user may be gone.
    pub(super) candidates: BTreeSet<BackendId>,
    /// Services-map entries this plan adds (negative: frees).
    pub(super) entries_delta: isize,
}

impl<'a> Planner<'a> {
    pub(super) fn new(
        applied: &'a AppliedState,
        desired: &'a DesiredState,
        alloc: &'a mut Allocators,
        cfg: &'a PlanConfig,
    ) -> Planner<'a> {
        Planner {
            applied,
            desired,
            alloc,
            cfg,
            new_backends: FastMap::default(),
            emitted_backends: FastSet::default(),
            new_frontends: FastMap::default(),
            taken_backends: None,
            taken_frontends: None,
            emitted_frontends: FastSet::default(),
            upserts: Upserts::default(),
            deletes: Deletes::default(),
            errors: Vec::new(),
            candidates: BTreeSet::new(),
            entries_delta: 0,
        }
    }

    /// Each candidate backend: its entry again if still used (its merged
    /// flags may have changed), deleted otherwise.
    pub(super) fn settle_candidates(&mut self) {
        let candidates = std::mem::take(&mut self.candidates);
        for id in candidates {
            if let Some(entry) = self.applied.backends.get(&id) {
                if self.desired.uses_backend(&entry.addr) {
                    self.backend_entry(id, &entry.addr);
                } else {
                    self.deletes.backends.push(MapOp::DeleteBackend { id });
                }
            }
        }
    }

    pub(super) fn frontend(&mut self, f: &DesiredFrontend) {
        // Resolve every ID first; emit nothing unless the whole frontend
        // fits, so a full map never leaves half a frontend behind.
        if !self.reserve_entries(f) {
            return;
        }
        let Some((id, ids)) = self.reserve_ids(f) else {
            self.entries_delta -= self.entries_change(f);
            return;
        };
        self.rev_nat_of_new(&f.key);
        // The short-circuit target may come later in this plan: its ID and
        // reverse-NAT entry are made now, before this master names it.
        let internal_via = f.policy.internal_via.and_then(|k| {
            let via = self.frontend_id(&k)?;
            self.rev_nat_of_new(&k);
            Some(via)
        });
        self.backends(f, &ids);
        let ids: Vec<BackendId> = ids.into_iter().map(|(id, _)| id).collect();
        let applied = self.applied;
        let old_slots: &[BackendId] = applied.frontends.get(&f.key).map_or(&[], |o| &o.slots);
        self.slots(f, old_slots, &stable_layout(old_slots, &ids));
        if f.key.protocol == Protocol::Udp {
            self.release_left(f, id, old_slots, &ids);
        }
        self.maglev(f, id, &ids);
        self.source_ranges(id, &f.policy.source_ranges);
        self.master(f, id, ids.len(), internal_via);
    }

    /// The upserts of `f`'s backends: new ones, and those whose flags
    /// changed (its draining ones included).
    fn backends(&mut self, f: &DesiredFrontend, ids: &[(BackendId, bool)]) {
        for (b, (bid, fresh)) in f.backends.iter().zip(ids) {
            if *fresh {
                let entry = self.merged_entry(&b.addr);
                self.upserts
                    .backends
                    .push(MapOp::UpsertBackend { id: *bid, entry });
            } else if self.applied.backends.contains_key(bid) {
                self.backend_entry(*bid, &b.addr);
            }
            // Otherwise an earlier frontend of this plan created it.
        }
        for b in f.draining.iter() {
            // Draining backends keep their entry when they have one; a new
            // draining backend needs none (no flow can reach it yet).
            if let Some(bid) = self.applied.backend_ids.get(&b.addr).copied() {
                self.backend_entry(bid, &b.addr);
            }
        }
    }

    /// Slots that changed, slots past the new count, and the backends they
    /// named as candidates for deletion.
    fn slots(&mut self, f: &DesiredFrontend, old_slots: &[BackendId], ids: &[BackendId]) {
        for (i, bid) in ids.iter().enumerate() {
            if old_slots.get(i) != Some(bid) {
                self.upserts.slots.push(MapOp::UpsertSlot {
                    frontend: f.key,
                    slot: slot_number(i),
                    backend: *bid,
                });
            }
        }
        for (i, old_bid) in old_slots.iter().enumerate().skip(ids.len()).rev() {
            self.candidates.insert(*old_bid);
            self.deletes.slots.push(MapOp::DeleteSlot {
                frontend: f.key,
                slot: slot_number(i),
            });
        }
        for (i, old_bid) in old_slots.iter().enumerate().take(ids.len()) {
            if ids[i] != *old_bid {
                self.candidates.insert(*old_bid);
            }
        }
    }

    /// A UDP frontend: the flows to backends it no longer names (neither
    /// in a slot nor draining) end.
    fn release_left(
        &mut self,
        f: &DesiredFrontend,
        id: FrontendId,
        old_slots: &[BackendId],
        ids: &[BackendId],
    ) {
        let stays: FastSet<BackendId> = ids
            .iter()
            .copied()
            .chain(
                f.draining
                    .iter()
                    .filter_map(|b| self.applied.backend_ids.get(&b.addr).copied()),
            )
            .collect();
        let left: Vec<BackendId> = old_slots
            .iter()
            .copied()
            .filter(|b| !stays.contains(b))
            .collect();
        self.release(id, &left);
    }

    /// The frontend's meta and master entry, each when it changed.
    fn master(
        &mut self,
        f: &DesiredFrontend,
        id: FrontendId,
        count: usize,
        internal_via: Option<FrontendId>,
    ) {
        let entry = FrontendEntry {
            id,
            count: u16::try_from(count).unwrap_or(u16::MAX),
            scope: f.policy.scope,
            action: f.policy.action,
            algorithm: f.policy.algorithm,
            affinity_timeout: f.policy.affinity_timeout,
            preserve_source: f.policy.preserve_source,
            source_ranges: !f.policy.source_ranges.is_empty(),
            internal_via,
        };
        let old = self.applied.frontends.get(&f.key);
        if !old
            .and_then(|o| o.meta.as_ref())
            .is_some_and(|m| m.describes(f))
        {
            self.upserts.meta.push(MapOp::UpsertMeta {
                frontend: f.key,
                meta: Arc::new(FrontendMeta::of(f)),
            });
        }
        if old.and_then(|o| o.entry) != Some(entry) {
            self.upserts.frontends.push(MapOp::UpsertFrontend {
                frontend: f.key,
                entry,
            });
        }
    }

    /// The reverse-NAT upsert of a frontend whose ID this plan allocated
    /// (once).
    pub(super) fn rev_nat_of_new(&mut self, key: &FrontendKey) {
        if let Some(fresh) = self.new_frontends.get(key) {
            if self.emitted_frontends.insert(*fresh) {
                self.upserts.rev_nat.push(MapOp::UpsertRevNat {
                    id: *fresh,
                    frontend: *key,
                });
            }
        }
    }

    pub(super) fn maglev(&mut self, f: &DesiredFrontend, id: FrontendId, ids: &[BackendId]) {
        let wants = f.policy.algorithm == Algorithm::Maglev
            && f.policy.action == Action::Forward
            && !ids.is_empty();
        let have = self.applied.maglev.get(&id);
        if !wants {
            if have.is_some() {
                self.deletes.maglev.push(MapOp::DeleteMaglev { id });
            }
            return;
        }
        // The table depends only on the set of backends (always in address
        // order): rebuild it only when that set or the size changed.
        let size_ok = have.is_some_and(|t| t.len() == self.cfg.maglev_size as usize);
        if size_ok && self.applied.maglev_members.get(&id) == Some(&sorted_members(ids)) {
            return;
        }
        let keys: Vec<Vec<u8>> = f
            .backends
            .iter()
            .map(|b| b.addr.to_string().into_bytes())
            .collect();
        let table: Arc<[BackendId]> = maglev::build_table(&keys, self.cfg.maglev_size)
            .into_iter()
            .map(|i| ids[i as usize])
            .collect();
        if have != Some(&table) {
            self.upserts.maglev.push(MapOp::UpsertMaglev { id, table });
        }
    }

    pub(super) fn source_ranges(&mut self, id: FrontendId, wanted: &[IpNet]) {
        let have = self.applied.source_ranges.get(&id);
        for r in wanted {
            if !have.is_some_and(|h| h.contains(r)) {
                self.upserts
                    .ranges
                    .push(MapOp::UpsertSourceRange { id, range: *r });
            }
        }
        for r in have.into_iter().flatten() {
            if !wanted.contains(r) {
                self.deletes
                    .ranges
                    .push(MapOp::DeleteSourceRange { id, range: *r });
            }
        }
    }

    /// Releases the flows of UDP frontend `id` to those of `left` (backends
    /// that left it) that stay in the maps for another frontend.
    pub(super) fn release(&mut self, id: FrontendId, left: &[BackendId]) {
        let mut seen = FastSet::default();
        for bid in left {
            let stays = self
                .applied
                .backends
                .get(bid)
                .is_some_and(|e| self.desired.uses_backend(&e.addr));
            if *bid != BackendId(0) && stays && seen.insert(*bid) {
                self.deletes.releases.push(MapOp::ReleaseFlows {
                    frontend: id,
                    backend: *bid,
                });
            }
        }
    }

    pub(super) fn remove_frontend(&mut self, key: &FrontendKey) {
        self.entries_delta -= self.entries_of(key) as isize;
        let id = self.applied.frontend_ids.get(key).copied();
        if let (Some(id), Some(old)) = (id, self.applied.frontends.get(key)) {
            if key.protocol == Protocol::Udp {
                let left = old.slots.clone();
                self.release(id, &left);
            }
        }
        if let Some(old) = self.applied.frontends.get(key) {
            if old.entry.is_some() {
                self.deletes
                    .frontends
                    .push(MapOp::DeleteFrontend { frontend: *key });
            }
            if old.meta.is_some() {
                self.deletes.meta.push(MapOp::DeleteMeta { frontend: *key });
            }
            for (i, bid) in old.slots.iter().enumerate().rev() {
                self.candidates.insert(*bid);
                self.deletes.slots.push(MapOp::DeleteSlot {
                    frontend: *key,
                    slot: slot_number(i),
                });
            }
        }
        if let Some(id) = id {
            if self.applied.maglev.contains_key(&id) {
                self.deletes.maglev.push(MapOp::DeleteMaglev { id });
            }
            for r in self.applied.source_ranges.get(&id).into_iter().flatten() {
                self.deletes
                    .ranges
                    .push(MapOp::DeleteSourceRange { id, range: *r });
            }
            self.deletes.rev_nat.push(MapOp::DeleteRevNat { id });
        }
    }

    /// The entry for `addr`, flags merged over every desired user.
    pub(super) fn merged_entry(&self, addr: &BackendAddr) -> BackendEntry {
        let u = self.desired.backend_use(addr).unwrap_or_default();
        BackendEntry {
            addr: *addr,
            local: u.local(),
            terminating: u.terminating(),
        }
    }

    /// Emits the entry of a backend the maps already hold when its flags
    /// changed (once per plan).
    pub(super) fn backend_entry(&mut self, id: BackendId, addr: &BackendAddr) {
        let entry = self.merged_entry(addr);
        if self.applied.backends.get(&id) == Some(&entry) {
            return;
        }
        // Several frontends share a backend: emit its upsert once.
        if self.emitted_backends.insert(id) {
            self.upserts
                .backends
                .push(MapOp::UpsertBackend { id, entry });
        }
    }
}

/// The slots of a frontend's backends `ids` (in the desired order) given
/// the slots it has now: a backend that stays keeps its slot (so a client's
/// remembered choice, which names its slot, still holds), the new ones fill
/// the free slots in the desired order. Only a backend above the new count
/// moves (the slots shrink under it).
pub fn stable_layout(old: &[BackendId], ids: &[BackendId]) -> Vec<BackendId> {
    // Nothing to keep (a new frontend, the first sync) or nothing moved.
    if old.is_empty() || old == ids {
        return ids.to_vec();
    }
    // The backends not placed yet.
    let mut unplaced: FastSet<BackendId> = ids.iter().copied().collect();
    let mut layout: Vec<Option<BackendId>> = vec![None; ids.len()];
    for (slot, b) in layout.iter_mut().zip(old) {
        if unplaced.remove(b) {
            *slot = Some(*b);
        }
    }
    let mut rest = ids.iter().filter(|b| unplaced.contains(b));
    layout
        .into_iter()
        .map(|s| s.or_else(|| rest.next().copied()).unwrap_or(BackendId(0)))
        .collect()
}
