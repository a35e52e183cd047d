//! A poll service: one Kafka consumer on one named OS thread. It routes each
//! record by topic and `ce_type` header into its type's buffer, applies
//! backpressure by pausing partitions while it keeps polling, and stores
//! offsets only once their messages are finished.
//!
//! All mutable loop state lives in [`LoopState`] behind a mutex that only the
//! poll thread takes (the rebalance callbacks run on it too, inside `poll`),
//! so it is never contended.

use std::collections::{HashMap, VecDeque};
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use tokio_util::sync::CancellationToken;

use crate::client::ClientGuard;
use crate::client::{Reach, TracingContext};
use crate::consumer::Backpressure;
use crate::consumer::buffer::{LaneBuffer, Room, TypeStats};
use crate::consumer::context::{Polled, Record, Rejection};
use crate::consumer::dead_letter::Sent;
use crate::consumer::offsets::OffsetTracker;
use crate::consumer::sync::lock;
use crate::headers;
use crate::registry::{ServiceProbe, ServiceState, ServiceStatus};
use crate::telemetry::{ServiceMetrics, TypeCounters};

impl ServiceProbe for ServiceShared {
    fn name(&self) -> &str {
        &self.name
    }

    fn status(&self) -> ServiceStatus {
        ServiceStatus {
            name: self.name.clone(),
            group_id: self.group_id.clone(),
            dedicated: self.dedicated,
            state: self.state(),
            assigned_partitions: lock(&self.assigned).clone(),
            paused_partitions: lock(&self.paused).clone(),
            types: Vec::new(),
            since_last_poll: self.since_last_poll(),
            joined: self.joined.load(Ordering::Acquire),
            assignments_lost: self.assignments_lost.load(Ordering::Relaxed),
            brokers_down_for: self.brokers_down_for(),
            tracked_entries: self.tracked.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            dead_letters_refused: self.dead_letters_refused.load(Ordering::Relaxed),
            settings: self.settings.get().cloned().unwrap_or_default(),
            stalled_for: None,
            stall_limit: self
                .stall_limit
                .get()
                .copied()
                .unwrap_or(Duration::from_secs(120)),
        }
    }

    fn start(&self) {
        ServiceShared::start(self);
    }
}

const RUN: u8 = 0;
const DRAIN: u8 = 1;
const STOP_NOW: u8 = 2;

/// What the poll thread, the workers and the registry share.
pub(crate) struct ServiceShared {
    pub(crate) name: String,
    pub(crate) group_id: String,
    pub(crate) dedicated: bool,
    pub(crate) state: Mutex<ServiceState>,
    pub(crate) paused: Mutex<Vec<(String, i32)>>,
    pub(crate) assigned: Mutex<Vec<(String, i32)>>,
    stop: AtomicU8,
    started: (Mutex<bool>, Condvar),
    pub(crate) workers_active: AtomicUsize,
    /// Where the poll thread waits while every lane is full.
    pub(crate) room: Arc<Room>,
    /// Milliseconds since `epoch` of the last completed poll, for health.
    last_poll_ms: AtomicU64,
    epoch: Instant,
    /// Cancelled when the service begins to stop; handlers see it through
    /// their context.
    pub(crate) stopping: CancellationToken,
    /// Entries of the offset bookkeeping (lane logs and offset runs).
    pub(crate) tracked: AtomicUsize,
    /// Records no consumed type could take (tombstones, missing or unknown
    /// `ce_type`), dead-lettered or given up on.
    pub(crate) rejected: AtomicU64,
    /// Dead letters the broker refused for good, over all types.
    pub(crate) dead_letters_refused: AtomicU64,
    /// Its consumer's client configuration, secrets redacted.
    pub(crate) settings: std::sync::OnceLock<Vec<(String, String)>>,
    /// A lane stalled longer than this makes the service unhealthy.
    pub(crate) stall_limit: std::sync::OnceLock<Duration>,
    /// Whether the consumer has joined its group (had an assignment, even
    /// an empty one).
    pub(crate) joined: AtomicBool,
    /// Times the consumer lost its assignment without a rebalance handing
    /// it over (it was no longer a member: session or poll interval
    /// exceeded, or fenced by the coordinator).
    pub(crate) assignments_lost: AtomicU64,
    /// Whether its consumer reaches a broker.
    reach: Reach,
}

impl ServiceShared {
    pub(crate) fn new(name: String, group_id: String, dedicated: bool, start: bool) -> Arc<Self> {
        Arc::new(ServiceShared {
            name,
            group_id,
            dedicated,
            state: Mutex::new(if start {
                ServiceState::Running
            } else {
                ServiceState::Waiting
            }),
            paused: Mutex::new(Vec::new()),
            assigned: Mutex::new(Vec::new()),
            stop: AtomicU8::new(RUN),
            started: (Mutex::new(start), Condvar::new()),
            workers_active: AtomicUsize::new(0),
            room: Arc::new(Room::default()),
            last_poll_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            stopping: CancellationToken::new(),
            tracked: AtomicUsize::new(0),
            rejected: AtomicU64::new(0),
            dead_letters_refused: AtomicU64::new(0),
            settings: std::sync::OnceLock::new(),
            stall_limit: std::sync::OnceLock::new(),
            joined: AtomicBool::new(false),
            assignments_lost: AtomicU64::new(0),
            reach: Reach::default(),
        })
    }

    /// How long no broker has been reachable, if none is.
    pub(crate) fn brokers_down_for(&self) -> Option<Duration> {
        self.reach.down_for()
    }

    pub(crate) fn state(&self) -> ServiceState {
        lock(&self.state).clone()
    }

    fn set_state(&self, state: ServiceState) {
        *lock(&self.state) = state;
    }

    /// Lets a `start_immediately(false)` service begin polling.
    pub(crate) fn start(&self) {
        let (flag, cv) = &self.started;
        *lock(flag) = true;
        cv.notify_all();
        let mut state = lock(&self.state);
        if *state == ServiceState::Waiting {
            *state = ServiceState::Running;
        }
    }

    /// Stop fetching; workers drain their buffers, then the thread commits and closes.
    pub(crate) fn drain(&self) {
        let _ = self
            .stop
            .compare_exchange(RUN, DRAIN, Ordering::SeqCst, Ordering::SeqCst);
        self.stopping.cancel();
        self.wake_waiting();
    }

    /// Stop at once, without waiting for workers.
    pub(crate) fn stop_now(&self) {
        self.stop.store(STOP_NOW, Ordering::SeqCst);
        self.stopping.cancel();
        self.wake_waiting();
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst) != RUN
    }

    /// Whether workers must stop after the record in hand: set with every
    /// cancellation of the runtime's workers, and when the poll loop ends.
    /// One relaxed load, cheap enough to ask before every record (a
    /// cancellation token's check takes a lock).
    pub(crate) fn must_stop_now(&self) -> bool {
        self.stop.load(Ordering::Relaxed) == STOP_NOW
    }

    /// Counts a rejected record's dead letter; whether the record is done
    /// with (sent, or given up on).
    pub(crate) fn count_rejected(&self, sent: Sent) -> bool {
        match sent {
            Sent::Published => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                true
            }
            Sent::Refused => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                self.dead_letters_refused.fetch_add(1, Ordering::Relaxed);
                true
            }
            Sent::Cancelled => false,
        }
    }

    fn wake_waiting(&self) {
        let (_, cv) = &self.started;
        cv.notify_all();
        self.room.wake();
    }

    /// How long since the poll loop last completed a poll; `None` if it never polled.
    pub(crate) fn since_last_poll(&self) -> Option<Duration> {
        let last = self.last_poll_ms.load(Ordering::Relaxed);
        (last > 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last))
        })
    }

    fn mark_polled(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_poll_ms.store(ms.max(1), Ordering::Relaxed);
    }
}

/// One topic of a poll service: its buffer and the types consumed from it.
pub(crate) struct Lane {
    pub(crate) topic: Arc<str>,
    pub(crate) buffer: Arc<LaneBuffer>,
    /// Discriminators of the types this service consumes from the topic, with
    /// their counters; a record's `type_index` points in here.
    pub(crate) types: Vec<(String, Arc<TypeStats>)>,
    /// Discriminators of the model's other types on the topic that this
    /// service may skip and commit: ignored by this process, or consumed
    /// under another group.
    pub(crate) others: Vec<String>,
    /// The model's other types on the topic that nobody claimed (not
    /// consumed, ignored or given another group): dead-lettered, since a
    /// member of this group elsewhere may consume them.
    pub(crate) unclaimed: Vec<String>,
    /// The types' counters (same order as `types`) and the buffer's gauge.
    pub(crate) counters: Vec<TypeCounters>,
    pub(crate) buffered: metrics::Gauge,
}

/// Everything a poll thread needs to start.
pub(crate) struct PollPlan {
    pub(crate) shared: Arc<ServiceShared>,
    pub(crate) config: ClientConfig,
    pub(crate) lanes: Vec<Lane>,
    pub(crate) guard: ClientGuard,
    pub(crate) revoke_timeout: Duration,
}

#[derive(Default)]
struct LaneState {
    /// Records routed in the current poll round, handed over together.
    pending: Vec<Record>,
    /// Records of each type routed this round, added to the counters once.
    received: Vec<u64>,
    /// The vector traded for the lane's retired messages each round.
    retired: Vec<Polled>,
    /// Records held while the lane is paused (`Backpressure::Apply`).
    overflow: VecDeque<Record>,
    paused: bool,
    /// Sequence number given to the last record pushed into the lane.
    last_seq: u64,
    /// The worker's `done` when the poll thread last looked (see
    /// `LaneBuffer::observe_progress`).
    last_done: u64,
    /// `(seq, partition, offset)` of the records in the lane, in order: the
    /// worker's `done` sequence number maps back to offsets through it. In
    /// a lane with a worker pool, an entry whose record finished out of
    /// order has its offset set to `FINISHED` until the entries before it go.
    log: VecDeque<(u64, i32, i64)>,
    /// The pool's finished sequence numbers, traded with the lane's.
    completed: Vec<u64>,
    /// Partitions paused because too many of their records are finished
    /// but not committable behind an unfinished one (worker pools).
    held_back: Vec<i32>,
}

/// A log entry whose record finished (worker pools).
const FINISHED: i64 = -1;

/// Where the router sends a record.
enum Routed {
    /// To type `i` of the lane.
    Type(usize),
    /// A type of the model this service does not consume: finished at once.
    Skip,
    /// Cannot be handled: to the lane's worker for dead-lettering, in order.
    Reject(Rejection),
}

struct LoopState {
    /// Records of types this group does not consume, committed unhandled.
    skipped: u64,
    metrics: ServiceMetrics,
    lanes: Vec<Lane>,
    lane_state: Vec<LaneState>,
    routes: HashMap<String, usize>,
    tracker: OffsetTracker,
    assignment: Vec<(Arc<str>, i32)>,
}

/// The consumer's context: tracing, and rebalance handling that commits
/// finished work before partitions move.
struct PollContext {
    tracing: TracingContext,
    shared: Arc<ServiceShared>,
    state: Arc<Mutex<LoopState>>,
    /// Longest a revocation waits for handlers of the revoked partitions.
    revoke_timeout: Duration,
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
        for (name, topic) in &statistics.topics {
            for (&partition, p) in &topic.partitions {
                // -1: not assigned here, or not known yet.
                if partition < 0 || p.consumer_lag_stored < 0 {
                    continue;
                }
                crate::telemetry::consumer_lag(name, partition, &self.shared.group_id)
                    .set(p.consumer_lag_stored as f64);
            }
        }
    }
}

impl ConsumerContext for PollContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            if consumer.assignment_lost() {
                // Not a handover: the group went on without this member, so
                // it is not a member until it joins again (not ready).
                self.shared.joined.store(false, Ordering::Release);
                self.shared.assignments_lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    service = %self.shared.name,
                    group = %self.shared.group_id,
                    partitions = tpl.count(),
                    "assignment lost: this member left its group (session or poll interval exceeded, or fenced); rejoining"
                );
            }
            let mut state = lock(&self.state);
            state.revoke(consumer, tpl, &self.shared, self.revoke_timeout);
            tracing::info!(service = %self.shared.name, revoked = tpl.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
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
                // librdkafka keeps a partition's pause flag across unassign
                // and assign; only a resume clears it. So each newly
                // assigned partition takes its lane's state now: paused if
                // the lane is, resumed otherwise (a partition paused before
                // it moved away would never be fetched again).
                let mut pause = TopicPartitionList::new();
                let mut resume = TopicPartitionList::new();
                for e in tpl.elements() {
                    if let Some(&lane) = state.routes.get(e.topic()) {
                        let to = if state.lane_state[lane].paused {
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
                        tracing::warn!(service = %self.shared.name, error = %e, pausing, "could not set the pause state of new partitions");
                    }
                }
                state.publish_paused(&self.shared);
                tracing::info!(service = %self.shared.name, assigned = tpl.count(), "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(service = %self.shared.name, error = %e, "rebalance error")
            }
        }
    }
}

impl LoopState {
    /// Hands partitions over to their next owner: no record of them is
    /// started here any more, the one a worker is handling may finish
    /// (waiting up to `timeout`), and everything finished is committed
    /// before the rebalance goes on, so the next owner starts right after
    /// the last record handled here and nothing is handled twice.
    fn revoke(
        &mut self,
        consumer: &BaseConsumer<PollContext>,
        tpl: &TopicPartitionList,
        shared: &ServiceShared,
        timeout: Duration,
    ) {
        self.absorb_done();
        let mut by_lane: Vec<Vec<i32>> = vec![Vec::new(); self.lanes.len()];
        for e in tpl.elements() {
            if let Some(&lane) = self.routes.get(e.topic()) {
                by_lane[lane].push(e.partition());
            }
            self.assignment
                .retain(|(t, p)| !(&**t == e.topic() && *p == e.partition()));
        }
        // Stop handing them over: what waits here or in a lane's queue goes.
        let mut announced = Vec::new();
        for (lane, partitions) in by_lane.iter().enumerate() {
            if partitions.is_empty() {
                continue;
            }
            let s = &mut self.lane_state[lane];
            s.overflow.retain(|r| !partitions.contains(&r.partition));
            s.pending.retain(|r| !partitions.contains(&r.partition));
            let (n, purged) = self.lanes[lane].buffer.revoke(partitions, s.last_seq);
            drop(purged);
            announced.push((lane, n));
        }
        // Wait for each worker to let go of the ones it holds.
        let deadline = Instant::now() + timeout;
        let mut settled: Vec<(usize, Option<u64>)> =
            announced.iter().map(|&(lane, _)| (lane, None)).collect();
        loop {
            for ((lane, done), (_, n)) in settled.iter_mut().zip(&announced) {
                if done.is_none() {
                    *done = self.lanes[*lane].buffer.applied(*n);
                }
            }
            if settled.iter().all(|(_, d)| d.is_some()) || shared.must_stop_now() {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(service = %shared.name, ?timeout, "a handler of a revoked partition is still running; its record will be handled again by the next owner");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Records of the revoked partitions numbered up to what the worker
        // had finished were handled; later ones were not and never will be,
        // so they leave the log before it is turned into offsets. (A worker
        // pool reports what finished one by one instead.)
        for (lane, done) in settled {
            if self.lanes[lane].buffer.is_parallel() {
                continue;
            }
            let done = done.unwrap_or_else(|| self.lanes[lane].buffer.done());
            let partitions = &by_lane[lane];
            self.lane_state[lane]
                .log
                .retain(|&(seq, p, _)| seq <= done || !partitions.contains(&p));
        }
        self.absorb_done();
        self.store_offsets(consumer);
        commit_sync(consumer, &shared.name);
        for (lane, partitions) in by_lane.iter().enumerate() {
            for &p in partitions {
                self.tracker.forget((lane, p));
            }
            if !partitions.is_empty() {
                // Entries still logged for them are of records no one will
                // finish here.
                let state = &mut self.lane_state[lane];
                state.log.retain(|&(_, p, _)| !partitions.contains(&p));
                state.held_back.retain(|p| !partitions.contains(p));
            }
        }
        self.publish_paused(shared);
    }

    /// Notes, for the registry, which lanes hold records and finished none
    /// since the last look.
    fn observe_progress(&mut self, now: Instant) {
        for (lane, s) in self.lanes.iter().zip(&mut self.lane_state) {
            s.last_done = lane.buffer.observe_progress(s.last_done, now);
        }
    }

    /// Sets the counters and gauges from the statistics the service keeps
    /// anyway: nothing is counted twice on the record path.
    fn publish_metrics(&self, shared: &ServiceShared) {
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
        self.metrics.skipped.absolute(self.skipped);
        self.metrics
            .rejected
            .absolute(shared.rejected.load(Ordering::Relaxed));
        self.metrics.paused.set(lock(&shared.paused).len() as f64);
    }

    /// Publishes how many entries the bookkeeping keeps, for the registry.
    fn publish_tracked(&self, shared: &ServiceShared) {
        let logged: usize = self.lane_state.iter().map(|s| s.log.len()).sum();
        shared
            .tracked
            .store(logged + self.tracker.entries(), Ordering::Relaxed);
    }

    /// Draining: lanes whose held records all went to their worker get no
    /// more (records polled while draining are not dispatched).
    fn seal_drained(&self) {
        for (lane, s) in self.lanes.iter().zip(&self.lane_state) {
            if s.overflow.is_empty() && s.pending.is_empty() {
                lane.buffer.seal();
            }
        }
    }

    /// Destroys the messages the workers finished with (see `Lender`).
    fn drop_retired(&mut self) {
        for (lane, state) in self.lanes.iter().zip(&mut self.lane_state) {
            lane.buffer.drop_retired(&mut state.retired);
        }
    }

    /// Marks finished every record the lanes' workers got through.
    fn absorb_done(&mut self) {
        for (i, lane) in self.lanes.iter().enumerate() {
            if lane.buffer.is_parallel() {
                let state = &mut self.lane_state[i];
                lane.buffer.take_completed(&mut state.completed);
                if state.completed.is_empty() {
                    continue;
                }
                state.completed.sort_unstable();
                let log = &mut state.log;
                // Sorted, and mostly in log order: look at the entry after
                // the last one found before searching.
                let mut from = 0;
                for &seq in &state.completed {
                    let found = match log.get(from) {
                        Some(e) if e.0 == seq => Some(from),
                        _ => log.binary_search_by_key(&seq, |e| e.0).ok(),
                    };
                    // Not found: its partition was revoked meanwhile.
                    if let Some(at) = found {
                        from = at + 1;
                        let (_, partition, offset) = log[at];
                        if offset != FINISHED {
                            self.tracker.finished((i, partition), offset);
                            log[at].2 = FINISHED;
                        }
                    }
                }
                state.completed.clear();
                while log.front().is_some_and(|e| e.2 == FINISHED) {
                    log.pop_front();
                }
                continue;
            }
            let done = lane.buffer.done();
            let log = &mut self.lane_state[i].log;
            // A fetch hands over long runs of one partition: one lookup a run.
            while let Some(&(seq, partition, _)) = log.front() {
                if seq > done {
                    break;
                }
                let mut offsets = self.tracker.partition_mut((i, partition));
                while let Some(&(seq, p, offset)) = log.front() {
                    if seq > done || p != partition {
                        break;
                    }
                    log.pop_front();
                    if let Some(o) = &mut offsets {
                        o.finished(offset);
                    }
                }
            }
        }
    }

    fn store_offsets(&mut self, consumer: &BaseConsumer<PollContext>) {
        let ready = self.tracker.take_committable();
        if ready.is_empty() {
            return;
        }
        // `store_offsets` takes the next offset to consume, as committed.
        // (The single-partition `store_offset` would add one to it.)
        let mut tpl = TopicPartitionList::with_capacity(ready.len());
        for ((lane, partition), offset) in ready {
            let topic = &self.lanes[lane].topic;
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            // A partition was revoked meanwhile; its next owner starts from
            // the last commit, which is at-least-once.
            tracing::debug!(error = %e, "offsets not stored");
        }
    }

    /// Assigned partitions of lane `i`'s topic.
    fn partitions_of(&self, i: usize) -> TopicPartitionList {
        let topic = &self.lanes[i].topic;
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &self.assignment {
            if t == topic {
                tpl.add_partition(t, *p);
            }
        }
        tpl
    }

    fn publish_paused(&self, shared: &ServiceShared) {
        let mut paused: Vec<(String, i32)> = Vec::new();
        for (i, s) in self.lane_state.iter().enumerate() {
            for (t, p) in &self.assignment {
                if *t == self.lanes[i].topic && (s.paused || s.held_back.contains(p)) {
                    paused.push((t.to_string(), *p));
                }
            }
        }
        paused.sort();
        *lock(&shared.paused) = paused;
        let mut assigned: Vec<(String, i32)> = self
            .assignment
            .iter()
            .map(|(t, p)| (t.to_string(), *p))
            .collect();
        assigned.sort();
        *lock(&shared.assigned) = assigned;
    }

    /// Routes one record of lane `lane` by its `ce_type` header. A topic
    /// carrying one type needs no header: its records go to that type
    /// (reading headers is librdkafka's costliest step per record; the
    /// worker still recognises a record of another type when it does not
    /// decode).
    fn route(&self, lane: &Lane, m: &BorrowedMessage<'_>) -> Routed {
        if m.payload().is_none() {
            return Routed::Reject(Rejection::Tombstone);
        }
        if lane.types.len() == 1 && lane.others.is_empty() && lane.unclaimed.is_empty() {
            return Routed::Type(0);
        }
        let declared = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == headers::MESSAGE_TYPE)
                .map(|h| h.value.unwrap_or_default())
        });
        match declared {
            Some(t) => {
                if let Some(i) = lane.types.iter().position(|(d, _)| d.as_bytes() == t) {
                    Routed::Type(i)
                } else if lane.others.iter().any(|d| d.as_bytes() == t) {
                    Routed::Skip
                } else if lane.unclaimed.iter().any(|d| d.as_bytes() == t) {
                    Routed::Reject(Rejection::NotConsumed(
                        String::from_utf8_lossy(t).into_owned(),
                    ))
                } else {
                    Routed::Reject(Rejection::UnknownType(
                        String::from_utf8_lossy(t).into_owned(),
                    ))
                }
            }
            None => Routed::Reject(Rejection::MissingType),
        }
    }
}

/// Runs the poll loop until the service is stopped. Never panics outward:
/// a failure is recorded in the service state.
pub(crate) fn run(plan: PollPlan) {
    let shared = Arc::clone(&plan.shared);
    let name = shared.name.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| poll_loop(plan)));
    // However the loop ended, nothing more reaches the workers: they stop.
    shared.stop_now();
    match result {
        Ok(Ok(())) => shared.set_state(ServiceState::Stopped),
        Ok(Err(reason)) => {
            tracing::error!(service = %name, %reason, "poll service failed");
            shared.set_state(ServiceState::Failed(reason));
        }
        Err(_) => {
            tracing::error!(service = %name, "poll service panicked");
            shared.set_state(ServiceState::Failed("the poll loop panicked".into()));
        }
    }
}

const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// Longest a poll thread waits, its lanes all full, before it polls again
/// (then a record for a full lane pauses its partitions).
const FULL_WAIT: Duration = Duration::from_secs(1);
/// Most records taken in one poll round before they are handed over.
const MAX_ROUND: usize = 256;
/// How long a stopping poll thread waits for its workers to let go of their
/// records before it closes the consumer.
const RELEASE_WAIT: Duration = Duration::from_secs(5);
/// Stored offsets are handed to librdkafka this often; its background
/// auto-commit then sends them.
const STORE_INTERVAL: Duration = Duration::from_millis(100);

fn poll_loop(plan: PollPlan) -> Result<(), String> {
    let PollPlan {
        shared,
        config,
        lanes,
        guard,
        revoke_timeout,
    } = plan;

    // Wait for an explicit start when the service does not start immediately.
    {
        let (flag, cv) = &shared.started;
        let mut started = lock(flag);
        while !*started && !shared.is_stopping() {
            started = cv
                .wait_timeout(started, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        if !*started {
            return Ok(());
        }
    }

    let routes: HashMap<String, usize> = lanes
        .iter()
        .enumerate()
        .map(|(i, lane)| (lane.topic.to_string(), i))
        .collect();
    let topics: Vec<String> = lanes.iter().map(|l| l.topic.to_string()).collect();
    let lane_state = lanes
        .iter()
        .map(|l| LaneState {
            received: vec![0; l.types.len()],
            ..LaneState::default()
        })
        .collect();
    let state = Arc::new(Mutex::new(LoopState {
        skipped: 0,
        metrics: ServiceMetrics::new(&shared.group_id, &shared.name),
        lanes,
        lane_state,
        routes,
        tracker: OffsetTracker::default(),
        assignment: Vec::new(),
    }));
    let context = PollContext {
        tracing: TracingContext::new("consumer"),
        shared: Arc::clone(&shared),
        state: Arc::clone(&state),
        revoke_timeout,
    };
    let consumer: BaseConsumer<PollContext> = config
        .create_with_context(context)
        .map_err(|e| format!("could not create the consumer: {e}"))?;
    // From here on, however the loop ends, the consumer outlives every record.
    let consumer = Holder::new(consumer, guard, Arc::clone(&shared), Arc::clone(&state));
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .map_err(|e| format!("could not subscribe to {topics:?}: {e}"))?;
    tracing::info!(service = %shared.name, group = %shared.group_id, ?topics, "poll service running");

    let mut last_store = Instant::now();
    let mut drain_started: Option<Instant> = None;
    loop {
        let stop = shared.stop.load(Ordering::SeqCst);
        if stop == STOP_NOW {
            break;
        }
        if stop == DRAIN && drain_started.is_none() {
            drain_started = Some(Instant::now());
            shared.set_state(ServiceState::Draining);
            if let Ok(assignment) = consumer.assignment() {
                let _ = consumer.pause(&assignment);
            }
            let st = lock(&state);
            for lane in &st.lanes {
                lane.buffer.wake();
            }
        }
        if drain_started.is_some() && shared.workers_active.load(Ordering::SeqCst) == 0 {
            break;
        }

        // Every lane full: stop polling until a worker makes room.
        // librdkafka keeps what it prefetched and stops fetching by itself,
        // as it does for a raw consumer busy with its records; a pause would
        // discard the prefetched records and fetch them again on resume.
        // Bounded, so rebalances and shutdown are still served.
        if drain_started.is_none() {
            let blocked = || lock(&state).all_blocked();
            let since = Instant::now();
            while blocked() && since.elapsed() < FULL_WAIT && !shared.is_stopping() {
                shared.room.wait_while(POLL_TIMEOUT, blocked);
                shared.mark_polled();
                let mut st = lock(&state);
                st.drop_retired();
                st.absorb_done();
                st.refill(&consumer, &shared);
                st.hold_back(&consumer, &shared);
            }
            lock(&state).pause_blocked(&consumer, &shared);
        }

        // One round: wait for the first record, then take whatever else is
        // ready without waiting, and hand each lane its share at once.
        let mut timeout = POLL_TIMEOUT;
        for _ in 0..MAX_ROUND {
            let Some(polled) = consumer.poll(timeout) else {
                break;
            };
            timeout = Duration::ZERO;
            if polled.is_ok() {
                shared.reach.up();
            }
            match polled {
                Ok(m) if drain_started.is_none() => lock(&state).accept(m),
                // Draining: records fetched before the pause are not
                // dispatched; they were never stored, so they are delivered
                // again later.
                Ok(_) => {}
                Err(e) => {
                    if matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
                        return Err(format!("fatal consumer error: {e}"));
                    }
                    tracing::warn!(service = %shared.name, error = %e, "poll error");
                }
            }
        }
        shared.mark_polled();
        let mut st = lock(&state);
        st.drop_retired();
        st.flush();
        st.absorb_done();
        st.refill(&consumer, &shared);
        st.hold_back(&consumer, &shared);
        if drain_started.is_some() {
            st.seal_drained();
        }
        if last_store.elapsed() >= STORE_INTERVAL {
            st.store_offsets(&consumer);
            last_store = Instant::now();
            st.publish_tracked(&shared);
            st.observe_progress(last_store);
            st.publish_metrics(&shared);
        }
    }

    // Final commit of everything finished, then close.
    {
        let mut st = lock(&state);
        st.absorb_done();
        st.store_offsets(&consumer);
        st.publish_metrics(&shared);
        if st.tracker.pending() > 0 {
            tracing::info!(service = %shared.name, unfinished = st.tracker.pending(), "stopping with unfinished messages; they will be delivered again");
        }
    }
    if shared.stop.load(Ordering::SeqCst) != STOP_NOW {
        commit_sync(&consumer, &shared.name);
    }
    drop(consumer);
    tracing::info!(service = %shared.name, "poll service stopped");
    Ok(())
}

/// Owns a poll service's consumer and lets go of it only once no record
/// holds one of its messages (see [`Polled`]), on every way out of the poll
/// loop: a clean stop, an error, a panic.
struct Holder {
    consumer: ManuallyDrop<BaseConsumer<PollContext>>,
    guard: ManuallyDrop<ClientGuard>,
    shared: Arc<ServiceShared>,
    state: Arc<Mutex<LoopState>>,
}

impl Holder {
    fn new(
        consumer: BaseConsumer<PollContext>,
        guard: ClientGuard,
        shared: Arc<ServiceShared>,
        state: Arc<Mutex<LoopState>>,
    ) -> Self {
        Holder {
            consumer: ManuallyDrop::new(consumer),
            guard: ManuallyDrop::new(guard),
            shared,
            state,
        }
    }
}

impl std::ops::Deref for Holder {
    type Target = BaseConsumer<PollContext>;

    fn deref(&self) -> &Self::Target {
        &self.consumer
    }
}

impl Drop for Holder {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        if release(&self.shared, &self.state) {
            // SAFETY: dropped once, here, and never used again.
            unsafe {
                ManuallyDrop::drop(&mut self.consumer);
                ManuallyDrop::drop(&mut self.guard);
            }
        } else {
            // A handler that ignores cancellation still holds a message:
            // closing the consumer under it would free that message's memory.
            // Left open instead; its uncommitted work is redelivered.
            tracing::error!(service = %self.shared.name, "handlers still running after the stop; the consumer is left open");
        }
    }
}

/// Drops every record the service still holds and waits for its workers to
/// stop; `true` once no record is left anywhere. Records not handled were
/// never stored, so they are delivered again.
fn release(shared: &ServiceShared, state: &Mutex<LoopState>) -> bool {
    shared.stop_now();
    {
        let mut st = lock(state);
        for s in &mut st.lane_state {
            s.pending.clear();
            s.overflow.clear();
        }
        for lane in &st.lanes {
            lane.buffer.clear();
            lane.buffer.wake();
        }
    }
    // A worker lets go of its records when it stops: after the record in
    // hand, once stopping with an empty buffer.
    let since = Instant::now();
    while shared.workers_active.load(Ordering::SeqCst) > 0 {
        if since.elapsed() >= RELEASE_WAIT {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

impl LoopState {
    /// Routes one polled record into its lane's pending batch.
    #[allow(unsafe_code)]
    fn accept(&mut self, m: BorrowedMessage<'_>) {
        // A service with one topic needs no lookup (and no UTF-8 check of
        // the topic name per record).
        let lane = if self.lanes.len() == 1 {
            0
        } else {
            match self.routes.get(m.topic()) {
                Some(&lane) => lane,
                None => return,
            }
        };
        let key = (lane, m.partition());
        self.tracker.dispatched(key, m.offset());
        let routed = self.route(&self.lanes[lane], &m);
        let state = &mut self.lane_state[lane];
        let (type_index, rejection) = match routed {
            Routed::Skip => {
                self.skipped += 1;
                self.tracker.finished(key, m.offset());
                return;
            }
            Routed::Type(i) => {
                if let Some(n) = state.received.get_mut(i) {
                    *n += 1;
                }
                (i, None)
            }
            Routed::Reject(rejection) => (0, Some(Box::new(rejection))),
        };
        // SAFETY: the consumer is in a `Holder`, which drops it only after
        // every record is gone.
        let mut record = Record::new(unsafe { Polled::new(m) });
        record.type_index = type_index;
        record.rejection = rejection;
        state.pending.push(record);
    }

    /// Hands every lane the records routed to it this round.
    fn flush(&mut self) {
        for lane in 0..self.lanes.len() {
            if self.lane_state[lane].pending.is_empty() {
                continue;
            }
            let state = &mut self.lane_state[lane];
            let mut batch = std::mem::take(&mut state.pending);
            for (i, n) in state.received.iter_mut().enumerate() {
                if *n > 0 {
                    if let Some((_, stats)) = self.lanes[lane].types.get(i) {
                        stats.received.fetch_add(*n, Ordering::Relaxed);
                    }
                    *n = 0;
                }
            }
            if self.lane_state[lane].paused || !self.lane_state[lane].overflow.is_empty() {
                self.lane_state[lane].overflow.extend(batch.drain(..));
            } else {
                self.admit(lane, &mut batch);
            }
            // Keep the allocation for the next round.
            self.lane_state[lane].pending = batch;
        }
    }

    /// Puts a batch into lane `lane` as its backpressure mode allows.
    fn admit(&mut self, lane: usize, batch: &mut Vec<Record>) {
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
                // They leave the log too, or it would grow by every record
                // dropped behind one that never finishes. The queue gives up
                // its front, so their numbers are one range.
                if let (Some(first), Some(last)) = (dropped.first(), dropped.last()) {
                    let log = &mut self.lane_state[lane].log;
                    let from = log.partition_point(|e| e.0 < first.seq);
                    let to = log.partition_point(|e| e.0 <= last.seq);
                    log.drain(from..to);
                }
                self.dropped(lane, &dropped);
            }
        }
    }

    /// Numbers records, logs their offsets and appends them to the lane.
    fn push(&mut self, lane: usize, records: impl Iterator<Item = Record>) {
        let state = &mut self.lane_state[lane];
        let numbered = records.map(|mut r| {
            state.last_seq += 1;
            r.seq = state.last_seq;
            state.log.push_back((r.seq, r.partition, r.offset));
            r
        });
        self.lanes[lane].buffer.push(numbered);
    }

    fn pause(&mut self, lane: usize, consumer: &BaseConsumer<PollContext>, shared: &ServiceShared) {
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

    /// Records discarded by a drop mode: counted, and their offsets finished.
    fn dropped(&mut self, lane: usize, records: &[Record]) {
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
    fn all_blocked(&self) -> bool {
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
    fn pause_blocked(&mut self, consumer: &BaseConsumer<PollContext>, shared: &ServiceShared) {
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
    fn refill(&mut self, consumer: &BaseConsumer<PollContext>, shared: &ServiceShared) {
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
                    if *t == self.lanes[i].topic && !self.lane_state[i].held_back.contains(p) {
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
    fn hold_back(&mut self, consumer: &BaseConsumer<PollContext>, shared: &ServiceShared) {
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
                    // A lane paused as a whole resumes it with the lane.
                    if !self.lane_state[i].paused {
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

fn commit_sync<C: ConsumerContext>(consumer: &BaseConsumer<C>, service: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        // Nothing new to commit.
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset) => {}
        Err(e) => tracing::warn!(service, error = %e, "offset commit failed"),
    }
}
