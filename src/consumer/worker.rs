//! The async worker of one type: takes records from its buffer in order,
//! decodes, runs the handler with retries, dead-letters what cannot be
//! handled, and reports each finished offset to its poll thread.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use std::collections::VecDeque;

use crate::consumer::buffer::{LaneBuffer, TypeStats};
use crate::consumer::context::Record;
use crate::consumer::dead_letter::{DeadLetters, Failure};
use crate::consumer::handler::{Action, HandlerError};
use crate::consumer::poll::{Rejection, ServiceShared};
use crate::consumer::{MessageContext, RetryPolicy};
use crate::model::{Message, TopicSpec};

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
    /// reporting each finished one to the lane; `false` if one was not
    /// finished (cancelled, or its stream is gone): it and the rest are not
    /// acknowledged. One boxed future per run of records, not per record.
    fn handle_run<'a>(
        &'a self,
        env: &'a WorkerEnv,
        lane: &'a LaneBuffer,
        batch: &'a mut VecDeque<Record>,
        n: usize,
    ) -> BoxFuture<'a, bool>;
}

pub(crate) struct Typed<T, D> {
    pub(crate) spec: TopicSpec<T>,
    pub(crate) retry: RetryPolicy,
    pub(crate) dead_letter_topic: String,
    pub(crate) dispatch: D,
    pub(crate) stats: Arc<TypeStats>,
}

impl<T: Message, D: Dispatch<T>> TypeWorker for Typed<T, D> {
    fn handle_run<'a>(
        &'a self,
        env: &'a WorkerEnv,
        lane: &'a LaneBuffer,
        batch: &'a mut VecDeque<Record>,
        n: usize,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            for _ in 0..n {
                if env.cancel.is_cancelled() {
                    return false;
                }
                let Some(record) = batch.pop_front() else {
                    break;
                };
                let seq = record.seq;
                let finished = handle(
                    env,
                    &self.stats,
                    &self.spec,
                    self.retry,
                    &self.dead_letter_topic,
                    &self.dispatch,
                    &record,
                )
                .await;
                if !finished {
                    return false;
                }
                lane.finished(seq);
                // A busy lane may never wait on anything; without this it
                // would hold its runtime thread (and the timers and tasks
                // queued behind it) for as long as records keep coming.
                // Not every record: each yield can wake an idle thread.
                if seq % YIELD_EVERY == 0 {
                    tokio::task::yield_now().await;
                }
            }
            true
        })
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
    let mut batch: VecDeque<Record> = VecDeque::with_capacity(TAKE);
    loop {
        if batch.is_empty() {
            buffer.take(&mut batch, TAKE);
        }
        let Some(front) = batch.front() else {
            if env.shared.is_stopping() {
                break;
            }
            tokio::select! {
                () = buffer.wait() => continue,
                () = env.cancel.cancelled() => break,
            }
        };
        if env.cancel.is_cancelled() {
            break;
        }
        let finished = match (front.rejection.is_some(), types.get(front.type_index)) {
            (false, Some(worker)) => {
                let index = front.type_index;
                let run = batch
                    .iter()
                    .take_while(|r| r.rejection.is_none() && r.type_index == index)
                    .count();
                worker.handle_run(&env, &buffer, &mut batch, run).await
            }
            _ => match batch.pop_front() {
                Some(record) => {
                    let finished = match &record.rejection {
                        Some(rejection) => {
                            reject(&env, &dead_letter_topic, &record, rejection).await
                        }
                        // The router only sets indexes of this lane's types.
                        None => true,
                    };
                    if finished {
                        buffer.finished(record.seq);
                    }
                    finished
                }
                None => true,
            },
        };
        if !finished {
            break;
        }
    }
}

/// Dead-letters a record the router could not give to a type.
async fn reject(env: &WorkerEnv, topic: &str, record: &Record, rejection: &Rejection) -> bool {
    let reason = match rejection {
        Rejection::Tombstone => "tombstone",
        Rejection::MissingType => "missing-type",
        Rejection::UnknownType(_) => "unknown-type",
    };
    let failure = Failure {
        reason,
        error: rejection.reason(),
        attempts: 0,
    };
    env.dead_letters
        .publish(topic, &env.shared.group_id, record, &failure, &env.cancel)
        .await
}

/// Handles one record to the end. `false` means it was not finished
/// (cancelled, or its stream is gone) and must not be acknowledged.
async fn handle<T, D>(
    env: &WorkerEnv,
    stats: &TypeStats,
    spec: &TopicSpec<T>,
    retry: RetryPolicy,
    dead_letter_topic: &str,
    dispatch: &D,
    record: &Record,
) -> bool
where
    T: Message,
    D: Dispatch<T>,
{
    let dead_letter = |reason: &'static str, error: String, attempts: u32| async move {
        let failure = Failure {
            reason,
            error,
            attempts,
        };
        let ok = env
            .dead_letters
            .publish(
                dead_letter_topic,
                &env.shared.group_id,
                record,
                &failure,
                &env.cancel,
            )
            .await;
        if ok {
            stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
        ok
    };

    let mut attempt = 1;
    loop {
        let payload = record.payload().unwrap_or_default();
        let message = match spec.codec().decode(payload) {
            Ok(m) => m,
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                return dead_letter(
                    "decode",
                    format!("cannot decode as `{}`: {e}", spec.rust_type()),
                    attempt - 1,
                )
                .await;
            }
        };
        // A clone costs two reference counts (topic name, round buffer).
        let ctx = MessageContext::new(record.clone(), attempt);
        let span = tracing::debug_span!(
            "kontext.handle",
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            r#type = spec.type_name(),
            attempt
        );
        let outcome = tracing::Instrument::instrument(
            AssertUnwindSafe(dispatch.dispatch(message, ctx)).catch_unwind(),
            span,
        )
        .await;
        let (action, error, reason) = match outcome {
            Ok(Outcome::Done) => {
                stats.handled.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(Outcome::Duplicate) => {
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(Outcome::Abandon) => return false,
            Ok(Outcome::Failed(e)) => (e.action, e.to_string(), "handler"),
            Err(panic) => (Action::Retry, panic_text(&panic), "panic"),
        };
        stats.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(source = ?record, attempt, %error, reason, "handler failed");
        let pause = match action {
            Action::Skip => {
                stats.handled.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Action::DeadLetter => return dead_letter(reason, error, attempt).await,
            _ if attempt >= retry.max_attempts => {
                let reason = if reason == "panic" {
                    "panic"
                } else {
                    "retries-exhausted"
                };
                return dead_letter(reason, error, attempt).await;
            }
            Action::RetryAfter(d) => d,
            Action::Retry => retry.backoff(attempt),
        };
        stats.retried.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = env.cancel.cancelled() => return false,
        }
        attempt += 1;
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    format!("handler panicked: {msg}")
}
