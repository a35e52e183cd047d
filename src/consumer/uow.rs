//! The consumer unit of work: a handler gets a database transaction from
//! kontext; the inbox row, the handler's writes and any outbox messages it
//! publishes commit together, and only then is the offset stored. If the
//! handler or the commit fails, nothing is stored and the retry and
//! dead-letter rules apply: consume, write, publish, effectively once.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sea_orm::{ConnectionTrait as _, DatabaseTransaction, DbBackend, TransactionTrait};
use uuid::Uuid;

use crate::consumer::worker::{Dispatch, Outcome};
use crate::consumer::{HandlerError, MessageContext};
use crate::error::{Error, Result};
use crate::inbox::{Inbox, Origin, Recorded};
use crate::model::Message;
use crate::outbox::Outbox;

/// The transaction of one message's handling. Dereferences to the sea-orm
/// [`DatabaseTransaction`] for the handler's writes. kontext commits it when
/// the handler returns `Ok`; do not keep a clone past the handler.
#[derive(Clone)]
pub struct UnitOfWork {
    txn: Arc<DatabaseTransaction>,
    outbox: Outbox,
    published: Arc<AtomicBool>,
}

impl UnitOfWork {
    /// Writes `message` into the outbox within this transaction: it is sent
    /// once the handling commits, and never if it rolls back.
    pub async fn publish<T: Message>(&self, message: &T) -> Result<Uuid> {
        let id = self.outbox.publish(&*self.txn, message).await?;
        self.published.store(true, Ordering::Relaxed);
        Ok(id)
    }
}

impl Deref for UnitOfWork {
    type Target = DatabaseTransaction;
    fn deref(&self) -> &DatabaseTransaction {
        &self.txn
    }
}

impl fmt::Debug for UnitOfWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnitOfWork").finish_non_exhaustive()
    }
}

/// Handles messages of `T` within a [`UnitOfWork`]. Implemented for every
/// `async fn(T, MessageContext, UnitOfWork) -> Result<(), HandlerError>`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot handle messages of type `{T}` in a unit of work",
    note = "a transactional handler is an `async fn(msg: {T}, ctx: MessageContext, uow: UnitOfWork) -> Result<(), HandlerError>` or a type implementing `TransactionalHandler<{T}>`"
)]
pub trait TransactionalHandler<T>: Send + Sync + 'static {
    /// Handles one message; `Ok` commits the unit of work.
    fn handle(
        &self,
        message: T,
        ctx: MessageContext,
        uow: UnitOfWork,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<T, F, Fut> TransactionalHandler<T> for F
where
    T: Send + 'static,
    F: Fn(T, MessageContext, UnitOfWork) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(
        &self,
        message: T,
        ctx: MessageContext,
        uow: UnitOfWork,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(message, ctx, uow)
    }
}

pub(crate) struct TransactionalDispatch<H> {
    pub(crate) handler: H,
    pub(crate) outbox: Outbox,
    pub(crate) inbox: Option<Inbox>,
}

impl<T: Message, H: TransactionalHandler<T>> Dispatch<T> for TransactionalDispatch<H> {
    async fn dispatch(&self, message: T, ctx: MessageContext) -> Outcome {
        let txn = match self.outbox.database().begin().await {
            Ok(t) => t,
            Err(e) => return Outcome::Failed(HandlerError::retry(e)),
        };
        if let Some(inbox) = &self.inbox {
            match inbox
                .record(
                    &txn,
                    &message as &(dyn Any + Sync),
                    &Origin {
                        message_id: ctx.message_id(),
                        topic: ctx.topic(),
                        partition: ctx.partition(),
                        offset: ctx.offset(),
                    },
                )
                .await
            {
                Ok(Recorded::New) => {}
                Ok(Recorded::Duplicate) => {
                    // Counted in the registry (`duplicates`); after a crash there
                    // can be thousands, so not logged above debug.
                    tracing::debug!(consumer = %inbox.consumer, topic = ctx.topic(), offset = ctx.offset(), "duplicate message: already processed, acknowledged");
                    let _ = txn.rollback().await;
                    return Outcome::Duplicate;
                }
                Err(e) => return Outcome::Failed(HandlerError::retry(e)),
            }
        }
        let uow = UnitOfWork {
            txn: Arc::new(txn),
            outbox: self.outbox.clone(),
            published: Arc::new(AtomicBool::new(false)),
        };
        let ctx_topic = ctx.topic().to_owned();
        let result = self.handler.handle(message, ctx, uow.clone()).await;
        let UnitOfWork { txn, published, .. } = uow;
        if let Err(e) = result {
            // Dropping the transaction rolls it back.
            return Outcome::Failed(e);
        }
        let Ok(txn) = Arc::try_unwrap(txn) else {
            return Outcome::Failed(HandlerError::dead_letter(
                "the handler kept its UnitOfWork after returning; it cannot be committed",
            ));
        };
        // PostgreSQL answers COMMIT of an aborted transaction with a silent
        // rollback; one statement first tells the two apart (SQLSTATE 25P02
        // "current transaction is aborted"). SQLite has no such state.
        if txn.get_database_backend() == DbBackend::Postgres {
            if let Err(source) = txn.execute_unprepared("SELECT 1").await {
                return Outcome::Failed(HandlerError::retry(Error::TransactionAborted { source }));
            }
        }
        let committed = tracing::Instrument::instrument(
            txn.commit(),
            tracing::debug_span!(
                "kontext.uow.commit",
                "messaging.destination.name" = ctx_topic.as_str(),
                "kontext.published" = published.load(Ordering::Relaxed)
            ),
        )
        .await;
        if let Err(e) = committed {
            return Outcome::Failed(HandlerError::retry(e));
        }
        if published.load(Ordering::Relaxed) {
            self.outbox.wake();
        }
        Outcome::Done
    }
}
