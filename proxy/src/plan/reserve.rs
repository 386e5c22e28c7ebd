//! The planner's reservations: room in the services map and IDs for a
//! frontend and its backends, allocated all or nothing, so a full map
//! leaves a frontend out whole.

use crate::model::{BackendAddr, DesiredFrontend, FrontendKey};
use crate::translate::DesiredState;

use super::planner::Planner;
use super::{BackendId, FrontendId, IdAllocator, PlanError};
use crate::model::FastSet;

impl Planner<'_> {
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
        let id = FrontendId(fresh_id(
            &mut self.alloc.frontends,
            |i| applied.rev_nat.contains_key(&FrontendId(i)),
            &mut self.taken_frontends,
            || new.values().map(|f| f.0).collect(),
        )?);
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
        let id = BackendId(fresh_id(
            &mut self.alloc.backends,
            |i| applied.backends.contains_key(&BackendId(i)),
            &mut self.taken_backends,
            || new.values().map(|b| b.0).collect(),
        )?);
        self.new_backends.insert(*addr, id);
        Some((id, true))
    }
}

/// A new ID from `alloc` that neither the maps (`in_maps`) nor this plan
/// hold. IDs handed out this plan need a lookup only once the allocator
/// has gone round every ID (the map is nearly full): `taken` is built then,
/// once per plan, from `new_ids`.
fn fresh_id(
    alloc: &mut IdAllocator,
    in_maps: impl Fn(u32) -> bool,
    taken: &mut Option<FastSet<u32>>,
    new_ids: impl FnOnce() -> FastSet<u32>,
) -> Option<u32> {
    let mut new_ids = Some(new_ids);
    let id = alloc.allocate_in_round(|i, may_repeat| {
        in_maps(i)
            || (may_repeat
                && taken
                    .get_or_insert_with(|| new_ids.take().map(|f| f()).unwrap_or_default())
                    .contains(&i))
    })?;
    if let Some(t) = taken.as_mut() {
        t.insert(id);
    }
    Some(id)
}
