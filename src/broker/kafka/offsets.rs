//! Which offset of a partition may be committed: the records of a partition
//! are settled in any order (shards run in parallel, retries wait), and the
//! committed offset must never pass one still in flight. A record counts from
//! the moment it is read (handed out, skipped, or held until its retry is
//! due) until it is settled; the commit is the offset after the longest
//! settled prefix. Pure bookkeeping, tested without a broker.

use std::collections::BTreeMap;

/// Where one record of a partition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// With a handler: a rebalance waits for it.
    Handed,
    /// In this process's memory only (a retry not yet due, a requeued
    /// delivery not yet handed out again): a rebalance drops it, and the
    /// partition's next owner reads it again.
    Held,
    /// Settled: the commit may pass it.
    Settled,
}

/// The records of one assigned partition not yet covered by a commit.
#[derive(Debug, Default)]
pub(super) struct PartitionOffsets {
    records: BTreeMap<i64, Stage>,
    /// The offset last handed to a commit (the next one to read).
    committed: Option<i64>,
}

impl PartitionOffsets {
    /// Records that `offset` was read and where it went.
    pub(super) fn read(&mut self, offset: i64, stage: Stage) {
        self.records.insert(offset, stage);
    }

    /// Moves `offset` to `stage`; false when it is not tracked (settled
    /// before, or its partition reassigned since).
    pub(super) fn set(&mut self, offset: i64, stage: Stage) -> bool {
        match self.records.get_mut(&offset) {
            Some(now) if *now != Stage::Settled => {
                *now = stage;
                true
            }
            _ => false,
        }
    }

    /// Records still with a handler.
    pub(super) fn handed(&self) -> usize {
        self.records
            .values()
            .filter(|s| **s == Stage::Handed)
            .count()
    }

    /// The offset to commit now, if the settled prefix grew since the last
    /// call: the one after the last settled record that every earlier one
    /// follows. The prefix is forgotten once returned.
    pub(super) fn commit(&mut self) -> Option<i64> {
        let mut next = None;
        while let Some(entry) = self.records.first_entry() {
            if *entry.get() != Stage::Settled {
                break;
            }
            next = Some(*entry.key() + 1);
            entry.remove();
        }
        let next = next?;
        self.committed = Some(next);
        Some(next)
    }

    /// The offset last returned by [`PartitionOffsets::commit`].
    pub(super) fn committed(&self) -> Option<i64> {
        self.committed
    }
}

#[cfg(test)]
mod tests {
    use super::{PartitionOffsets, Stage};

    #[test]
    fn the_commit_stops_before_the_first_record_in_flight() {
        let mut p = PartitionOffsets::default();
        for offset in 10..15 {
            p.read(offset, Stage::Handed);
        }
        assert!(p.set(11, Stage::Settled) && p.set(12, Stage::Settled));
        assert_eq!(p.commit(), None, "10 is still in flight");
        assert!(p.set(10, Stage::Settled));
        assert_eq!(p.commit(), Some(13), "10..=12 settled");
        assert_eq!(p.commit(), None, "nothing new");
        assert!(p.set(14, Stage::Settled));
        assert_eq!(p.commit(), None, "13 is in flight");
        assert_eq!(p.handed(), 1);
        p.set(13, Stage::Settled);
        assert_eq!(p.commit(), Some(15));
        assert_eq!(p.committed(), Some(15));
    }

    #[test]
    fn a_held_record_blocks_the_commit_and_gaps_between_offsets_do_not() {
        let mut p = PartitionOffsets::default();
        p.read(3, Stage::Settled);
        p.read(7, Stage::Held);
        p.read(9, Stage::Settled);
        assert_eq!(p.commit(), Some(4), "offsets 4..=6 were never records");
        assert_eq!(p.handed(), 0, "held is not with a handler");
        assert!(p.set(7, Stage::Handed));
        assert!(p.set(7, Stage::Settled));
        assert!(!p.set(7, Stage::Settled), "settled once");
        assert_eq!(p.commit(), Some(10));
    }
}
