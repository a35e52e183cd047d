//! Consuming a type as an async `Stream` instead of through a handler.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use crate::consumer::worker::{Dispatch, Outcome};
use crate::consumer::{HandlerError, MessageContext};

/// One message from a [`MessageStream`]. Acknowledge it with [`ack`](Self::ack)
/// once its work is done; only then is its offset committed. Dropping it
/// unacknowledged counts as a failure: it is retried (redelivered to the
/// stream) by the consumer's retry policy and dead-lettered after that.
pub struct Received<T> {
    /// The decoded message.
    pub message: T,
    /// Where it came from.
    pub context: MessageContext,
    done: Option<oneshot::Sender<Result<(), HandlerError>>>,
}

impl<T> Received<T> {
    /// The work is done: the offset may be committed.
    pub fn ack(mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Ok(()));
        }
    }

    /// The work failed; `error` decides between retry, dead letter and skip.
    pub fn nack(mut self, error: HandlerError) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Err(error));
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Received<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("message", &self.message)
            .field("context", &self.context)
            .finish()
    }
}

/// The messages of one type, in partition order, one at a time: the next is
/// delivered once the previous was acknowledged. Ends when kontext shuts down.
///
/// Cancellation: dropping the stream stops delivery, for every type on its
/// topic: its poll service fails (not live, and its member leaves the
/// group, so other members take the partitions); unacknowledged messages
/// are delivered again.
pub struct MessageStream<T> {
    rx: mpsc::Receiver<Received<T>>,
}

impl<T> Stream for MessageStream<T> {
    type Item = Received<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl<T> fmt::Debug for MessageStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageStream")
            .field("type", &std::any::type_name::<T>())
            .finish()
    }
}

pub(crate) fn channel<T>() -> (StreamSink<T>, MessageStream<T>) {
    let (tx, rx) = mpsc::channel(1);
    (StreamSink { tx }, MessageStream { rx })
}

/// The worker's end of a stream.
pub(crate) struct StreamSink<T> {
    tx: mpsc::Sender<Received<T>>,
}

impl<T: Send + 'static> Dispatch<T> for StreamSink<T> {
    async fn dispatch(&self, message: T, context: MessageContext) -> Outcome {
        let (done, result) = oneshot::channel();
        let item = Received {
            message,
            context,
            done: Some(done),
        };
        if self.tx.send(item).await.is_err() {
            return Outcome::Abandon;
        }
        match result.await {
            Ok(Ok(())) => Outcome::Done,
            Ok(Err(e)) => Outcome::Failed(e),
            Err(_) => Outcome::Failed(HandlerError::retry(
                "the stream dropped the message without acknowledging it",
            )),
        }
    }
}
