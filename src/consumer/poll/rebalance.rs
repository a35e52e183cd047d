//! The consumer's context: librdkafka's logs, statistics (lag, broker
//! reach) and the rebalance callbacks, which hand revoked partitions over
//! with their finished work committed.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, TopicPartitionList};

use super::progress::commit_sync;
use super::{LoopState, ServiceShared};
use crate::client::TracingContext;
use crate::consumer::sync::lock;

/// The consumer's context: tracing, and rebalance handling that commits
/// finished work before partitions move.
pub(super) struct PollContext {
    pub(super) tracing: TracingContext,
    pub(super) shared: Arc<ServiceShared>,
    pub(super) state: Arc<Mutex<LoopState>>,
    /// Longest a revocation waits for handlers of the revoked partitions.
    pub(super) revoke_timeout: Duration,
}

impl ClientContext for PollContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.tracing.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.shared.reach.down();
        }
        self.tracing.error(error, reason);
    }

    /// Consumer lag per partition, from librdkafka's statistics (every
    /// `statistics.interval.ms`): the partition's high watermark minus the
    /// offset last stored for commit, so records fetched but not finished
    /// count as lag.
    fn stats(&self, statistics: rdkafka::Statistics) {
        if statistics.brokers.values().any(|b| b.state == "UP") {
            self.shared.reach.up();
        }
        // Only partitions this member owns: statistics gathered before a
        // revoke may be served after it, and a member's stale lag for a
        // partition that moved would outlive the move on dashboards.
        let state = lock(&self.state);
        let known = |v: i64| (v >= 0).then_some(v);
        let mut positions = Vec::new();
        for (name, topic) in &statistics.topics {
            for (&partition, p) in &topic.partitions {
                // -1: librdkafka's internal partition.
                if partition < 0
                    || !state
                        .assignment
                        .iter()
                        .any(|(t, q)| *q == partition && **t == **name)
                {
                    continue;
                }
                positions.push(crate::registry::PartitionStatus {
                    topic: name.clone(),
                    partition,
                    committed: known(p.committed_offset),
                    end: known(p.hi_offset),
                    lag: known(p.consumer_lag_stored),
                });
                // -1: not known yet.
                if p.consumer_lag_stored < 0 {
                    continue;
                }
                crate::telemetry::consumer_lag(name, partition, &self.shared.group_id)
                    .set(p.consumer_lag_stored as f64);
            }
        }
        drop(state);
        positions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        *lock(&self.shared.positions) = positions;
    }
}

impl ConsumerContext for PollContext {
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        super::close::Commits::record(&self.shared.commits, &result, offsets);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        lock(&self.state).rebalances += 1;
        if let Rebalance::Assign(tpl) = rebalance {
            // Before the assignment starts, not after: librdkafka discards
            // a pause or resume whose op it queues while the assignment's
            // fetch start is being queued, or the fetch start itself, as
            // outdated (librdkafka issue #5591). A lost resume left a
            // partition that was paused when it moved away paused for good
            // (`partitions_paused_when_they_moved_away_all_flow_when_they_come_back`).
            // Nothing else happens to these partitions yet.
            let mut state = lock(&self.state);
            state.unreached = state.take_lane_pause_state(consumer, tpl, &self.shared);
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            if consumer.assignment_lost() {
                // Not a handover: the group went on without this member, so
                // it is not a member until it joins again (not ready). Its
                // transactions get no group metadata meanwhile: librdkafka
                // resets it (generation -1, no member id), which the
                // coordinator would accept for any partition.
                self.shared.joined.store(false, Ordering::Release);
                self.shared.assignments_lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    service = %self.shared.name,
                    group = %self.shared.group_id,
                    partitions = tpl.count(),
                    "assignment lost: this member left its group (session or poll interval exceeded, or fenced); rejoining"
                );
            }
            // The generation the revocation belongs to (librdkafka takes it
            // from the JoinGroup answer, before this callback): a lane
            // completing its transaction now commits in it.
            self.shared.refresh_group_metadata(consumer);
            let mut state = lock(&self.state);
            state.revoke(consumer, tpl, &self.shared, self.revoke_timeout);
            tracing::info!(service = %self.shared.name, revoked = tpl.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        lock(&self.state).rebalances += 1;
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.shared.joined.store(true, Ordering::Release);
                self.shared.reach.up();
                let mut state = lock(&self.state);
                for e in tpl.elements() {
                    if let Some(&lane) = state.routes.get(e.topic()) {
                        let topic = Arc::clone(&state.lanes[lane].topic);
                        state.assignment.push((topic, e.partition()));
                    }
                }
                // Partitions librdkafka did not know before the assignment
                // (it had no metadata of them yet) take their state now.
                let unreached = std::mem::take(&mut state.unreached);
                if !unreached.is_empty() {
                    let mut late = TopicPartitionList::new();
                    for (topic, partition) in &unreached {
                        late.add_partition(topic, *partition);
                    }
                    let _ = state.take_lane_pause_state(consumer, &late, &self.shared);
                }
                state.publish_paused(&self.shared);
                tracing::info!(service = %self.shared.name, assigned = tpl.count(), "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(service = %self.shared.name, error = %e, "rebalance error")
            }
        }
        // A new generation: transactions commit offsets with it.
        self.shared.refresh_group_metadata(consumer);
    }
}

impl LoopState {
    /// Newly assigned partitions take their lane's pause state: paused if
    /// the lane is, resumed otherwise. librdkafka keeps a partition's pause
    /// flag across unassign and assign, and only a resume clears it, so a
    /// partition paused when it moved away would never be fetched again.
    /// Returns the partitions librdkafka does not know yet (no metadata):
    /// their state could not be set.
    fn take_lane_pause_state(
        &self,
        consumer: &BaseConsumer<PollContext>,
        tpl: &TopicPartitionList,
        shared: &ServiceShared,
    ) -> Vec<(String, i32)> {
        let mut unreached = Vec::new();
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for e in tpl.elements() {
            if let Some(&lane) = self.routes.get(e.topic()) {
                let state = &self.lane_state[lane];
                let to = if state.paused || state.hold.holds(e.partition()) {
                    &mut pause
                } else {
                    &mut resume
                };
                to.add_partition(e.topic(), e.partition());
            }
        }
        for (tpl, pausing) in [(pause, true), (resume, false)] {
            if tpl.count() == 0 {
                continue;
            }
            let result = if pausing {
                consumer.pause(&tpl)
            } else {
                consumer.resume(&tpl)
            };
            if let Err(e) = result {
                tracing::warn!(service = %shared.name, error = %e, pausing, "could not set the pause state of new partitions");
            }
            // librdkafka reports an unknown partition on the list's element.
            for e in tpl.elements() {
                if e.error().is_err() {
                    unreached.push((e.topic().to_owned(), e.partition()));
                }
            }
        }
        unreached
    }

    /// Hands partitions over to their next owner: no record of them is
    /// started here any more, the one a worker is handling may finish
    /// (waiting up to `timeout`), and everything finished is committed
    /// before the rebalance goes on, so the next owner starts right after
    /// the last record handled here and nothing is handled twice.
    pub(super) fn revoke(
        &mut self,
        consumer: &BaseConsumer<PollContext>,
        tpl: &TopicPartitionList,
        shared: &ServiceShared,
        timeout: Duration,
    ) {
        self.absorb_returned();
        let mut by_lane: Vec<Vec<i32>> = vec![Vec::new(); self.lanes.len()];
        for e in tpl.elements() {
            if let Some(&lane) = self.routes.get(e.topic()) {
                by_lane[lane].push(e.partition());
            }
            self.assignment
                .retain(|(t, p)| !(&**t == e.topic() && *p == e.partition()));
        }
        self.fence(&by_lane, shared, timeout);
        self.store_offsets(consumer);
        // Leaving to close: the final commit is done (or failed) already.
        if !shared.closing.load(Ordering::Acquire) {
            commit_sync(consumer, &shared.name);
        }
        for (lane, partitions) in by_lane.iter().enumerate() {
            for &p in partitions {
                self.tracker.forget((lane, p));
                self.stored.remove(&(self.lanes[lane].topic.to_string(), p));
                super::close::Commits::forget(&shared.commits, &self.lanes[lane].topic, p);
                // Its lag is its next owner's to say (each member exports
                // only what it owns).
                crate::telemetry::consumer_lag(&self.lanes[lane].topic, p, &shared.group_id)
                    .set(0.0);
            }
            if !partitions.is_empty() {
                let state = &mut self.lane_state[lane];
                state.held_back.retain(|p| !partitions.contains(p));
                // Its positions are its next owner's to show.
                let topic = &*self.lanes[lane].topic;
                lock(&shared.positions)
                    .retain(|s| !(s.topic == topic && partitions.contains(&s.partition)));
            }
        }
        self.publish_paused(shared);
    }

    /// Ends this member's work on `by_lane`'s partitions (per lane): no
    /// record of them is started any more, what waits here or in a lane's
    /// queue goes, the one a worker is handling may finish (waiting up to
    /// `timeout`), and what the workers finished is taken back into the
    /// offset tracker. A record still held at the deadline is marked late:
    /// never committed here, whenever it comes back. For a revoke and a
    /// seek alike.
    pub(super) fn fence(
        &mut self,
        by_lane: &[Vec<i32>],
        shared: &ServiceShared,
        timeout: Duration,
    ) {
        // Stop handing them over: what waits here or in a lane's queue goes.
        let mut announced = Vec::new();
        for (lane, partitions) in by_lane.iter().enumerate() {
            if partitions.is_empty() {
                continue;
            }
            let s = &mut self.lane_state[lane];
            s.overflow.retain(|r| !partitions.contains(&r.partition));
            s.parked.retain(|r| !partitions.contains(&r.partition));
            s.pending.retain(|r| !partitions.contains(&r.partition));
            let (n, purged) = self.lanes[lane].buffer.revoke(partitions, s.last_seq);
            drop(purged);
            announced.push((lane, n));
        }
        // Wait for each worker to let go of the ones it holds: having
        // applied the revocation, it gave back every record it finished.
        let deadline = Instant::now() + timeout;
        let mut settled: Vec<(usize, bool)> =
            announced.iter().map(|&(lane, _)| (lane, false)).collect();
        loop {
            for ((lane, applied), (_, n)) in settled.iter_mut().zip(&announced) {
                *applied = *applied || self.lanes[*lane].buffer.applied(*n);
            }
            if settled.iter().all(|&(_, applied)| applied) || shared.must_stop_now() {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(service = %shared.name, ?timeout, "a handler of a revoked partition is still running; its record will be handled again by the next owner");
                for ((lane, applied), (_, n)) in settled.iter().zip(&announced) {
                    if !applied {
                        self.lanes[*lane].buffer.give_up(*n);
                    }
                }
                break;
            }
            // Serving a rebalance is not a hung loop (health).
            shared.mark_polled();
            std::thread::sleep(Duration::from_millis(1));
        }
        // What the workers gave back of the revoked partitions was handled
        // here: committed now, so the next owner starts after it.
        self.absorb_returned();
        // A record a worker still holds (its handler overran the wait) is
        // not committed here, whenever it comes back.
        for (lane, applied) in settled {
            if applied {
                continue;
            }
            let last = self.lane_state[lane].last_seq;
            let late = &mut self.lane_state[lane].late;
            for &p in &by_lane[lane] {
                late.retain(|&(q, _)| q != p);
                late.push((p, last));
            }
        }
    }
}
