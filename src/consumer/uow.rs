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
use std::sync::atomic::{AtomicU8, Ordering};

use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, ExecResult, QueryResult, Statement,
    TransactionTrait,
};
use uuid::Uuid;

use crate::consumer::worker::{Dispatch, Outcome};
use crate::consumer::{HandlerError, MessageContext};
use crate::error::{Error, Result};
use crate::inbox::{Inbox, Origin, Recorded};
use crate::model::Message;
use crate::outbox::Outbox;

/// The transaction of one message's handling. kontext commits it when the
/// handler returns `Ok`; do not keep a clone past the handler.
///
/// Run the handler's statements on the unit of work itself: it implements
/// sea-orm's [`ConnectionTrait`] (`uow.execute(..)`,
/// `Entity::insert(..).exec(&uow)`). It also dereferences to the sea-orm
/// [`DatabaseTransaction`] (`&*uow`) for what `ConnectionTrait` does not
/// cover: streams, nested transactions, functions that take one.
///
/// Why it matters on PostgreSQL: a failed statement aborts the transaction,
/// and PostgreSQL answers the `COMMIT` of an aborted transaction with a
/// rollback, not an error. A handler that ignores a failed statement would
/// see its message acknowledged with nothing stored. kontext sees every
/// statement run through the unit of work; when none failed it commits
/// directly. Once the raw transaction has been handed out, or a statement
/// failed, it first sends one more statement to learn whether the
/// transaction is still alive (one round trip).
#[derive(Clone)]
pub struct UnitOfWork {
    txn: Arc<DatabaseTransaction>,
    outbox: Outbox,
    state: Arc<State>,
}

/// What the unit of work saw of its transaction, as bits.
#[derive(Debug, Default)]
struct State(AtomicU8);

impl State {
    /// A message was written into the outbox: wake the relay after commit.
    const PUBLISHED: u8 = 1;
    /// The transaction may be aborted: a statement failed, or the raw
    /// transaction was handed out and kontext did not see its statements.
    const UNSEEN: u8 = 2;

    fn set(&self, bit: u8) {
        // Only the committing thread reads, after `Arc::try_unwrap` has
        // synchronised with every clone's drop.
        self.0.fetch_or(bit, Ordering::Relaxed);
    }

    fn has(&self, bit: u8) -> bool {
        self.0.load(Ordering::Relaxed) & bit != 0
    }

    /// Passes `result` on, noting a failure.
    fn watch<R>(&self, result: Result<R, DbErr>) -> Result<R, DbErr> {
        if result.is_err() {
            self.set(Self::UNSEEN);
        }
        result
    }
}

impl UnitOfWork {
    fn new(txn: DatabaseTransaction, outbox: Outbox) -> Self {
        Self {
            txn: Arc::new(txn),
            outbox,
            state: Arc::default(),
        }
    }

    /// Writes `message` into the outbox within this transaction: it is sent
    /// once the handling commits, and never if it rolls back.
    pub async fn publish<T: Message>(&self, message: &T) -> Result<Uuid> {
        match self.outbox.publish(&*self.txn, message).await {
            Ok(id) => {
                self.state.set(State::PUBLISHED);
                Ok(id)
            }
            Err(e) => {
                self.state.set(State::UNSEEN);
                Err(e)
            }
        }
    }
}

impl Deref for UnitOfWork {
    type Target = DatabaseTransaction;
    fn deref(&self) -> &DatabaseTransaction {
        self.state.set(State::UNSEEN);
        &self.txn
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for UnitOfWork {
    fn get_database_backend(&self) -> DbBackend {
        self.txn.get_database_backend()
    }

    async fn execute(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        self.state.watch(self.txn.execute(stmt).await)
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.state.watch(self.txn.execute_unprepared(sql).await)
    }

    async fn query_one(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        self.state.watch(self.txn.query_one(stmt).await)
    }

    async fn query_all(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.state.watch(self.txn.query_all(stmt).await)
    }

    fn support_returning(&self) -> bool {
        self.txn.support_returning()
    }

    fn is_mock_connection(&self) -> bool {
        self.txn.is_mock_connection()
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
                        timestamp: ctx.timestamp_ms(),
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
        let uow = UnitOfWork::new(txn, self.outbox.clone());
        let ctx_topic = ctx.topic().to_owned();
        let result = self.handler.handle(message, ctx, uow.clone()).await;
        let UnitOfWork { txn, state, .. } = uow;
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
        // rollback; when kontext did not see every statement succeed, one
        // more statement tells the two apart (SQLSTATE 25P02 "current
        // transaction is aborted"). SQLite has no such state.
        if txn.get_database_backend() == DbBackend::Postgres && state.has(State::UNSEEN) {
            if let Err(source) = txn.execute_unprepared("SELECT 1").await {
                return Outcome::Failed(HandlerError::retry(Error::TransactionAborted { source }));
            }
        }
        let committed = tracing::Instrument::instrument(
            txn.commit(),
            tracing::debug_span!(
                "kontext.uow.commit",
                "messaging.destination.name" = ctx_topic.as_str(),
                "kontext.published" = state.has(State::PUBLISHED)
            ),
        )
        .await;
        if let Err(e) = committed {
            return Outcome::Failed(HandlerError::retry(e));
        }
        if state.has(State::PUBLISHED) {
            self.outbox.wake();
        }
        Outcome::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::outbox::OutboxSettings;
    use sea_orm::Database;
    use tokio_util::task::TaskTracker;

    /// A unit of work on an in-memory SQLite database with a table `t`.
    async fn unit_of_work() -> UnitOfWork {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        db.execute_unprepared("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .await
            .unwrap();
        let model = Arc::new(Model::builder().build().unwrap());
        let outbox = Outbox::new(
            model,
            db.clone(),
            "test".to_owned(),
            None,
            OutboxSettings::default(),
            TaskTracker::new(),
        );
        UnitOfWork::new(db.begin().await.unwrap(), outbox)
    }

    #[tokio::test]
    async fn statements_that_succeed_through_the_unit_of_work_need_no_check() {
        let uow = unit_of_work().await;
        uow.execute_unprepared("INSERT INTO t (id) VALUES (1)")
            .await
            .unwrap();
        let stmt = Statement::from_string(DbBackend::Sqlite, "SELECT id FROM t");
        assert_eq!(uow.query_all(stmt.clone()).await.unwrap().len(), 1);
        assert!(uow.query_one(stmt).await.unwrap().is_some());
        assert!(!uow.state.has(State::UNSEEN));
    }

    #[tokio::test]
    async fn a_failed_statement_is_noted_even_when_the_handler_ignores_it() {
        let uow = unit_of_work().await;
        uow.execute_unprepared("INSERT INTO t (id) VALUES (1)")
            .await
            .unwrap();
        let _ = uow
            .execute_unprepared("INSERT INTO t (id) VALUES (1)")
            .await
            .unwrap_err();
        assert!(uow.state.has(State::UNSEEN));
    }

    #[tokio::test]
    async fn handing_out_the_raw_transaction_is_noted() {
        let uow = unit_of_work().await;
        let raw: &DatabaseTransaction = &uow;
        raw.execute_unprepared("INSERT INTO t (id) VALUES (1)")
            .await
            .unwrap();
        assert!(uow.state.has(State::UNSEEN));
    }
}
