//! Newtype IDs for backends and frontends, and their allocator: a live ID is
//! never handed out again, and freed IDs are reused as late as possible
//! (conntrack entries may still name them).

use std::fmt;

/// Index of a backend in the backends map. 0 is never used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendId(pub u32);

/// Index of a frontend (its reverse-NAT, Maglev and source-range entries).
/// 0 is never used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendId(pub u32);

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for FrontendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Hands out IDs 1..=max round-robin, skipping the live ones.
#[derive(Debug, Clone)]
pub struct IdAllocator {
    next: u32,
    max: u32,
    /// IDs stepped over since [`IdAllocator::start_round`]: until it reaches
    /// `max`, no ID can come round twice in one round.
    round_walk: u64,
}

impl IdAllocator {
    pub fn new(max: u32) -> IdAllocator {
        IdAllocator {
            next: 1,
            max: max.max(1),
            round_walk: 0,
        }
    }

    /// Continues after the highest ID found in existing maps (restart).
    pub fn restore(max: u32, highest_live: Option<u32>) -> IdAllocator {
        let mut a = IdAllocator::new(max);
        if let Some(h) = highest_live {
            a.next = if h >= a.max { 1 } else { h + 1 };
        }
        a
    }

    /// The next ID that is not live, or None when all `max` are.
    pub fn allocate(&mut self, is_live: impl Fn(u32) -> bool) -> Option<u32> {
        self.allocate_in_round(|id, _| is_live(id))
    }

    /// Starts a round (one plan): IDs handed out from now on are not live
    /// yet, so the caller tracks them; see [`IdAllocator::allocate_in_round`].
    pub fn start_round(&mut self) {
        self.round_walk = 0;
    }

    /// Like [`IdAllocator::allocate`]; `is_live(id, may_repeat)` gets
    /// `may_repeat == true` only once the round has stepped over every ID,
    /// i.e. when `id` may already have been handed out this round. Until
    /// then the caller need not look that up.
    pub fn allocate_in_round(&mut self, mut is_live: impl FnMut(u32, bool) -> bool) -> Option<u32> {
        for _ in 0..self.max {
            let id = self.next;
            self.next = if self.next >= self.max {
                1
            } else {
                self.next + 1
            };
            let may_repeat = self.round_walk >= u64::from(self.max);
            self.round_walk += 1;
            if !is_live(id, may_repeat) {
                return Some(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn skips_live_ids_and_wraps() {
        let mut a = IdAllocator::new(3);
        let live = BTreeSet::from([2u32]);
        assert_eq!(a.allocate(|i| live.contains(&i)), Some(1));
        assert_eq!(a.allocate(|i| live.contains(&i)), Some(3));
        assert_eq!(a.allocate(|i| live.contains(&i)), Some(1));
        assert_eq!(a.allocate(|_| true), None);
    }

    #[test]
    fn repeats_are_flagged_only_after_a_full_walk() {
        let mut a = IdAllocator::new(3);
        a.start_round();
        let mut handed = Vec::new();
        for _ in 0..3 {
            let id = a
                .allocate_in_round(|i, may_repeat| {
                    assert!(!may_repeat, "no repeat is possible in the first walk");
                    handed.contains(&i)
                })
                .unwrap();
            handed.push(id);
        }
        assert_eq!(handed, vec![1, 2, 3]);
        // The round has walked every ID: now they are flagged, and taken.
        let next = a.allocate_in_round(|i, may_repeat| may_repeat && handed.contains(&i));
        assert_eq!(next, None);
    }

    #[test]
    fn restore_continues_after_highest() {
        let mut a = IdAllocator::restore(100, Some(41));
        assert_eq!(a.allocate(|_| false), Some(42));
    }

    proptest! {
        #[test]
        fn ids_unique_while_live(ops in prop::collection::vec((any::<bool>(), 0usize..64), 1..300)) {
            let mut a = IdAllocator::new(64);
            let mut live: Vec<u32> = Vec::new();
            for (alloc, pick) in ops {
                if alloc || live.is_empty() {
                    if let Some(id) = a.allocate(|i| live.contains(&i)) {
                        prop_assert!(!live.contains(&id));
                        prop_assert!((1..=64).contains(&id));
                        live.push(id);
                    } else {
                        prop_assert_eq!(live.len(), 64);
                    }
                } else {
                    live.remove(pick % live.len());
                }
            }
        }
    }
}
