//! What the poll thread, the workers and the registry share of a poll
//! service: its lifecycle, stop flags, counters and health signals.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use tokio_util::sync::CancellationToken;

use crate::client::Reach;
use crate::consumer::buffer::Room;
use crate::consumer::dead_letter::Sent;
use crate::consumer::sync::lock;
use crate::registry::{ServiceProbe, ServiceState, ServiceStatus};

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
            held_partitions: lock(&self.held).clone(),
            partitions: lock(&self.positions).clone(),
            types: Vec::new(),
            since_last_poll: self.since_last_poll(),
            joined: self.joined.load(Ordering::Acquire),
            assignments_lost: self.assignments_lost.load(Ordering::Relaxed),
            brokers_down_for: self.brokers_down_for(),
            tracked_entries: self.tracked.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            dead_letters_refused: self.dead_letters_refused.load(Ordering::Relaxed),
            settings: self.settings.get().cloned().unwrap_or_default(),
            stalled_for: None,
            database_down_for: None,
            stall_limit: self.stall_limit(),
        }
    }

    fn start(&self) {
        ServiceShared::start(self);
    }
}

pub(super) const RUN: u8 = 0;
pub(super) const DRAIN: u8 = 1;
pub(super) const STOP_NOW: u8 = 2;

/// What the poll thread, the workers and the registry share.
pub(crate) struct ServiceShared {
    pub(crate) name: String,
    pub(crate) group_id: String,
    pub(crate) dedicated: bool,
    pub(crate) state: Mutex<ServiceState>,
    pub(crate) paused: Mutex<Vec<(String, i32)>>,
    /// Owned partitions an operator holds paused.
    pub(crate) held: Mutex<Vec<(String, i32)>>,
    /// Positions of owned partitions, from the last statistics.
    pub(crate) positions: Mutex<Vec<crate::registry::PartitionStatus>>,
    /// Operator commands, drained by the poll thread between polls
    /// (`control.rs`): an idle channel costs one check per poll round.
    pub(crate) control: std::sync::mpsc::Sender<super::control::Request>,
    pub(super) control_rx: Mutex<Option<std::sync::mpsc::Receiver<super::control::Request>>>,
    /// The topics of its lanes, for addressing commands.
    pub(crate) topics: std::sync::OnceLock<Vec<String>>,
    pub(crate) assigned: Mutex<Vec<(String, i32)>>,
    pub(super) stop: AtomicU8,
    pub(super) started: (Mutex<bool>, Condvar),
    pub(crate) workers_active: AtomicUsize,
    /// Where the poll thread waits while every lane is full.
    pub(crate) room: Arc<Room>,
    /// Milliseconds since `epoch` of the last completed poll, for health.
    pub(super) last_poll_ms: AtomicU64,
    pub(super) epoch: Instant,
    /// Cancelled when the service begins to stop; handlers see it through
    /// their context.
    pub(crate) stopping: CancellationToken,
    /// Entries of the offset bookkeeping (lane logs and offset runs).
    pub(crate) tracked: AtomicUsize,
    /// Records no consumed type could take (tombstones, missing or unknown
    /// `ce_type`), dead-lettered or given up on.
    pub(crate) rejected: AtomicU64,
    /// Records of types its group leaves to others, committed unhandled.
    pub(crate) skipped: Arc<AtomicU64>,
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
    pub(super) reach: Reach,
    /// What its consumer's commits came to (`close.rs`).
    pub(super) commits: Mutex<super::close::Commits>,
    /// Set once the poll thread leaves its group to close: a revocation
    /// then commits nothing (the final commit is done or failed).
    pub(super) closing: AtomicBool,
    /// When a shutdown wants the poll thread done with its final commit
    /// and its leave.
    close_by: Mutex<Option<Instant>>,
    /// What a graceful stop did not do (its final commit), for `shutdown`.
    report: Mutex<Option<String>>,
    /// The consumer's group metadata (member and generation), which a lane
    /// committing offsets in Kafka transactions sends with them. The poll
    /// thread reads it in its rebalance callbacks.
    group_metadata: Mutex<Option<Arc<ConsumerGroupMetadata>>>,
}

impl ServiceShared {
    pub(crate) fn new(name: String, group_id: String, dedicated: bool, start: bool) -> Arc<Self> {
        let (control, control_rx) = std::sync::mpsc::channel();
        Arc::new(ServiceShared {
            held: Mutex::new(Vec::new()),
            positions: Mutex::new(Vec::new()),
            control,
            control_rx: Mutex::new(Some(control_rx)),
            topics: std::sync::OnceLock::new(),
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
            skipped: Arc::new(AtomicU64::new(0)),
            dead_letters_refused: AtomicU64::new(0),
            settings: std::sync::OnceLock::new(),
            stall_limit: std::sync::OnceLock::new(),
            joined: AtomicBool::new(false),
            assignments_lost: AtomicU64::new(0),
            reach: Reach::default(),
            commits: Mutex::default(),
            closing: AtomicBool::new(false),
            close_by: Mutex::new(None),
            report: Mutex::new(None),
            group_metadata: Mutex::new(None),
        })
    }

    /// The group metadata to commit offsets in a transaction with, as the
    /// poll thread last read it.
    pub(crate) fn group_metadata(&self) -> Option<Arc<ConsumerGroupMetadata>> {
        lock(&self.group_metadata).clone()
    }

    /// Poll thread, in a rebalance callback: reads the consumer's group
    /// metadata again (a rebalance may change the generation; every
    /// completed one calls back, with an empty assignment if need be).
    /// Only there: librdkafka resets the metadata of a member that lost its
    /// assignment (generation -1, no member id, which the coordinator
    /// accepts for any partition) before it reports the loss.
    pub(super) fn refresh_group_metadata(&self, consumer: &BaseConsumer<super::PollContext>) {
        // Not a member (before the first assignment, or after losing it):
        // no metadata, so no transaction commits offsets.
        let member = self.joined.load(Ordering::Acquire);
        *lock(&self.group_metadata) = if member {
            consumer.group_metadata().map(Arc::new)
        } else {
            None
        };
    }

    /// How long no broker has been reachable, if none is.
    pub(crate) fn brokers_down_for(&self) -> Option<Duration> {
        self.reach.down_for()
    }

    pub(crate) fn state(&self) -> ServiceState {
        lock(&self.state).clone()
    }

    pub(super) fn set_state(&self, state: ServiceState) {
        *lock(&self.state) = state;
    }

    /// Asks the poll thread to be done with its final commit and its
    /// leave by `at` (a shutdown's deadline).
    pub(crate) fn close_by_at(&self, at: Instant) {
        *lock(&self.close_by) = Some(at);
    }

    pub(super) fn close_by(&self) -> Option<Instant> {
        *lock(&self.close_by)
    }

    pub(super) fn report(&self, what: String) {
        *lock(&self.report) = Some(what);
    }

    /// What the stop left undone, once its poll thread has ended.
    pub(crate) fn take_report(&self) -> Option<String> {
        lock(&self.report).take()
    }

    /// How long a lane may stall before the service is not live.
    pub(crate) fn stall_limit(&self) -> Duration {
        self.stall_limit
            .get()
            .copied()
            .unwrap_or(Duration::from_secs(120))
    }

    /// Fails the service for `reason` (kept over the state its poll loop
    /// would set when it ends) and stops it at once.
    pub(crate) fn fail(&self, reason: String) {
        self.set_state(ServiceState::Failed(reason));
        self.stop_now();
    }

    /// Whether the service has failed.
    pub(super) fn has_failed(&self) -> bool {
        matches!(*lock(&self.state), ServiceState::Failed(_))
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

    pub(super) fn wake_waiting(&self) {
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

    pub(super) fn mark_polled(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_poll_ms.store(ms.max(1), Ordering::Relaxed);
    }
}
