//! Turning finished records into stored offsets, and what the registry
//! and metrics see of the loop's progress.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::{LoopState, PollContext, ServiceShared};
use crate::consumer::context::Record;
use crate::consumer::sync::lock;

impl LoopState {
    /// Notes, for the registry, which lanes hold records and finished none
    /// since the last look.
    pub(super) fn observe_progress(&mut self, now: Instant, stall_limit: Duration) {
        for (lane, s) in self.lanes.iter().zip(&mut self.lane_state) {
            s.last_finished = lane
                .buffer
                .observe_progress(s.last_finished, now, stall_limit);
        }
    }

    /// Sets the counters and gauges from the statistics the service keeps
    /// anyway: nothing is counted twice on the record path.
    pub(super) fn publish_metrics(&self, shared: &ServiceShared) {
        for lane in &self.lanes {
            for ((_, stats), c) in lane.types.iter().zip(&lane.counters) {
                let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                c.consumed.absolute(get(&stats.received));
                c.handled.absolute(get(&stats.handled));
                c.failed.absolute(get(&stats.failed));
                c.retried.absolute(get(&stats.retried));
                c.dead_lettered.absolute(get(&stats.dead_lettered));
                c.dropped.absolute(get(&stats.dropped));
                c.duplicates.absolute(get(&stats.duplicates));
            }
            lane.buffered.set(lane.buffer.len() as f64);
        }
        self.metrics
            .skipped
            .absolute(self.skipped.load(Ordering::Relaxed));
        self.metrics
            .rejected
            .absolute(shared.rejected.load(Ordering::Relaxed));
        self.metrics.paused.set(lock(&shared.paused).len() as f64);
    }

    /// Publishes how many entries the bookkeeping keeps, for the registry.
    pub(super) fn publish_tracked(&self, shared: &ServiceShared) {
        shared
            .tracked
            .store(self.tracker.entries(), Ordering::Relaxed);
    }

    /// Draining: lanes whose held records all went to their worker get no
    /// more (records polled while draining are not dispatched).
    pub(super) fn seal_drained(&self) {
        for (lane, s) in self.lanes.iter().zip(&self.lane_state) {
            if s.overflow.is_empty() && s.pending.is_empty() {
                lane.buffer.seal();
            }
        }
    }

    /// Takes back the records the lanes' workers finished: their offsets
    /// are finished, their messages destroyed here.
    pub(super) fn absorb_returned(&mut self) {
        for (i, lane) in self.lanes.iter().enumerate() {
            let state = &mut self.lane_state[i];
            lane.buffer.take_returned(&mut state.returned);
            let late = &state.late;
            let mut returned = state.returned.drain(..).peekable();
            // A worker gives back long runs of one partition: one lookup a run.
            while let Some(first) = returned.next() {
                let partition = first.partition;
                let mut offsets = self.tracker.partition_mut((i, partition));
                let mut finish = |r: &Record| {
                    let stale = !late.is_empty()
                        && late
                            .iter()
                            .any(|&(p, last)| p == r.partition && r.seq <= last);
                    if let (Some(o), false) = (&mut offsets, stale) {
                        o.finished(r.offset);
                    }
                };
                finish(&first);
                while let Some(r) = returned.next_if(|r| r.partition == partition) {
                    finish(&r);
                }
            }
        }
    }

    pub(super) fn store_offsets(&mut self, consumer: &BaseConsumer<PollContext>) {
        let ready = self.tracker.take_committable();
        if ready.is_empty() {
            return;
        }
        // `store_offsets` takes the next offset to consume, as committed.
        // (The single-partition `store_offset` would add one to it.)
        let mut tpl = TopicPartitionList::with_capacity(ready.len());
        for ((lane, partition), offset) in ready {
            if self.lanes[lane].transactional {
                continue;
            }
            let topic = Arc::clone(&self.lanes[lane].topic);
            let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(offset));
            self.note_stored(&topic, partition, offset);
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            // A partition was revoked meanwhile; its next owner starts from
            // the last commit, which is at-least-once.
            tracing::debug!(error = %e, "offsets not stored");
        }
    }

    /// Assigned partitions of lane `i`'s topic.
    pub(super) fn partitions_of(&self, i: usize) -> TopicPartitionList {
        let topic = &self.lanes[i].topic;
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &self.assignment {
            if t == topic {
                tpl.add_partition(t, *p);
            }
        }
        tpl
    }

    pub(super) fn publish_paused(&self, shared: &ServiceShared) {
        let mut paused: Vec<(String, i32)> = Vec::new();
        let mut held: Vec<(String, i32)> = Vec::new();
        for (i, s) in self.lane_state.iter().enumerate() {
            for (t, p) in &self.assignment {
                if *t != self.lanes[i].topic {
                    continue;
                }
                if s.hold.holds(*p) {
                    held.push((t.to_string(), *p));
                }
                if s.paused || s.held_back.contains(p) || s.hold.holds(*p) {
                    paused.push((t.to_string(), *p));
                }
            }
        }
        paused.sort();
        held.sort();
        *lock(&shared.paused) = paused;
        *lock(&shared.held) = held;
        let mut assigned: Vec<(String, i32)> = self
            .assignment
            .iter()
            .map(|(t, p)| (t.to_string(), *p))
            .collect();
        assigned.sort();
        *lock(&shared.assigned) = assigned;
    }
}

pub(super) fn commit_sync<C: ConsumerContext>(consumer: &BaseConsumer<C>, service: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        // Nothing new to commit.
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
        Err(e) => tracing::warn!(service, error = %e, "offset commit failed"),
    }
}
