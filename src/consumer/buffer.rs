//! The bounded buffer of one lane (one topic of a poll service, with every
//! type on it) between the poll thread and the lane's async worker. One lane
//! per topic keeps the records of a partition in order even when several
//! types share it.
//!
//! Built for batches, because a hand-off per record costs more than the
//! record: the poll thread appends everything one poll round fetched under
//! one lock and wakes the worker only if it found the queue empty; the
//! worker takes a chunk at a time.
//!
//! Records come back one way: a worker gives each finished record back
//! ([`LaneBuffer::give_back`]), message and all, and the poll thread takes
//! them in one swap per round, marks their offsets finished and destroys
//! their messages on its own thread (measured: freeing librdkafka's
//! allocations on the thread that polled them costs a good deal less CPU
//! than on a runtime thread). A record the worker drops unhandled (its
//! partition was revoked) is only counted out of the lane.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::consumer::Backpressure;
use crate::consumer::context::Record;
use crate::consumer::dead_letter::FailureReason;
use crate::consumer::sync::lock;

/// Counters of one type, readable from the registry.
#[derive(Debug, Default)]
pub(crate) struct TypeStats {
    pub(crate) received: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) dead_letters_refused: AtomicU64,
    /// `dead_lettered` by reason, indexed by `FailureReason::index`.
    pub(crate) dead_letter_reasons: [AtomicU64; FailureReason::COUNT],
    pub(crate) dropped: AtomicU64,
    pub(crate) duplicates: AtomicU64,
}

/// Lets a poll thread whose lanes are all full sleep until a worker makes
/// room, instead of pausing partitions: a pause makes librdkafka discard
/// what it prefetched for them, and resuming fetches it all again.
#[derive(Default)]
pub(crate) struct Room {
    waiting: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Room {
    /// Sleeps up to `timeout` unless `full()`, checked under the lock, is
    /// already false; a worker making room wakes it.
    pub(crate) fn wait_while(&self, timeout: Duration, full: impl Fn() -> bool) {
        let guard = lock(&self.lock);
        self.waiting.store(true, Ordering::SeqCst);
        if full() {
            let _ = self.cv.wait_timeout(guard, timeout);
        }
        self.waiting.store(false, Ordering::SeqCst);
    }

    /// Wakes the poll thread if it waits (shutdown, or room was made).
    pub(crate) fn wake(&self) {
        let _guard = lock(&self.lock);
        self.cv.notify_all();
    }
}

pub(crate) struct LaneBuffer {
    /// Records the worker finished, for the poll thread (see the module).
    returned: Mutex<Vec<Record>>,
    /// The lane's topic: records do not carry it, so the poll thread never
    /// touches a reference count the workers also touch.
    pub(crate) topic: Arc<str>,
    room: Arc<Room>,
    queue: Mutex<VecDeque<Record>>,
    notify: Notify,
    pub(crate) mode: Backpressure,
    capacity: usize,
    /// Records pushed and not yet given back or dropped.
    in_lane: AtomicUsize,
    /// Records given back so far: progress, for the stall check.
    finished: AtomicU64,
    /// Whether the lane's partitions are paused because it is full.
    pub(crate) paused: AtomicBool,
    /// Whether an operator holds some of its partitions paused
    /// (`Kontext::pause`).
    pub(crate) held: AtomicBool,
    dropped: AtomicU64,
    /// Partition ownership as the worker sees it; see [`LaneBuffer::revoke`].
    ownership: Ownership,
    /// Set by a draining poll thread once it holds nothing more for this
    /// lane: the worker may stop when its queue is empty, not before.
    sealed: AtomicBool,
    /// Since when the lane holds records and finished none (a hung or very
    /// slow handler, a long retry pause); kept by the poll thread.
    stalled_since: Mutex<Option<Instant>>,
    /// Since when its worker retries a record whose attempts cannot reach
    /// the database, and the last such error: waiting out an outage, which
    /// is not a stall (not ready, still live). Cleared by the poll thread
    /// once a record finishes.
    database_down: Mutex<Option<DatabaseDown>>,
    /// Whether the lane has a worker pool (see `consumer::pool`): its
    /// records finish out of order.
    parallel: bool,
    /// The pool's current size and how many of it are busy (registry).
    pub(crate) workers: AtomicUsize,
    pub(crate) busy: AtomicUsize,
}

/// Revocations the poll thread announced and the worker applied. A
/// partition's ownership ends at a sequence number: its records numbered up
/// to it belong to an ownership that is over (they are that ownership's
/// epoch), later ones to a new assignment of the same partition.
#[derive(Default)]
struct Ownership {
    /// Revocations announced by the poll thread.
    announced: AtomicU64,
    /// The last revocation the worker applied; every record it finished
    /// before was given back first.
    applied: AtomicU64,
    /// Partition -> last sequence number of its ended ownership.
    ended: Mutex<HashMap<i32, u64>>,
    /// Wakes a worker waiting out a retry pause.
    signal: Notify,
    /// Whether the lane's worker runs (so a revocation waits for it).
    worker_running: AtomicBool,
    /// The last revocation the poll thread stopped waiting for: its
    /// partitions went on to their next owner whatever the worker holds.
    given_up: AtomicU64,
}

impl LaneBuffer {
    pub(crate) fn new(
        topic: Arc<str>,
        capacity: usize,
        mode: Backpressure,
        room: Arc<Room>,
        parallel: bool,
    ) -> Arc<LaneBuffer> {
        Arc::new(LaneBuffer {
            returned: Mutex::new(Vec::new()),
            topic,
            room,
            queue: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            mode,
            capacity: capacity.max(1),
            in_lane: AtomicUsize::new(0),
            finished: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            held: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            ownership: Ownership::default(),
            sealed: AtomicBool::new(false),
            stalled_since: Mutex::new(None),
            database_down: Mutex::new(None),
            parallel,
            workers: AtomicUsize::new(1),
            busy: AtomicUsize::new(0),
        })
    }

    /// Records delivered and not finished: waiting, or being handled.
    pub(crate) fn len(&self) -> usize {
        self.in_lane.load(Ordering::Acquire)
    }

    /// Whether the lane is full under `Backpressure::Apply` (the drop modes
    /// are never full: they make room).
    pub(crate) fn is_full(&self) -> bool {
        self.mode == Backpressure::Apply && self.room() == 0
    }

    /// Room left before the lane holds `capacity` records.
    pub(crate) fn room(&self) -> usize {
        self.capacity.saturating_sub(self.len())
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Fill level below which paused partitions resume.
    pub(crate) fn low_mark(&self) -> usize {
        self.capacity / 2
    }

    /// Records given back so far.
    pub(crate) fn finished_count(&self) -> u64 {
        self.finished.load(Ordering::Acquire)
    }

    /// Appends records (already numbered, in order) for the worker. Called
    /// by the poll thread only; never blocks on the worker.
    pub(crate) fn push(&self, records: impl Iterator<Item = Record>) {
        let mut q = lock(&self.queue);
        let was_empty = q.is_empty();
        let before = q.len();
        q.extend(records);
        let added = q.len() - before;
        self.in_lane.fetch_add(added, Ordering::AcqRel);
        drop(q);
        // The worker waits only after finding the queue empty, so only a
        // push onto an empty queue needs to wake it: a busy worker is not
        // rescheduled once per record.
        if was_empty && added > 0 {
            self.notify.notify_one();
        }
    }

    /// `DropOldest`: removes up to `n` of the oldest records still waiting
    /// (a record the worker already took is handled).
    pub(crate) fn drop_oldest(&self, n: usize) -> Vec<Record> {
        let mut q = lock(&self.queue);
        let n = n.min(q.len());
        let dropped: Vec<Record> = q.drain(..n).collect();
        self.in_lane.fetch_sub(dropped.len(), Ordering::AcqRel);
        dropped
    }

    /// Counts `n` discarded records, logging the first and every thousandth.
    pub(crate) fn count_drops(&self, n: u64) {
        if n == 0 {
            return;
        }
        let before = self.dropped.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        if before == 0 || after / 1000 > before / 1000 {
            tracing::warn!(dropped = after, mode = ?self.mode, "buffer full: messages dropped");
        }
    }

    /// Drops every waiting and every returned record (the service is
    /// stopping).
    pub(crate) fn clear(&self) {
        let dropped = std::mem::take(&mut *lock(&self.queue));
        self.in_lane.fetch_sub(dropped.len(), Ordering::AcqRel);
        drop(dropped);
        lock(&self.returned).clear();
    }

    /// Worker: `record` is finished (handled, skipped or dead-lettered).
    pub(crate) fn give_back(&self, record: Record) {
        lock(&self.returned).push(record);
        self.finished.fetch_add(1, Ordering::Release);
        self.leave(1);
    }

    /// Worker pool: every record of `records` is finished; empties it.
    pub(crate) fn give_back_all(&self, records: &mut Vec<Record>) {
        let n = records.len();
        if n == 0 {
            return;
        }
        lock(&self.returned).append(records);
        self.finished.fetch_add(n as u64, Ordering::Release);
        self.leave(n);
    }

    /// Poll thread: the records given back since the last call, traded for
    /// `into` (empty, its allocation reused).
    pub(crate) fn take_returned(&self, into: &mut Vec<Record>) {
        std::mem::swap(&mut *lock(&self.returned), into);
    }

    /// Moves up to `max` waiting records into `into`, without waiting.
    pub(crate) fn take(&self, into: &mut VecDeque<Record>, max: usize) {
        let mut q = lock(&self.queue);
        if into.is_empty() && q.len() <= max {
            // The usual case, a worker keeping up: trade queues instead of
            // moving each record.
            std::mem::swap(&mut *q, into);
        } else {
            let n = max.min(q.len());
            into.extend(q.drain(..n));
        }
    }

    /// Whether records finish out of order (a worker pool).
    pub(crate) fn is_parallel(&self) -> bool {
        self.parallel
    }

    /// Worker pool: revocation `n` is applied (the records of its
    /// partitions were dropped, or have finished and were given back).
    pub(crate) fn mark_applied(&self, n: u64) {
        self.ownership.applied.store(n, Ordering::Release);
    }

    /// The number of the last revocation announced.
    pub(crate) fn announced(&self) -> u64 {
        self.ownership.announced.load(Ordering::SeqCst)
    }

    /// Whether partition `partition`'s record `seq` belongs to an ended
    /// ownership.
    pub(crate) fn is_revoked_at(&self, partition: i32, seq: u64) -> bool {
        lock(&self.ownership.ended)
            .get(&partition)
            .is_some_and(|&last| seq <= last)
    }

    /// The worker dropped `n` records without handling them (their
    /// partition was revoked): they leave the lane and are not given back.
    pub(crate) fn discard(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.leave(n);
    }

    /// `n` records left the lane: wakes a waiting poll thread when that
    /// brings the lane to its low mark.
    fn leave(&self, n: usize) {
        let before = self.in_lane.fetch_sub(n, Ordering::AcqRel);
        let low = self.low_mark();
        if before > low && before - n <= low && self.room.waiting.load(Ordering::SeqCst) {
            self.room.wake();
        }
    }

    /// Poll thread: ends the ownership of `partitions`, whose records are
    /// numbered up to `last_seq`. Waiting records of them leave the queue
    /// (returned, to be dropped on the poll thread) and the worker is told
    /// to drop the ones it holds; returns the revocation's number, for
    /// [`LaneBuffer::applied`].
    pub(crate) fn revoke(&self, partitions: &[i32], last_seq: u64) -> (u64, Vec<Record>) {
        {
            let mut ended = lock(&self.ownership.ended);
            for p in partitions {
                ended.insert(*p, last_seq);
            }
        }
        let purged: Vec<Record> = {
            let mut q = lock(&self.queue);
            let (gone, kept): (VecDeque<Record>, VecDeque<Record>) = std::mem::take(&mut *q)
                .into_iter()
                .partition(|r| partitions.contains(&r.partition));
            *q = kept;
            self.in_lane.fetch_sub(gone.len(), Ordering::AcqRel);
            gone.into()
        };
        // SeqCst, paired with the worker's check before each record: once
        // this is visible the worker starts no record of these partitions.
        let n = self.ownership.announced.fetch_add(1, Ordering::SeqCst) + 1;
        self.ownership.signal.notify_waiters();
        self.notify.notify_one();
        (n, purged)
    }

    /// Poll thread: whether the worker applied revocation `n` (or no worker
    /// runs: nothing to wait for). Once it has, every record of the revoked
    /// partitions it finished was given back, and it holds no other.
    pub(crate) fn applied(&self, n: u64) -> bool {
        self.ownership.applied.load(Ordering::Acquire) >= n
            || !self.ownership.worker_running.load(Ordering::Acquire)
    }

    /// Poll thread: it stopped waiting for revocation `n` (its time ran
    /// out); the partitions go on to their next owner.
    pub(crate) fn give_up(&self, n: u64) {
        self.ownership.given_up.fetch_max(n, Ordering::AcqRel);
    }

    /// Worker: whether a revocation it has not applied yet was given up on
    /// by the poll thread. Records of revoked partitions it holds are then
    /// its next owner's: an exactly-once lane must not commit them.
    pub(crate) fn revocation_given_up(&self) -> bool {
        self.ownership.given_up.load(Ordering::Acquire)
            > self.ownership.applied.load(Ordering::Acquire)
    }

    /// Worker: whether a revocation waits to be applied. Checked before
    /// every record: two loads.
    pub(crate) fn revocation_pending(&self) -> bool {
        self.ownership.announced.load(Ordering::SeqCst)
            != self.ownership.applied.load(Ordering::Relaxed)
    }

    /// Whether `record` belongs to an ownership that has ended.
    pub(crate) fn is_revoked(&self, record: &Record) -> bool {
        lock(&self.ownership.ended)
            .get(&record.partition)
            .is_some_and(|&last| record.seq <= last)
    }

    /// Worker, between records: drops the records of revoked partitions it
    /// holds in `batch` and tells the poll thread it did. (Every record it
    /// finished was given back already.)
    pub(crate) fn apply_revocations(&self, batch: &mut VecDeque<Record>) {
        self.apply_revocations_upto(batch, self.announced());
    }

    /// [`LaneBuffer::apply_revocations`] up to revocation `n`. A worker
    /// holding a record loads `n` ([`LaneBuffer::announced`]) before it
    /// checks that record ([`LaneBuffer::is_revoked`]): a revocation of the
    /// record's own partition announced in between is then never marked
    /// applied while the worker still holds the record.
    pub(crate) fn apply_revocations_upto(&self, batch: &mut VecDeque<Record>, n: u64) {
        let dropped = {
            let ended = lock(&self.ownership.ended);
            let before = batch.len();
            batch.retain(|r| ended.get(&r.partition).is_none_or(|&last| r.seq > last));
            before - batch.len()
        };
        self.discard(dropped);
        self.ownership.applied.store(n, Ordering::Release);
    }

    /// Worker: a record it took but will not handle (revoked mid-retry).
    pub(crate) fn discard_revoked(&self) {
        self.discard(1);
    }

    /// Waits until a revocation is announced (or forever): lets a retry
    /// pause end early when its record's partition goes. `enabled` first,
    /// then [`LaneBuffer::revocation_pending`], then await it.
    pub(crate) fn revocation_signal(&self) -> tokio::sync::futures::Notified<'_> {
        self.ownership.signal.notified()
    }

    /// Marks the lane's worker running until the returned guard drops.
    pub(crate) fn worker_running(self: &Arc<Self>) -> WorkerRunning {
        self.ownership.worker_running.store(true, Ordering::Release);
        WorkerRunning(Arc::clone(self))
    }

    /// Poll thread: whether the worker got anywhere since it had given
    /// back `last` records; returns the new count. Marks the lane stalled
    /// from `now` when it holds records and finished none.
    ///
    /// While the worker waits out its database the lane is not stalled;
    /// that ends when a record finishes, or when no attempt has failed to
    /// reach the database for `limit` (the worker is stuck on something
    /// else, and the stall clock starts).
    pub(crate) fn observe_progress(&self, last: u64, now: Instant, limit: Duration) -> u64 {
        let done = self.finished_count();
        let waiting = {
            let mut down = lock(&self.database_down);
            if done != last
                || self.len() == 0
                || down
                    .as_ref()
                    .is_some_and(|d| now.duration_since(d.last) > limit)
            {
                *down = None;
            }
            down.is_some()
        };
        let stalled = done == last && self.len() > 0 && !waiting;
        let mut since = lock(&self.stalled_since);
        match (stalled, since.is_some()) {
            (true, false) => *since = Some(now),
            (false, true) => *since = None,
            _ => {}
        }
        done
    }

    /// Worker: an attempt could not reach the database (`error`); the
    /// record is retried until it can.
    pub(crate) fn database_unreachable(&self, error: &str) {
        let now = Instant::now();
        let mut down = lock(&self.database_down);
        match &mut *down {
            Some(d) => {
                d.last = now;
                error.clone_into(&mut d.error);
            }
            None => {
                *down = Some(DatabaseDown {
                    since: now,
                    last: now,
                    error: error.to_owned(),
                });
            }
        }
    }

    /// Worker: an attempt failed for another reason; whatever it waits
    /// for now, it is not the database.
    pub(crate) fn database_reachable(&self) {
        *lock(&self.database_down) = None;
    }

    /// How long the worker has been waiting for its database, and why.
    pub(crate) fn database_down(&self) -> Option<(Duration, String)> {
        lock(&self.database_down)
            .as_ref()
            .map(|d| (d.since.elapsed(), d.error.clone()))
    }

    /// How long the lane has held records without finishing one.
    pub(crate) fn stalled_for(&self) -> Option<Duration> {
        lock(&self.stalled_since).map(|s| s.elapsed())
    }

    /// Poll thread, draining: nothing more will be pushed.
    pub(crate) fn seal(&self) {
        if !self.sealed.swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    /// Whether the lane will get no more records (see [`LaneBuffer::seal`]).
    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Waits until something may have been pushed.
    pub(crate) async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Wakes the worker without a record (shutdown).
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }
}

/// A lane's worker waiting out its database: since when, its last failed
/// attempt, and that attempt's error.
struct DatabaseDown {
    since: Instant,
    last: Instant,
    error: String,
}

/// While alive, the lane's worker counts as running.
pub(crate) struct WorkerRunning(Arc<LaneBuffer>);

impl Drop for WorkerRunning {
    fn drop(&mut self) {
        self.0
            .ownership
            .worker_running
            .store(false, Ordering::Release);
    }
}

/// What the registry reads of a type: its lane's buffer and its counters.
pub(crate) struct LaneProbe {
    pub(crate) buffer: Arc<LaneBuffer>,
    pub(crate) stats: Arc<TypeStats>,
}

impl crate::registry::TypeProbe for LaneProbe {
    fn fill(&self, status: &mut crate::registry::TypeStatus) {
        let (b, s) = (&self.buffer, &self.stats);
        status.buffered = b.len();
        status.capacity = b.capacity();
        status.paused = b.paused.load(Ordering::Acquire);
        status.held = b.held.load(Ordering::Acquire);
        status.stalled_for = b.stalled_for();
        if let Some((d, error)) = b.database_down() {
            status.database_down_for = Some(d);
            status.database_error = Some(error);
        }
        status.workers = b.workers.load(Ordering::Relaxed);
        status.busy_workers = b.busy.load(Ordering::Relaxed);
        status.received = s.received.load(Ordering::Relaxed);
        status.handled = s.handled.load(Ordering::Relaxed);
        status.failed = s.failed.load(Ordering::Relaxed);
        status.retried = s.retried.load(Ordering::Relaxed);
        status.dead_lettered = s.dead_lettered.load(Ordering::Relaxed);
        status.dead_letters_refused = s.dead_letters_refused.load(Ordering::Relaxed);
        status.dead_letter_reasons = FailureReason::ALL
            .iter()
            .zip(&s.dead_letter_reasons)
            .map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        status.dropped = s.dropped.load(Ordering::Relaxed);
        status.duplicates = s.duplicates.load(Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(capacity: usize, mode: Backpressure) -> Arc<LaneBuffer> {
        LaneBuffer::new(
            Arc::from("t"),
            capacity,
            mode,
            Arc::new(Room::default()),
            false,
        )
    }

    #[test]
    fn a_revocation_announced_after_the_worker_looked_is_not_marked_applied() {
        let b = lane(8, Backpressure::Apply);
        b.push((1..=4).map(|seq| Record::test((seq % 2) as i32, seq as i64, seq)));
        let mut held = VecDeque::new();
        b.take(&mut held, 4);
        let in_hand = held.pop_front().unwrap(); // partition 1
        // The worker loads the count, finds its record not revoked ...
        let seen = b.announced();
        assert!(!b.is_revoked(&in_hand));
        // ... then the poll thread revokes both partitions ...
        let (n, _) = b.revoke(&[0, 1], 4);
        assert_eq!(n, seen + 1);
        // ... and the worker applies what it had seen: the revocation of
        // its own record's partition stays pending.
        b.apply_revocations_upto(&mut held, seen);
        assert!(b.revocation_pending());
        assert!(b.is_revoked(&in_hand));
    }

    #[test]
    fn a_wait_for_the_database_is_no_stall_and_clears_when_it_is_over() {
        let b = lane(8, Backpressure::Apply);
        let limit = Duration::from_secs(60);
        b.push(std::iter::once(Record::test(0, 1, 1)));
        let now = Instant::now();
        b.database_unreachable("connection refused");
        assert_eq!(b.observe_progress(0, now, limit), 0);
        assert!(b.stalled_for().is_none(), "waiting for the database");
        assert!(b.database_down().is_some());
        // Another kind of failure: not the database any more.
        b.database_reachable();
        assert!(b.database_down().is_none());
        b.observe_progress(0, now, limit);
        assert!(b.stalled_for().is_some(), "now a stall");
        // An empty lane waits for nothing.
        b.database_unreachable("connection refused");
        let mut taken = VecDeque::new();
        b.take(&mut taken, 1);
        b.give_back(taken.pop_front().unwrap());
        b.observe_progress(0, now, limit);
        assert!(b.database_down().is_none());
    }

    #[test]
    fn counts_records_until_the_worker_finishes_them() {
        let b = lane(4, Backpressure::Apply);
        b.push((1..=3).map(|seq| Record::test(0, seq as i64 + 10, seq)));
        assert_eq!((b.len(), b.room(), b.is_full()), (3, 1, false));

        // Taken by the worker: still in the lane until finished.
        let mut taken = VecDeque::new();
        b.take(&mut taken, 2);
        assert_eq!(taken.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(b.len(), 3);

        b.push(std::iter::once(Record::test(0, 14, 4)));
        assert!(b.is_full());
        for r in taken.drain(..) {
            b.give_back(r);
        }
        assert_eq!((b.len(), b.finished_count()), (2, 2));
        assert!(!b.is_full());

        // The poll thread gets the finished records back, with their offsets.
        let mut back = Vec::new();
        b.take_returned(&mut back);
        assert_eq!(back.iter().map(|r| r.offset).collect::<Vec<_>>(), [11, 12]);
    }

    #[test]
    fn drop_oldest_takes_only_waiting_records() {
        let b = lane(2, Backpressure::DropOldest);
        b.push((1..=2).map(|seq| Record::test(0, seq as i64, seq)));
        let mut taken = VecDeque::new();
        b.take(&mut taken, 1);
        b.push((3..=4).map(|seq| Record::test(0, seq as i64, seq)));
        // Four in the lane, room for two: the worker holds 1, so 2 and 3 go.
        let dropped = b.drop_oldest(b.len() - b.capacity());
        assert_eq!(dropped.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(b.len(), 2);
        // A drop mode is never full: it makes room instead.
        b.push(std::iter::once(Record::test(0, 5, 5)));
        assert!(!b.is_full());
    }
}
