//! The plan's order: upserts grouped by map (backends, reverse NAT, slots,
//! Maglev tables, source ranges, meta, master entries), then deletions
//! (master entries first, backends last, flow releases at the very end),
//! so a reader never sees an entry naming one that is not there.

use super::MapOp;

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
