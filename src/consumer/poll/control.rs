//! Operator commands applied by the poll thread between two polls: pause
//! and resume held across rebalances, and seek with the records in flight
//! fenced as on a revoke. Being on the poll thread, a command never
//! interleaves with a rebalance callback (they run inside `poll`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::close::Commits;
use super::{LoopState, PollContext, ServiceShared};
use crate::admin::{Command, ControlReport, Outcome, SeekTo};
use crate::consumer::context::Record;

/// Longest a seek waits for the broker to resolve a position (watermarks,
/// offsets for a timestamp): the poll thread serves nothing meanwhile.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A command for one lane of a poll service, with where its answer goes.
pub(crate) struct Request {
    pub(crate) topic: String,
    pub(crate) partitions: Option<Vec<i32>>,
    pub(crate) command: Command,
    pub(crate) reply: tokio::sync::oneshot::Sender<ControlReport>,
}

/// What an operator holds paused on a lane: all of it, or some partitions
/// (owned here or not: a held partition that comes here stays paused).
#[derive(Default, Debug)]
pub(super) struct Hold {
    all: bool,
    partitions: BTreeSet<i32>,
}

impl Hold {
    pub(super) fn holds(&self, partition: i32) -> bool {
        self.all || self.partitions.contains(&partition)
    }

    pub(super) fn is_active(&self) -> bool {
        self.all || !self.partitions.is_empty()
    }

    /// `records` split into those of held partitions and the others, each
    /// in its order.
    pub(super) fn split(
        &self,
        records: impl Iterator<Item = Record>,
    ) -> (Vec<Record>, Vec<Record>) {
        records.partition(|r| self.holds(r.partition))
    }
}

impl LoopState {
    /// Applies every command waiting in `rx`; a stopping service refuses
    /// them.
    pub(super) fn apply_controls(
        &mut self,
        rx: &std::sync::mpsc::Receiver<Request>,
        consumer: &BaseConsumer<PollContext>,
        shared: &ServiceShared,
        revoke_timeout: Duration,
    ) {
        while let Ok(request) = rx.try_recv() {
            let Some(lane) = self.lanes.iter().position(|l| *l.topic == *request.topic) else {
                let _ = request.reply.send(ControlReport {
                    service: shared.name.clone(),
                    group: shared.group_id.clone(),
                    topic: request.topic,
                    types: Vec::new(),
                    outcome: Outcome::Refused {
                        reason: "this poll service does not read the topic".into(),
                    },
                });
                continue;
            };
            let partitions = request.partitions.as_deref();
            let outcome = if shared.is_stopping() {
                Outcome::Refused {
                    reason: "the poll service is stopping".into(),
                }
            } else {
                match request.command {
                    Command::Pause => self.hold(lane, partitions, consumer, shared),
                    Command::Resume => self.release_hold(lane, partitions, consumer, shared),
                    Command::Seek(to) => {
                        self.seek(lane, partitions, to, consumer, shared, revoke_timeout)
                    }
                }
            };
            tracing::info!(
                service = %shared.name,
                group = %shared.group_id,
                topic = %request.topic,
                command = request.command.name(),
                partitions = ?partitions,
                outcome = ?outcome,
                "operator command applied"
            );
            let lane = &self.lanes[lane];
            let _ = request.reply.send(ControlReport {
                service: shared.name.clone(),
                group: shared.group_id.clone(),
                topic: lane.topic.to_string(),
                types: lane.types.iter().map(|(d, _)| d.clone()).collect(),
                outcome,
            });
        }
    }

    /// Owned partitions of lane `lane` that `pick` selects.
    fn owned(&self, lane: usize, pick: impl Fn(i32) -> bool) -> Vec<i32> {
        let topic = &self.lanes[lane].topic;
        let mut owned: Vec<i32> = self
            .assignment
            .iter()
            .filter(|(t, p)| t == topic && pick(*p))
            .map(|(_, p)| *p)
            .collect();
        owned.sort_unstable();
        owned
    }

    fn tpl(&self, lane: usize, partitions: &[i32]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.lanes[lane].topic, *p);
        }
        tpl
    }

    /// Holds the lane (or some partitions) paused: Kafka stops fetching
    /// them, and records of them not yet handed to the worker wait here
    /// (the ones in the lane's queue are handled).
    fn hold(
        &mut self,
        lane: usize,
        partitions: Option<&[i32]>,
        consumer: &BaseConsumer<PollContext>,
        shared: &ServiceShared,
    ) -> Outcome {
        let state = &mut self.lane_state[lane];
        match partitions {
            None => {
                state.hold.all = true;
                state.hold.partitions.clear();
            }
            Some(ps) if !state.hold.all => state.hold.partitions.extend(ps),
            Some(_) => {}
        }
        let (held, free) = state.hold.split(state.overflow.drain(..));
        state.parked.extend(held);
        state.overflow = free.into();
        let owned = {
            let hold = &self.lane_state[lane].hold;
            self.owned(lane, |p| hold.holds(p))
        };
        if !owned.is_empty() {
            if let Err(e) = consumer.pause(&self.tpl(lane, &owned)) {
                tracing::warn!(service = %shared.name, error = %e, "could not pause partitions");
            }
        }
        let held = self.lane_state[lane].hold.is_active();
        self.lanes[lane].buffer.held.store(held, Ordering::Release);
        self.publish_paused(shared);
        Outcome::Applied {
            not_applied: not_owned(partitions, &owned),
            partitions: owned,
            positions: Vec::new(),
            held,
            uncommitted: None,
        }
    }

    /// Lets held partitions flow again: their waiting records go first,
    /// then Kafka fetches them again (unless backpressure holds them).
    fn release_hold(
        &mut self,
        lane: usize,
        partitions: Option<&[i32]>,
        consumer: &BaseConsumer<PollContext>,
        shared: &ServiceShared,
    ) -> Outcome {
        let before: Vec<i32> = {
            let hold = &self.lane_state[lane].hold;
            self.owned(lane, |p| hold.holds(p))
        };
        let state = &mut self.lane_state[lane];
        match partitions {
            None => state.hold = Hold::default(),
            Some(_) if state.hold.all => {
                return Outcome::Refused {
                    reason: "the whole lane is paused: resume it without naming partitions".into(),
                };
            }
            Some(ps) => {
                for p in ps {
                    state.hold.partitions.remove(p);
                }
            }
        }
        // Released records are older than anything held back for room.
        let (still, released) = state.hold.split(state.parked.drain(..));
        state.parked = still.into();
        for r in released.into_iter().rev() {
            state.overflow.push_front(r);
        }
        let active = state.hold.is_active();
        let resumed: Vec<i32> = before
            .into_iter()
            .filter(|p| !self.lane_state[lane].hold.holds(*p))
            .collect();
        // A lane paused for room, or a partition held back in a pool,
        // resumes by its own rule.
        let state = &self.lane_state[lane];
        let flowing: Vec<i32> = if state.paused {
            Vec::new()
        } else {
            resumed
                .iter()
                .copied()
                .filter(|p| !state.held_back.contains(p))
                .collect()
        };
        if !flowing.is_empty() {
            if let Err(e) = consumer.resume(&self.tpl(lane, &flowing)) {
                tracing::warn!(service = %shared.name, error = %e, "could not resume partitions");
            }
        }
        self.lanes[lane]
            .buffer
            .held
            .store(active, Ordering::Release);
        self.publish_paused(shared);
        Outcome::Applied {
            not_applied: not_owned(partitions, &resumed),
            partitions: resumed,
            positions: Vec::new(),
            held: active,
            uncommitted: None,
        }
    }

    /// Moves the group's position on owned partitions: records of them in
    /// flight are fenced as on a revoke (a handler running may finish; its
    /// offset is not committed), the consumer seeks, and the new position
    /// is stored and committed, so a rebalance right after loses nothing.
    fn seek(
        &mut self,
        lane: usize,
        partitions: Option<&[i32]>,
        to: SeekTo,
        consumer: &BaseConsumer<PollContext>,
        shared: &ServiceShared,
        timeout: Duration,
    ) -> Outcome {
        if self.lanes[lane].transactional {
            return Outcome::Refused {
                reason: "the lane commits its offsets in Kafka transactions (exactly once); \
                         stop it and reset the group's offsets instead"
                    .into(),
            };
        }
        let owned = self.owned(lane, |p| partitions.is_none_or(|ps| ps.contains(&p)));
        if owned.is_empty() {
            return Outcome::NotOwned {
                partitions: partitions.map(<[i32]>::to_vec).unwrap_or_default(),
            };
        }
        let topic = Arc::clone(&self.lanes[lane].topic);
        let positions = match resolve(consumer, &topic, &owned, to, shared) {
            Ok(p) => p,
            Err(reason) => return Outcome::Refused { reason },
        };
        let mut by_lane = vec![Vec::new(); self.lanes.len()];
        by_lane[lane] = owned.clone();
        self.fence(&by_lane, shared, timeout);
        let mut tpl = TopicPartitionList::new();
        let mut moved = Vec::with_capacity(positions.len());
        let mut not_applied = not_owned(partitions, &owned);
        for &(p, offset) in &positions {
            // Their finished, unstored records belong to the old position;
            // so do the fenced ones, which it must fetch again if it stays.
            self.tracker.forget((lane, p));
            Commits::forget(&shared.commits, &topic, p);
            if let Err(e) = consumer.seek(&topic, p, Offset::Offset(offset), RESOLVE_TIMEOUT) {
                tracing::warn!(service = %shared.name, %topic, partition = p, error = %e, "seek failed; the partition goes back to its last stored position");
                self.restart(consumer, &topic, p, shared);
                not_applied.push(p);
                continue;
            }
            let _ = tpl.add_partition_offset(&topic, p, Offset::Offset(offset));
            self.note_stored(&topic, p, offset);
            moved.push((p, offset));
        }
        let changed: Vec<i32> = moved.iter().map(|&(p, _)| p).collect();
        let mut uncommitted = None;
        if tpl.count() > 0 {
            // Stored as well as committed: the auto-commit would otherwise
            // send the old stored offset again, and the commit on a revoke
            // sends the new one should this commit be refused.
            let stored = consumer.store_offsets(&tpl);
            if let Err(e) = &stored {
                tracing::warn!(service = %shared.name, error = %e, "could not store the positions sought");
            }
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(service = %shared.name, positions = ?moved, error = %e, "the group did not take the commit of the positions sought");
                let after = if stored.is_ok() {
                    "they stay stored and go with the next commit"
                } else {
                    "nor could they be stored: a member they move to starts from the last commit"
                };
                uncommitted = Some(format!(
                    "the group did not take the commit of the new positions ({e}); {after}; \
                     seek again once the group has settled to be sure"
                ));
            }
        }
        not_applied.sort_unstable();
        let held = self.lane_state[lane].hold.is_active();
        Outcome::Applied {
            partitions: changed,
            positions: moved,
            not_applied,
            held,
            uncommitted,
        }
    }

    /// After a failed seek: the fenced records of `partition` are fetched
    /// again from its last stored position (or the group's commit), so
    /// none is skipped (at the cost of handling finished ones again).
    fn restart(
        &mut self,
        consumer: &BaseConsumer<PollContext>,
        topic: &str,
        partition: i32,
        shared: &ServiceShared,
    ) {
        let stored = self.stored.get(&(topic.to_owned(), partition)).copied();
        let from = stored.map(Offset::Offset).or_else(|| {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, partition);
            let committed = consumer.committed_offsets(tpl, RESOLVE_TIMEOUT).ok()?;
            let offset = committed.find_partition(topic, partition)?.offset();
            matches!(offset, Offset::Offset(_)).then_some(offset)
        });
        let done =
            from.is_some_and(|o| consumer.seek(topic, partition, o, RESOLVE_TIMEOUT).is_ok());
        if !done {
            tracing::error!(service = %shared.name, %topic, partition, "a partition could not be moved back after a failed seek: it stays stalled until the next rebalance");
        }
    }
}

/// The partitions asked for that this member does not own.
fn not_owned(asked: Option<&[i32]>, owned: &[i32]) -> Vec<i32> {
    asked
        .unwrap_or_default()
        .iter()
        .copied()
        .filter(|p| !owned.contains(p))
        .collect()
}

/// The offset each partition moves to.
fn resolve(
    consumer: &BaseConsumer<PollContext>,
    topic: &str,
    partitions: &[i32],
    to: SeekTo,
    shared: &ServiceShared,
) -> Result<Vec<(i32, i64)>, String> {
    let mut bounds = Vec::with_capacity(partitions.len());
    for &p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, RESOLVE_TIMEOUT)
            .map_err(|e| format!("could not read the bounds of partition {p}: {e}"))?;
        shared.mark_polled();
        bounds.push((p, low, high));
    }
    let by_time = match to {
        SeekTo::Timestamp(ms) => {
            let mut tpl = TopicPartitionList::new();
            for &p in partitions {
                let _ = tpl.add_partition_offset(topic, p, Offset::Offset(ms));
            }
            let found = consumer
                .offsets_for_times(tpl, RESOLVE_TIMEOUT)
                .map_err(|e| format!("could not look up offsets for time {ms}: {e}"))?;
            shared.mark_polled();
            Some(found)
        }
        _ => None,
    };
    bounds
        .into_iter()
        .map(|(p, low, high)| {
            let offset = match to {
                SeekTo::Beginning => low,
                SeekTo::End => high,
                SeekTo::Offset(o) => o.clamp(low, high),
                SeekTo::Timestamp(_) => {
                    match by_time
                        .as_ref()
                        .and_then(|t| t.find_partition(topic, p))
                        .map(|e| e.offset())
                    {
                        Some(Offset::Offset(o)) => o.clamp(low, high),
                        // No record at or after the time.
                        _ => high,
                    }
                }
            };
            Ok((p, offset))
        })
        .collect()
}
