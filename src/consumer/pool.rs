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
//! A pool of one worker has nothing to overlap: while nothing waits to be
//! retried, it runs records one after another in one future per run of a
//! type, the lane worker's own loop, which hands back a record to retry.

use std::collections::VecDeque;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use rustc_hash::{FxHashMap, FxHashSet, FxHasher};
use tokio::time::{Instant, MissedTickBehavior};

use crate::consumer::buffer::LaneBuffer;
use crate::consumer::context::{Lender, Record};
use crate::consumer::stopwatch::Stopwatch;
use crate::consumer::worker::{
    ActiveWorker, Attempted, LaneKit, Retries, RunEnd, Step, TypeWorker, WorkerEnv, front_run,
    reject,
};
use crate::model::consumer::{Distribution, WorkerSpec};
use crate::telemetry::trace;

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
                let mut h = FxHasher::default();
                key.hash(&mut h);
                OrderKey::Key(record.partition, h.finish())
            }
            None => OrderKey::Partition(record.partition),
        }),
    }
}

/// Records taken from the lane that have not started.
///
/// A key is claimed by its oldest record from the moment it arrives until
/// it is done with (ready, running, or parked for a retry); later records
/// of a claimed key wait in its queue. Queues exist only for keys with
/// records waiting behind another, so spread keys cost no allocation.
#[derive(Default)]
struct Waiting {
    /// Records that may start, oldest first (a retry whose pause is over
    /// goes first); their keys are claimed.
    ready: VecDeque<(Option<OrderKey>, Record, u32)>,
    /// Records behind their key's claim, per key.
    blocked: FxHashMap<OrderKey, VecDeque<Record>>,
    /// Keys with a record ready, running or parked.
    claimed: FxHashSet<OrderKey>,
    /// Records parked for a retry: when, their key, the record, the attempt.
    parked: Vec<(Instant, Option<OrderKey>, Record, u32)>,
    /// Records held in `ready`, `blocked` and `parked`.
    len: usize,
}

impl Waiting {
    fn add(&mut self, key: Option<OrderKey>, record: Record) {
        self.len += 1;
        match key {
            Some(k) if !self.claimed.insert(k) => {
                self.blocked.entry(k).or_default().push_back(record);
            }
            _ => self.ready.push_back((key, record, 1)),
        }
    }

    /// Claims `key` for a record that started without waiting here (the
    /// pool's fast path) and keeps running or waits for a retry.
    fn claim(&mut self, key: Option<OrderKey>) {
        if let Some(k) = key {
            self.claimed.insert(k);
        }
    }

    /// The next record that may start, with its key and attempt number.
    fn next(&mut self) -> Option<(Option<OrderKey>, Record, u32)> {
        let next = self.ready.pop_front()?;
        self.len -= 1;
        Some(next)
    }

    /// The record of `key` is done with: the key's next record may start.
    fn release(&mut self, key: Option<OrderKey>) {
        let Some(key) = key else { return };
        if self.blocked.is_empty() {
            self.claimed.remove(&key);
            return;
        }
        let next = match self.blocked.get_mut(&key) {
            Some(queue) => {
                let next = queue.pop_front();
                if queue.is_empty() {
                    self.blocked.remove(&key);
                }
                next
            }
            None => None,
        };
        match next {
            Some(record) => self.ready.push_back((Some(key), record, 1)),
            None => {
                self.claimed.remove(&key);
            }
        }
    }

    fn park(&mut self, until: Instant, key: Option<OrderKey>, record: Record, attempt: u32) {
        self.len += 1;
        self.parked.push((until, key, record, attempt));
    }

    /// Moves parked records whose pause is over to the front of `ready`.
    fn wake_parked(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.parked.len() {
            if self.parked[i].0 <= now {
                let (_, key, record, attempt) = self.parked.swap_remove(i);
                self.ready.push_front((key, record, attempt));
            } else {
                i += 1;
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        self.parked.iter().map(|p| p.0).min()
    }

    /// Removes the records `revoked` says belong to an ended ownership,
    /// passing each to `gone`.
    fn purge(&mut self, revoked: impl Fn(&Record) -> bool, mut gone: impl FnMut(Record)) {
        // Keys whose claiming record went: their next record takes over.
        let mut freed = Vec::new();
        let ready = std::mem::take(&mut self.ready);
        for (key, record, attempt) in ready {
            if revoked(&record) {
                freed.push(key);
                gone(record);
            } else {
                self.ready.push_back((key, record, attempt));
            }
        }
        let parked = std::mem::take(&mut self.parked);
        for (until, key, record, attempt) in parked {
            if revoked(&record) {
                freed.push(key);
                gone(record);
            } else {
                self.parked.push((until, key, record, attempt));
            }
        }
        for queue in self.blocked.values_mut() {
            let kept: VecDeque<Record> = std::mem::take(queue)
                .into_iter()
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
        self.blocked.retain(|_, q| !q.is_empty());
        for key in freed {
            self.release(key);
        }
        self.len = self.ready.len()
            + self.parked.len()
            + self.blocked.values().map(VecDeque::len).sum::<usize>();
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

/// What the pool keeps between records, apart from the running futures
/// (which borrow the lane and its workers).
struct State {
    waiting: Waiting,
    /// Sequence number and partition of each running record (at most the
    /// pool's size, so a list): whether a revocation's records still run.
    running: Vec<(u64, i32)>,
    /// Finished records not yet given back to the lane.
    finished: Vec<Record>,
    /// Lenders to reuse (each keeps a context cell and a stop token).
    lenders: Vec<Lender>,
    /// A record was not finished (stream gone, cancelled): the pool stops.
    abandoned: bool,
    /// The pool's reading of the wall clock, which its attempts' watches
    /// fork from; read again whenever the pool has waited.
    watch: Stopwatch,
}

impl State {
    /// Takes one attempt's result back; `key` is its record's order key.
    fn complete(&mut self, buffer: &LaneBuffer, (key, a): (Option<OrderKey>, Attempted)) {
        if let Some(at) = self
            .running
            .iter()
            .position(|&(seq, _)| seq == a.record.seq)
        {
            self.running.swap_remove(at);
        }
        if let Some(lender) = a.lender {
            self.lenders.push(lender);
        }
        match a.step {
            Step::Finished(true) => {
                self.finished.push(a.record);
                self.waiting.release(key);
            }
            // Not acknowledged: dropped, and the pool stops.
            Step::Finished(false) => self.abandoned = true,
            Step::RetryAfter(pause) => {
                if buffer.is_revoked(&a.record) {
                    // Its partition went: its next owner retries it.
                    buffer.discard(1);
                    self.waiting.release(key);
                } else {
                    let until = Instant::now() + pause;
                    self.waiting.park(until, key, a.record, a.attempt + 1);
                }
            }
        }
    }

    /// Gives what finished back to the lane.
    fn report(&mut self, buffer: &LaneBuffer) {
        buffer.give_back_all(&mut self.finished);
    }
}

/// What a pool starts its attempts with.
struct Starter<'a> {
    env: &'a WorkerEnv,
    buffer: &'a LaneBuffer,
    types: &'a [Box<dyn TypeWorker>],
    dead_letter_topic: &'a str,
}

impl<'a> Starter<'a> {
    /// Starts an attempt at `record`: its result when it finished on its
    /// first poll (a handler that does not wait), else the running attempt.
    /// Taken at once, such an attempt needs no task node in `running` (an
    /// allocation per record). One that waits is polled again there, with
    /// the pool's waker, since a pushed future is queued to run.
    fn start(
        &self,
        st: &mut State,
        record: Record,
        attempt: u32,
    ) -> Result<Attempted, BoxFuture<'a, Attempted>> {
        let Starter {
            env,
            buffer,
            types,
            dead_letter_topic: dlt,
        } = *self;
        let mut future = match (&record.rejection, types.get(record.type_index)) {
            (None, Some(worker)) => {
                let lender = st
                    .lenders
                    .pop()
                    .unwrap_or_else(|| Lender::new(env.shared.stopping.clone()));
                worker.attempt(env, buffer, record, attempt, lender, st.watch.fork())
            }
            _ => async move {
                let done = match &record.rejection {
                    Some(rejection) => reject(env, (dlt, &buffer.topic), &record, rejection).await,
                    // The router only sets indexes of this lane's types.
                    None => true,
                };
                Attempted {
                    record,
                    attempt,
                    step: Step::Finished(done),
                    lender: None,
                }
            }
            .boxed(),
        };
        match (&mut future).now_or_never() {
            Some(done) => Ok(done),
            None => Err(future),
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
    let mut st = State {
        waiting: Waiting::default(),
        running: Vec::new(),
        finished: Vec::new(),
        lenders: Vec::new(),
        abandoned: false,
        watch: Stopwatch::start(),
    };
    let starter = Starter {
        env: &env,
        buffer: &buffer,
        types: &types,
        dead_letter_topic: &dead_letter_topic,
    };
    let mut incoming: VecDeque<Record> = VecDeque::new();
    type Running<'a> = Keyed<BoxFuture<'a, Attempted>>;
    let mut running: FuturesUnordered<Running<'_>> = FuturesUnordered::new();
    let mut revoking: Option<u64> = None;
    let mut tick = tokio::time::interval(LAG_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let scaled = size.spec.lag_threshold.is_some();
    let single = size.spec.max == 1;
    let mut kit = LaneKit::new(&env);
    let mut since_yield = 0u32;

    loop {
        // Revocations: records of ended ownerships that have not started
        // never will here; the running ones may finish, and the revocation
        // counts as applied once none of them runs.
        if buffer.revocation_pending() {
            let n = buffer.announced();
            if revoking != Some(n) {
                let mut gone = 0;
                st.waiting.purge(|r| buffer.is_revoked(r), |_| gone += 1);
                buffer.discard(gone);
                revoking = Some(n);
            }
        }
        if let Some(n) = revoking {
            if st
                .running
                .iter()
                .all(|&(seq, p)| !buffer.is_revoked_at(p, seq))
            {
                st.report(&buffer);
                buffer.mark_applied(n);
                revoking = None;
            }
        }

        let stop_now = env.shared.must_stop_now();
        let mut progressed = false;
        if !stop_now && st.waiting.len < lookahead {
            buffer.take(&mut incoming, lookahead - st.waiting.len);
            // One worker and nothing waiting to be retried: records run one
            // after another in one future per run of a type, as in a lane
            // without a pool; a record to be retried comes back to be parked,
            // so that other keys flow meanwhile.
            while single
                && running.is_empty()
                && st.waiting.is_empty()
                && !st.abandoned
                && !buffer.revocation_pending()
                && !env.cancel.is_cancelled()
            {
                let Some((worker, n)) = front_run(&incoming, &types) else {
                    break;
                };
                kit.watch = st.watch.fork();
                buffer.busy.store(1, Ordering::Relaxed);
                let scope = kit.handling();
                let run =
                    worker.handle_run(&env, &buffer, &mut incoming, n, &mut kit, Retries::HandBack);
                let end = trace::lane(scope, run).await;
                progressed = true;
                match end {
                    RunEnd::Finished => {}
                    RunEnd::Unfinished => st.abandoned = true,
                    RunEnd::Retry(a) => {
                        let key = order_key(size.spec.distribution, &a.record);
                        st.waiting.claim(key);
                        st.complete(&buffer, (key, a));
                    }
                }
            }
            for record in incoming.drain(..) {
                let key = order_key(size.spec.distribution, &record);
                // Nothing runs or waits (a pool keeping up with handlers that
                // do not wait): the record starts without queueing, and claims
                // its key only if it keeps running or waits for a retry.
                if !(running.is_empty() && st.waiting.is_empty())
                    || st.abandoned
                    || buffer.revocation_pending()
                {
                    st.waiting.add(key, record);
                    continue;
                }
                let (seq, partition) = (record.seq, record.partition);
                match starter.start(&mut st, record, 1) {
                    Ok(done) => {
                        let key = match done.step {
                            Step::RetryAfter(_) => {
                                st.waiting.claim(key);
                                key
                            }
                            Step::Finished(_) => None,
                        };
                        st.complete(&buffer, (key, done));
                        progressed = true;
                    }
                    Err(future) => {
                        st.waiting.claim(key);
                        st.running.push((seq, partition));
                        running.push(Keyed { key, future });
                    }
                }
            }
        }
        while !stop_now && !st.abandoned && running.len() < size.current {
            let Some((key, record, attempt)) = st.waiting.next() else {
                break;
            };
            let (seq, partition) = (record.seq, record.partition);
            match starter.start(&mut st, record, attempt) {
                Ok(done) => {
                    st.complete(&buffer, (key, done));
                    progressed = true;
                }
                Err(future) => {
                    st.running.push((seq, partition));
                    running.push(Keyed { key, future });
                }
            }
        }
        buffer.busy.store(running.len(), Ordering::Relaxed);

        if running.is_empty()
            && (stop_now
                || (env.shared.is_stopping() && buffer.is_sealed() && st.waiting.is_empty()))
        {
            break;
        }

        // Whatever finished already is taken without the select's wake-ups.
        while let Some(Some(a)) = running.next().now_or_never() {
            st.complete(&buffer, a);
            progressed = true;
        }
        if progressed {
            st.report(&buffer);
            if st.abandoned {
                break;
            }
            // A busy pool may never wait on anything; without this it would
            // hold its runtime thread for as long as records keep coming.
            since_yield += 1;
            if since_yield >= YIELD_EVERY {
                since_yield = 0;
                tokio::task::yield_now().await;
                st.watch = Stopwatch::start();
                if env.cancel.is_cancelled() {
                    break;
                }
                if scaled && tick.tick().now_or_never().is_some() {
                    let lag = buffer.len().saturating_sub(running.len());
                    size.follow(lag);
                    buffer.workers.store(size.current, Ordering::Relaxed);
                }
            }
            continue;
        }

        let wake = st.waiting.next_wake();
        // Re-read after the wait, below: a pool that runs for days follows
        // the wall clock's adjustments.
        tokio::select! {
            biased;
            () = env.cancel.cancelled() => break,
            Some(a) = running.next(), if !running.is_empty() => {
                st.complete(&buffer, a);
                while let Some(Some(a)) = running.next().now_or_never() {
                    st.complete(&buffer, a);
                }
                st.report(&buffer);
            }
            () = buffer.wait() => {}
            () = sleep_until(wake), if wake.is_some() => {
                st.waiting.wake_parked(Instant::now());
            }
            _ = tick.tick(), if scaled => {
                let lag = buffer.len().saturating_sub(running.len());
                size.follow(lag);
                buffer.workers.store(size.current, Ordering::Relaxed);
            }
        }
        st.watch = Stopwatch::start();
        if st.abandoned {
            // A stream is gone or the service is cancelled: what is left is
            // not acknowledged and is delivered again.
            break;
        }
    }
    buffer.busy.store(0, Ordering::Relaxed);
    st.report(&buffer);
}

/// A running attempt with its record's order key, which comes back with
/// the attempt's result.
struct Keyed<F> {
    key: Option<OrderKey>,
    future: F,
}

impl<F: Future + Unpin> Future for Keyed<F> {
    type Output = (Option<OrderKey>, F::Output);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        Pin::new(&mut this.future)
            .poll(cx)
            .map(|out| (this.key, out))
    }
}

/// A busy pool yields to the runtime after this many rounds.
const YIELD_EVERY: u32 = 64;

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
        w.release(a);
        w.release(b);
        assert!(w.is_empty());
        assert!(w.claimed.is_empty() && w.blocked.is_empty());
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
