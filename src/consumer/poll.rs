//! A poll service: one Kafka consumer on one named OS thread. It routes each
//! record by topic and `ce_type` header into its type's buffer, applies
//! backpressure by pausing partitions while it keeps polling, and stores
//! offsets only once their messages are finished.
//!
//! All mutable loop state lives in [`LoopState`] behind a mutex that only the
//! poll thread takes (the rebalance callbacks run on it too, inside `poll`),
//! so it is never contended.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::consumer::buffer::{Offer, TypeBuffer};
use crate::consumer::context::Record;
use crate::consumer::offsets::OffsetTracker;
use crate::headers;
use crate::runtime::client_context::TracingContext;
use crate::runtime::clients::ClientGuard;

/// Lifecycle of a poll service.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServiceState {
    /// Declared with `start_immediately(false)` and not started yet.
    Waiting,
    /// Polling.
    Running,
    /// Shutting down: no new records, buffers draining.
    Draining,
    /// Stopped cleanly.
    Stopped,
    /// Died; the reason is logged too. Other services keep running.
    Failed(String),
}

/// Why a record could not be routed to a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejection {
    Tombstone,
    MissingType,
    UnknownType(String),
}

impl Rejection {
    pub(crate) fn reason(&self) -> String {
        match self {
            Rejection::Tombstone => "tombstone (record without payload)".into(),
            Rejection::MissingType => "no ce_type header, and several types share the topic".into(),
            Rejection::UnknownType(t) => format!("unknown type `{t}` for this topic"),
        }
    }
}

/// A finished message, reported by a worker to its poll thread.
pub(crate) struct Ack {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
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
    pub(crate) acks: Sender<Ack>,
    ack_rx: Receiver<Ack>,
    stop: AtomicU8,
    started: (Mutex<bool>, Condvar),
    pub(crate) workers_active: AtomicUsize,
    /// Milliseconds since `epoch` of the last completed poll, for health.
    last_poll_ms: AtomicU64,
    epoch: Instant,
}

impl ServiceShared {
    pub(crate) fn new(name: String, group_id: String, dedicated: bool, start: bool) -> Arc<Self> {
        let (acks, ack_rx) = crossbeam_channel::unbounded();
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
            acks,
            ack_rx,
            stop: AtomicU8::new(RUN),
            started: (Mutex::new(start), Condvar::new()),
            workers_active: AtomicUsize::new(0),
            last_poll_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
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
        self.wake_waiting();
    }

    /// Stop at once, without waiting for workers.
    pub(crate) fn stop_now(&self) {
        self.stop.store(STOP_NOW, Ordering::SeqCst);
        self.wake_waiting();
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst) != RUN
    }

    fn wake_waiting(&self) {
        let (_, cv) = &self.started;
        cv.notify_all();
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

/// A type served by a poll service.
pub(crate) struct Slot {
    pub(crate) topic: Arc<str>,
    pub(crate) discriminator: String,
    pub(crate) buffer: Arc<TypeBuffer>,
}

/// Everything a poll thread needs to start.
pub(crate) struct PollPlan {
    pub(crate) shared: Arc<ServiceShared>,
    pub(crate) config: ClientConfig,
    pub(crate) slots: Vec<Slot>,
    /// Receives records that cannot be routed, for dead-lettering.
    pub(crate) rejects: Arc<TypeBuffer>,
    pub(crate) guard: ClientGuard,
}

struct SlotState {
    overflow: VecDeque<Record>,
    paused: bool,
}

struct Route {
    topic: Arc<str>,
    /// Indexes into `slots` of the types on this topic.
    slots: Vec<usize>,
}

struct LoopState {
    slots: Vec<Slot>,
    slot_state: Vec<SlotState>,
    rejects: Arc<TypeBuffer>,
    reject_overflow: VecDeque<Record>,
    routes: HashMap<String, Route>,
    tracker: OffsetTracker,
    assignment: Vec<(Arc<str>, i32)>,
}

/// The consumer's context: tracing, and rebalance handling that commits
/// finished work before partitions move.
struct PollContext {
    tracing: TracingContext,
    shared: Arc<ServiceShared>,
    state: Arc<Mutex<LoopState>>,
}

impl ClientContext for PollContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.tracing.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.tracing.error(error, reason);
    }
}

impl ConsumerContext for PollContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut state = lock(&self.state);
            // Everything finished so far is committed before the partitions go,
            // so the next owner starts right after it.
            state.absorb_acks(&self.shared.ack_rx);
            state.store_offsets(consumer);
            commit_sync(consumer, &self.shared.name);
            for e in tpl.elements() {
                state.tracker.forget(e.topic(), e.partition());
                for s in &mut state.slot_state {
                    s.overflow
                        .retain(|r| !(&*r.topic == e.topic() && r.partition == e.partition()));
                }
                state
                    .reject_overflow
                    .retain(|r| !(&*r.topic == e.topic() && r.partition == e.partition()));
                state
                    .assignment
                    .retain(|(t, p)| !(&**t == e.topic() && *p == e.partition()));
            }
            state.publish_paused(&self.shared);
            tracing::info!(service = %self.shared.name, revoked = tpl.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut state = lock(&self.state);
                for e in tpl.elements() {
                    if let Some(route) = state.routes.get(e.topic()) {
                        let topic = Arc::clone(&route.topic);
                        state.assignment.push((topic, e.partition()));
                    }
                }
                // A type still paused keeps its new partitions paused too.
                let paused: Vec<usize> = (0..state.slots.len())
                    .filter(|i| state.slot_state[*i].paused)
                    .collect();
                for i in paused {
                    let tpl = state.partitions_of(i);
                    if let Err(e) = consumer.pause(&tpl) {
                        tracing::warn!(service = %self.shared.name, error = %e, "could not pause new partitions");
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
    fn absorb_acks(&mut self, acks: &Receiver<Ack>) {
        while let Ok(ack) = acks.try_recv() {
            self.tracker.finished(&ack.topic, ack.partition, ack.offset);
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
        for (topic, partition, offset) in &ready {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            // A partition was revoked meanwhile; its next owner starts from
            // the last commit, which is at-least-once.
            tracing::debug!(error = %e, "offsets not stored");
        }
    }

    /// Assigned partitions of slot `i`'s topic.
    fn partitions_of(&self, i: usize) -> TopicPartitionList {
        let topic = &self.slots[i].topic;
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
        for (i, s) in self.slot_state.iter().enumerate() {
            if s.paused {
                for (t, p) in &self.assignment {
                    if *t == self.slots[i].topic
                        && !paused.iter().any(|(pt, pp)| pt == &**t && pp == p)
                    {
                        paused.push((t.to_string(), *p));
                    }
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

    /// Routes one record: the type from the topic and `ce_type` header.
    fn route(
        &self,
        route: &Route,
        m: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Result<usize, Rejection> {
        if m.payload().is_none() {
            return Err(Rejection::Tombstone);
        }
        let declared = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == headers::MESSAGE_TYPE)
                .map(|h| h.value.unwrap_or_default())
        });
        match declared {
            Some(t) => route
                .slots
                .iter()
                .copied()
                .find(|i| self.slots[*i].discriminator.as_bytes() == t)
                .ok_or_else(|| Rejection::UnknownType(String::from_utf8_lossy(t).into_owned())),
            // Records from producers that do not write kontext's headers are
            // accepted when the topic carries a single type.
            None if route.slots.len() == 1 => Ok(route.slots[0]),
            None => Err(Rejection::MissingType),
        }
    }
}

/// Runs the poll loop until the service is stopped. Never panics outward:
/// a failure is recorded in the service state.
pub(crate) fn run(plan: PollPlan) {
    let shared = Arc::clone(&plan.shared);
    let name = shared.name.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| poll_loop(plan)));
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
/// Stored offsets are handed to librdkafka this often; its background
/// auto-commit then sends them.
const STORE_INTERVAL: Duration = Duration::from_millis(100);

fn poll_loop(plan: PollPlan) -> Result<(), String> {
    let PollPlan {
        shared,
        config,
        slots,
        rejects,
        guard,
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

    let mut routes: HashMap<String, Route> = HashMap::new();
    for (i, slot) in slots.iter().enumerate() {
        routes
            .entry(slot.topic.to_string())
            .or_insert_with(|| Route {
                topic: Arc::clone(&slot.topic),
                slots: Vec::new(),
            })
            .slots
            .push(i);
    }
    let topics: Vec<String> = routes.keys().cloned().collect();
    let slot_state = slots
        .iter()
        .map(|_| SlotState {
            overflow: VecDeque::new(),
            paused: false,
        })
        .collect();
    let state = Arc::new(Mutex::new(LoopState {
        slots,
        slot_state,
        rejects,
        reject_overflow: VecDeque::new(),
        routes,
        tracker: OffsetTracker::default(),
        assignment: Vec::new(),
    }));
    let context = PollContext {
        tracing: TracingContext { role: "consumer" },
        shared: Arc::clone(&shared),
        state: Arc::clone(&state),
    };
    let consumer: BaseConsumer<PollContext> = config
        .create_with_context(context)
        .map_err(|e| format!("could not create the consumer: {e}"))?;
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
            for s in &st.slots {
                s.buffer.wake();
            }
            st.rejects.wake();
        }
        if drain_started.is_some() && shared.workers_active.load(Ordering::SeqCst) == 0 {
            break;
        }

        let polled = consumer.poll(POLL_TIMEOUT);
        shared.mark_polled();
        let mut st = lock(&state);
        match polled {
            Some(Ok(m)) if drain_started.is_none() => {
                if let Some(route) = st.routes.get(m.topic()) {
                    let topic = Arc::clone(&route.topic);
                    let routed = st.route(route, &m);
                    let mut record = Record::copy_from(topic, &m);
                    st.tracker
                        .dispatched(&record.topic, record.partition, record.offset);
                    match routed {
                        Ok(i) => st.deliver(i, record, &consumer, &shared),
                        Err(rejection) => {
                            record.rejection = Some(rejection);
                            st.deliver_reject(record, &consumer, &shared);
                        }
                    }
                }
            }
            // Draining: records fetched before the pause are not dispatched;
            // they were never stored, so they are delivered again later.
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                if matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal)) {
                    return Err(format!("fatal consumer error: {e}"));
                }
                tracing::warn!(service = %shared.name, error = %e, "poll error");
            }
            None => {}
        }
        st.absorb_acks(&shared.ack_rx);
        st.resume_drained(&consumer, &shared);
        if last_store.elapsed() >= STORE_INTERVAL {
            st.store_offsets(&consumer);
            last_store = Instant::now();
        }
    }

    // Final commit of everything finished, then close.
    {
        let mut st = lock(&state);
        st.absorb_acks(&shared.ack_rx);
        st.store_offsets(&consumer);
        if st.tracker.pending() > 0 {
            tracing::info!(service = %shared.name, unfinished = st.tracker.pending(), "stopping with unfinished messages; they will be delivered again");
        }
    }
    if shared.stop.load(Ordering::SeqCst) != STOP_NOW {
        commit_sync(&consumer, &shared.name);
    }
    drop(consumer);
    drop(guard);
    tracing::info!(service = %shared.name, "poll service stopped");
    Ok(())
}

impl LoopState {
    fn deliver(
        &mut self,
        i: usize,
        record: Record,
        consumer: &BaseConsumer<PollContext>,
        shared: &ServiceShared,
    ) {
        if self.slot_state[i].paused {
            self.slot_state[i].overflow.push_back(record);
            return;
        }
        match self.slots[i].buffer.offer(record) {
            Offer::Accepted => {}
            Offer::Full(record) => {
                self.slot_state[i].overflow.push_back(record);
                self.slot_state[i].paused = true;
                self.slots[i]
                    .buffer
                    .stats
                    .paused
                    .store(true, Ordering::Relaxed);
                let tpl = self.partitions_of(i);
                if let Err(e) = consumer.pause(&tpl) {
                    tracing::warn!(service = %shared.name, error = %e, "could not pause partitions");
                }
                tracing::debug!(service = %shared.name, topic = %self.slots[i].topic, "buffer full: partitions paused");
                self.publish_paused(shared);
            }
            Offer::Dropped(a, b) => {
                for r in std::iter::once(a).chain(b) {
                    self.tracker.finished(&r.topic, r.partition, r.offset);
                }
            }
        }
    }

    fn deliver_reject(
        &mut self,
        record: Record,
        consumer: &BaseConsumer<PollContext>,
        shared: &ServiceShared,
    ) {
        if !self.reject_overflow.is_empty() {
            self.reject_overflow.push_back(record);
            return;
        }
        if let Offer::Full(record) = self.rejects.offer(record) {
            // The dead-letter worker is behind (its broker is down, say):
            // hold the record and stop fetching until it catches up.
            self.reject_overflow.push_back(record);
            if let Ok(a) = consumer.assignment() {
                let _ = consumer.pause(&a);
            }
            tracing::warn!(service = %shared.name, "dead-letter buffer full: all partitions paused");
        }
    }

    /// Moves held records into buffers that drained below their low mark and
    /// resumes the partitions no paused type still needs.
    fn resume_drained(&mut self, consumer: &BaseConsumer<PollContext>, shared: &ServiceShared) {
        let mut changed = false;
        for i in 0..self.slots.len() {
            if !self.slot_state[i].paused {
                continue;
            }
            let buffer = Arc::clone(&self.slots[i].buffer);
            if buffer.len() > buffer.low_mark() {
                continue;
            }
            while let Some(r) = self.slot_state[i].overflow.pop_front() {
                match buffer.offer(r) {
                    Offer::Accepted => {}
                    Offer::Full(r) => {
                        self.slot_state[i].overflow.push_front(r);
                        break;
                    }
                    Offer::Dropped(a, b) => {
                        for r in std::iter::once(a).chain(b) {
                            self.tracker.finished(&r.topic, r.partition, r.offset);
                        }
                    }
                }
            }
            if self.slot_state[i].overflow.is_empty() {
                self.slot_state[i].paused = false;
                buffer.stats.paused.store(false, Ordering::Relaxed);
                changed = true;
                // Partitions of a topic shared with a type still paused stay paused.
                let still: Vec<&Arc<str>> = (0..self.slots.len())
                    .filter(|j| self.slot_state[*j].paused)
                    .map(|j| &self.slots[j].topic)
                    .collect();
                if !still.contains(&&self.slots[i].topic) {
                    let tpl = self.partitions_of(i);
                    if let Err(e) = consumer.resume(&tpl) {
                        tracing::warn!(service = %shared.name, error = %e, "could not resume partitions");
                    }
                }
            }
        }
        if !self.reject_overflow.is_empty() && self.rejects.len() <= self.rejects.low_mark() {
            while let Some(r) = self.reject_overflow.pop_front() {
                if let Offer::Full(r) = self.rejects.offer(r) {
                    self.reject_overflow.push_front(r);
                    break;
                }
            }
            if self.reject_overflow.is_empty() {
                // Resume everything no type keeps paused.
                let paused_topics: Vec<Arc<str>> = (0..self.slots.len())
                    .filter(|j| self.slot_state[*j].paused)
                    .map(|j| Arc::clone(&self.slots[j].topic))
                    .collect();
                let mut tpl = TopicPartitionList::new();
                for (t, p) in &self.assignment {
                    if !paused_topics.contains(t) {
                        tpl.add_partition(t, *p);
                    }
                }
                let _ = consumer.resume(&tpl);
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

/// Locks a mutex, recovering from poisoning: the state is plain data and a
/// panicking handler never holds these locks.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
