//! Handlers and their outcomes.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::consumer::MessageContext;

/// Why a handler did not finish, and what kontext should do about it.
///
/// Any error converts into a `HandlerError` with `?`, meaning "retry by the
/// consumer's policy, then dead-letter". Use the constructors to decide
/// otherwise.
pub struct HandlerError {
    pub(crate) action: Action,
    pub(crate) source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Retry by policy; dead-letter when attempts run out.
    Retry,
    /// Retry after this pause (still bounded by the policy's attempts).
    RetryAfter(Duration),
    /// Dead-letter now, without retrying.
    DeadLetter,
    /// Acknowledge and move on: the message is deliberately ignored.
    Skip,
    /// A retry whose error says the database could not be reached (see
    /// `db::is_unreachable`): retried until it can be, without spending
    /// the message's attempts.
    Unreachable,
}

impl HandlerError {
    /// A transient failure: retry by the consumer's policy.
    pub fn retry(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::with(Action::Retry, error)
    }

    /// Retry after `delay` (e.g. a rate limit's retry-after).
    pub fn retry_after(
        delay: Duration,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::with(Action::RetryAfter(delay), error)
    }

    /// A permanent failure: send the message to the dead-letter topic now.
    pub fn dead_letter(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::with(Action::DeadLetter, error)
    }

    /// Ignore the message: it is acknowledged and not dead-lettered.
    pub fn skip(reason: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::with(Action::Skip, reason)
    }

    fn with(action: Action, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError {
            action,
            source: error.into(),
        }
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        HandlerError::retry(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("action", &self.action)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

/// Handles messages of type `T`.
///
/// Implemented for every `async fn(T, MessageContext) -> Result<(), HandlerError>`
/// (and closures of that shape), or implement it on a struct that holds the
/// handler's dependencies:
///
/// ```
/// use kontext::consumer::{Handler, HandlerError, MessageContext};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderCreated { order_id: u64 }
/// # #[derive(Clone)] struct Inventory;
/// # impl Inventory { async fn reserve(&self, _: u64) -> Result<(), std::io::Error> { Ok(()) } }
///
/// struct OrderCreatedHandler {
///     inventory: Inventory,
/// }
///
/// impl Handler<OrderCreated> for OrderCreatedHandler {
///     async fn handle(&self, event: OrderCreated, _ctx: MessageContext) -> Result<(), HandlerError> {
///         self.inventory.reserve(event.order_id).await?;
///         Ok(())
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot handle messages of type `{T}`",
    note = "a handler is an `async fn(msg: {T}, ctx: MessageContext) -> Result<(), HandlerError>` or a type implementing `Handler<{T}>`"
)]
pub trait Handler<T>: Send + Sync + 'static {
    /// Handles one message. Returning `Ok` acknowledges it.
    fn handle(
        &self,
        message: T,
        ctx: MessageContext,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<T, F, Fut> Handler<T> for F
where
    T: Send + 'static,
    F: Fn(T, MessageContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(
        &self,
        message: T,
        ctx: MessageContext,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(message, ctx)
    }
}
