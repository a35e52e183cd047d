//! The async worker of one type: takes records from its buffer in order,
//! decodes, runs the handler with retries, dead-letters what cannot be
//! handled, and reports each finished offset to its poll thread.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use std::collections::VecDeque;

use crate::codec::CodecError;
use crate::consumer::buffer::{LaneBuffer, TypeStats};
use crate::consumer::context::Rejection;
use crate::consumer::context::{Lender, Record};
use crate::consumer::dead_letter::{DeadLetters, Failure, FailureReason, Sent};
use crate::consumer::handler::{Action, HandlerError};
use crate::consumer::poll::ServiceShared;
use crate::consumer::stopwatch::Stopwatch;
use crate::consumer::{MessageContext, RetryPolicy};
use crate::headers;
use crate::model::{Message, TopicSpec};
use crate::telemetry::{TypeTimings, trace};

/// What became of a dispatched message.
pub(crate) enum Outcome {
    Done,
    /// Already processed (inbox): acknowledged without handling.
    Duplicate,
    Failed(HandlerError),
    /// The receiving side is gone (a dropped stream): stop without acknowledging.
    Abandon,
}

/// Something that takes decoded messages: a user handler or a stream.
pub(crate) trait Dispatch<T>: Send + Sync + 'static {
    fn dispatch(&self, message: T, ctx: MessageContext) -> impl Future<Output = Outcome> + Send;
}

/// Counts a worker as active for its poll service until dropped, so the
/// poll thread knows when draining is over.
pub(crate) struct ActiveWorker(pub(crate) Arc<ServiceShared>);

impl ActiveWorker {
    pub(crate) fn new(shared: Arc<ServiceShared>) -> Self {
        shared.workers_active.fetch_add(1, Ordering::SeqCst);
        ActiveWorker(shared)
    }
}

impl Drop for ActiveWorker {
    fn drop(&mut self) {
        self.0.workers_active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Shared inputs of every worker.
#[derive(Clone)]
pub(crate) struct WorkerEnv {
    pub(crate) shared: Arc<ServiceShared>,
    pub(crate) dead_letters: Arc<DeadLetters>,
    pub(crate) cancel: CancellationToken,
}

/// One consumed type of a lane: decodes, dispatches, retries, dead-letters.
pub(crate) trait TypeWorker: Send + Sync {
    /// Handles the first `n` records of `batch` (all of this type) in order,
    /// reporting each finished one to the lane. One boxed future per run of
    /// records, not per record. It stops early, leaving the rest in
    /// `batch`, when a revocation is pending or (`Retries::HandBack`) a
    /// record is to be retried.
    fn handle_run<'a>(
        &'a self,
        env: &'a WorkerEnv,
        lane: &'a LaneBuffer,
        batch: &'a mut VecDeque<Record>,
        n: usize,
        kit: &'a mut LaneKit,
        retries: Retries,
    ) -> BoxFuture<'a, RunEnd>;

    /// Whether this worker holds records across runs ([`TypeWorker::settle`]).
    fn settles(&self) -> bool {
        false
    }

    /// Completes what the worker holds unfinished across runs (an
    /// exactly-once lane's open transaction): called before its lane
    /// applies a revocation, waits for records, or stops draining. Records
    /// it could not complete go back to the front of `batch`. `false`: the
    /// lane must stop.
    fn settle<'a>(
        &'a self,
        _env: &'a WorkerEnv,
        _lane: &'a LaneBuffer,
        _batch: &'a mut VecDeque<Record>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async { true })
    }

    /// One attempt at `record` for a worker pool: never waits out a retry
    /// pause (the pool parks the record instead, so it holds no worker).
    /// `lender`: the pool's lender for this attempt, handed back in
    /// [`Attempted`] (lenders are reused: each keeps a context cell and a
    /// clone of the stop token). `watch`: started for this attempt.
    fn attempt<'a>(
        &'a self,
        env: &'a WorkerEnv,
        lane: &'a LaneBuffer,
        record: Record,
        attempt: u32,
        lender: Lender,
        watch: Stopwatch,
    ) -> BoxFuture<'a, Attempted>;
}

/// A record back from one attempt in a worker pool.
pub(crate) struct Attempted {
    pub(crate) record: Record,
    /// Attempts spent: one that could not reach the database is not.
    pub(crate) attempt: u32,
    pub(crate) step: Step,
    /// The lender, for the next attempt.
    pub(crate) lender: Option<Lender>,
}

/// What a run of records does with a record whose attempt is to be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retries {
    /// Waits out the pause and retries it in place: a lane without a pool,
    /// where later records wait behind it anyway.
    Wait,
    /// Ends the run with it: a one-worker pool parks it, so that records of
    /// other keys flow meanwhile.
    HandBack,
}

/// How a run of records ended.
pub(crate) enum RunEnd {
    /// Every record was finished, or a revocation is pending (the rest are
    /// still in the batch).
    Finished,
    /// A record was not finished (cancelled, or its stream is gone): it and
    /// the rest are not acknowledged.
    Unfinished,
    /// `Retries::HandBack`: this record is to be retried after its pause
    /// (`Step::RetryAfter`); the rest are still in the batch.
    Retry(Attempted),
}

/// What a worker pool does with a record after an attempt.
pub(crate) enum Step {
    /// Done with: `true` when finished (handled, skipped, dead-lettered),
    /// `false` when it must not be acknowledged (cancelled, stream gone).
    Finished(bool),
    /// Attempt again after this pause.
    RetryAfter(Duration),
}

pub(crate) struct Typed<T, D> {
    pub(crate) spec: TopicSpec<T>,
    pub(crate) retry: RetryPolicy,
    pub(crate) handler_timeout: Option<Duration>,
    pub(crate) dead_letter_topic: String,
    pub(crate) dispatch: D,
    pub(crate) stats: Arc<TypeStats>,
    pub(crate) timings: TypeTimings,
}

impl<T: Message, D: Dispatch<T>> TypeWorker for Typed<T, D> {
    fn handle_run<'a>(
        &'a self,
        env: &'a WorkerEnv,
        lane: &'a LaneBuffer,
        batch: &'a mut VecDeque<Record>,
        n: usize,
        kit: &'a mut LaneKit,
        retries: Retries,
    ) -> BoxFuture<'a, RunEnd> {
        Box::pin(async move {
            for _ in 0..n {
                if env.shared.must_stop_now() {
                    return RunEnd::Unfinished;
                }
                // The lane drops the records of revoked partitions before
                // this worker starts another one.
                if lane.revocation_pending() {
                    return RunEnd::Finished;
                }
                let Some(mut record) = batch.pop_front() else {
                    break;
                };
                // Handled here rather than in an async fn of its own: every
                // `.await` of an async fn moves the callee's whole future into
                // the caller's, once per record.
                let mut attempt = 1;
                let mut shrunk = false;
                let finished = loop {
                    // Decoded, wrapped and awaited in one expression, so the
                    // handler's future is built where it is polled instead of
                    // being moved through return values.
                    let decoded = self
                        .spec
                        .codec()
                        .decode(record.payload().unwrap_or_default());
                    let result = match decoded {
                        Ok(message) => {
                            let lent = kit.lender.lend(&mut record);
                            let ctx = MessageContext::new(
                                Arc::clone(&lane.topic),
                                &record,
                                lent.shared(),
                                attempt,
                            );
                            let shared = lent.shared();
                            let span = self.span(&lane.topic, &record, attempt, &*shared);
                            kit.handling.set(shared);
                            let guarded = Guarded {
                                span,
                                future: self.dispatch.dispatch(message, ctx),
                            };
                            let outcome = match self.handler_timeout {
                                None => Some(guarded.await),
                                // Boxed: the timer would grow every
                                // record's future, also where unused.
                                Some(limit) => {
                                    Box::pin(tokio::time::timeout(limit, guarded)).await.ok()
                                }
                            };
                            self.measure(&record, kit.watch.lap(), &outcome);
                            // Before the take-back: the cell comes back
                            // unshared once the handler's future is gone.
                            kit.handling.clear();
                            kit.lender.take_back(lent, &mut record);
                            match outcome {
                                Some(outcome) => self.outcome(outcome, attempt),
                                None => Err(self.timed_out(attempt)),
                            }
                        }
                        Err(e) => Err(self.undecodable(&record, &e, attempt)),
                    };
                    let failure = match result {
                        Ok(finished) => break finished,
                        Err(failure) => failure,
                    };
                    let spent = failure.spent();
                    let held = batch.len();
                    let next = self
                        .recover(env, lane, &record, failure, (retries, Some(&mut *batch)))
                        .await;
                    // Revoked records left the batch: `n` no longer
                    // counts this run (the caller works out the next one).
                    shrunk |= batch.len() != held;
                    kit.watch.restart();
                    match next {
                        Next::Retry => attempt += spent,
                        Next::Finished(finished) => break finished,
                        Next::HandBack(pause) => {
                            return RunEnd::Retry(Attempted {
                                record,
                                attempt: attempt - 1 + spent,
                                step: Step::RetryAfter(pause),
                                lender: None,
                            });
                        }
                    }
                    // Its partition went while it waited to retry: its
                    // next owner handles it, this worker never again.
                    let announced = lane.announced();
                    if lane.is_revoked(&record) {
                        lane.discard_revoked();
                        drop(record);
                        lane.apply_revocations_upto(batch, announced);
                        return RunEnd::Finished;
                    }
                    if lane.revocation_pending() {
                        let held = batch.len();
                        lane.apply_revocations_upto(batch, announced);
                        shrunk |= batch.len() != held;
                    }
                };
                if !finished {
                    return RunEnd::Unfinished;
                }
                let seq = record.seq;
                lane.give_back(record);
                if shrunk {
                    return RunEnd::Finished;
                }
                // A busy lane may never wait on anything; without this it
                // would hold its runtime thread (and the timers and tasks
                // queued behind it) for as long as records keep coming.
                // Not every record: each yield can wake an idle thread.
                if seq % YIELD_EVERY == 0 {
                    tokio::task::yield_now().await;
                    kit.watch.restart();
                }
            }
            RunEnd::Finished
        })
    }

    fn attempt<'a>(
        &'a self,
        env: &'a WorkerEnv,
        lane: &'a LaneBuffer,
        mut record: Record,
        attempt: u32,
        mut lender: Lender,
        mut watch: Stopwatch,
    ) -> BoxFuture<'a, Attempted> {
        Box::pin(async move {
            let result = match self
                .spec
                .codec()
                .decode(record.payload().unwrap_or_default())
            {
                Ok(message) => {
                    let lent = lender.lend(&mut record);
                    let ctx = MessageContext::new(
                        Arc::clone(&lane.topic),
                        &record,
                        lent.shared(),
                        attempt,
                    );
                    let shared = lent.shared();
                    let span = self.span(&lane.topic, &record, attempt, &*shared);
                    let guarded = trace::handling(
                        shared,
                        Guarded {
                            span,
                            future: self.dispatch.dispatch(message, ctx),
                        },
                    );
                    let outcome = match self.handler_timeout {
                        None => Some(guarded.await),
                        // Boxed, as in `handle_run`: the future is boxed
                        // per attempt, so its size costs every record.
                        Some(limit) => Box::pin(tokio::time::timeout(limit, guarded)).await.ok(),
                    };
                    self.measure(&record, watch.lap(), &outcome);
                    lender.take_back(lent, &mut record);
                    match outcome {
                        Some(outcome) => self.outcome(outcome, attempt),
                        None => Err(self.timed_out(attempt)),
                    }
                }
                Err(e) => Err(self.undecodable(&record, &e, attempt)),
            };
            let mut spent = 1;
            let step = match result {
                Ok(finished) => Step::Finished(finished),
                Err(failure) => {
                    spent = failure.spent();
                    match self
                        .recover(env, lane, &record, failure, (Retries::HandBack, None))
                        .await
                    {
                        Next::Finished(finished) => Step::Finished(finished),
                        Next::HandBack(pause) => Step::RetryAfter(pause),
                        // `HandBack` never waits to retry in place.
                        Next::Retry => Step::RetryAfter(Duration::ZERO),
                    }
                }
            };
            Attempted {
                record,
                attempt: attempt - 1 + spent,
                step,
                lender: Some(lender),
            }
        })
    }
}

impl<T: Message, D: Dispatch<T>> Typed<T, D> {
    /// One attempt at `record` on a lane, for a caller that decides what
    /// follows a failure itself (a lane in Kafka transactions). Unlike
    /// [`TypeWorker::handle_run`] it does not count the record handled:
    /// that caller counts it once its transaction commits.
    pub(super) async fn try_once(
        &self,
        lane: &LaneBuffer,
        record: &mut Record,
        attempt: u32,
        kit: &mut LaneKit,
    ) -> Result<bool, Failed> {
        let message = match self
            .spec
            .codec()
            .decode(record.payload().unwrap_or_default())
        {
            Ok(message) => message,
            Err(e) => return Err(self.undecodable(record, &e, attempt)),
        };
        let lent = kit.lender.lend(record);
        let ctx = MessageContext::new(Arc::clone(&lane.topic), record, lent.shared(), attempt);
        let shared = lent.shared();
        let span = self.span(&lane.topic, record, attempt, &*shared);
        kit.handling.set(shared);
        let guarded = Guarded {
            span,
            future: self.dispatch.dispatch(message, ctx),
        };
        let outcome = match self.handler_timeout {
            None => Some(guarded.await),
            Some(limit) => tokio::time::timeout(limit, guarded).await.ok(),
        };
        self.measure(record, kit.watch.lap(), &outcome);
        kit.handling.clear();
        kit.lender.take_back(lent, record);
        match outcome {
            Some(Ok(Outcome::Done)) => Ok(true),
            Some(outcome) => self.outcome(outcome, attempt),
            None => Err(self.timed_out(attempt)),
        }
    }

    /// Records an attempt's duration and, once handled, the record's age
    /// (`now_ms`: the wall clock when the attempt ended).
    fn measure(
        &self,
        record: &Record,
        (took, now_ms): (Duration, u64),
        outcome: &Option<std::thread::Result<Outcome>>,
    ) {
        self.timings.handler.record(took);
        // The age counts once, when the record is handled.
        if !matches!(outcome, Some(Ok(Outcome::Done))) {
            return;
        }
        if let Some(age) = record
            .timestamp
            .and_then(|t| u64::try_from(t).ok())
            .and_then(|ts| now_ms.checked_sub(ts))
        {
            self.timings.end_to_end.record(Duration::from_millis(age));
        }
    }

    /// [`after_failure`] for this type. Boxed: rare and large (a timer, a
    /// produce), so the per-record future stays small.
    pub(super) fn recover<'a>(
        &'a self,
        env: &'a WorkerEnv,
        lane: &'a LaneBuffer,
        record: &'a Record,
        failure: Failed,
        retries: (Retries, Option<&'a mut VecDeque<Record>>),
    ) -> BoxFuture<'a, Next> {
        Box::pin(after_failure(
            env,
            lane,
            (&self.stats, self.retry),
            (&self.dead_letter_topic, &lane.topic),
            record,
            failure,
            retries,
        ))
    }

    /// An attempt cancelled at the handler time limit.
    fn timed_out(&self, attempt: u32) -> Failed {
        let limit = self.handler_timeout.unwrap_or_default();
        tracing::warn!(attempt, ?limit, "handler overran its time limit; cancelled");
        Failed {
            reason: FailureReason::Timeout,
            error: format!("the handler did not finish within {limit:?}; it was cancelled"),
            attempts: attempt,
            action: Action::Retry,
        }
    }

    /// The span a handler runs in.
    /// The process span of one attempt, with OpenTelemetry's messaging
    /// attributes (`messaging.*`) and kontext's own (`kontext.*`).
    fn span(
        &self,
        topic: &str,
        record: &Record,
        attempt: u32,
        message: &dyn trace::Incoming,
    ) -> tracing::Span {
        let span = tracing::debug_span!(
            "kontext.process",
            "messaging.system" = "kafka",
            "messaging.operation.type" = "process",
            "messaging.destination.name" = %topic,
            "messaging.destination.partition.id" = record.partition,
            "messaging.kafka.offset" = record.offset,
            "kontext.type" = self.spec.type_name(),
            "kontext.attempt" = attempt
        );
        // The producer's trace, when the span is exported (reads headers).
        trace::adopt(&span, message);
        span
    }

    /// Why a record does not decode. On a topic of one type the router does
    /// not read headers, so a record of another type is recognised here, by
    /// its `ce_type`, rather than reported as a decoding error.
    fn undecodable(&self, record: &Record, error: &CodecError, attempt: u32) -> Failed {
        // Not retried: the same bytes will not decode next time.
        if let Some(name) = record.bad_header() {
            return Failed {
                reason: FailureReason::BadHeader,
                error: Rejection::BadHeader(name).reason(),
                attempts: 0,
                action: Action::DeadLetter,
            };
        }
        match record.header(headers::MESSAGE_TYPE) {
            Some(t) if t != self.spec.type_name().as_bytes() => Failed {
                reason: FailureReason::UnknownType,
                error: Rejection::UnknownType(String::from_utf8_lossy(t).into_owned()).reason(),
                attempts: 0,
                action: Action::DeadLetter,
            },
            _ => Failed {
                reason: FailureReason::Decode,
                error: format!(
                    "cannot decode as `{}`: {}",
                    self.spec.rust_type(),
                    crate::codec::describe(error)
                ),
                attempts: attempt - 1,
                action: Action::DeadLetter,
            },
        }
    }

    /// What a finished dispatch means: `Ok(false)` when the message was not
    /// finished (its stream is gone), `Err` when the attempt failed.
    fn outcome(&self, outcome: std::thread::Result<Outcome>, attempt: u32) -> Result<bool, Failed> {
        match outcome {
            Ok(Outcome::Done) => {
                self.stats.handled.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Ok(Outcome::Duplicate) => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Ok(Outcome::Abandon) => Ok(false),
            Ok(Outcome::Failed(e)) => Err(Failed {
                reason: FailureReason::Handler,
                error: e.to_string(),
                attempts: attempt,
                action: match e.action {
                    Action::Retry | Action::RetryAfter(_)
                        if crate::db::is_unreachable(e.source()) =>
                    {
                        Action::Unreachable
                    }
                    action => action,
                },
            }),
            Err(panic) => Err(Failed {
                reason: FailureReason::Panic,
                error: panic_text(&panic),
                attempts: attempt,
                action: Action::Retry,
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// A handler's future run inside its span, a panic turned into an
    /// error: one wrapper instead of two, so the future moves once less.
    struct Guarded<F> {
        #[pin]
        future: F,
        span: tracing::Span,
    }
}

impl<F: Future> Future for Guarded<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        match std::panic::catch_unwind(AssertUnwindSafe(|| this.future.poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// What a lane worker keeps from one attempt to the next.
pub(crate) struct LaneKit {
    lender: Lender,
    /// Times the next attempt.
    pub(crate) watch: Stopwatch,
    /// Which message its handler handles, for the trace context.
    handling: Arc<trace::Handling>,
}

impl LaneKit {
    pub(crate) fn new(env: &WorkerEnv) -> LaneKit {
        LaneKit {
            lender: Lender::new(env.shared.stopping.clone()),
            watch: Stopwatch::start(),
            handling: Arc::new(trace::Handling::default()),
        }
    }

    /// Where its handlers' messages are noted for the trace context: a run
    /// of records (`TypeWorker::handle_run`) runs in `trace::lane` with it.
    pub(crate) fn handling(&self) -> Arc<trace::Handling> {
        Arc::clone(&self.handling)
    }
}

/// A busy lane yields to the runtime after this many records.
const YIELD_EVERY: u64 = 256;

/// Records a worker takes from its lane at a time.
const TAKE: usize = 128;

/// Runs one lane until its service drains (buffer empty) or is cancelled:
/// records in buffer order, so a partition's records are handled in order
/// whatever their types.
pub(crate) async fn run_lane(
    active: ActiveWorker,
    env: WorkerEnv,
    buffer: Arc<LaneBuffer>,
    types: Vec<Box<dyn TypeWorker>>,
    dead_letter_topic: String,
) {
    let _active = active;
    let _running = buffer.worker_running();
    let mut batch: VecDeque<Record> = VecDeque::with_capacity(TAKE);
    let mut kit = LaneKit::new(&env);
    let handling = Arc::clone(&kit.handling);
    let settles = types.iter().any(|t| t.settles());
    trace::lane(handling, async move {
        loop {
            if buffer.revocation_pending() {
                if settles && !settle(&types, &env, &buffer, &mut batch).await {
                    break;
                }
                buffer.apply_revocations(&mut batch);
            }
            if batch.is_empty() {
                buffer.take(&mut batch, TAKE);
                kit.watch = Stopwatch::start();
            }
            if batch.is_empty() && settles {
                // Complete before waiting: nothing may stay uncommitted
                // while no record comes.
                if !settle(&types, &env, &buffer, &mut batch).await {
                    break;
                }
                if !batch.is_empty() {
                    continue;
                }
            }
            if batch.is_empty() {
                // Draining ends when the poll thread holds nothing more for
                // this lane (records it kept back while the lane was full).
                if env.shared.must_stop_now() || (env.shared.is_stopping() && buffer.is_sealed()) {
                    break;
                }
                tokio::select! {
                    () = buffer.wait() => continue,
                    () = env.cancel.cancelled() => break,
                }
            }
            if env.cancel.is_cancelled() {
                break;
            }
            let finished = match front_run(&batch, &types) {
                Some((worker, run)) => {
                    // `Wait` never hands a record back.
                    matches!(
                        worker
                            .handle_run(&env, &buffer, &mut batch, run, &mut kit, Retries::Wait)
                            .await,
                        RunEnd::Finished
                    )
                }
                None => match batch.pop_front() {
                    Some(record) => {
                        let finished = match &record.rejection {
                            Some(rejection) => {
                                reject(
                                    &env,
                                    (&dead_letter_topic, &buffer.topic),
                                    &record,
                                    rejection,
                                )
                                .await
                            }
                            // The router only sets indexes of this lane's types.
                            None => true,
                        };
                        if finished {
                            buffer.give_back(record);
                        }
                        kit.watch.restart();
                        finished
                    }
                    None => true,
                },
            };
            if !finished {
                break;
            }
        }
    })
    .await;
}

/// The run of records at the front of `batch` that one type handles in
/// one future (`TypeWorker::handle_run`): its worker and length. `None`
/// when the batch is empty or its front record was rejected by the router.
pub(crate) fn front_run<'t>(
    batch: &VecDeque<Record>,
    types: &'t [Box<dyn TypeWorker>],
) -> Option<(&'t dyn TypeWorker, usize)> {
    let front = batch.front()?;
    if front.rejection.is_some() {
        return None;
    }
    let worker = types.get(front.type_index)?;
    let index = front.type_index;
    let run = batch
        .iter()
        .take_while(|r| r.rejection.is_none() && r.type_index == index)
        .count();
    Some((worker.as_ref(), run))
}

/// [`TypeWorker::settle`] for every type of a lane.
async fn settle(
    types: &[Box<dyn TypeWorker>],
    env: &WorkerEnv,
    lane: &LaneBuffer,
    batch: &mut VecDeque<Record>,
) -> bool {
    for t in types {
        if !t.settle(env, lane, batch).await {
            return false;
        }
    }
    true
}

/// Dead-letters a record the router could not give to a type.
/// `topics`: the dead-letter topic and the record's own.
pub(crate) async fn reject(
    env: &WorkerEnv,
    (topic, source): (&str, &str),
    record: &Record,
    rejection: &Rejection,
) -> bool {
    let reason = match rejection {
        Rejection::Tombstone => FailureReason::Tombstone,
        Rejection::MissingType => FailureReason::MissingType,
        Rejection::UnknownType(_) => FailureReason::UnknownType,
        Rejection::NotConsumed(_) => FailureReason::NotConsumed,
        Rejection::BadHeader(_) => FailureReason::BadHeader,
    };
    let failure = Failure {
        reason,
        error: rejection.reason(),
        attempts: 0,
    };
    let sent = env
        .dead_letters
        .publish(
            topic,
            &env.shared.group_id,
            source,
            record,
            &failure,
            &env.cancel,
        )
        .await;
    env.shared.count_rejected(sent)
}

/// A failed attempt, and what the handler asked for.
pub(super) struct Failed {
    reason: FailureReason,
    error: String,
    attempts: u32,
    action: Action,
}

impl Failed {
    /// An attempt whose Kafka transaction could not commit, again and
    /// again with only its record in it: counted as the handler's failure.
    pub(super) fn uncommitted(error: String, attempts: u32) -> Failed {
        Failed {
            reason: FailureReason::Handler,
            error,
            attempts,
            action: Action::Retry,
        }
    }

    /// The attempts this failure spent of the retry policy's: none when the
    /// database could not be reached.
    pub(super) fn spent(&self) -> u32 {
        u32::from(self.action != Action::Unreachable)
    }
}

/// The pause before attempting again a record whose attempt could not reach
/// the database: fixed, as these retries do not end with a dead letter.
const UNREACHABLE_PAUSE: Duration = Duration::from_millis(500);

/// What to do after a failed attempt.
pub(super) enum Next {
    /// Its pause is over: attempt again.
    Retry,
    Finished(bool),
    /// `Retries::HandBack`: attempt again after this pause, elsewhere.
    HandBack(Duration),
}

/// What comes after a failed attempt, before any waiting or sending.
enum Plan {
    /// Finished with (skipped on the handler's word).
    Finished(bool),
    /// Retry after this pause.
    Pause(Duration),
    /// Dead-letter; `true` when the failure is this type's own.
    DeadLetter(Failed, bool),
}

/// Counts and logs a failure and decides what follows: a retry after the
/// policy's pause, a skip, or a dead letter, as the handler asked and the
/// retry budget allows.
fn plan_failure(
    stats: &TypeStats,
    retry: RetryPolicy,
    source: &str,
    record: &Record,
    mut failure: Failed,
) -> Plan {
    // A record of another type is not this type's failure: the router would
    // have rejected it had it read the headers, and rejections count nowhere.
    let ours = !matches!(
        failure.reason,
        FailureReason::UnknownType | FailureReason::BadHeader
    );
    if ours {
        stats.failed.fetch_add(1, Ordering::Relaxed);
    }
    let attempt = failure.attempts;
    if matches!(
        failure.reason,
        FailureReason::Handler | FailureReason::Panic
    ) && failure.action != Action::Unreachable
    {
        tracing::warn!(source, record = ?record, attempt, error = %failure.error, reason = failure.reason.as_str(), "handler failed");
    }
    let pause = match failure.action {
        Action::Unreachable => {
            tracing::warn!(source, record = ?record, error = %failure.error, pause = ?UNREACHABLE_PAUSE, "database unreachable; retrying without spending an attempt");
            Some(UNREACHABLE_PAUSE)
        }
        Action::Skip => {
            stats.handled.fetch_add(1, Ordering::Relaxed);
            return Plan::Finished(true);
        }
        Action::DeadLetter => None,
        _ if attempt >= retry.max_attempts => {
            // A panic or a timeout says more than "retries exhausted".
            if !matches!(
                failure.reason,
                FailureReason::Panic | FailureReason::Timeout
            ) {
                failure.reason = FailureReason::RetriesExhausted;
            }
            None
        }
        Action::RetryAfter(d) => Some(d),
        Action::Retry => Some(retry.backoff(attempt)),
    };
    match pause {
        Some(pause) => {
            stats.retried.fetch_add(1, Ordering::Relaxed);
            Plan::Pause(pause)
        }
        None => Plan::DeadLetter(failure, ours),
    }
}

/// Sends a failed record to the dead-letter topic and counts it; whether
/// the record is done with (sent, or given up on). `topics`: the
/// dead-letter topic and the record's own.
async fn dead_letter(
    env: &WorkerEnv,
    stats: &TypeStats,
    (dead_letter_topic, source): (&str, &str),
    record: &Record,
    failure: Failed,
    ours: bool,
) -> bool {
    let reason = failure.reason;
    let sent = env
        .dead_letters
        .publish(
            dead_letter_topic,
            &env.shared.group_id,
            source,
            record,
            &Failure {
                reason: failure.reason,
                error: failure.error,
                attempts: failure.attempts,
            },
            &env.cancel,
        )
        .await;
    if !ours {
        return env.shared.count_rejected(sent);
    }
    match sent {
        Sent::Published => {
            stats.dead_letter_reasons[reason.index()].fetch_add(1, Ordering::Relaxed);
            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
        Sent::Refused => {
            stats.dead_letters_refused.fetch_add(1, Ordering::Relaxed);
            env.shared
                .dead_letters_refused
                .fetch_add(1, Ordering::Relaxed);
        }
        Sent::Cancelled => {}
    }
    sent != Sent::Cancelled
}

/// Counts a failure and then retries after the policy's pause (waited out
/// here or handed back, as `retries` says), skips, or dead-letters, as the
/// handler asked and the retry budget allows. `topics`: the dead-letter
/// topic and the record's own; `held`: the records the worker holds behind
/// this one, when it waits out the pause in place.
async fn after_failure(
    env: &WorkerEnv,
    lane: &LaneBuffer,
    (stats, retry): (&TypeStats, RetryPolicy),
    topics: (&str, &str),
    record: &Record,
    failure: Failed,
    (retries, mut held): (Retries, Option<&mut VecDeque<Record>>),
) -> Next {
    if failure.action == Action::Unreachable {
        lane.database_unreachable(&failure.error);
    } else {
        lane.database_reachable();
    }
    match plan_failure(stats, retry, topics.1, record, failure) {
        Plan::Finished(finished) => Next::Finished(finished),
        Plan::Pause(pause) if retries == Retries::HandBack => Next::HandBack(pause),
        Plan::Pause(pause) => {
            let until = tokio::time::Instant::now() + pause;
            loop {
                // A revocation of the record's partition ends the pause (the
                // caller then lets the record go); one of another partition
                // does not, but is applied now: the poll thread waits inside
                // the rebalance for it, and so does the partition's next
                // owner, which must not wait out this record's pause.
                let revoked = lane.revocation_signal();
                tokio::pin!(revoked);
                revoked.as_mut().enable();
                let announced = lane.announced();
                if lane.is_revoked(record) {
                    return Next::Retry;
                }
                if lane.revocation_pending() {
                    if let Some(held) = held.as_deref_mut() {
                        lane.apply_revocations_upto(held, announced);
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep_until(until) => return Next::Retry,
                    () = &mut revoked => {}
                    () = env.cancel.cancelled() => return Next::Finished(false),
                }
            }
        }
        Plan::DeadLetter(failure, ours) => {
            Next::Finished(dead_letter(env, stats, topics, record, failure, ours).await)
        }
    }
}

/// A lane's task, watched: should it end while its service runs (a panic
/// in kontext's own code: handlers' panics are caught per attempt; a
/// stream dropped by its reader), the service fails at once, naming the
/// lane, instead of the lane filling up
/// silently until the stall limit notices. A failed service is not live,
/// and its poll thread leaves the group, so the partitions move to members
/// that can handle them.
pub(crate) async fn supervised(
    run: futures::future::BoxFuture<'static, ()>,
    shared: Arc<ServiceShared>,
    lane: String,
) {
    use futures::FutureExt as _;
    let ended = std::panic::AssertUnwindSafe(run).catch_unwind().await;
    let why = match ended {
        Ok(()) if shared.is_stopping() => return,
        // The one way a lane ends while its service runs: a stream's
        // receiver was dropped. Its topic's records (of every type on it)
        // are no longer handled here, so the member steps out of its group
        // rather than hold the partitions.
        Ok(()) => format!(
            "the stream of {lane} was dropped; the topic is no longer consumed by this member"
        ),
        Err(panic) => format!(
            "the worker of {lane} panicked: {}",
            panic_text(&panic).trim_start_matches("handler panicked: ")
        ),
    };
    tracing::error!(service = %shared.name, %lane, reason = %why, "a lane's worker died; its poll service fails");
    shared.fail(why);
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    format!("handler panicked: {msg}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ServiceProbe as _, ServiceState};

    #[tokio::test]
    async fn a_lane_worker_that_dies_fails_its_service_at_once_naming_the_lane() {
        let shared = ServiceShared::new("shared-g".into(), "g".into(), false, true);
        let dies: BoxFuture<'static, ()> = Box::pin(async { panic!("kontext bug") });
        supervised(dies, Arc::clone(&shared), "topic `orders` (types a)".into()).await;
        let status = shared.status();
        match &status.state {
            ServiceState::Failed(why) => {
                assert!(why.contains("topic `orders`"), "{why}");
                assert!(why.contains("kontext bug"), "{why}");
            }
            other => panic!("not failed: {other:?}"),
        }
        assert!(shared.must_stop_now(), "the poll loop is told to stop");
        assert!(!status.is_healthy());

        // A lane that ends because its service stops is no failure.
        let shared = ServiceShared::new("shared-h".into(), "h".into(), false, true);
        shared.drain();
        supervised(Box::pin(async {}), Arc::clone(&shared), "l".into()).await;
        assert_eq!(shared.state(), ServiceState::Running);
        // One that ends while it runs (its stream was dropped) is, saying so.
        let shared = ServiceShared::new("shared-i".into(), "i".into(), false, true);
        supervised(Box::pin(async {}), Arc::clone(&shared), "l".into()).await;
        assert!(
            matches!(shared.state(), ServiceState::Failed(why) if why.contains("stream of l was dropped"))
        );
    }
}
