//! The transactional outbox: messages are written into `kontext_outbox` in
//! the caller's own database transaction, so they exist if and only if the
//! business change committed; a relay publishes them afterwards.
//!
//! ```no_run
//! # use kontext::prelude::*;
//! # #[derive(serde::Serialize, serde::Deserialize)] struct ShipmentCreated { id: u64 }
//! # async fn run(kontext: Kontext) -> kontext::Result<()> {
//! let outbox = kontext.outbox()?;
//! let mut tx = outbox.begin().await?;
//! // ... business writes through `&*tx` (a sea-orm `DatabaseTransaction`) ...
//! tx.publish(&ShipmentCreated { id: 7 }).await?;
//! tx.commit().await?; // commits, then wakes the relay at once
//! # Ok(()) }
//! ```
//!
//! Or, inside a transaction the application already manages:
//! `outbox.publish(&txn, &event).await?` (the relay then finds the row within
//! its polling interval, or sooner if `outbox.wake()` is called after commit).
//!
//! **Relay.** Rows are spread over shards by a hash of their key; a relay
//! publishes a shard only while it holds that shard's lease
//! (`kontext_outbox_lease`, an atomic conditional update that works the same
//! on PostgreSQL and SQLite), so several service instances can relay at once,
//! each row is sent by one of them, and a key's rows go out in the order they
//! were written. Leases are fenced (see `lease`): a generation that changes
//! on every takeover guards every delete and update, expiry follows the
//! database's clock, the relay renews on a heartbeat while a batch is in
//! flight, and it hands a message to Kafka only while the lease outlasts
//! that message's send timeout (`lease_ttl / 2` at most). Sent rows are **deleted** once the broker acknowledged them:
//! the table stays as small as the backlog, which keeps claiming fast; the
//! broker is the record of what was sent. A row that keeps failing moves to
//! the failed state after `max_attempts`, with its last error, stays visible
//! (`failed()`), and is sent again on `retry_failed()`; the rows behind it
//! go on. While a row waits for its next attempt, later rows with the same
//! key wait too.

mod layout;
mod lease;
mod notify;
mod relay;

pub use layout::Resharded;

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, Statement, TransactionTrait,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::db::now_ms;
use crate::db::outbox_entity as row;
use crate::error::{DbContext as _, Error, Result};
use crate::model::{Message, Model};
use crate::producer::{CallOptions, Producer, prepare};

/// What sends the outbox's rows in this process: the relay's own producer
/// and its message timeout.
pub(crate) struct Sender {
    pub(crate) producer: Producer,
    /// Every message handed to `producer` is delivered or failed within
    /// this time, at most [`OutboxSettings::send_timeout_cap`].
    pub(crate) send_timeout: Duration,
}

pub use crate::model::OutboxMode;

/// Outbox and relay settings.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// Shards the rows are spread over by key; the unit of relay leases.
    /// The count belongs to the outbox table, which every writer and relay
    /// of a database shares: `None` (the default) uses the table's count;
    /// the first process to start on a new table seeds it with this value,
    /// or 16. A process whose count differs from the table's is refused at
    /// start; change a table's count with [`Outbox::reshard`].
    pub shards: Option<i32>,
    /// Rows per relay batch. Defaults to 1000.
    pub batch_size: u64,
    /// How often the relay looks for rows it was not woken for (written by
    /// other processes, or before a restart). Defaults to 1 s.
    pub poll_interval: Duration,
    /// How long a relay owns a shard without renewing. Defaults to 30 s.
    pub lease_ttl: Duration,
    /// Attempts before a row moves to the failed state. Defaults to 10.
    pub max_attempts: i32,
    /// Pause after the first failed attempt, doubling up to `max_backoff`.
    /// Defaults to 100 ms.
    pub initial_backoff: Duration,
    /// Longest pause between attempts. Defaults to 60 s.
    pub max_backoff: Duration,
    /// Whether this process runs a relay. Defaults to `true`.
    pub run_relay: bool,
    /// How long [`OutboxTransaction::commit`] waits for immediate-mode
    /// deliveries before it returns with them still pending (they go out
    /// once, in the background or through the relay). Defaults to 5 s.
    pub immediate_timeout: Duration,
    /// How often the relay counts the backlog for its gauges
    /// (`kontext_outbox_backlog`, `..._oldest_age_seconds`,
    /// `..._failed_rows`): three counting queries. Defaults to 5 s.
    pub gauge_interval: Duration,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        OutboxSettings {
            shards: None,
            batch_size: 1000,
            poll_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(30),
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(60),
            run_relay: true,
            immediate_timeout: Duration::from_secs(5),
            gauge_interval: Duration::from_secs(5),
        }
    }
}

impl OutboxSettings {
    /// The longest a relay's message may take to be delivered or fail: half
    /// the lease, so it is settled before the lease can pass to another
    /// relay (the relay's producer is created with this `message.timeout.ms`
    /// when the configured one is longer).
    pub fn send_timeout_cap(&self) -> Duration {
        self.lease_ttl / 2
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.lease_ttl < Duration::from_millis(200) {
            return Err(Error::config(format!(
                "outbox `lease_ttl` must be at least 200 ms (it is {:?}): a relay renews it while it sends",
                self.lease_ttl
            )));
        }
        if self.shards.is_some_and(|s| s < 1) || self.batch_size < 1 {
            return Err(Error::config(
                "outbox `shards` and `batch_size` must be at least 1",
            ));
        }
        Ok(())
    }

    fn backoff_ms(&self, attempts: i32) -> i64 {
        let d = Backoff::new(self.initial_backoff, self.max_backoff)
            .delay(u32::try_from(attempts).unwrap_or(0));
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A message that used up its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedMessage {
    /// Its `ce_id`.
    pub message_id: String,
    /// Its topic.
    pub topic: String,
    /// Attempts made.
    pub attempts: i32,
    /// The last error.
    pub last_error: Option<String>,
}

/// Writes messages into the outbox and owns the relay. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    model: Arc<Model>,
    db: DatabaseConnection,
    /// The `ce_source` of the rows (the client id).
    source: String,
    /// `None` in a writer-only process: other instances send the rows.
    sender: Option<Sender>,
    settings: OutboxSettings,
    wake: Notify,
    relay_id: String,
    /// Owns the relay and immediate sends that outlive their commit.
    tasks: TaskTracker,
    /// How the relay is doing, for health.
    relay_state: RelayState,
    /// Set at shutdown's deadline: the relay hands nothing more over,
    /// settles what is in flight and releases its leases.
    halt: CancellationToken,
    /// Shards known to have a lease row.
    lease_rows: std::sync::Mutex<std::collections::HashSet<i32>>,
    /// Rows handed to the producer whose delivery is not settled yet.
    unsettled: std::sync::atomic::AtomicUsize,
    /// The tasks in `tasks`, to abort those still running when shutdown's
    /// time is up.
    handles: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Inner {
    /// Keeps `task`'s abort handle (and forgets those of finished tasks).
    fn owned<T>(&self, task: &tokio::task::JoinHandle<T>) {
        let mut handles = self
            .handles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        handles.retain(|h| !h.is_finished());
        handles.push(task.abort_handle());
    }
}

/// The relay's state as health reads it.
#[derive(Debug, Default)]
struct RelayState {
    /// Between the relay task's start and its end (a panic ends it too).
    running: std::sync::atomic::AtomicBool,
    /// Since when passes fail, and the last failure, while they do.
    failing: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl RelayState {
    fn failing(&self) -> std::sync::MutexGuard<'_, Option<(std::time::Instant, String)>> {
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn pass_succeeded(&self) {
        self.failing().take();
    }

    pub(super) fn pass_failed(&self, error: String) {
        let mut failing = self.failing();
        let since = failing
            .as_ref()
            .map_or_else(std::time::Instant::now, |f| f.0);
        *failing = Some((since, error));
    }
}

/// Marks the relay stopped when its task ends, however it ends.
struct Running<'a>(&'a RelayState);

impl<'a> Running<'a> {
    fn start(state: &'a RelayState) -> Self {
        state.running.store(true, Ordering::Release);
        Running(state)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

/// What the relay of this process looks like to a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RelayHealth {
    /// No relay runs here (writer-only, or `run_relay: false`).
    NotHere,
    /// Its task has ended before shutdown.
    Stopped,
    /// Passes have failed for this long; the last error.
    Failing(std::time::Duration, String),
    Well,
}

impl Outbox {
    /// An outbox writing rows with `source` as their `ce_source`, sending
    /// them through `sender` (none in a writer-only process).
    pub(crate) fn new(
        model: Arc<Model>,
        db: DatabaseConnection,
        source: String,
        sender: Option<Sender>,
        mut settings: OutboxSettings,
        tasks: TaskTracker,
    ) -> Outbox {
        let sender = sender.map(|s| Sender {
            send_timeout: s.send_timeout.min(settings.send_timeout_cap()),
            producer: s.producer,
        });
        settings.run_relay &= sender.is_some();
        Outbox {
            inner: Arc::new(Inner {
                model,
                db,
                source,
                sender,
                settings,
                wake: Notify::new(),
                relay_id: Uuid::now_v7().to_string(),
                tasks,
                relay_state: RelayState::default(),
                halt: CancellationToken::new(),
                lease_rows: std::sync::Mutex::new(std::collections::HashSet::new()),
                unsettled: std::sync::atomic::AtomicUsize::new(0),
                handles: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// Adopts the table's shard count (seeding it on a new table; refusing
    /// an explicit count that differs) and creates the lease rows: before
    /// anything in this process writes a row.
    pub(crate) async fn prepare(&self) -> Result<()> {
        let shards = layout::adopt(&self.inner.db, self.inner.settings.shards).await?;
        relay::ensure_lease_rows(&self.inner.db, 0..shards).await?;
        self.inner
            .lease_rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(0..shards);
        Ok(())
    }

    /// Starts the relay (if enabled), stopped by `cancel`.
    pub(crate) async fn start_relay(&self, cancel: CancellationToken) -> Result<()> {
        let postgres = self.inner.db.get_database_backend() == DbBackend::Postgres;
        if !self.inner.settings.run_relay {
            if postgres {
                let task = self
                    .inner
                    .tasks
                    .spawn(notify::announce(Arc::clone(&self.inner), cancel));
                self.inner.owned(&task);
            }
            return Ok(());
        }
        if postgres {
            let task = self
                .inner
                .tasks
                .spawn(notify::listen(Arc::clone(&self.inner), cancel.clone()));
            self.inner.owned(&task);
        }
        // Marked running before the task is polled, so a health check right
        // after start does not see a stopped relay.
        self.inner
            .relay_state
            .running
            .store(true, Ordering::Release);
        let inner = Arc::clone(&self.inner);
        let task = self.inner.tasks.spawn(async move {
            let _running = Running::start(&inner.relay_state);
            relay::run(Arc::clone(&inner), cancel).await;
        });
        self.inner.owned(&task);
        Ok(())
    }

    /// Shutdown's deadline: the relay hands no more rows over, settles
    /// those in flight and releases its leases.
    pub(crate) fn halt(&self) {
        self.inner.halt.cancel();
    }

    /// Aborts the outbox's tasks still running (shutdown's time is up) and
    /// says what that leaves behind, if anything.
    pub(crate) fn abort(&self) -> Option<String> {
        let handles = std::mem::take(
            &mut *self
                .inner
                .handles
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let running: Vec<_> = handles.into_iter().filter(|h| !h.is_finished()).collect();
        if running.is_empty() {
            return None;
        }
        for h in &running {
            h.abort();
        }
        let unsettled = self.inner.unsettled.load(Ordering::Relaxed);
        Some(format!(
            "the outbox relay did not stop in time and was aborted with {unsettled} rows handed to Kafka but not settled: \
             a row Kafka acknowledged but the relay did not delete is sent again by the next relay, and the shards it held \
             stay leased for up to {:?} (the lease), so no other relay sends them out of order meanwhile",
            self.inner.settings.lease_ttl
        ))
    }

    /// How this process's relay is doing. `stopping`: a shutdown began, so
    /// a relay that ended is not a failure.
    pub(crate) fn relay_health(&self, stopping: bool) -> RelayHealth {
        if !self.inner.settings.run_relay {
            return RelayHealth::NotHere;
        }
        if !self.inner.relay_state.running.load(Ordering::Acquire) && !stopping {
            return RelayHealth::Stopped;
        }
        match &*self.inner.relay_state.failing() {
            Some((since, error)) => RelayHealth::Failing(since.elapsed(), error.clone()),
            None => RelayHealth::Well,
        }
    }

    /// The relay's producer, if this process relays.
    pub(crate) fn relay_producer(&self) -> Option<&Producer> {
        self.inner.sender.as_ref().map(|s| &s.producer)
    }

    /// How long the relay may fail before the process is not ready: a
    /// lease's time, after which other instances take its shards over.
    pub(crate) fn relay_failure_limit(&self) -> std::time::Duration {
        self.inner.settings.lease_ttl
    }

    /// Writes `message` into the outbox through `conn`: pass the caller's
    /// transaction so the message commits or rolls back with its business
    /// rows. Returns the message id (`ce_id`).
    pub async fn publish<C, T>(&self, conn: &C, message: &T) -> Result<Uuid>
    where
        C: ConnectionTrait,
        T: Message,
    {
        Ok(self.insert(conn, message).await?.0)
    }

    async fn insert<C, T>(&self, conn: &C, message: &T) -> Result<(Uuid, i64, i32, OutboxMode)>
    where
        C: ConnectionTrait,
        T: Message,
    {
        let spec = self.inner.model.spec::<T>()?;
        let (encoded, headers) = prepare(
            spec,
            message,
            &CallOptions::default(),
            &self.inner.source,
            Vec::new(),
        )?;
        let headers_json = serde_json::to_string(&headers).map_err(|e| Error::Encode {
            topic: spec.topic().to_owned(),
            type_name: spec.rust_type(),
            source: e.into(),
        })?;
        // The shard is computed by the database from the table's count
        // (see `layout`); the writer sends only the key's hash.
        let hash = key_hash(encoded.key().unwrap_or(encoded.message_id.as_bytes()));
        let message_id = encoded.message_id;
        let (payload, key) = encoded.into_parts();
        let now = now_ms();
        const INSERT: &str = "insert into the outbox";
        let backend = conn.get_database_backend();
        let mut values: Vec<sea_orm::Value> = Vec::with_capacity(12);
        let sql = match (&key, backend) {
            // The key's commit-order lock (see `key_lock_id`) and the insert
            // in one round trip: the row's sequence number is drawn once
            // the lock is held.
            (Some(k), DbBackend::Postgres) => {
                values.push(key_lock_id(spec.topic(), k).into());
                PG_INSERT_KEYED
            }
            (None, DbBackend::Postgres) => PG_INSERT,
            _ => SQLITE_INSERT,
        };
        values.extend([
            message_id.to_string().into(),
            spec.topic().to_owned().into(),
            hash.into(),
            key.into(),
            headers_json.into(),
            payload.into(),
            spec.type_name().to_owned().into(),
            now.into(),
        ]);
        let row = conn
            .query_one(Statement::from_sql_and_values(backend, sql, values))
            .await
            .db(INSERT)?
            .ok_or(sea_orm::DbErr::RecordNotInserted)
            .db(INSERT)?;
        let seq: i64 = row.try_get("", "seq").db(INSERT)?;
        let shard: i32 = row.try_get("", "shard").db(INSERT)?;
        Ok((message_id, seq, shard, spec.outbox_mode()))
    }

    /// Begins a transaction on the outbox's database whose commit wakes the
    /// relay (and sends immediate-mode messages at once).
    pub async fn begin(&self) -> Result<OutboxTransaction> {
        let txn = self.inner.db.begin().await.db("begin a transaction")?;
        Ok(OutboxTransaction {
            txn,
            outbox: self.clone(),
            immediate: Vec::new(),
            published: 0,
        })
    }

    /// The database the outbox writes to.
    pub fn database(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// Nudges the relay to look for rows now (after committing a
    /// transaction that [`publish`](Self::publish) wrote to).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Rows waiting to be sent (failed ones excluded).
    pub async fn pending(&self) -> Result<u64> {
        row::Entity::find()
            .filter(row::Column::State.eq(row::PENDING))
            .count(&self.inner.db)
            .await
            .db("count pending outbox rows")
    }

    /// How many rows used up their attempts.
    pub async fn failed_count(&self) -> Result<u64> {
        row::Entity::find()
            .filter(row::Column::State.eq(row::FAILED))
            .count(&self.inner.db)
            .await
            .db("count failed outbox rows")
    }

    /// Rows that used up their attempts, oldest first.
    pub async fn failed(&self) -> Result<Vec<FailedMessage>> {
        let rows = row::Entity::find()
            .filter(row::Column::State.eq(row::FAILED))
            .order_by_asc(row::Column::Seq)
            .all(&self.inner.db)
            .await
            .db("read failed outbox rows")?;
        Ok(rows
            .into_iter()
            .map(|r| FailedMessage {
                message_id: r.message_id,
                topic: r.topic,
                attempts: r.attempts,
                last_error: r.last_error,
            })
            .collect())
    }

    /// Changes the outbox table's shard count to `shards` on a live system,
    /// for every writer and relay of the database at once, keeping each
    /// key's order: it takes every shard's lease (relays pause; it waits up
    /// to twice `lease_ttl` for them to give their shards up), stores the
    /// new count and moves every pending and failed row to its new shard,
    /// then releases the leases. Writers keep writing meanwhile (an insert
    /// waits while the rows are moved). Processes configured with an
    /// explicit `shards` other than the new count are refused at their next
    /// start; leave `shards` unset in their settings.
    pub async fn reshard(&self, shards: i32) -> Result<Resharded> {
        layout::reshard(&self.inner, shards).await
    }

    /// Makes every failed row pending again with fresh attempts. Returns how many.
    pub async fn retry_failed(&self) -> Result<u64> {
        let res = row::Entity::update_many()
            .col_expr(row::Column::State, row::PENDING.into())
            .col_expr(row::Column::Attempts, 0.into())
            .col_expr(row::Column::NextAttemptAt, 0i64.into())
            .filter(row::Column::State.eq(row::FAILED))
            .exec(&self.inner.db)
            .await
            .db("retry failed outbox rows")?;
        self.wake();
        Ok(res.rows_affected)
    }

    /// Makes the failed rows with these message ids (`ce_id`, as
    /// [`failed`](Self::failed) lists them) pending again with fresh
    /// attempts. Returns how many; ids of rows that are not failed (sent,
    /// pending, unknown) are left alone.
    pub async fn retry(&self, message_ids: &[&str]) -> Result<u64> {
        if message_ids.is_empty() {
            return Ok(0);
        }
        let res = row::Entity::update_many()
            .col_expr(row::Column::State, row::PENDING.into())
            .col_expr(row::Column::Attempts, 0.into())
            .col_expr(row::Column::NextAttemptAt, 0i64.into())
            .filter(row::Column::State.eq(row::FAILED))
            .filter(row::Column::MessageId.is_in(message_ids.iter().copied()))
            .exec(&self.inner.db)
            .await
            .db("retry failed outbox rows")?;
        tracing::info!(rows = res.rows_affected, ids = ?message_ids, "failed outbox rows made pending again");
        self.wake();
        Ok(res.rows_affected)
    }

    /// Deletes the failed rows with these message ids: their messages are
    /// never sent. Returns how many; ids of rows that are not failed are
    /// left alone (a pending row is never discarded).
    pub async fn discard(&self, message_ids: &[&str]) -> Result<u64> {
        if message_ids.is_empty() {
            return Ok(0);
        }
        let res = row::Entity::delete_many()
            .filter(row::Column::State.eq(row::FAILED))
            .filter(row::Column::MessageId.is_in(message_ids.iter().copied()))
            .exec(&self.inner.db)
            .await
            .db("discard failed outbox rows")?;
        tracing::warn!(rows = res.rows_affected, ids = ?message_ids, "failed outbox rows discarded: their messages will not be sent");
        Ok(res.rows_affected)
    }
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("relay_id", &self.inner.relay_id)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

/// A database transaction whose commit also hands its outbox messages on.
/// Dereferences to the sea-orm [`DatabaseTransaction`] for business writes.
/// Dropping it without `commit` rolls everything back.
pub struct OutboxTransaction {
    txn: DatabaseTransaction,
    outbox: Outbox,
    /// Immediate-mode rows written here: (seq, shard).
    immediate: Vec<(i64, i32)>,
    /// Messages written here.
    published: usize,
}

/// What [`OutboxTransaction::commit`] did with the transaction's messages.
/// All of them are safe in the database once it returns `Ok`; this says
/// which are already on Kafka.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Immediate-mode messages Kafka acknowledged before `commit` returned.
    pub delivered: usize,
    /// Messages not yet acknowledged: every background-mode one, and
    /// immediate-mode ones left to the relay (a relay held the shard, an
    /// earlier row of the key was waiting, the broker did not answer within
    /// [`OutboxSettings::immediate_timeout`]). Each goes out once.
    pub pending: usize,
}

impl OutboxTransaction {
    /// Writes `message` into the outbox within this transaction.
    pub async fn publish<T: Message>(&mut self, message: &T) -> Result<Uuid> {
        let (id, seq, shard, mode) = self.outbox.insert(&self.txn, message).await?;
        self.published += 1;
        if mode == OutboxMode::ImmediateWithFallback {
            self.immediate.push((seq, shard));
        }
        Ok(id)
    }

    /// Commits, then sends immediate-mode messages (waiting at most
    /// [`OutboxSettings::immediate_timeout`]) and wakes the relay. Once the
    /// commit succeeded the messages are safe: an immediate send that fails
    /// or takes longer is left pending, not reported as an error.
    pub async fn commit(self) -> Result<Committed> {
        self.txn.commit().await.db("commit")?;
        let mut pending = self.published - self.immediate.len();
        if !self.immediate.is_empty() {
            pending += relay::send_immediately(&self.outbox.inner, &self.immediate).await;
        }
        self.outbox.wake();
        Ok(Committed {
            delivered: self.published - pending,
            pending,
        })
    }

    /// Rolls back: neither the business rows nor the messages persist.
    pub async fn rollback(self) -> Result<()> {
        self.txn.rollback().await.db("roll back")
    }
}

impl Deref for OutboxTransaction {
    type Target = DatabaseTransaction;
    fn deref(&self) -> &DatabaseTransaction {
        &self.txn
    }
}

impl fmt::Debug for OutboxTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxTransaction")
            .field("immediate", &self.immediate.len())
            .finish()
    }
}

/// The insert of one row. `$count` is the table's shard count as SQL; the
/// shard is the key's hash (`$h`) modulo it.
macro_rules! insert_values {
    ($count:literal, $m:literal, $t:literal, $h:literal, $k:literal, $hd:literal, $p:literal, $ty:literal, $c:literal) => {
        concat!(
            "INSERT INTO kontext_outbox (message_id, topic, shard, key, headers, payload, message_type, \
             created_at, attempts, next_attempt_at, last_error, state) SELECT ",
            $m, ", ", $t, ", CAST(CAST(", $h, " AS BIGINT) % ", $count, " AS INTEGER), ",
            $k, ", ", $hd, ", ", $p, ", ", $ty, ", ", $c, ", 0, 0, NULL, 0"
        )
    };
}

/// A keyed row on PostgreSQL, in one statement: the table's count through
/// `kontext_outbox_shards()` (which takes the layout lock shared, then
/// reads the count with a snapshot of its own, so a reshard that committed
/// while this statement waited for the lock is seen), then the key's lock
/// (`pg_advisory_xact_lock($1)`, see `key_lock_id`), then the insert. The layout lock
/// comes first: a fixed order, so a reshard waiting for it cannot close a
/// cycle with writers' key locks.
const PG_INSERT_KEYED: &str = concat!(
    "WITH layout AS (SELECT kontext_outbox_shards() AS n), ",
    "key_lock AS (SELECT pg_advisory_xact_lock($1) FROM layout) ",
    insert_values!("layout.n", "$2", "$3", "$4", "$5", "$6", "$7", "$8", "$9"),
    " FROM layout, key_lock RETURNING seq, shard"
);

/// A keyless row on PostgreSQL: the table's count (and the layout lock),
/// then the insert.
const PG_INSERT: &str = concat!(
    "WITH layout AS (SELECT kontext_outbox_shards() AS n) ",
    insert_values!("layout.n", "$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8"),
    " FROM layout RETURNING seq, shard"
);

/// A row on SQLite, where a writing transaction excludes all others (a
/// reshard's included) and one whose snapshot is older than the last
/// commit cannot write, so the count is read plainly. No count (the layout
/// row missing) fails the insert: `shard` is `NOT NULL`.
const SQLITE_INSERT: &str = concat!(
    insert_values!(
        "(SELECT shards FROM kontext_outbox_layout WHERE id = 1)",
        "?",
        "?",
        "?",
        "?",
        "?",
        "?",
        "?",
        "?"
    ),
    " RETURNING seq, shard"
);

/// On PostgreSQL, transactions that publish the same key (on one topic)
/// take turns, each until it commits or rolls back: the sequence number of
/// a later transaction's row is then drawn after the earlier one
/// committed, so the relay's sequence order for a key is its commit order.
/// (Without it, T1 could draw K#10, T2 draw K#11 and commit, the relay send
/// K#11, and K#10 follow when T1 commits.) Transactions on different keys
/// do not wait for each other. The lock id is a 64-bit hash of topic and
/// key (one `bigint` advisory lock): with 32 bits, unrelated keys collided
/// often enough to take turns needlessly, and to deadlock transactions
/// that publish several keys. SQLite needs nothing: a writing transaction
/// excludes all others.
///
/// A transaction that publishes several keys takes their locks in publish
/// order; two transactions publishing the same keys in opposite orders can
/// deadlock, which PostgreSQL breaks by failing one of them.
fn key_lock_id(topic: &str, key: &[u8]) -> i64 {
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.as_bytes().iter().chain([0u8].iter()).chain(key) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// FNV-1a: a stable hash (unlike `std`'s), so a key maps to the same shard
/// in every process and release. Positive in an `i64`, for SQL.
fn key_hash(key: &[u8]) -> i64 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    i64::from(h)
}

/// The shard of a key of hash `hash` among `shards`, as the insert
/// computes it in SQL.
fn shard_of_hash(hash: i64, shards: i32) -> i32 {
    i32::try_from(hash.rem_euclid(i64::from(shards.max(1)))).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 200,000 keys of one topic: with 32-bit lock ids about five pairs
    /// would share a lock (and take turns, or deadlock a transaction that
    /// publishes both); with 64 bits none do.
    #[test]
    fn key_lock_ids_do_not_collide() {
        let ids: std::collections::HashSet<i64> = (0..200_000u32)
            .map(|k| key_lock_id("orders", format!("order-{k}").as_bytes()))
            .collect();
        assert_eq!(ids.len(), 200_000);
        assert_ne!(key_lock_id("a", b"bc"), key_lock_id("ab", b"c"));
    }

    /// README: the relay's task ending before shutdown makes the process
    /// not live. Its task holds `Running` for its whole life, so it is
    /// marked stopped however it ends, a panic included.
    #[test]
    fn a_relay_task_that_panics_is_marked_stopped() {
        let state = std::sync::Arc::new(RelayState::default());
        let s = std::sync::Arc::clone(&state);
        let task = std::thread::spawn(move || {
            let _running = Running::start(&s);
            assert!(s.running.load(Ordering::Acquire));
            panic!("a bug in the relay");
        });
        assert!(task.join().is_err());
        assert!(!state.running.load(Ordering::Acquire));
    }

    #[test]
    fn shards_are_stable_and_in_range() {
        let shard_of = |key: &[u8], shards| shard_of_hash(key_hash(key), shards);
        assert_eq!(shard_of(b"order-1", 16), shard_of(b"order-1", 16));
        for k in 0..1000u32 {
            let s = shard_of(k.to_string().as_bytes(), 16);
            assert!((0..16).contains(&s));
        }
        let settings = OutboxSettings::default();
        assert_eq!(settings.backoff_ms(1), 100);
        assert!(
            settings.shards.is_none(),
            "processes adopt the table's count"
        );
        assert_eq!(settings.backoff_ms(2), 200);
        assert_eq!(settings.backoff_ms(30), 60_000);
    }
}
