//! The async worker of one type: takes records from its buffer in order,
//! decodes, runs the handler with retries, dead-letters what cannot be
//! handled, and reports each finished offset to its poll thread.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::FutureExt as _;
use tokio_util::sync::CancellationToken;

use crate::consumer::buffer::TypeBuffer;
use crate::consumer::context::Record;
use crate::consumer::dead_letter::{DeadLetters, Failure};
use crate::consumer::handler::{Action, HandlerError};
use crate::consumer::poll::{Ack, Rejection, ServiceShared};
use crate::consumer::{MessageContext, RetryPolicy};
use crate::model::{Message, TopicSpec};

/// What became of a dispatched message.
pub(crate) enum Outcome {
    Done,
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

/// Runs until the service drains (buffer empty) or is cancelled.
pub(crate) async fn run<T, D>(
    active: ActiveWorker,
    env: WorkerEnv,
    buffer: Arc<TypeBuffer>,
    spec: TopicSpec<T>,
    retry: RetryPolicy,
    dead_letter_topic: String,
    dispatch: D,
) where
    T: Message,
    D: Dispatch<T>,
{
    let _active = active;
    loop {
        let Some(record) = buffer.try_take() else {
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
        let record = Arc::new(record);
        let finished = handle(
            &env,
            &buffer,
            &spec,
            retry,
            &dead_letter_topic,
            &dispatch,
            &record,
        )
        .await;
        if !finished {
            break;
        }
        let _ = env.shared.acks.send(Ack {
            topic: Arc::clone(&record.topic),
            partition: record.partition,
            offset: record.offset,
        });
    }
}

/// Handles one record to the end. `false` means it was not finished
/// (cancelled, or its stream is gone) and must not be acknowledged.
async fn handle<T, D>(
    env: &WorkerEnv,
    buffer: &TypeBuffer,
    spec: &TopicSpec<T>,
    retry: RetryPolicy,
    dead_letter_topic: &str,
    dispatch: &D,
    record: &Arc<Record>,
) -> bool
where
    T: Message,
    D: Dispatch<T>,
{
    let stats = &buffer.stats;
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
        let payload = record.payload.as_deref().unwrap_or_default();
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
        let ctx = MessageContext::new(Arc::clone(record), attempt);
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

/// Dead-letters the records its poll service could not route to a type.
pub(crate) async fn run_rejects(
    active: ActiveWorker,
    env: WorkerEnv,
    buffer: Arc<TypeBuffer>,
    dead_letter_topics: std::collections::HashMap<Arc<str>, String>,
) {
    let _active = active;
    loop {
        let Some(record) = buffer.try_take() else {
            if env.shared.is_stopping() {
                break;
            }
            tokio::select! {
                () = buffer.wait() => continue,
                () = env.cancel.cancelled() => break,
            }
        };
        let (reason, error) = match &record.rejection {
            Some(r @ Rejection::Tombstone) => ("tombstone", r.reason()),
            Some(r @ Rejection::MissingType) => ("missing-type", r.reason()),
            Some(r @ Rejection::UnknownType(_)) => ("unknown-type", r.reason()),
            None => ("unroutable", "no type accepts this record".to_owned()),
        };
        let Some(topic) = dead_letter_topics.get(&record.topic) else {
            continue;
        };
        let failure = Failure {
            reason,
            error,
            attempts: 0,
        };
        let published = env
            .dead_letters
            .publish(topic, &env.shared.group_id, &record, &failure, &env.cancel)
            .await;
        if !published {
            break;
        }
        buffer.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        let _ = env.shared.acks.send(Ack {
            topic: Arc::clone(&record.topic),
            partition: record.partition,
            offset: record.offset,
        });
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
