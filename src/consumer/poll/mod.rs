//! A poll service: one Kafka consumer on one named OS thread. It routes each
//! record by topic and `ce_type` header into its type's buffer, applies
//! backpressure by pausing partitions while it keeps polling, and stores
//! offsets only once their messages are finished.
//!
//! All mutable loop state lives in [`LoopState`] behind a mutex that only the
//! poll thread takes (the rebalance callbacks run on it too, inside `poll`),
//! so it is never contended. This file holds the loop, routing and the
//! consumer's ownership (the lent records' lifetime); the rest by concern:
//! - `service`: what the thread, the workers and the registry share;
//! - `rebalance`: the consumer's context, assign and revoke;
//! - `backpressure`: admitting records into lanes, pausing and resuming;
//! - `progress`: finished records to stored offsets, metrics and the
//!   registry's view of progress.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::types::RDKafkaErrorCode;

use crate::client::raw_headers::{self, RawHeaders};
use crate::client::{ClientGuard, TracingContext};
use crate::consumer::buffer::{LaneBuffer, TypeStats};
use crate::consumer::context::{Record, Rejection};
use crate::consumer::lent::{LentConsumer, Polled};
use crate::consumer::offsets::OffsetTracker;
use crate::consumer::sync::lock;
use crate::headers;
use crate::registry::ServiceState;
use crate::telemetry::{ServiceMetrics, TypeCounters};

mod backpressure;
mod close;
mod control;
mod progress;
mod rebalance;
mod service;

pub(crate) use control::Request;
use rebalance::PollContext;
pub(crate) use service::ServiceShared;
use service::{DRAIN, STOP_NOW};

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
    /// Its offsets are committed by its worker's Kafka transactions: the
    /// poll thread stores and commits none of them (a plain commit landing
    /// between a transaction's offsets and its commit marker would undo
    /// them at the group coordinator).
    pub(crate) transactional: bool,
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
    /// The vector traded for the lane's returned records each round.
    returned: Vec<Record>,
    /// Records held while the lane is paused (`Backpressure::Apply`).
    overflow: VecDeque<Record>,
    /// What an operator holds paused (`control.rs`), and the records of
    /// those partitions polled before Kafka stopped fetching them.
    hold: control::Hold,
    parked: VecDeque<Record>,
    paused: bool,
    /// Sequence number given to the last record pushed into the lane.
    last_seq: u64,
    /// Records the worker had given back when the poll thread last looked
    /// (see `LaneBuffer::observe_progress`).
    last_finished: u64,
    /// Partitions whose revocation did not wait for their handler (it
    /// overran the revoke timeout), with the last sequence number of that
    /// ownership: such a record, given back late, is not this member's to
    /// commit any more.
    late: Vec<(i32, u64)>,
    /// Partitions paused because too many of their records are finished
    /// but not committable behind an unfinished one (worker pools).
    held_back: Vec<i32>,
    /// Records the worker had given back when the poll thread last chose
    /// its poll timeout (`LoopState::poll_timeout`).
    drain_seen: u64,
}

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
    /// Records of types this group does not consume, committed unhandled
    /// (shared with the registry's view).
    skipped: Arc<std::sync::atomic::AtomicU64>,
    metrics: ServiceMetrics,
    lanes: Vec<Lane>,
    lane_state: Vec<LaneState>,
    routes: HashMap<String, usize>,
    tracker: OffsetTracker,
    assignment: Vec<(Arc<str>, i32)>,
    /// Partitions of an assignment in progress that librdkafka did not
    /// know yet when their pause state was set before it (`rebalance.rs`).
    unreached: Vec<(String, i32)>,
    /// The last offset stored per partition it owns (`close.rs`).
    stored: HashMap<(String, i32), i64>,
    /// Rebalance callbacks served so far (`close.rs`).
    rebalances: u64,
}

impl LoopState {
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
        // Read as bytes: a name that is not UTF-8 must not panic this
        // thread (`raw_headers`); such a record is dead-lettered, unless it
        // is another group's to read.
        let mut declared = None;
        let mut bad = None;
        for (name, value) in RawHeaders::of(m) {
            if bad.is_none() && std::str::from_utf8(name).is_err() {
                bad = Some(raw_headers::lossy(name));
            }
            if declared.is_none() && name == headers::MESSAGE_TYPE.as_bytes() {
                declared = Some(value.unwrap_or_default());
            }
        }
        if let Some(name) = bad {
            if declared.is_some_and(|t| lane.others.iter().any(|d| d.as_bytes() == t)) {
                return Routed::Skip;
            }
            return Routed::Reject(Rejection::BadHeader(name));
        }
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
        // A service a dead lane failed keeps saying why.
        Ok(Ok(())) if shared.has_failed() => {}
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
/// How long a poll waits for a record while a paused lane drains: its
/// worker may reach the low mark meanwhile, and nothing can cut the wait
/// short (rdkafka's poll waits again after librdkafka's queue yield), so a
/// lane with fast handlers would otherwise run dry for most of
/// `POLL_TIMEOUT`.
const DRAIN_POLL_TIMEOUT: Duration = Duration::from_millis(1);
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

/// Why a poll error ends the service, if it does: errors that retrying
/// cannot mend. Others are logged and polling goes on.
fn fatal(e: &KafkaError, session_timeout: &str) -> Option<String> {
    match e.rdkafka_error_code()? {
        RDKafkaErrorCode::Fatal => Some(format!("fatal consumer error: {e}")),
        // The broker refuses the group join for as long as the setting stays.
        RDKafkaErrorCode::InvalidSessionTimeout => Some(format!(
            "the broker refused the consumer's session.timeout.ms = {session_timeout}: it \
             must lie between the broker's group.min.session.timeout.ms and \
             group.max.session.timeout.ms (6 s and 30 min on Apache Kafka by default) ({e})"
        )),
        _ => None,
    }
}

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
        skipped: Arc::clone(&shared.skipped),
        metrics: ServiceMetrics::new(&shared.group_id, &shared.name),
        lanes,
        lane_state,
        routes,
        tracker: OffsetTracker::default(),
        assignment: Vec::new(),
        unreached: Vec::new(),
        stored: HashMap::new(),
        rebalances: 0,
    }));
    let context = PollContext {
        tracing: TracingContext::new("consumer"),
        shared: Arc::clone(&shared),
        state: Arc::clone(&state),
        revoke_timeout,
    };
    let session_timeout = config
        .get("session.timeout.ms")
        .unwrap_or("45000 (librdkafka's default)")
        .to_owned();
    let consumer: BaseConsumer<PollContext> = config
        .create_with_context(context)
        .map_err(|e| format!("could not create the consumer: {e}"))?;
    // From here on, however the loop ends, the consumer outlives every record.
    let consumer = Holder {
        consumer: LentConsumer::new(consumer, guard),
        shared: Arc::clone(&shared),
        state: Arc::clone(&state),
    };
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .map_err(|e| format!("could not subscribe to {topics:?}: {e}"))?;
    tracing::info!(service = %shared.name, group = %shared.group_id, ?topics, "poll service running");

    // Commands sent before the thread ran wait in the channel: a pause
    // standing in the fleet holds its lane before the first poll.
    let controls = lock(&shared.control_rx)
        .take()
        .ok_or_else(|| "the poll service's command channel was taken twice".to_owned())?;
    lock(&state).apply_controls(&controls, &consumer, &shared, revoke_timeout);
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
                st.absorb_returned();
                st.refill(&consumer, &shared);
                st.hold_back(&consumer, &shared);
                st.apply_controls(&controls, &consumer, &shared, revoke_timeout);
            }
            lock(&state).pause_blocked(&consumer, &shared);
        }

        // One round: wait for the first record, then take whatever else is
        // ready without waiting, and hand each lane its share at once.
        let mut timeout = lock(&state).poll_timeout();
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
                    if let Some(reason) = fatal(&e, &session_timeout) {
                        return Err(reason);
                    }
                    tracing::warn!(service = %shared.name, error = %e, "poll error");
                }
            }
        }
        shared.mark_polled();
        let mut st = lock(&state);
        st.flush();
        st.absorb_returned();
        st.refill(&consumer, &shared);
        st.hold_back(&consumer, &shared);
        st.apply_controls(&controls, &consumer, &shared, revoke_timeout);
        if drain_started.is_some() {
            st.seal_drained();
        }
        if last_store.elapsed() >= STORE_INTERVAL {
            st.store_offsets(&consumer);
            last_store = Instant::now();
            st.publish_tracked(&shared);
            st.observe_progress(last_store, shared.stall_limit());
            st.publish_metrics(&shared);
        }
    }

    // Final commit of everything finished, then close.
    {
        let mut st = lock(&state);
        st.absorb_returned();
        st.store_offsets(&consumer);
        st.publish_metrics(&shared);
        if st.tracker.pending() > 0 {
            tracing::info!(service = %shared.name, unfinished = st.tracker.pending(), "stopping with unfinished messages; they will be delivered again");
        }
    }
    let (commit_by, leave_by) = close::deadlines(&shared);
    // A shutdown commits what finished, also when its deadline cut the
    // drain short (it gave the thread until `close_by`); a service that
    // failed, or whose `Kontext` was dropped, does not.
    if shared.stop.load(Ordering::SeqCst) != STOP_NOW || shared.close_by().is_some() {
        if let Some(why) = close::final_commit(&consumer, &state, &shared, commit_by) {
            tracing::warn!(service = %shared.name, %why, "stopping without the final commit; its records come again to the next member");
            shared.report(why);
        }
    }
    // Workers stopped and buffers empty first: the revocation the leave
    // brings then waits for nothing.
    release(&shared, &state);
    close::leave(&consumer, &state, &shared, leave_by);
    drop(consumer);
    tracing::info!(service = %shared.name, "poll service stopped");
    Ok(())
}

/// Owns a poll service's consumer and, on every way out of the poll loop
/// (a clean stop, an error, a panic), first makes its workers and lanes
/// let go of their records, so that the consumer can close (see
/// [`LentConsumer`]).
struct Holder {
    consumer: LentConsumer<PollContext>,
    shared: Arc<ServiceShared>,
    state: Arc<Mutex<LoopState>>,
}

impl std::ops::Deref for Holder {
    type Target = LentConsumer<PollContext>;

    fn deref(&self) -> &Self::Target {
        &self.consumer
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        release(&self.shared, &self.state);
        // A worker lets go of its records when it stops: after the record
        // in hand, once stopping with an empty buffer.
        if !self.consumer.wait_returned(RELEASE_WAIT) {
            // A handler that ignores cancellation still holds a message; the
            // consumer is left open when it drops, next. Its uncommitted
            // work is redelivered.
            tracing::error!(service = %self.shared.name, records = self.consumer.out(), "handlers still running after the stop; the consumer is left open");
        }
    }
}

/// Stops the workers and drops every record the service still holds.
/// Records not handled were never stored, so they are delivered again.
fn release(shared: &ServiceShared, state: &Mutex<LoopState>) {
    shared.stop_now();
    let mut st = lock(state);
    for s in &mut st.lane_state {
        s.pending.clear();
        s.overflow.clear();
        s.parked.clear();
        s.returned.clear();
    }
    for lane in &st.lanes {
        lane.buffer.clear();
        lane.buffer.wake();
    }
}

impl LoopState {
    /// Routes one polled record into its lane's pending batch.
    fn accept(&mut self, polled: Polled) {
        let m = polled.message();
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
        let routed = self.route(&self.lanes[lane], m);
        let state = &mut self.lane_state[lane];
        let (type_index, rejection) = match routed {
            Routed::Skip => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
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
        let mut record = Record::new(polled);
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
            if state.hold.is_active() {
                let (held, free) = state.hold.split(batch.drain(..));
                state.parked.extend(held);
                batch = free;
            }
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
}
