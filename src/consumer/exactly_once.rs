//! Consume-transform-produce in Kafka transactions: a lane whose handler
//! produces through a transaction that also commits the consumed records'
//! offsets, in the consumer's group generation (KIP-447). Each input's
//! output becomes visible to `read_committed` consumers exactly once.
//!
//! One transaction takes several records, up to a count or an age, and is
//! committed before the lane would wait for more, before a revocation is
//! applied (the partitions' next owner starts from what it committed) and
//! when the service drains. A record is given back to the lane, and so to
//! the offset bookkeeping, only once its transaction committed: a crash or
//! an abort leaves every record of the transaction to be handled again,
//! and its output was never visible.
//!
//! A failed attempt aborts the transaction it ran in, so the records
//! before it in that transaction are handled again, in a transaction of
//! their own, before the failed record is retried alone; the retry and
//! dead-letter rules then apply to it as to any handler's. A dead letter is
//! sent outside the transaction (at least once).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::consumer::buffer::LaneBuffer;
use crate::consumer::context::{Lender, Record};
use crate::consumer::handler::HandlerError;
use crate::consumer::sync::lock;
use crate::consumer::worker::{
    Attempted, Dispatch, Failed, LaneKit, Next, Outcome, Retries, RunEnd, TypeWorker, Typed,
    WorkerEnv, reject,
};
use crate::consumer::{MessageContext, stopwatch::Stopwatch};
use crate::error::{Error, TransactionFailure};
use crate::model::Message;
use crate::producer::{Open, Transaction, TransactionalProducer};

/// Handles messages of type `T` in Kafka transactions: what it produces
/// through the [`Transaction`] commits together with the message's offset,
/// or not at all. Registered with
/// [`Consumers::exactly_once`](crate::consumer::Consumers::exactly_once).
///
/// Implemented for every
/// `async fn(T, MessageContext, Transaction) -> Result<(), HandlerError>`
/// and closures of that shape. A handler may run more than once for a
/// message (its transaction aborted, or the process stopped before the
/// commit); only one run's output is ever visible to `read_committed`
/// consumers. Effects outside Kafka are not part of the transaction.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot handle messages of type `{T}` in Kafka transactions",
    note = "an exactly-once handler is an `async fn(msg: {T}, ctx: MessageContext, tx: Transaction) -> Result<(), HandlerError>`"
)]
pub trait ExactlyOnceHandler<T>: Send + Sync + 'static {
    /// Handles one message, producing its output through `tx`. Returning
    /// `Ok` lets the transaction commit; `Err` aborts it.
    fn handle(
        &self,
        message: T,
        ctx: MessageContext,
        tx: Transaction,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<T, F, Fut> ExactlyOnceHandler<T> for F
where
    T: Send + 'static,
    F: Fn(T, MessageContext, Transaction) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(
        &self,
        message: T,
        ctx: MessageContext,
        tx: Transaction,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(message, ctx, tx)
    }
}

/// Passes the lane's open transaction to the handler.
pub(crate) struct TransactionDispatch<H> {
    pub(crate) handler: H,
    /// Set by the lane around each attempt.
    current: std::sync::Mutex<Option<Transaction>>,
}

impl<H> TransactionDispatch<H> {
    pub(crate) fn new(handler: H) -> Self {
        TransactionDispatch {
            handler,
            current: std::sync::Mutex::new(None),
        }
    }
}

impl<T: Message, H: ExactlyOnceHandler<T>> Dispatch<T> for TransactionDispatch<H> {
    fn dispatch(&self, message: T, ctx: MessageContext) -> impl Future<Output = Outcome> + Send {
        let tx = lock(&self.current).clone();
        async move {
            let Some(tx) = tx else {
                return Outcome::Failed(HandlerError::retry(Error::Internal(
                    "an exactly-once handler ran outside a transaction".into(),
                )));
            };
            match self.handler.handle(message, ctx, tx).await {
                Ok(()) => Outcome::Done,
                Err(e) => Outcome::Failed(e),
            }
        }
    }
}

/// How many records a transaction takes, and for how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    pub(crate) max_records: usize,
    pub(crate) interval: Duration,
}

/// The worker of an exactly-once type, alone on its lane.
pub(crate) struct ExactlyOnce<T, H> {
    pub(crate) typed: Typed<T, super::Wrapped<TransactionDispatch<H>>>,
    pub(crate) producer: TransactionalProducer,
    pub(crate) bounds: Bounds,
    /// The poll service's client settings: a commit in doubt is settled by
    /// reading the group's committed offsets with a client of its own.
    pub(crate) group_config: ClientConfig,
    pub(crate) state: tokio::sync::Mutex<Txn>,
}

/// The lane's transaction and the records handled in it.
#[derive(Default)]
pub(crate) struct Txn {
    open: Option<Open>,
    /// Handled in `open`, in lane order; given back once it commits.
    pending: Vec<Record>,
    /// Commit after this many records: the ones that preceded a failed
    /// attempt, handled again before that record is retried alone.
    limit: Option<usize>,
    /// The record to attempt next (by `seq`) and its attempt number.
    head: Option<(u64, u32)>,
    /// The failure of `head`'s last attempt, when it failed among other
    /// records: the retry rules apply to it once those are committed.
    deferred: Option<Failed>,
    /// Of `pending`, the records handled (not dead-lettered or rejected).
    handled: u64,
    /// The last record handled (by `seq`) and its attempt number.
    ran: Option<(u64, u32)>,
    /// Commits that failed in a row for what they carried (a message that
    /// could not be delivered), not for the group or the coordinator.
    failed_commits: u32,
    /// Transactions take one record each until the one with this sequence
    /// number is committed: the records of a transaction that failed for
    /// what it carried, tried one at a time to find the culprit.
    narrow_until: Option<u64>,
    /// Pause after a transaction that could not begin or commit.
    backoff: Duration,
}

/// Why a lane stops.
struct Stop;

/// Reads of the committed offsets that settle a commit in doubt.
const SETTLE_TRIES: u32 = 5;
const SETTLE_PAUSE: Duration = Duration::from_secs(1);

/// After this many failed commits in a row, transactions take one record
/// at a time, to find the one whose output cannot be delivered.
const ONE_AT_A_TIME_AFTER: u32 = 3;
/// After this many, a transaction of one record counts as a failed attempt
/// of that record (the retry and dead-letter rules apply).
const RECORD_FAILED_AFTER: u32 = 5;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl<T: Message, H: ExactlyOnceHandler<T>> TypeWorker for ExactlyOnce<T, H> {
    fn handle_run<'a>(
        &'a self,
        env: &'a WorkerEnv,
        lane: &'a LaneBuffer,
        batch: &'a mut VecDeque<Record>,
        _n: usize,
        kit: &'a mut LaneKit,
        _retries: Retries,
    ) -> BoxFuture<'a, RunEnd> {
        // The type is alone on its lane: every record of `batch` is its.
        Box::pin(async move {
            let mut st = self.state.lock().await;
            match self.run(env, lane, batch, kit, &mut st).await {
                Ok(end) => end,
                Err(Stop) => {
                    stop(&mut st).await;
                    RunEnd::Unfinished
                }
            }
        })
    }

    fn settles(&self) -> bool {
        true
    }

    fn settle<'a>(
        &'a self,
        env: &'a WorkerEnv,
        lane: &'a LaneBuffer,
        batch: &'a mut VecDeque<Record>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let mut st = self.state.lock().await;
            let settled = if env.shared.must_stop_now() || env.cancel.is_cancelled() {
                Err(Stop)
            } else {
                self.commit(env, lane, batch, &mut st).await
            };
            match settled {
                Ok(()) => true,
                Err(Stop) => {
                    stop(&mut st).await;
                    false
                }
            }
        })
    }

    fn attempt<'a>(
        &'a self,
        _env: &'a WorkerEnv,
        _lane: &'a LaneBuffer,
        record: Record,
        attempt: u32,
        lender: Lender,
        _watch: Stopwatch,
    ) -> BoxFuture<'a, Attempted> {
        // `start()` refuses an exactly-once type in a worker pool.
        Box::pin(async move {
            Attempted {
                record,
                attempt,
                step: crate::consumer::worker::Step::Finished(false),
                lender: Some(lender),
            }
        })
    }
}

impl<T: Message, H: ExactlyOnceHandler<T>> ExactlyOnce<T, H> {
    async fn run(
        &self,
        env: &WorkerEnv,
        lane: &LaneBuffer,
        batch: &mut VecDeque<Record>,
        kit: &mut LaneKit,
        st: &mut Txn,
    ) -> Result<RunEnd, Stop> {
        loop {
            if env.shared.must_stop_now() || env.cancel.is_cancelled() {
                return Err(Stop);
            }
            // Complete the transaction before the partitions move: the
            // poll thread waits inside the rebalance for this lane, and the
            // next owner starts from what this one committed.
            if lane.revocation_pending() {
                self.commit(env, lane, batch, st).await?;
                return Ok(RunEnd::Finished);
            }
            let bound = if st.narrow_until.is_some() {
                1
            } else {
                st.limit.unwrap_or(self.bounds.max_records)
            };
            let full = !st.pending.is_empty() && st.pending.len() >= bound;
            let old = st.open.as_ref().is_some_and(|open| {
                open.begun().elapsed() >= self.bounds.interval
                    || Instant::now() >= open.work_deadline()
            });
            if full || old {
                self.commit(env, lane, batch, st).await?;
                continue;
            }
            let Some(mut record) = batch.pop_front() else {
                break;
            };
            // A record the router could not give to a type: dead-lettered
            // (outside the transaction), its offset committed with it.
            if let Some(rejection) = &record.rejection {
                if !reject(
                    env,
                    (&self.typed.dead_letter_topic, &lane.topic),
                    &record,
                    rejection,
                )
                .await
                {
                    return Err(Stop);
                }
                st.pending.push(record);
                continue;
            }
            let (attempt, deferred) = match st.head {
                Some((seq, attempt)) if seq == record.seq => {
                    st.head = None;
                    (attempt, st.deferred.take())
                }
                _ => (1, None),
            };
            if let Some(failure) = deferred {
                if !st.pending.is_empty() {
                    // The records before it commit first.
                    st.head = Some((record.seq, attempt));
                    st.deferred = Some(failure);
                    batch.push_front(record);
                    self.commit(env, lane, batch, st).await?;
                    continue;
                }
                if let Some(end) = self
                    .after_failure(env, lane, batch, kit, st, record, failure, attempt)
                    .await?
                {
                    return Ok(end);
                }
                continue;
            }
            if st.open.is_none() {
                match self.producer.open().await {
                    Ok(open) => st.open = Some(open),
                    Err(e) => {
                        st.head = Some((record.seq, attempt));
                        batch.push_front(record);
                        self.refused(env, &e)?;
                        self.pause(env, lane, st).await;
                        continue;
                    }
                }
            }
            let tx = st.open.as_ref().map(Open::transaction);
            *lock(&super::unwrapped(&self.typed.dispatch).current) = tx;
            let result = self.typed.try_once(lane, &mut record, attempt, kit).await;
            *lock(&super::unwrapped(&self.typed.dispatch).current) = None;
            let failure = match result {
                Ok(true) => {
                    st.ran = Some((record.seq, attempt));
                    st.pending.push(record);
                    st.handled += 1;
                    continue;
                }
                // Only a stream's records go unfinished.
                Ok(false) => return Err(Stop),
                Err(failure) => failure,
            };
            // Its output, and that of the records before it in this
            // transaction, is discarded.
            if let Some(open) = st.open.take() {
                open.abort().await;
            }
            if !st.pending.is_empty() {
                // The records before it go again, committed on their own;
                // then the retry rules apply to this failure.
                st.head = Some((record.seq, attempt));
                st.deferred = Some(failure);
                batch.push_front(record);
                st.limit = Some(st.pending.len());
                requeue(st, batch);
                continue;
            }
            if let Some(end) = self
                .after_failure(env, lane, batch, kit, st, record, failure, attempt)
                .await?
            {
                return Ok(end);
            }
        }
        // The lane commits before it waits for more (`settle`).
        Ok(RunEnd::Finished)
    }

    /// The retry and dead-letter rules for `record`, alone (no record
    /// before it is in a transaction): it goes back in front of `batch` to
    /// be attempted again, or is finished (dead-lettered, skipped) and its
    /// offset committed at once. `Some`: how the run ends.
    #[allow(clippy::too_many_arguments)]
    async fn after_failure(
        &self,
        env: &WorkerEnv,
        lane: &LaneBuffer,
        batch: &mut VecDeque<Record>,
        kit: &mut LaneKit,
        st: &mut Txn,
        record: Record,
        failure: Failed,
        attempt: u32,
    ) -> Result<Option<RunEnd>, Stop> {
        let spent = failure.spent();
        let next = self
            .typed
            .recover(
                env,
                lane,
                &record,
                failure,
                (Retries::Wait, Some(&mut *batch)),
            )
            .await;
        kit.watch.restart();
        match next {
            Next::Retry | Next::HandBack(_) => {
                let announced = lane.announced();
                if lane.is_revoked(&record) {
                    // Its partition went while it waited: not this
                    // member's any more.
                    lane.discard_revoked();
                    drop(record);
                    lane.apply_revocations_upto(batch, announced);
                    return Ok(Some(RunEnd::Finished));
                }
                st.head = Some((record.seq, attempt + spent));
                batch.push_front(record);
            }
            // Dead-lettered or skipped: its offset commits at once, in a
            // transaction of its own (not to be retried again if a later
            // record's failure aborted the next one).
            Next::Finished(true) => {
                st.pending.push(record);
                st.limit = Some(1);
            }
            Next::Finished(false) => return Err(Stop),
        }
        Ok(None)
    }

    /// Commits the open transaction with the offsets after its records,
    /// and gives them back. What could not commit goes again, after a
    /// pause; a fenced producer stops the lane.
    async fn commit(
        &self,
        env: &WorkerEnv,
        lane: &LaneBuffer,
        batch: &mut VecDeque<Record>,
        st: &mut Txn,
    ) -> Result<(), Stop> {
        st.limit = None;
        if st.pending.is_empty() {
            if let Some(open) = st.open.take() {
                open.abort().await;
            }
            return Ok(());
        }
        // Records finished without output (dead-lettered, skipped) commit
        // their offsets in a transaction of their own.
        let open = match st.open.take() {
            Some(open) => open,
            None => match self.producer.open().await {
                Ok(open) => open,
                Err(e) => {
                    self.refused(env, &e)?;
                    requeue(st, batch);
                    self.pause(env, lane, st).await;
                    return Ok(());
                }
            },
        };
        let Some(group) = env.shared.group_metadata() else {
            open.abort().await;
            requeue(st, batch);
            self.pause(env, lane, st).await;
            return Ok(());
        };
        // The poll thread stopped waiting for a revocation: records of
        // those partitions are their next owner's now, who may already
        // have read the committed offsets. Never commit them. (Checked
        // after reading the metadata: a generation published after a give
        // up is never used for them.)
        if lane.revocation_given_up() && st.pending.iter().any(|r| lane.is_revoked(r)) {
            open.abort().await;
            requeue(st, batch);
            return Ok(());
        }
        let offsets = next_offsets(&lane.topic, &st.pending);
        let began = open.begun();
        let committing = Instant::now();
        let failure = match open.commit(Some((offsets, group))).await {
            Ok(()) => {
                tracing::debug!(
                    topic = %lane.topic,
                    records = st.pending.len(),
                    open_for = ?committing - began,
                    commit_took = ?committing.elapsed(),
                    "exactly-once transaction committed"
                );
                self.committed(lane, st);
                return Ok(());
            }
            Err(e) => e,
        };
        self.refused(env, &failure)?;
        if matches!(
            failure,
            Error::KafkaTransaction {
                failure: TransactionFailure::InDoubt,
                ..
            }
        ) {
            match self.settle_in_doubt(lane, st).await {
                Some(true) => return Ok(()),
                Some(false) => {}
                None => {
                    // Handling them again could show their output twice:
                    // the member steps out, its next owner starts from what
                    // is committed.
                    env.shared.fail(format!(
                        "a Kafka transaction's commit on topic `{}` stayed in doubt: its outcome could not be read back ({failure})",
                        lane.topic
                    ));
                    return Err(Stop);
                }
            }
        }
        // Refused for the group's generation, perhaps: the next rebalance
        // callback brings the new one.
        // An abortable error at the commit itself (not at the offsets, not
        // a timeout or a fatal client error) is what a message that could
        // not be delivered causes: it fails its whole transaction.
        let carried = matches!(
            failure,
            Error::KafkaTransaction {
                operation: "commit",
                failure: TransactionFailure::Aborted,
                ..
            }
        );
        let first = st.pending.first().map(|r| r.seq);
        let last = st.pending.last().map(|r| r.seq);
        let alone = st.pending.len() == 1;
        requeue(st, batch);
        if carried {
            st.failed_commits += 1;
            if st.failed_commits >= ONE_AT_A_TIME_AFTER && st.narrow_until.is_none() {
                // One record at a time, until all of this transaction's
                // records are committed, finds the one that cannot be.
                st.narrow_until = last;
            }
            let head_free = st.head.is_none_or(|(seq, _)| Some(seq) == first);
            if alone && head_free && st.failed_commits >= RECORD_FAILED_AFTER {
                if let Some(seq) = first {
                    // The attempt that ran it, now failed at the commit.
                    let attempt = st.ran.filter(|(s, _)| *s == seq).map_or(1, |(_, a)| a);
                    st.head = Some((seq, attempt));
                    st.deferred = Some(Failed::uncommitted(
                        format!("its Kafka transaction did not commit: {failure}"),
                        attempt,
                    ));
                }
            }
        }
        self.pause(env, lane, st).await;
        Ok(())
    }

    /// The transaction committed: its records are finished.
    fn committed(&self, lane: &LaneBuffer, st: &mut Txn) {
        st.backoff = Duration::ZERO;
        st.failed_commits = 0;
        let last = st.pending.last().map(|r| r.seq);
        if st
            .narrow_until
            .is_some_and(|until| last.is_some_and(|l| l >= until))
        {
            st.narrow_until = None;
        }
        let handled = std::mem::take(&mut st.handled);
        self.typed
            .stats
            .handled
            .fetch_add(handled, Ordering::Relaxed);
        for record in st.pending.drain(..) {
            lane.give_back(record);
        }
    }

    /// A commit whose outcome is unknown: the next client registers the
    /// transactional id again, which makes the coordinator complete or
    /// abort it; the group's committed offsets then tell which (read a few
    /// times). `Some(true)`: committed, the records were given back;
    /// `Some(false)`: not committed; `None`: still unknown.
    async fn settle_in_doubt(&self, lane: &LaneBuffer, st: &mut Txn) -> Option<bool> {
        for _ in 0..SETTLE_TRIES {
            match self.read_settled(lane, st).await {
                Ok(done) => {
                    tracing::warn!(topic = %lane.topic, committed = done, "settled a transaction whose commit was in doubt");
                    self.producer.settled(done);
                    if done {
                        self.committed(lane, st);
                    }
                    return Some(done);
                }
                Err(e) => {
                    tracing::warn!(topic = %lane.topic, error = %e, "a transaction's commit is in doubt and its outcome could not be read yet");
                    tokio::time::sleep(SETTLE_PAUSE).await;
                }
            }
        }
        None
    }

    /// Whether the group's committed offsets are past every pending record.
    async fn read_settled(&self, lane: &LaneBuffer, st: &Txn) -> Result<bool, String> {
        self.producer
            .ensure_client()
            .await
            .map_err(|e| e.to_string())?;
        let wanted = next_offsets(&lane.topic, &st.pending);
        let config = self.group_config.clone();
        let committed = tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = config.create()?;
            consumer.committed_offsets(wanted, Duration::from_secs(10))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok(st.pending.iter().all(|r| {
            committed
                .find_partition(&lane.topic, r.partition)
                .is_some_and(|e| matches!(e.offset(), Offset::Offset(o) if o > r.offset))
        }))
    }

    /// A fenced producer stops the lane and fails its service: another
    /// process registered the same transactional id.
    fn refused(&self, env: &WorkerEnv, e: &Error) -> Result<(), Stop> {
        if let Error::KafkaTransaction {
            failure: TransactionFailure::Fenced,
            ..
        } = e
        {
            env.shared
                .fail(format!("transactional producer fenced: {e}"));
            return Err(Stop);
        }
        tracing::warn!(error = %e, "a Kafka transaction of an exactly-once lane failed; its records are handled again");
        Ok(())
    }

    /// Waits before trying a transaction again, doubling each time; a
    /// revocation or the end of a shutdown's time ends the wait (a drain
    /// does not: it would make this a busy loop).
    async fn pause(&self, env: &WorkerEnv, lane: &LaneBuffer, st: &mut Txn) {
        st.backoff = (st.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
        let revoked = lane.revocation_signal();
        tokio::pin!(revoked);
        revoked.as_mut().enable();
        if lane.revocation_pending() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(st.backoff) => {}
            () = &mut revoked => {}
            () = env.cancel.cancelled() => {}
        }
    }
}

/// The lane stops: the open transaction is aborted, and its records are not
/// given back (whoever owns them next handles them again).
async fn stop(st: &mut Txn) {
    if let Some(open) = st.open.take() {
        open.abort().await;
    }
    st.pending.clear();
    st.handled = 0;
}

/// Puts the records of an aborted transaction back in front of `batch`,
/// in their order, to be handled again.
fn requeue(st: &mut Txn, batch: &mut VecDeque<Record>) {
    st.handled = 0;
    for record in st.pending.drain(..).rev() {
        batch.push_front(record);
    }
}

/// The offsets to commit after `records`: per partition, the one after the
/// last record.
fn next_offsets(topic: &str, records: &[Record]) -> TopicPartitionList {
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for r in records {
        let e = next.entry(r.partition).or_insert(r.offset + 1);
        *e = (*e).max(r.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in next {
        // Only fails for an invalid offset, which `offset + 1` is not.
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    tpl
}

/// Reads a lane's settings of exactly-once delivery and checks that the
/// lane can take it.
pub(crate) fn check_lane(
    types: &[&'static str],
    exactly_once: &[bool],
    pooled: bool,
    transactional_id: Option<&str>,
) -> crate::error::Result<bool> {
    let Some(i) = exactly_once.iter().position(|&e| e) else {
        return Ok(false);
    };
    let rust_type = types[i];
    if types.len() > 1 {
        return Err(Error::config(format!(
            "`{rust_type}` is consumed exactly once, in Kafka transactions, and shares its topic's lane with {}: an exactly-once type must be the only type this poll service consumes from its topic (give the others a dedicated connection, or another topic)",
            types
                .iter()
                .filter(|t| **t != rust_type)
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if pooled {
        return Err(Error::config(format!(
            "`{rust_type}` is consumed exactly once, in Kafka transactions, which a worker pool does not support: a pool finishes records out of order, and a transaction commits its partition's offsets in order; remove `workers(..)` from its consumer settings"
        )));
    }
    if transactional_id.is_none() {
        return Err(Error::config(format!(
            "`{rust_type}` is consumed exactly once, in Kafka transactions, which need a transactional id: call `KontextBuilder::transactional_producer(id)` with an id unique and stable per instance (its lanes use `<id>.<group>.<topic>`)"
        )));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_of_an_exactly_once_type_must_hold_it_alone_without_a_pool_and_with_an_id() {
        assert!(!check_lane(&["A"], &[false], true, None).unwrap());
        assert!(check_lane(&["A"], &[true], false, Some("svc-1")).unwrap());
        let shared = check_lane(&["A", "B"], &[true, false], false, Some("svc-1"))
            .unwrap_err()
            .to_string();
        assert!(shared.contains("`A`") && shared.contains("`B`"), "{shared}");
        let pooled = check_lane(&["A"], &[true], true, Some("svc-1"))
            .unwrap_err()
            .to_string();
        assert!(pooled.contains("worker pool"), "{pooled}");
        let no_id = check_lane(&["A"], &[true], false, None)
            .unwrap_err()
            .to_string();
        assert!(no_id.contains("transactional_producer"), "{no_id}");
    }

    #[test]
    fn offsets_after_a_transaction_are_one_past_each_partitions_last_record() {
        let records = [
            Record::test(0, 7, 1),
            Record::test(1, 3, 2),
            Record::test(0, 8, 3),
            Record::test(1, 4, 4),
            Record::test(2, 0, 5),
        ];
        let tpl = next_offsets("t", &records);
        let got: Vec<(i32, Offset)> = tpl
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, Offset::Offset(9)),
                (1, Offset::Offset(5)),
                (2, Offset::Offset(1))
            ]
        );
        assert_eq!(next_offsets("t", &[]).count(), 0);
    }
}
