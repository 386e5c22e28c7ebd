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

use super::{
    Allocators, AppliedState, BackendEntry, BackendId, FrontendEntry, FrontendId, FrontendMeta,
    MapOp, PlanConfig, PlanError,
};

#[derive(Default)]
pub(super) struct Upserts {
    pub(super) backends: Vec<MapOp>,
    pub(super) rev_nat: Vec<MapOp>,
    pub(super) slots: Vec<MapOp>,
    pub(super) maglev: Vec<MapOp>,
    pub(super) ranges: Vec<MapOp>,
    pub(super) meta: Vec<MapOp>,
    pub(super) frontends: Vec<MapOp>,
}

impl Upserts {
    pub(super) fn into_ops(self) -> Vec<MapOp> {
        let mut ops = Vec::with_capacity(
            self.backends.len()
                + self.rev_nat.len()
                + self.slots.len()
                + self.maglev.len()
                + self.ranges.len()
                + self.meta.len()
                + self.frontends.len(),
        );
        ops.extend(self.backends);
        ops.extend(self.rev_nat);
        ops.extend(self.slots);
        ops.extend(self.maglev);
        ops.extend(self.ranges);
        ops.extend(self.meta);
        ops.extend(self.frontends);
        ops
    }
}

#[derive(Default)]
pub(super) struct Deletes {
    pub(super) frontends: Vec<MapOp>,
    pub(super) meta: Vec<MapOp>,
    pub(super) slots: Vec<MapOp>,
    pub(super) maglev: Vec<MapOp>,
    pub(super) ranges: Vec<MapOp>,
    pub(super) rev_nat: Vec<MapOp>,
    pub(super) backends: Vec<MapOp>,
    /// Last: the flows of pairs no new flow can pick any more.
    pub(super) releases: Vec<MapOp>,
}

impl Deletes {
    pub(super) fn into_ops(self) -> Vec<MapOp> {
        let mut ops = self.frontends;
        ops.extend(self.meta);
        ops.extend(self.slots);
        ops.extend(self.maglev);
        ops.extend(self.ranges);
        ops.extend(self.rev_nat);
        ops.extend(self.backends);
        ops.extend(self.releases);
        ops
    }
}

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

impl Planner<'_> {
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
        for (b, (bid, fresh)) in f.backends.iter().zip(&ids) {
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
        let ids: Vec<BackendId> = ids.into_iter().map(|(id, _)| id).collect();
        let old = self.applied.frontends.get(&f.key);
        let old_slots: &[BackendId] = old.map_or(&[], |o| &o.slots);
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
        if f.key.protocol == Protocol::Udp {
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
        self.maglev(f, id, &ids);
        self.source_ranges(id, &f.policy.source_ranges);
        let entry = FrontendEntry {
            id,
            count: u16::try_from(ids.len()).unwrap_or(u16::MAX),
            scope: f.policy.scope,
            action: f.policy.action,
            algorithm: f.policy.algorithm,
            affinity_timeout: f.policy.affinity_timeout,
            preserve_source: f.policy.preserve_source,
            source_ranges: !f.policy.source_ranges.is_empty(),
            internal_via,
        };
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

    /// How many services-map entries `f` adds over what it has (its master
    /// entry and a slot per backend).
    pub(super) fn entries_change(&self, f: &DesiredFrontend) -> isize {
        (1 + f.backends.len()) as isize - self.entries_of(&f.key) as isize
    }

    /// The services-map entries the frontend `key` has now.
    pub(super) fn entries_of(&self, key: &FrontendKey) -> usize {
        self.applied.frontends.get(key).map_or(0, |o| {
            usize::from(o.entry.is_some()) + o.slots.iter().filter(|b| b.0 != 0).count()
        })
    }

    /// Whether the services map has room for `f` (taken if so); a plan
    /// error otherwise.
    pub(super) fn reserve_entries(&mut self, f: &DesiredFrontend) -> bool {
        let change = self.entries_change(f);
        let after = self.applied.service_entries as isize + self.entries_delta + change;
        if change > 0 && after > self.cfg.max_service_entries as isize {
            self.errors.push(PlanError {
                frontend: f.key,
                reason: format!(
                    "the services map is full ({} entries)",
                    self.cfg.max_service_entries
                ),
            });
            return false;
        }
        self.entries_delta += change;
        true
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

    /// The frontend's ID and its backends' IDs, allocating what is new.
    /// On a full map the new allocations are undone and an error recorded.
    /// Sizes the op lists and indexes for programming empty maps (start-up
    /// without pinned maps), where growing them would dominate.
    pub(super) fn reserve_for_empty_maps(&mut self, desired: &DesiredState) {
        let frontends = desired.frontends().len();
        let slots: usize = desired.frontends().values().map(|f| f.backends.len()).sum();
        let backends = desired.backend_count();
        self.upserts.backends.reserve(backends);
        self.upserts.rev_nat.reserve(frontends);
        self.upserts.slots.reserve(slots);
        self.upserts.frontends.reserve(frontends);
        self.new_backends.reserve(backends);
        self.new_frontends.reserve(frontends);
    }

    /// Each backend ID comes with whether this call allocated it.
    pub(super) fn reserve_ids(
        &mut self,
        f: &DesiredFrontend,
    ) -> Option<(FrontendId, Vec<(BackendId, bool)>)> {
        let mut fresh_backends = Vec::new();
        let fresh_frontend = !self.applied.frontend_ids.contains_key(&f.key)
            && !self.new_frontends.contains_key(&f.key);
        let result = self.frontend_id(&f.key).ok_or("frontends").and_then(|id| {
            let mut ids = Vec::with_capacity(f.backends.len());
            for b in f.backends.iter() {
                let (bid, fresh) = self.backend_id(&b.addr).ok_or("backends")?;
                if fresh {
                    fresh_backends.push(b.addr);
                }
                ids.push((bid, fresh));
            }
            Ok((id, ids))
        });
        match result {
            Ok(r) => Some(r),
            Err(map) => {
                for addr in fresh_backends {
                    if let Some(id) = self.new_backends.remove(&addr) {
                        if let Some(t) = self.taken_backends.as_mut() {
                            t.remove(&id.0);
                        }
                    }
                }
                if fresh_frontend {
                    if let Some(id) = self.new_frontends.remove(&f.key) {
                        if let Some(t) = self.taken_frontends.as_mut() {
                            t.remove(&id.0);
                        }
                    }
                }
                let max = if map == "frontends" {
                    self.cfg.max_frontends
                } else {
                    self.cfg.max_backends
                };
                self.errors.push(PlanError {
                    frontend: f.key,
                    reason: format!("the {map} map is full ({max} entries)"),
                });
                None
            }
        }
    }

    pub(super) fn frontend_id(&mut self, key: &FrontendKey) -> Option<FrontendId> {
        if let Some(id) = self.applied.frontend_ids.get(key) {
            return Some(*id);
        }
        if let Some(id) = self.new_frontends.get(key) {
            return Some(*id);
        }
        let applied = self.applied;
        if applied.rev_nat.len() + self.new_frontends.len() >= self.cfg.max_frontends as usize {
            return None;
        }
        let new = &self.new_frontends;
        let taken = &mut self.taken_frontends;
        // IDs handed out this plan need a lookup only once the allocator has
        // gone round every ID (the map is nearly full): the set is built
        // then, once per plan.
        let id = FrontendId(self.alloc.frontends.allocate_in_round(|i, may_repeat| {
            applied.rev_nat.contains_key(&FrontendId(i))
                || (may_repeat
                    && taken
                        .get_or_insert_with(|| new.values().map(|f| f.0).collect())
                        .contains(&i))
        })?);
        if let Some(t) = self.taken_frontends.as_mut() {
            t.insert(id.0);
        }
        self.new_frontends.insert(*key, id);
        Some(id)
    }

    pub(super) fn existing_backend_id(&self, addr: &BackendAddr) -> Option<BackendId> {
        self.applied
            .backend_ids
            .get(addr)
            .or_else(|| self.new_backends.get(addr))
            .copied()
    }

    /// The backend's ID and whether it was allocated just now.
    pub(super) fn backend_id(&mut self, addr: &BackendAddr) -> Option<(BackendId, bool)> {
        if let Some(id) = self.existing_backend_id(addr) {
            return Some((id, false));
        }
        let applied = self.applied;
        if applied.backends.len() + self.new_backends.len() >= self.cfg.max_backends as usize {
            return None;
        }
        let new = &self.new_backends;
        let taken = &mut self.taken_backends;
        let id = BackendId(self.alloc.backends.allocate_in_round(|i, may_repeat| {
            applied.backends.contains_key(&BackendId(i))
                || (may_repeat
                    && taken
                        .get_or_insert_with(|| new.values().map(|b| b.0).collect())
                        .contains(&i))
        })?);
        if let Some(t) = self.taken_backends.as_mut() {
            t.insert(id.0);
        }
        self.new_backends.insert(*addr, id);
        Some((id, true))
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
