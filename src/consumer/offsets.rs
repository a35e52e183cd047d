//! Which offset may be stored for commit: the one after the longest run of
//! finished messages from the start of what was dispatched. A message that
//! finishes early never lets the commit pass an earlier one still running,
//! so several handlers (types sharing a partition today, key-parallel
//! workers later) can complete out of order without losing anything.

use std::collections::VecDeque;

/// A partition of a poll service: its lane (topic) index and partition
/// number. Integers, not the topic name, so the per-record bookkeeping never
/// hashes a string.
pub(crate) type PartitionKey = (usize, i32);

/// Dispatched offsets of one partition and whether each has finished.
#[derive(Debug, Default)]
pub(crate) struct PartitionOffsets {
    in_flight: VecDeque<(i64, bool)>,
    /// Next offset to consume after everything finished so far.
    committable: Option<i64>,
    /// What was last handed to librdkafka's offset store.
    stored: Option<i64>,
}

impl PartitionOffsets {
    /// Records that `offset` was handed to a handler (or dropped).
    pub(crate) fn dispatched(&mut self, offset: i64) {
        if let Some(&(last, _)) = self.in_flight.back() {
            if offset <= last {
                // Refetched after a seek: forget the later entries; their
                // late acknowledgements are then ignored.
                self.in_flight.retain(|(o, _)| *o < offset);
            }
        }
        self.in_flight.push_back((offset, false));
    }

    /// Records that `offset` finished. Unknown offsets are ignored.
    pub(crate) fn finished(&mut self, offset: i64) {
        let Some(&(front, _)) = self.in_flight.front() else {
            return;
        };
        if front == offset {
            // The usual case: messages finish in the order they came.
            self.in_flight.pop_front();
            self.committable = Some(offset + 1);
        } else {
            // Offsets are increasing, usually contiguous: try the direct index first.
            let guess = usize::try_from(offset - front).ok();
            let index = match guess {
                Some(i) if self.in_flight.get(i).is_some_and(|(o, _)| *o == offset) => Some(i),
                _ => self
                    .in_flight
                    .binary_search_by_key(&offset, |(o, _)| *o)
                    .ok(),
            };
            if let Some(i) = index {
                self.in_flight[i].1 = true;
            }
        }
        while let Some(&(o, true)) = self.in_flight.front() {
            self.committable = Some(o + 1);
            self.in_flight.pop_front();
        }
    }

    /// The offset to store, if it moved since the last call.
    pub(crate) fn take_committable(&mut self) -> Option<i64> {
        match self.committable {
            Some(c) if self.stored != Some(c) => {
                self.stored = Some(c);
                Some(c)
            }
            _ => None,
        }
    }

    /// Messages dispatched and not finished.
    pub(crate) fn pending(&self) -> usize {
        self.in_flight.iter().filter(|(_, done)| !done).count()
    }
}

/// Offsets of every partition a poll service owns, indexed by lane and
/// partition number (both small and dense), so the per-record bookkeeping is
/// two bounds-checked indexes rather than a hash lookup.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    lanes: Vec<Vec<Option<PartitionOffsets>>>,
}

impl OffsetTracker {
    pub(crate) fn dispatched(&mut self, (lane, partition): PartitionKey, offset: i64) {
        // Consumed records always carry a partition number >= 0.
        let Ok(p) = usize::try_from(partition) else {
            return;
        };
        if self.lanes.len() <= lane {
            self.lanes.resize_with(lane + 1, Vec::new);
        }
        let partitions = &mut self.lanes[lane];
        if partitions.len() <= p {
            partitions.resize_with(p + 1, || None);
        }
        partitions[p]
            .get_or_insert_with(PartitionOffsets::default)
            .dispatched(offset);
    }

    pub(crate) fn finished(&mut self, key: PartitionKey, offset: i64) {
        if let Some(p) = self.partition_mut(key) {
            p.finished(offset);
        }
    }

    /// One partition's offsets, to mark a run of them finished with one
    /// lookup; `None` if it is not tracked (revoked).
    pub(crate) fn partition_mut(
        &mut self,
        (lane, partition): PartitionKey,
    ) -> Option<&mut PartitionOffsets> {
        let p = usize::try_from(partition).ok()?;
        self.lanes.get_mut(lane)?.get_mut(p)?.as_mut()
    }

    /// `(partition, offset)` to store, for every partition that moved.
    pub(crate) fn take_committable(&mut self) -> Vec<(PartitionKey, i64)> {
        let mut ready = Vec::new();
        for (lane, partitions) in self.lanes.iter_mut().enumerate() {
            for (p, offsets) in partitions.iter_mut().enumerate() {
                let Some(offsets) = offsets else { continue };
                if let (Some(c), Ok(p)) = (offsets.take_committable(), i32::try_from(p)) {
                    ready.push(((lane, p), c));
                }
            }
        }
        ready
    }

    /// Forgets a partition (revoked): its late acknowledgements are ignored.
    pub(crate) fn forget(&mut self, (lane, partition): PartitionKey) {
        let slot = usize::try_from(partition)
            .ok()
            .and_then(|p| self.lanes.get_mut(lane)?.get_mut(p));
        if let Some(slot) = slot {
            *slot = None;
        }
    }

    /// Messages dispatched and not finished, over all partitions.
    pub(crate) fn pending(&self) -> usize {
        self.lanes
            .iter()
            .flatten()
            .flatten()
            .map(PartitionOffsets::pending)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_completion_never_passes_an_unfinished_offset() {
        let mut p = PartitionOffsets::default();
        for o in 10..15 {
            p.dispatched(o);
        }
        p.finished(12);
        p.finished(13);
        assert_eq!(p.take_committable(), None, "10 is still running");
        p.finished(10);
        assert_eq!(p.take_committable(), Some(11));
        assert_eq!(p.take_committable(), None, "unchanged since last store");
        p.finished(11);
        assert_eq!(
            p.take_committable(),
            Some(14),
            "11, 12, 13 done; 14 running"
        );
        p.finished(14);
        assert_eq!(p.take_committable(), Some(15));
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave gaps.
        let mut p = PartitionOffsets::default();
        for o in [3, 7, 8, 20] {
            p.dispatched(o);
        }
        p.finished(20);
        p.finished(7);
        p.finished(3);
        assert_eq!(p.take_committable(), Some(8));
        p.finished(8);
        assert_eq!(p.take_committable(), Some(21));
    }

    #[test]
    fn refetch_and_unknown_acks_are_ignored_safely() {
        let mut p = PartitionOffsets::default();
        for o in 0..5 {
            p.dispatched(o);
        }
        p.finished(0);
        // Refetched from 2 (a seek): 2..5 are dispatched again.
        p.dispatched(2);
        p.finished(99);
        p.finished(1);
        assert_eq!(p.take_committable(), Some(2));
        p.finished(2);
        assert_eq!(p.take_committable(), Some(3));
    }

    #[test]
    fn tracker_forgets_revoked_partitions() {
        let mut t = OffsetTracker::default();
        t.dispatched((0, 0), 5);
        t.dispatched((0, 1), 9);
        t.forget((0, 0));
        t.finished((0, 0), 5);
        t.finished((0, 1), 9);
        assert_eq!(t.take_committable(), vec![((0, 1), 10)]);
        assert_eq!(t.pending(), 0);
    }
}
