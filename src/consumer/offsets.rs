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

/// A run of dispatched offsets in one state. An unfinished run is
/// contiguous (every offset in it was dispatched and waits); a finished run
/// may span gaps, since offsets never dispatched need no finishing. Runs
/// keep the bookkeeping small when one record never finishes: the records
/// after it that a drop mode discards merge into one finished run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: i64,
    last: i64,
    finished: bool,
}

/// Dispatched offsets of one partition, as runs of finished and unfinished ones.
#[derive(Debug, Default)]
pub(crate) struct PartitionOffsets {
    runs: VecDeque<Run>,
    /// Next offset to consume after everything finished so far.
    committable: Option<i64>,
    /// What was last handed to librdkafka's offset store.
    stored: Option<i64>,
}

impl PartitionOffsets {
    /// Records that `offset` was handed to a handler (or dropped).
    pub(crate) fn dispatched(&mut self, offset: i64) {
        if self.runs.back().is_some_and(|b| offset <= b.last) {
            // Refetched after a seek: forget the later entries; their late
            // acknowledgements are then ignored.
            while let Some(b) = self.runs.back_mut() {
                if b.first >= offset {
                    self.runs.pop_back();
                } else {
                    b.last = b.last.min(offset - 1);
                    break;
                }
            }
        }
        match self.runs.back_mut() {
            Some(b) if !b.finished && b.last + 1 == offset => b.last = offset,
            _ => self.runs.push_back(Run {
                first: offset,
                last: offset,
                finished: false,
            }),
        }
    }

    /// Records that `offset` finished. Unknown offsets are ignored.
    pub(crate) fn finished(&mut self, offset: i64) {
        let Some(front) = self.runs.front_mut() else {
            return;
        };
        if !front.finished && front.first == offset {
            // The usual case: messages finish in the order they came.
            if front.first == front.last {
                self.runs.pop_front();
            } else {
                front.first += 1;
            }
            self.committable = Some(offset + 1);
        } else {
            self.finish_out_of_order(offset);
        }
        while let Some(&Run {
            last,
            finished: true,
            ..
        }) = self.runs.front()
        {
            self.committable = Some(last + 1);
            self.runs.pop_front();
        }
    }

    /// Splits the unfinished run holding `offset` around it and merges the
    /// finished piece with finished neighbours.
    fn finish_out_of_order(&mut self, offset: i64) {
        let found = self.runs.binary_search_by(|r| {
            if r.last < offset {
                std::cmp::Ordering::Less
            } else if r.first > offset {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        });
        let Ok(mut i) = found else { return };
        let run = self.runs[i];
        if run.finished {
            return;
        }
        let done = Run {
            first: offset,
            last: offset,
            finished: true,
        };
        self.runs[i] = done;
        if offset < run.last {
            self.runs.insert(
                i + 1,
                Run {
                    first: offset + 1,
                    ..run
                },
            );
        }
        if run.first < offset {
            self.runs.insert(
                i,
                Run {
                    last: offset - 1,
                    ..run
                },
            );
            i += 1;
        }
        if self.runs.get(i + 1).is_some_and(|n| n.finished) {
            self.runs[i].last = self.runs[i + 1].last;
            self.runs.remove(i + 1);
        }
        if i > 0 && self.runs[i - 1].finished {
            self.runs[i - 1].last = self.runs[i].last;
            self.runs.remove(i);
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
        self.runs
            .iter()
            .filter(|r| !r.finished)
            .map(|r| usize::try_from(r.last - r.first + 1).unwrap_or(0))
            .sum()
    }

    /// Records finished behind an unfinished one, waiting to become
    /// committable (counted in offsets, so a gap counts too).
    pub(crate) fn finished_behind(&self) -> usize {
        self.runs
            .iter()
            .filter(|r| r.finished)
            .map(|r| usize::try_from(r.last - r.first + 1).unwrap_or(0))
            .sum()
    }

    /// Entries kept: what the bookkeeping costs in memory.
    pub(crate) fn entries(&self) -> usize {
        self.runs.len()
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

    /// Entries kept over all partitions (see [`PartitionOffsets::entries`]).
    pub(crate) fn entries(&self) -> usize {
        self.lanes
            .iter()
            .flatten()
            .flatten()
            .map(PartitionOffsets::entries)
            .sum()
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
    fn records_finished_behind_a_stuck_one_take_one_entry() {
        let mut p = PartitionOffsets::default();
        p.dispatched(0);
        // A drop mode discards everything after the stuck record 0.
        for o in 1..100_000 {
            p.dispatched(o);
            p.finished(o);
        }
        assert_eq!(p.entries(), 2);
        assert_eq!(p.pending(), 1);
        assert_eq!(p.take_committable(), None);
        p.finished(0);
        assert_eq!(p.take_committable(), Some(100_000));
        assert_eq!(p.entries(), 0);
    }

    #[test]
    fn finishing_inside_a_run_splits_it_and_merges_finished_neighbours() {
        let mut p = PartitionOffsets::default();
        for o in 0..10 {
            p.dispatched(o);
        }
        p.finished(5);
        p.finished(7);
        assert_eq!(p.entries(), 5, "0-4, 5, 6, 7, 8-9");
        p.finished(6);
        assert_eq!(p.entries(), 3, "0-4, 5-7, 8-9");
        assert_eq!(p.pending(), 7);
        for o in 0..5 {
            p.finished(o);
        }
        assert_eq!(p.take_committable(), Some(8));
        p.finished(6);
        p.finished(42);
        assert_eq!(p.pending(), 2, "repeated and unknown acks change nothing");
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
