//! A lane's worker pool (`ConsumerBuilder::workers`): up to `n` records of
//! one topic handled at once, in the order the [`Distribution`] requires.
//!
//! Records wait in per-key (or per-partition) queues; a queue's head may
//! start when nothing else of its key runs or waits to be retried, so a key
//! is handled in its partition's order and a failing key holds back only
//! itself. A record waiting out a retry pause is parked, not awaited: it
//! holds no worker. Finished records are reported one by one (in any
//! order) and the poll thread stores each partition's offset only up to its
//! first unfinished record (`offsets.rs`).
//!
//! The attempts run concurrently on the lane's one task, which owns them:
//! nothing is spawned per record, and aborting the task drops them all.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::{Instant, MissedTickBehavior};

use crate::consumer::buffer::LaneBuffer;
use crate::consumer::context::{Lender, Record};
use crate::consumer::spec::{Distribution, WorkerSpec};
use crate::consumer::worker::{ActiveWorker, Attempted, Step, TypeWorker, WorkerEnv, reject};

/// How often a lag-scaled pool looks at its lag.
pub(crate) const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// What orders a record against others: records of one order key run one
/// at a time, in delivery order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OrderKey {
    Partition(i32),
    /// Partition and a hash of the key: a collision only orders two keys
    /// that need not be, never the other way round.
    Key(i32, u64),
}

fn order_key(distribution: Distribution, record: &Record) -> Option<OrderKey> {
    match distribution {
        Distribution::Free => None,
        Distribution::ByPartition => Some(OrderKey::Partition(record.partition)),
        Distribution::ByKey => Some(match record.key() {
            Some(key) => {
                let mut h = DefaultHasher::new();
                key.hash(&mut h);
                OrderKey::Key(record.partition, h.finish())
            }
            None => OrderKey::Partition(record.partition),
        }),
    }
}

/// Records taken from the lane that have not started, by order key.
#[derive(Default)]
struct Waiting {
    queues: HashMap<OrderKey, VecDeque<Record>>,
    /// Keys whose head may start (not busy, queue not empty), oldest first.
    ready: VecDeque<OrderKey>,
    /// Keys with a record running or parked.
    busy: HashSet<OrderKey>,
    /// Records without an order (`Distribution::Free`).
    free: VecDeque<Record>,
    /// Records parked for a retry: when, their key, the record, the attempt.
    parked: Vec<(Instant, Option<OrderKey>, Record, u32)>,
    /// Records whose retry pause is over, to start before anything else.
    due: VecDeque<(Option<OrderKey>, Record, u32)>,
    /// Records held in `queues`, `free`, `parked` and `due`.
    len: usize,
}

impl Waiting {
    fn add(&mut self, key: Option<OrderKey>, record: Record) {
        self.len += 1;
        let Some(key) = key else {
            self.free.push_back(record);
            return;
        };
        let queue = self.queues.entry(key).or_default();
        queue.push_back(record);
        if queue.len() == 1 && !self.busy.contains(&key) {
            self.ready.push_back(key);
        }
    }

    /// The next record that may start, with its key and attempt number.
    fn next(&mut self) -> Option<(Option<OrderKey>, Record, u32)> {
        if let Some(due) = self.due.pop_front() {
            self.len -= 1;
            return Some(due);
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(queue) = self.queues.get_mut(&key) else {
                continue;
            };
            let Some(record) = queue.pop_front() else {
                self.queues.remove(&key);
                continue;
            };
            if queue.is_empty() {
                self.queues.remove(&key);
            }
            self.busy.insert(key);
            self.len -= 1;
            return Some((Some(key), record, 1));
        }
        let record = self.free.pop_front()?;
        self.len -= 1;
        Some((None, record, 1))
    }

    /// The record of `key` is done with: the key's next record may start.
    fn release(&mut self, key: Option<OrderKey>) {
        let Some(key) = key else { return };
        self.busy.remove(&key);
        if self.queues.get(&key).is_some_and(|q| !q.is_empty()) {
            self.ready.push_back(key);
        }
    }

    fn park(&mut self, until: Instant, key: Option<OrderKey>, record: Record, attempt: u32) {
        self.len += 1;
        self.parked.push((until, key, record, attempt));
    }

    /// Moves parked records whose pause is over to `due`.
    fn wake_parked(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.parked.len() {
            if self.parked[i].0 <= now {
                let (_, key, record, attempt) = self.parked.swap_remove(i);
                self.due.push_back((key, record, attempt));
            } else {
                i += 1;
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        self.parked.iter().map(|p| p.0).min()
    }

    /// Removes the records `revoked` says belong to an ended ownership.
    fn purge(&mut self, revoked: impl Fn(&Record) -> bool, mut gone: impl FnMut(Record)) {
        let before = self.len;
        let mut freed = Vec::new();
        for queue in self.queues.values_mut() {
            let kept: VecDeque<Record> = queue
                .drain(..)
                .filter_map(|r| {
                    if revoked(&r) {
                        gone(r);
                        None
                    } else {
                        Some(r)
                    }
                })
                .collect();
            *queue = kept;
        }
        self.queues.retain(|_, q| !q.is_empty());
        let free: VecDeque<Record> = self
            .free
            .drain(..)
            .filter_map(|r| {
                if revoked(&r) {
                    gone(r);
                    None
                } else {
                    Some(r)
                }
            })
            .collect();
        self.free = free;
        let mut parked = Vec::new();
        for (until, key, record, attempt) in self.parked.drain(..) {
            if revoked(&record) {
                freed.push(key);
                gone(record);
            } else {
                parked.push((until, key, record, attempt));
            }
        }
        self.parked = parked;
        let mut due = VecDeque::new();
        for (key, record, attempt) in self.due.drain(..) {
            if revoked(&record) {
                freed.push(key);
                gone(record);
            } else {
                due.push_back((key, record, attempt));
            }
        }
        self.due = due;
        self.len = self.queues.values().map(VecDeque::len).sum::<usize>()
            + self.free.len()
            + self.parked.len()
            + self.due.len();
        debug_assert!(self.len <= before);
        for key in freed {
            self.release(key);
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The pool's size: fixed, or following the lag.
struct Size {
    spec: WorkerSpec,
    current: usize,
}

impl Size {
    fn new(spec: WorkerSpec) -> Size {
        Size {
            current: spec.initial(),
            spec,
        }
    }

    /// Doubles while more than the threshold wait, halves once fewer than
    /// half of it do; between the two it holds, so it does not flap.
    fn follow(&mut self, lag: usize) {
        let Some(threshold) = self.spec.lag_threshold else {
            return;
        };
        if lag > threshold {
            self.current = (self.current * 2).min(self.spec.max);
        } else if lag < threshold.div_ceil(2) {
            self.current = (self.current / 2).max(self.spec.min).max(1);
        }
    }
}

/// Runs one lane with a worker pool until its service drains (nothing
/// left anywhere) or is cancelled.
pub(crate) async fn run_pool(
    active: ActiveWorker,
    env: WorkerEnv,
    buffer: Arc<LaneBuffer>,
    types: Vec<Box<dyn TypeWorker>>,
    dead_letter_topic: String,
    spec: WorkerSpec,
) {
    let _active = active;
    let _running = buffer.worker_running();
    let mut size = Size::new(spec);
    buffer.workers.store(size.current, Ordering::Relaxed);
    // How many records the pool looks ahead for keys that may start: the
    // rest stays in the lane, where a drop mode can still drop it.
    let lookahead = (buffer.capacity() / 2).max(size.spec.max).max(1);
    let mut lender = Lender::new(env.shared.stopping.clone());
    let mut incoming: VecDeque<Record> = VecDeque::new();
    let mut waiting = Waiting::default();
    type Running<'a> = BoxFuture<'a, (Option<OrderKey>, Attempted)>;
    let mut running: FuturesUnordered<Running<'_>> = FuturesUnordered::new();
    // Partition and sequence number of each running record, to know when
    // a revocation's records have all finished.
    let mut in_flight: HashMap<u64, i32> = HashMap::new();
    let mut finished: Vec<u64> = Vec::new();
    let mut revoking: Option<u64> = None;
    let mut tick = tokio::time::interval(LAG_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let scaled = size.spec.lag_threshold.is_some();
    let mut since_yield = 0u32;

    loop {
        // Revocations: records of ended ownerships that have not started
        // never will here; the running ones may finish, and the revocation
        // counts as applied once none of them runs.
        if buffer.revocation_pending() {
            let n = buffer.announced();
            if revoking != Some(n) {
                let mut gone = 0;
                waiting.purge(
                    |r| buffer.is_revoked(r),
                    |r| {
                        gone += 1;
                        lender.retire(r);
                    },
                );
                buffer.discard(gone);
                lender.hand_back(&buffer);
                revoking = Some(n);
            }
        }
        if let Some(n) = revoking {
            if in_flight
                .iter()
                .all(|(&seq, &p)| !buffer.is_revoked_at(p, seq))
            {
                buffer.completed(&mut finished);
                buffer.mark_applied(n);
                revoking = None;
            }
        }

        let stop_now = env.shared.must_stop_now();
        if !stop_now && waiting.len < lookahead {
            buffer.take(&mut incoming, lookahead - waiting.len);
            for record in incoming.drain(..) {
                let key = order_key(size.spec.distribution, &record);
                waiting.add(key, record);
            }
        }
        while !stop_now && running.len() < size.current {
            let Some((key, record, attempt)) = waiting.next() else {
                break;
            };
            in_flight.insert(record.seq, record.partition);
            let future: Running<'_> = match (&record.rejection, types.get(record.type_index)) {
                (None, Some(worker)) => worker
                    .attempt(&env, &buffer, record, attempt)
                    .map(move |a| (key, a))
                    .boxed(),
                _ => {
                    let (env, buffer, dlt) = (&env, &buffer, &dead_letter_topic);
                    async move {
                        let done = match &record.rejection {
                            Some(rejection) => {
                                reject(env, (dlt, &buffer.topic), &record, rejection).await
                            }
                            // The router only sets indexes of this lane's types.
                            None => true,
                        };
                        let step = Step::Finished(done);
                        (
                            key,
                            Attempted {
                                record,
                                attempt,
                                step,
                            },
                        )
                    }
                    .boxed()
                }
            };
            running.push(future);
        }
        buffer.busy.store(running.len(), Ordering::Relaxed);

        if running.is_empty()
            && (stop_now || (env.shared.is_stopping() && buffer.is_sealed() && waiting.is_empty()))
        {
            break;
        }

        let wake = waiting.next_wake();
        let mut abandoned = false;
        tokio::select! {
            biased;
            () = env.cancel.cancelled() => break,
            Some((key, attempted)) = running.next(), if !running.is_empty() => {
                let mut next = Some((key, attempted));
                // Everything that is ready now, under one report.
                while let Some((key, a)) = next.take() {
                    in_flight.remove(&a.record.seq);
                    match a.step {
                        Step::Finished(true) => {
                            finished.push(a.record.seq);
                            lender.retire(a.record);
                            waiting.release(key);
                        }
                        Step::Finished(false) => {
                            abandoned = true;
                            lender.retire(a.record);
                        }
                        Step::RetryAfter(pause) => {
                            if buffer.is_revoked(&a.record) {
                                // Its partition went: its next owner retries it.
                                buffer.discard(1);
                                lender.retire(a.record);
                                waiting.release(key);
                            } else {
                                waiting.park(Instant::now() + pause, key, a.record, a.attempt + 1);
                            }
                        }
                    }
                    next = running.next().now_or_never().flatten();
                }
                buffer.completed(&mut finished);
                lender.hand_back(&buffer);
            }
            () = buffer.wait() => {}
            () = sleep_until(wake), if wake.is_some() => {
                waiting.wake_parked(Instant::now());
            }
            _ = tick.tick(), if scaled => {
                let lag = buffer.len().saturating_sub(running.len());
                size.follow(lag);
                buffer.workers.store(size.current, Ordering::Relaxed);
            }
        }
        if abandoned {
            // A stream is gone or the service is cancelled: what is left is
            // not acknowledged and is delivered again.
            break;
        }
        since_yield += 1;
        if since_yield >= 64 {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
    buffer.busy.store(0, Ordering::Relaxed);
    buffer.completed(&mut finished);
    lender.hand_back(&buffer);
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_key_holds_only_its_own_records() {
        let mut w = Waiting::default();
        let a = Some(OrderKey::Key(0, 1));
        let b = Some(OrderKey::Key(0, 2));
        w.add(a, Record::test(0, 0, 1));
        w.add(a, Record::test(0, 1, 2));
        w.add(b, Record::test(0, 2, 3));
        let (k1, r1, _) = w.next().unwrap();
        assert_eq!((k1, r1.seq), (a, 1));
        // a is busy: b goes next, a's second record waits.
        let (k2, r2, _) = w.next().unwrap();
        assert_eq!((k2, r2.seq), (b, 3));
        assert!(w.next().is_none());
        // a parked for a retry: still busy.
        w.park(Instant::now(), a, r1, 2);
        assert!(w.next().is_none());
        w.wake_parked(Instant::now());
        let (_, again, attempt) = w.next().unwrap();
        assert_eq!((again.seq, attempt), (1, 2));
        w.release(a);
        assert_eq!(w.next().unwrap().1.seq, 2);
        assert!(w.is_empty());
    }

    #[test]
    fn purge_frees_the_keys_of_parked_records() {
        let mut w = Waiting::default();
        let a = Some(OrderKey::Partition(3));
        w.add(a, Record::test(3, 0, 1));
        w.add(a, Record::test(3, 1, 2));
        let (_, r, _) = w.next().unwrap();
        w.park(Instant::now(), a, r, 2);
        let mut gone = Vec::new();
        w.purge(|r| r.partition == 3, |r| gone.push(r.seq));
        gone.sort_unstable();
        assert_eq!(gone, [1, 2]);
        assert!(w.is_empty());
        w.add(a, Record::test(3, 5, 9));
        assert_eq!(w.next().unwrap().1.seq, 9);
    }

    #[test]
    fn lag_scaling_doubles_and_halves_within_bounds() {
        let mut s = Size::new(WorkerSpec {
            min: 2,
            max: 10,
            lag_threshold: Some(20),
            distribution: Distribution::ByKey,
        });
        assert_eq!(s.current, 2);
        s.follow(100);
        s.follow(100);
        assert_eq!(s.current, 8);
        s.follow(100);
        assert_eq!(s.current, 10);
        s.follow(15);
        assert_eq!(s.current, 10, "between half the threshold and it, it holds");
        s.follow(0);
        s.follow(0);
        s.follow(0);
        assert_eq!(s.current, 2);
    }
}
