//! Putting routed records into lanes as each lane's backpressure mode
//! allows: hold back and pause (`Apply`), or drop (`DropNewest`,
//! `DropOldest`); and holding back partitions of worker pools whose
//! finished records cannot be committed yet.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::{DRAIN_POLL_TIMEOUT, LoopState, POLL_TIMEOUT, PollContext, ServiceShared};
use crate::consumer::Backpressure;
use crate::consumer::context::Record;

impl LoopState {
    /// Puts a batch into lane `lane` as its backpressure mode allows.
    pub(super) fn admit(&mut self, lane: usize, batch: &mut Vec<Record>) {
        let buffer = Arc::clone(&self.lanes[lane].buffer);
        let fits = buffer.room().min(batch.len());
        match buffer.mode {
            Backpressure::Apply => {
                // What does not fit is held; `pause_blocked` decides
                // whether the lane's partitions must pause.
                self.lane_state[lane].overflow.extend(batch.drain(fits..));
                self.push(lane, batch.drain(..));
            }
            Backpressure::DropNewest => {
                let rest: Vec<Record> = batch.drain(fits..).collect();
                self.push(lane, batch.drain(..));
                self.dropped(lane, &rest);
            }
            Backpressure::DropOldest => {
                self.push(lane, batch.drain(..));
                let excess = buffer.len().saturating_sub(buffer.capacity());
                let dropped = buffer.drop_oldest(excess);
                self.dropped(lane, &dropped);
            }
        }
    }

    /// Numbers records and appends them to the lane.
    pub(super) fn push(&mut self, lane: usize, records: impl Iterator<Item = Record>) {
        let state = &mut self.lane_state[lane];
        let numbered = records.map(|mut r| {
            state.last_seq += 1;
            r.seq = state.last_seq;
            r
        });
        self.lanes[lane].buffer.push(numbered);
    }

    pub(super) fn pause(
        &mut self,
        lane: usize,
        consumer: &BaseConsumer<PollContext>,
        shared: &ServiceShared,
    ) {
        self.lane_state[lane].paused = true;
        let tpl = self.partitions_of(lane);
        if let Err(e) = consumer.pause(&tpl) {
            tracing::warn!(service = %shared.name, error = %e, "could not pause partitions");
        }
        tracing::debug!(service = %shared.name, topic = %self.lanes[lane].topic, "buffer full: partitions paused");
        self.publish_paused(shared);
        // Last, so whoever sees the type paused also sees its partitions
        // listed as paused in the service's status.
        self.lanes[lane]
            .buffer
            .paused
            .store(true, Ordering::Release);
    }

    /// How long the next poll may wait for a record: short while a paused
    /// lane (or a held-back partition of a pool) is draining, so that it
    /// resumes near its low mark rather than after the lane ran dry; the
    /// usual wait when nothing paused makes progress (a stalled handler
    /// does not make the poll thread spin).
    pub(super) fn poll_timeout(&mut self) -> Duration {
        let mut draining = false;
        for (lane, state) in self.lanes.iter().zip(&mut self.lane_state) {
            if state.paused || !state.held_back.is_empty() {
                let finished = lane.buffer.finished_count();
                draining |= finished != state.drain_seen;
                state.drain_seen = finished;
            }
        }
        if draining {
            DRAIN_POLL_TIMEOUT
        } else {
            POLL_TIMEOUT
        }
    }

    /// Records discarded by a drop mode: counted, and their offsets finished.
    pub(super) fn dropped(&mut self, lane: usize, records: &[Record]) {
        for r in records {
            if r.rejection.is_none() {
                if let Some((_, stats)) = self.lanes[lane].types.get(r.type_index) {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.tracker.finished((lane, r.partition), r.offset);
        }
        self.lanes[lane].buffer.count_drops(records.len() as u64);
    }

    /// Whether no lane can take records now: each is paused, holding
    /// records, or full under `Backpressure::Apply`.
    pub(super) fn all_blocked(&self) -> bool {
        !self.lanes.is_empty()
            && self
                .lanes
                .iter()
                .zip(&self.lane_state)
                .all(|(l, s)| s.paused || !s.overflow.is_empty() || l.buffer.is_full())
    }

    /// Pauses the partitions of lanes holding records they have no room
    /// for, so the other lanes of the service keep flowing; when every lane
    /// is blocked the poll thread waits instead, unless a lane holds more
    /// than its capacity again (a stalled handler).
    pub(super) fn pause_blocked(
        &mut self,
        consumer: &BaseConsumer<PollContext>,
        shared: &ServiceShared,
    ) {
        let all_blocked = self.all_blocked();
        for lane in 0..self.lanes.len() {
            let state = &self.lane_state[lane];
            let held = state.overflow.len();
            if !state.paused
                && held > 0
                && (!all_blocked || held > self.lanes[lane].buffer.capacity())
            {
                self.pause(lane, consumer, shared);
            }
        }
    }

    /// Moves held records into lanes with room; resumes a paused lane once
    /// it holds nothing and has drained to its low mark.
    pub(super) fn refill(&mut self, consumer: &BaseConsumer<PollContext>, shared: &ServiceShared) {
        let mut changed = false;
        for i in 0..self.lanes.len() {
            let buffer = Arc::clone(&self.lanes[i].buffer);
            let paused = self.lane_state[i].paused;
            if self.lane_state[i].overflow.is_empty() && !paused {
                continue;
            }
            // A paused lane refills only below its low mark, so it does not
            // pause and resume for every few records.
            if paused && buffer.len() > buffer.low_mark() {
                continue;
            }
            let mut held = std::mem::take(&mut self.lane_state[i].overflow);
            let fits = buffer.room().min(held.len());
            self.push(i, held.drain(..fits));
            self.lane_state[i].overflow = held;
            if paused && self.lane_state[i].overflow.is_empty() {
                self.lane_state[i].paused = false;
                buffer.paused.store(false, Ordering::Relaxed);
                changed = true;
                let mut tpl = TopicPartitionList::new();
                for (t, p) in &self.assignment {
                    let state = &self.lane_state[i];
                    if *t == self.lanes[i].topic
                        && !state.held_back.contains(p)
                        && !state.hold.holds(*p)
                    {
                        tpl.add_partition(t, *p);
                    }
                }
                if let Err(e) = consumer.resume(&tpl) {
                    tracing::warn!(service = %shared.name, error = %e, "could not resume partitions");
                }
            }
        }
        if changed {
            self.publish_paused(shared);
        }
    }
}

impl LoopState {
    /// Worker pools: pauses a partition once `capacity` of its records
    /// finished behind an unfinished one (a key in retry, a slow record), so
    /// what waits to be committed stays bounded; resumes it at half. The
    /// lane's other partitions go on.
    pub(super) fn hold_back(
        &mut self,
        consumer: &BaseConsumer<PollContext>,
        shared: &ServiceShared,
    ) {
        let mut changed = false;
        for i in 0..self.lanes.len() {
            let buffer = &self.lanes[i].buffer;
            if !buffer.is_parallel() {
                continue;
            }
            let bound = buffer.capacity();
            let topic = Arc::clone(&self.lanes[i].topic);
            let mut pause = TopicPartitionList::new();
            let mut resume = TopicPartitionList::new();
            for (t, p) in &self.assignment {
                if *t != topic {
                    continue;
                }
                let span = self
                    .tracker
                    .partition_mut((i, *p))
                    .map_or(0, |o| o.finished_behind());
                let held = self.lane_state[i].held_back.contains(p);
                if !held && span >= bound {
                    self.lane_state[i].held_back.push(*p);
                    pause.add_partition(t, *p);
                } else if held && span <= bound / 2 {
                    self.lane_state[i].held_back.retain(|q| q != p);
                    // A lane paused as a whole resumes it with the lane;
                    // one an operator holds, on the operator's resume.
                    if !self.lane_state[i].paused && !self.lane_state[i].hold.holds(*p) {
                        resume.add_partition(t, *p);
                    }
                }
            }
            if pause.count() > 0 {
                changed = true;
                tracing::debug!(service = %shared.name, %topic, partitions = ?pause, "records wait for an unfinished one: partition paused");
                if let Err(e) = consumer.pause(&pause) {
                    tracing::warn!(service = %shared.name, error = %e, "could not pause partitions");
                }
            }
            if resume.count() > 0 {
                changed = true;
                if let Err(e) = consumer.resume(&resume) {
                    tracing::warn!(service = %shared.name, error = %e, "could not resume partitions");
                }
            }
        }
        if changed {
            self.publish_paused(shared);
        }
    }
}
