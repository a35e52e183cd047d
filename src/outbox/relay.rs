//! The relay: takes a shard's lease, publishes its pending rows in order,
//! deletes what the broker acknowledged, records failures with backoff.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot::Canceled;
use futures::{StreamExt as _, stream};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait as _, DbBackend, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Set,
};
use tokio_util::sync::CancellationToken;

use super::lease::{self, Lease, Reshard, db_now};
use super::{Inner, Sender};
use crate::backoff::Backoff;
use crate::db::{lease_entity as lease_row, now_ms, outbox_entity as row};
use crate::error::DbContext as _;
use crate::error::{Error, Result};
use crate::headers::HeaderList as _;
use crate::producer::{self, Enqueue, MakeRoom};

/// Creates the lease rows of `shards` (idempotent).
pub(super) async fn ensure_lease_rows(
    db: &sea_orm::DatabaseConnection,
    shards: impl IntoIterator<Item = i32>,
) -> Result<()> {
    let rows: Vec<lease_row::ActiveModel> = shards
        .into_iter()
        .map(|shard| lease_row::ActiveModel {
            shard: Set(shard),
            owner: Set(None),
            expires_at: Set(0),
            generation: Set(0),
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let result = lease_row::Entity::insert_many(rows)
        .on_conflict(
            OnConflict::column(lease_row::Column::Shard)
                .do_nothing()
                .to_owned(),
        )
        .exec(db)
        .await;
    match result {
        Ok(_) | Err(sea_orm::DbErr::RecordNotInserted) => Ok(()),
        Err(e) => Err(e).db("create outbox leases"),
    }
}

/// Relays until cancelled: a pass over all shards whenever woken, and at
/// least every `poll_interval`.
pub(super) async fn run(inner: Arc<Inner>, cancel: CancellationToken) {
    crate::telemetry::describe();
    // Side by side in this one task: a pass waiting on a broker that is
    // down does not hold the gauges back.
    tokio::join!(relay(&inner, &cancel), count_backlog(&inner, &cancel));
}

/// Sets the backlog gauges every `gauge_interval` until cancelled.
async fn count_backlog(inner: &Inner, cancel: &CancellationToken) {
    loop {
        if let Err(e) = set_gauges(inner).await {
            tracing::debug!(error = %e, "could not count the outbox backlog");
        }
        tokio::select! {
            () = tokio::time::sleep(inner.settings.gauge_interval) => {}
            () = cancel.cancelled() => break,
        }
    }
}

/// Relays pass after pass until cancelled, then makes a last pass.
///
/// A pass is never dropped midway (a batch handed over but not yet deleted
/// would be sent again after a restart): it ends between batches, or hands
/// nothing more over and settles what is in flight, once `inner.halt` is
/// set (shutdown's deadline).
async fn relay(inner: &Arc<Inner>, cancel: &CancellationToken) {
    let mut failures = 0u32;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let sent = pass(inner).await;
        match &sent {
            Ok(_) => inner.relay_state.pass_succeeded(),
            Err(e) => inner.relay_state.pass_failed(e.to_string()),
        }
        match sent {
            // More may be waiting behind a full batch.
            Ok(n) if n > 0 => {
                failures = 0;
                continue;
            }
            Ok(_) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "outbox relay pass failed");
            }
        }
        // Failing passes back off up to ten poll intervals (at most 30 s).
        let pause = Backoff::new(
            inner.settings.poll_interval,
            (inner.settings.poll_interval * 10).min(Duration::from_secs(30)),
        )
        .delay(failures);
        tokio::select! {
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(pause) => {}
            () = cancel.cancelled() => break,
        }
    }
    // A last pass sends what was committed up to the stop (for example by
    // consumers' units of work drained during a graceful shutdown), until
    // shutdown's deadline halts it.
    if let Err(e) = pass(inner).await {
        tracing::warn!(error = %e, "final outbox relay pass failed");
    }
    // Every shard's lease was released as its work ended.
    tracing::debug!(relay = %inner.relay_id, "outbox relay stopped");
}

/// Sets the backlog gauges: pending rows, the age of the oldest (by its
/// writer's clock), failed rows.
async fn set_gauges(inner: &Inner) -> Result<()> {
    use sea_orm::{PaginatorTrait, QuerySelect};
    let pending = row::Entity::find()
        .filter(row::Column::State.eq(row::PENDING))
        .count(&inner.db)
        .await
        .db("count pending outbox rows")?;
    let oldest: Option<Option<i64>> = row::Entity::find()
        .select_only()
        .column_as(row::Column::CreatedAt.min(), "oldest")
        .filter(row::Column::State.eq(row::PENDING))
        .into_tuple()
        .one(&inner.db)
        .await
        .db("find the oldest pending outbox row")?;
    let failed = row::Entity::find()
        .filter(row::Column::State.eq(row::FAILED))
        .count(&inner.db)
        .await
        .db("count failed outbox rows")?;
    let age = oldest
        .flatten()
        .map_or(0.0, |created| (now_ms() - created).max(0) as f64 / 1000.0);
    metrics::gauge!(crate::telemetry::OUTBOX_BACKLOG).set(pending as f64);
    metrics::gauge!(crate::telemetry::OUTBOX_OLDEST_AGE).set(age);
    metrics::gauge!(crate::telemetry::OUTBOX_FAILED_ROWS).set(failed as f64);
    Ok(())
}

/// Shards relayed at once on PostgreSQL: a shard's database round trips
/// overlap another's wait for broker acknowledgements. SQLite has one
/// writer, so it relays one shard at a time.
const CONCURRENT_SHARDS: usize = 4;

/// One pass over every shard that has pending rows and whose lease this
/// relay can take. Returns rows sent.
///
/// Every such shard, not only those below the table's count: a row is
/// never stranded in a shard no relay walks, whoever wrote it.
async fn pass(inner: &Inner) -> Result<usize> {
    let concurrency = match inner.db.get_database_backend() {
        DbBackend::Sqlite => 1,
        _ => CONCURRENT_SHARDS,
    };
    // Only shards with something to send: an idle shard would cost a lease
    // round trip and a query per pass for nothing.
    let mut waiting: Vec<i32> = row::Entity::find()
        .select_only()
        .column(row::Column::Shard)
        .distinct()
        .filter(row::Column::State.eq(row::PENDING))
        .into_tuple::<i32>()
        .all(&inner.db)
        .await
        .db("find outbox shards with pending rows")?;
    waiting.sort_unstable();
    let unknown: Vec<i32> = {
        let known = inner
            .lease_rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        waiting
            .iter()
            .copied()
            .filter(|s| !known.contains(s))
            .collect()
    };
    if !unknown.is_empty() {
        ensure_lease_rows(&inner.db, unknown.iter().copied()).await?;
        inner
            .lease_rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(unknown);
    }
    // Start at a different shard each pass so relays spread over shards.
    let n = waiting.len();
    let start = usize::try_from(now_ms().rem_euclid(n.max(1) as i64)).unwrap_or(0);
    waiting.rotate_left(start.min(n));
    let order = waiting.into_iter();
    let mut results =
        stream::iter(order.map(|shard| relay_shard(inner, shard))).buffer_unordered(concurrency);
    let mut sent = 0;
    let mut first_error = None;
    while let Some(result) = results.next().await {
        match result {
            Ok(n) => sent += n,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        // Rows sent by other shards were deleted; report the failure.
        Some(e) => Err(e),
        None => Ok(sent),
    }
}

/// Relays one shard while this relay holds its lease.
async fn relay_shard(inner: &Inner, shard: i32) -> Result<usize> {
    if inner.halt.is_cancelled() {
        return Ok(0);
    }
    let ttl = inner.settings.lease_ttl;
    let Some(mut held) =
        lease::acquire(&inner.db, shard, &inner.relay_id, ttl, Reshard::Yield).await?
    else {
        return Ok(0);
    };
    let result = async {
        let mut total = 0;
        loop {
            let span = tracing::debug_span!(
                "kontext.relay.send",
                "messaging.system" = "kafka",
                "messaging.operation.type" = "send",
                "kontext.shard" = shard,
                "kontext.sent" = tracing::field::Empty
            );
            let batch =
                tracing::Instrument::instrument(relay_batch(inner, &mut held), span.clone())
                    .await?;
            span.record("kontext.sent", batch.sent);
            total += batch.sent;
            if batch.lost {
                tracing::warn!(
                    shard,
                    "outbox lease taken over while a batch was in flight; its unsettled rows are left to the new holder"
                );
                return Ok(total);
            }
            if !batch.full
                || batch.sent == 0
                || inner.halt.is_cancelled()
                // A reshard waiting for the shard gets it between batches.
                || !lease::renew(&inner.db, &mut held, ttl, Reshard::Yield).await?
            {
                break;
            }
        }
        Ok::<usize, Error>(total)
    }
    .await;
    lease::release(&inner.db, &held).await;
    result
}

/// What one batch did.
struct Batch {
    /// Rows delivered and deleted.
    sent: usize,
    /// Whether the batch was full (more may wait).
    full: bool,
    /// Whether the lease was lost on the way.
    lost: bool,
}

/// Publishes the next batch of `held`'s shard, renewing the lease on a
/// heartbeat while deliveries are awaited.
async fn relay_batch(inner: &Inner, held: &mut Lease) -> Result<Batch> {
    let shard = held.shard;
    let backend = inner.db.get_database_backend();
    // Keys with a row waiting for its next attempt are left out of the batch
    // altogether, so they hold back only their own later rows: read as part
    // of the batch, a backlog of one such key could fill every batch and
    // starve the keys behind it. Usually there are none, and this is one
    // indexed query.
    let backing_off: Vec<Option<Vec<u8>>> = row::Entity::find()
        .select_only()
        .column(row::Column::Key)
        .distinct()
        .filter(row::Column::Shard.eq(shard))
        .filter(row::Column::State.eq(row::PENDING))
        .filter(Expr::col(row::Column::NextAttemptAt).gt(db_now(backend)))
        .into_tuple::<Option<Vec<u8>>>()
        .all(&inner.db)
        .await
        .db("find outbox keys in backoff")?;
    let held_keys: Vec<Vec<u8>> = backing_off.into_iter().flatten().collect();
    let mut query = row::Entity::find()
        .filter(row::Column::Shard.eq(shard))
        .filter(row::Column::State.eq(row::PENDING))
        .filter(Expr::col(row::Column::NextAttemptAt).lte(db_now(backend)));
    if !held_keys.is_empty() {
        query = query.filter(
            Condition::any()
                .add(row::Column::Key.is_null())
                .add(row::Column::Key.is_not_in(held_keys)),
        );
    }
    let rows = query
        .order_by_asc(row::Column::Seq)
        .limit(inner.settings.batch_size)
        .all(&inner.db)
        .await
        .db("read the outbox")?;
    let full = rows.len() as u64 >= inner.settings.batch_size;
    if rows.is_empty() {
        return Ok(Batch {
            sent: 0,
            full: false,
            lost: false,
        });
    }

    // Hand the rows over and await their deliveries while a heartbeat keeps
    // the lease; the sender reads the lease's state through `watch`.
    let ttl = inner.settings.lease_ttl;
    let watch = Watch {
        lost: AtomicBool::new(false),
        renewed: Mutex::new(held.renewed()),
    };
    let outcomes = {
        let work = send_rows(inner, &rows, &watch);
        tokio::pin!(work);
        let mut beat = tokio::time::interval(heartbeat(ttl));
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.tick().await;
        loop {
            tokio::select! {
                outcomes = &mut work => break outcomes,
                _ = beat.tick() => {
                    if watch.lost.load(Ordering::Relaxed) {
                        continue;
                    }
                    // The batch in flight is finished, reshard or not.
                    match lease::renew(&inner.db, held, ttl, Reshard::Ignore).await {
                        Ok(true) => watch.renewed(held.renewed()),
                        Ok(false) => watch.lost.store(true, Ordering::Relaxed),
                        // Unknown: `may_send` stops new sends once the last
                        // renewal is too old.
                        Err(e) => tracing::warn!(shard, error = %e, "could not renew an outbox lease"),
                    }
                }
            }
        }
    };
    let lost = watch.lost.load(Ordering::Relaxed);
    settle(inner, held, &rows, outcomes, full, lost).await
}

/// The lease as the sending half of a batch sees it.
struct Watch {
    lost: AtomicBool,
    /// When the last successful renewal was sent.
    renewed: Mutex<Instant>,
}

impl Watch {
    fn renewed(&self, at: Instant) {
        *self
            .renewed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = at;
    }

    /// See [`Lease::may_send`].
    fn may_send(&self, ttl: Duration, send_timeout: Duration) -> bool {
        let renewed = *self
            .renewed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        !self.lost.load(Ordering::Relaxed) && lease::settled_in_time(renewed, ttl, send_timeout)
    }
}

/// How often a relay renews a lease while a batch is in flight.
fn heartbeat(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(10))
}

/// What became of one row of a batch.
enum Sent {
    Delivered,
    Failed(String),
    /// Not handed over: an earlier row of its key failed, or the lease
    /// could no longer vouch for a delivery.
    Skipped,
}

/// Hands `rows` to the producer in order and awaits every delivery.
///
/// When librdkafka's queue is full, room is made by settling the oldest
/// delivery of the batch, whose outcome is kept (each delivery is read
/// once). Every wait is bounded: for room by the send timeout, for an
/// acknowledgement by the send timeout plus [`SETTLE_MARGIN`] after the
/// hand-over, so a delivery that never settles fails the batch instead of
/// holding the shard's lease for ever. A halted relay hands nothing more
/// over and only settles what is in flight.
async fn send_rows(inner: &Inner, rows: &[row::Model], watch: &Watch) -> Vec<Sent> {
    let Some(sender) = &inner.sender else {
        return rows.iter().map(|_| Sent::Skipped).collect();
    };
    let (ttl, send_timeout) = (inner.settings.lease_ttl, sender.send_timeout);
    let mut outcomes: Vec<Sent> = rows.iter().map(|_| Sent::Skipped).collect();
    // A key whose earlier row could not be handed over holds back its later
    // rows of this batch.
    let mut blocked: HashSet<&[u8]> = HashSet::new();
    let mut in_flight = InFlight {
        queue: VecDeque::with_capacity(rows.len()),
        outcomes: &mut outcomes,
        bound: send_timeout + SETTLE_MARGIN,
        unsettled: &inner.unsettled,
        lease: Some((watch, ttl, send_timeout)),
        halt: &inner.halt,
    };
    for (i, r) in rows.iter().enumerate() {
        if inner.halt.is_cancelled() || !watch.may_send(ttl, send_timeout) {
            break;
        }
        if r.key.as_deref().is_some_and(|k| blocked.contains(k)) {
            continue;
        }
        let deadline = Some((std::time::Instant::now(), send_timeout));
        match enqueue(sender, r, deadline, &mut in_flight).await {
            Ok(Some(f)) => in_flight.push(i, f),
            Ok(None) => break,
            Err(e) => {
                if let Some(k) = &r.key {
                    blocked.insert(k.as_slice());
                }
                in_flight.outcomes[i] = Sent::Failed(e);
            }
        }
    }
    while in_flight.settle_oldest().await {}
    outcomes
}

/// How long past its send timeout a relay waits for a delivery's outcome
/// before counting it failed (librdkafka fails a message at its timeout;
/// this only guards against that not happening).
const SETTLE_MARGIN: Duration = Duration::from_secs(2);

/// A batch's deliveries in hand-over order, and where their outcomes go.
struct InFlight<'o> {
    queue: VecDeque<(usize, DeliveryFuture, tokio::time::Instant)>,
    outcomes: &'o mut [Sent],
    /// How long after its hand-over a delivery may take to settle.
    bound: Duration,
    /// The relay's count of rows handed over and not yet settled.
    unsettled: &'o AtomicUsize,
    /// The batch's lease, its ttl and the send timeout: a row still waiting
    /// for room when the lease can no longer vouch for its delivery is not
    /// handed over.
    lease: Option<(&'o Watch, Duration, Duration)>,
    /// Shutdown's deadline: a row still waiting for room is not handed over.
    halt: &'o CancellationToken,
}

impl InFlight<'_> {
    fn push(&mut self, i: usize, f: DeliveryFuture) {
        self.unsettled.fetch_add(1, Ordering::Relaxed);
        self.queue
            .push_back((i, f, tokio::time::Instant::now() + self.bound));
    }

    /// Awaits the oldest delivery and records its outcome. `false` when
    /// nothing is in flight.
    async fn settle_oldest(&mut self) -> bool {
        let Some((i, f, deadline)) = self.queue.pop_front() else {
            return false;
        };
        self.outcomes[i] = outcome(f, deadline, self.bound).await;
        self.unsettled.fetch_sub(1, Ordering::Relaxed);
        true
    }
}

/// What became of one delivery, waiting for it until `deadline`.
async fn outcome<F>(delivery: F, deadline: tokio::time::Instant, bound: Duration) -> Sent
where
    F: std::future::Future<
            Output = std::result::Result<
                rdkafka::producer::future_producer::OwnedDeliveryResult,
                Canceled,
            >,
        >,
{
    match tokio::time::timeout_at(deadline, delivery).await {
        Ok(Ok(Ok(_))) => Sent::Delivered,
        Ok(Ok(Err((e, _)))) => Sent::Failed(e.to_string()),
        Ok(Err(Canceled)) => Sent::Failed("the producer went away before acknowledging".into()),
        Err(_) => Sent::Failed(format!(
            "no acknowledgement within {bound:?} of the hand-over"
        )),
    }
}

/// Deletes the delivered rows and records the failed ones, only while the
/// lease is still ours.
///
/// When a row fails, the later rows of its key that were delivered in the
/// same batch are **kept** (and so sent again after it): the key's last
/// record on the topic is then its latest row, at the cost of duplicates
/// (bounded by the batch) on a path that already failed.
async fn settle(
    inner: &Inner,
    held: &Lease,
    rows: &[row::Model],
    outcomes: Vec<Sent>,
    full: bool,
    mut lost: bool,
) -> Result<Batch> {
    let (done, failed) = sort_outcomes(rows, outcomes);
    count_by_topic(inner, rows, &done, &failed);
    let mut sent = 0;
    for chunk in done.chunks(500) {
        let res = row::Entity::delete_many()
            .filter(row::Column::Seq.is_in(chunk.iter().copied()))
            .filter(lease::fence(held))
            .exec(&inner.db)
            .await
            .db("delete sent outbox rows")?;
        sent += usize::try_from(res.rows_affected).unwrap_or(usize::MAX);
        if res.rows_affected < chunk.len() as u64 {
            // Taken over: the rest is the new holder's to settle.
            lost = true;
            break;
        }
    }
    if !lost {
        for (r, error) in failed {
            if !record_failure(inner, held, r, error).await? {
                lost = true;
                break;
            }
        }
    }
    Ok(Batch { sent, full, lost })
}

/// Splits a batch into the rows to delete (delivered, and no earlier row of
/// their key failed) and the rows that failed, with their errors. A row
/// delivered after a failed row of its key is in neither: it stays pending
/// and goes out again after that row, so the key's order on the topic ends
/// with its latest row.
fn sort_outcomes(
    rows: &[row::Model],
    outcomes: Vec<Sent>,
) -> (Vec<i64>, Vec<(&row::Model, String)>) {
    let mut failed_keys: HashSet<&[u8]> = HashSet::new();
    let mut done: Vec<i64> = Vec::with_capacity(rows.len());
    let mut failed: Vec<(&row::Model, String)> = Vec::new();
    for (r, outcome) in rows.iter().zip(outcomes) {
        let key_failed = r.key.as_deref().is_some_and(|k| failed_keys.contains(k));
        match outcome {
            Sent::Delivered if !key_failed => done.push(r.seq),
            Sent::Delivered | Sent::Skipped => {}
            Sent::Failed(e) => {
                if let Some(k) = &r.key {
                    failed_keys.insert(k.as_slice());
                }
                failed.push((r, e));
            }
        }
    }
    (done, failed)
}

/// Counts sent and failed rows per topic, once per topic per batch.
fn count_by_topic(
    inner: &Inner,
    rows: &[row::Model],
    done: &[i64],
    failed: &[(&row::Model, String)],
) {
    let mut published: HashMap<(&str, &str), u64> = HashMap::new();
    let done: HashSet<i64> = done.iter().copied().collect();
    for r in rows.iter().filter(|r| done.contains(&r.seq)) {
        *published
            .entry((r.topic.as_str(), r.message_type.as_str()))
            .or_default() += 1;
    }
    let mut by_topic: HashMap<&str, u64> = HashMap::new();
    for ((topic, message_type), n) in published {
        if let Some(sender) = &inner.sender {
            crate::telemetry::ledger::outbox_sent(
                sender.producer.servers(),
                topic,
                message_type,
                n,
            );
        }
        *by_topic.entry(topic).or_default() += n;
    }
    for (topic, n) in by_topic {
        crate::telemetry::outbox_published(topic).increment(n);
    }
    let mut failures: HashMap<&str, u64> = HashMap::new();
    for (r, _) in failed {
        *failures.entry(r.topic.as_str()).or_default() += 1;
    }
    for (topic, n) in failures {
        crate::telemetry::outbox_failed(topic).increment(n);
    }
}

/// Hands one row to the producer, waiting for room while its queue is full
/// (until `deadline`, if any) by settling the oldest delivery in `room`.
async fn enqueue(
    sender: &Sender,
    r: &row::Model,
    deadline: Option<(std::time::Instant, Duration)>,
    room: &mut InFlight<'_>,
) -> std::result::Result<Option<DeliveryFuture>, String> {
    let pairs: Vec<(String, String)> =
        serde_json::from_str(&r.headers).map_err(|e| format!("unreadable headers: {e}"))?;
    let headers = pairs
        .iter()
        .fold(OwnedHeaders::new_with_capacity(pairs.len()), |h, (k, v)| {
            h.with(k, v)
        });
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.topic)
        .headers(headers)
        .timestamp(r.created_at);
    if let Some(k) = &r.key {
        record = record.key(k.as_slice());
    }
    if let Some(p) = &r.payload {
        record = record.payload(p.as_slice());
    }
    match producer::enqueue(sender.producer.client(), record, deadline, room).await {
        Ok(f) => Ok(Some(f)),
        Err(Enqueue::Failed(e)) => Err(e.to_string()),
        // Not handed over: it stays pending, no attempt spent.
        Err(Enqueue::Stopped(LeaseLapsed)) => Ok(None),
    }
}

/// Makes room by settling the oldest delivery of the batch (its outcome is
/// kept); with nothing of its own in flight, by pausing a moment, so the
/// wait yields to the lease's heartbeat. Gives up once the lease could no
/// longer vouch for the row's delivery.
impl MakeRoom for &mut InFlight<'_> {
    type Error = LeaseLapsed;

    async fn make_room(&mut self) -> std::result::Result<(), LeaseLapsed> {
        if !self.settle_oldest().await {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if self.halt.is_cancelled() {
            return Err(LeaseLapsed);
        }
        match self.lease {
            Some((watch, ttl, send_timeout)) if !watch.may_send(ttl, send_timeout) => {
                Err(LeaseLapsed)
            }
            _ => Ok(()),
        }
    }
}

/// A row waited for room until its lease could no longer vouch for it, or
/// shutdown's deadline.
#[derive(Debug)]
pub(super) struct LeaseLapsed;

/// Counts a failed attempt of `r` (fenced by the lease). `Ok(false)`: the
/// lease was taken over, nothing recorded.
async fn record_failure(
    inner: &Inner,
    held: &Lease,
    r: &row::Model,
    error: String,
) -> Result<bool> {
    let attempts = r.attempts.saturating_add(1);
    let state = if attempts >= inner.settings.max_attempts {
        tracing::error!(message_id = %r.message_id, topic = %r.topic, attempts, %error, "outbox message failed for good; see Outbox::failed");
        row::FAILED
    } else {
        tracing::warn!(message_id = %r.message_id, topic = %r.topic, attempts, %error, "outbox message not sent; will retry");
        row::PENDING
    };
    let backend = inner.db.get_database_backend();
    let res = row::Entity::update_many()
        .col_expr(row::Column::Attempts, Expr::value(attempts))
        .col_expr(row::Column::LastError, Expr::value(Some(error)))
        .col_expr(
            row::Column::NextAttemptAt,
            db_now(backend).add(inner.settings.backoff_ms(attempts)),
        )
        .col_expr(row::Column::State, Expr::value(state))
        .filter(row::Column::Seq.eq(r.seq))
        .filter(lease::fence(held))
        .exec(&inner.db)
        .await
        .db("record an outbox failure")?;
    Ok(res.rows_affected == 1)
}

/// Sends freshly committed rows at once, each under its shard's lease,
/// waiting at most `settings.immediate_timeout` in all. Returns how many
/// rows are still pending (left to the relay, or delivered but not yet
/// acknowledged).
///
/// Every commit leases under an owner of its own, so concurrent commits of
/// one process exclude each other as they exclude relays: a shared owner
/// would let them all "hold" a shard at once.
pub(super) async fn send_immediately(inner: &Arc<Inner>, rows: &[(i64, i32)]) -> usize {
    if inner.sender.is_none() {
        // A writer-only process: other instances' relays send them.
        return rows.len();
    }
    let owner = format!("{}:immediate:{}", inner.relay_id, uuid::Uuid::now_v7());
    let deadline = tokio::time::Instant::now() + inner.settings.immediate_timeout;
    let mut pending = 0;
    for &(seq, shard) in rows {
        match send_one(inner, seq, shard, &owner, deadline).await {
            Ok(true) => {}
            Ok(false) => pending += 1,
            Err(e) => {
                pending += 1;
                tracing::debug!(seq, error = %e, "immediate send skipped; the relay will send it");
            }
        }
    }
    pending
}

/// Sends one row under its shard's lease. `Ok(true)` once it is delivered
/// and deleted; `Ok(false)` if it was left to the relay or is still in
/// flight at `deadline` (then a task owned by the outbox settles it).
async fn send_one(
    inner: &Arc<Inner>,
    seq: i64,
    shard: i32,
    owner: &str,
    deadline: tokio::time::Instant,
) -> Result<bool> {
    let ttl = inner.settings.lease_ttl;
    let Some(sender) = &inner.sender else {
        return Ok(false);
    };
    let Some(held) = lease::acquire(&inner.db, shard, owner, ttl, Reshard::Yield).await? else {
        return Ok(false);
    };
    // Read under the lease: a relay that sent the row deleted it before
    // releasing, so a row still here has not been sent. (Read before the
    // lease, it could be a copy the relay sent in the meantime.)
    let found = async {
        // In the shard whose lease is held: a reshard since the insert may
        // have moved the row, and then it is the relay's.
        let Some(r) = row::Entity::find_by_id(seq)
            .filter(row::Column::Shard.eq(shard))
            .filter(row::Column::State.eq(row::PENDING))
            .one(&inner.db)
            .await
            .db("read an outbox row")?
        else {
            return Ok(None);
        };
        if let Some(k) = &r.key {
            let earlier = row::Entity::find()
                .filter(row::Column::Shard.eq(r.shard))
                .filter(row::Column::Key.eq(k.clone()))
                .filter(row::Column::Seq.lt(r.seq))
                .filter(row::Column::State.eq(row::PENDING))
                .count(&inner.db)
                .await
                .db("check earlier outbox rows")?;
            if earlier > 0 {
                return Ok(None);
            }
        }
        Ok::<_, Error>(Some(r))
    }
    .await;
    let r = match found {
        Ok(Some(r)) if held.may_send(ttl, sender.send_timeout) => r,
        other => {
            lease::release(&inner.db, &held).await;
            return other.map(|_| false);
        }
    };
    // Room in a full queue is waited for only until the commit's deadline,
    // and while the lease can still vouch for the delivery.
    let mut nothing: [Sent; 0] = [];
    let watch = Watch {
        lost: AtomicBool::new(false),
        renewed: Mutex::new(held.renewed()),
    };
    let mut room = InFlight {
        queue: VecDeque::new(),
        outcomes: &mut nothing,
        bound: sender.send_timeout + SETTLE_MARGIN,
        unsettled: &inner.unsettled,
        lease: Some((&watch, ttl, sender.send_timeout)),
        halt: &inner.halt,
    };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let enqueued = enqueue(
        sender,
        &r,
        Some((std::time::Instant::now(), left)),
        &mut room,
    )
    .await;
    let delivery = match enqueued {
        Ok(Some(f)) => f,
        Ok(None) => {
            lease::release(&inner.db, &held).await;
            return Ok(false);
        }
        Err(e) => {
            tracing::debug!(seq, error = %e, "immediate send failed; the relay will retry");
            lease::release(&inner.db, &held).await;
            return Ok(false);
        }
    };
    let topic = r.topic;
    let message_type = r.message_type;
    let bound = room.bound;
    let settle_one = {
        let inner = Arc::clone(inner);
        async move {
            let deadline = tokio::time::Instant::now() + bound;
            let delivered = matches!(outcome(delivery, deadline, bound).await, Sent::Delivered);
            if delivered {
                crate::telemetry::outbox_published(&topic).increment(1);
                if let Some(sender) = &inner.sender {
                    crate::telemetry::ledger::outbox_sent(
                        sender.producer.servers(),
                        &topic,
                        &message_type,
                        1,
                    );
                }
            }
            let result = if delivered {
                row::Entity::delete_by_id(seq)
                    .filter(lease::fence(&held))
                    .exec(&inner.db)
                    .await
                    .map(|_| ())
                    .db("delete a sent outbox row")
            } else {
                Ok(())
            };
            // Released only now: until the delivery is settled no relay
            // may read the row, or it would send it a second time.
            lease::release(&inner.db, &held).await;
            result.map(|()| delivered)
        }
    };
    let mut settle_one = Box::pin(settle_one);
    match tokio::time::timeout_at(deadline, &mut settle_one).await {
        Ok(result) => result,
        Err(_) => {
            // The caller stops waiting; the delivery is settled in the
            // background (bounded by the relay producer's send timeout).
            let task = inner.tasks.spawn(async move {
                if let Err(e) = settle_one.await {
                    tracing::warn!(seq, error = %e, "settling an immediate outbox send failed; the relay will send the row");
                }
            });
            inner.owned(&task);
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, key: Option<&str>) -> row::Model {
        row::Model {
            seq,
            message_id: format!("m{seq}"),
            topic: "t".into(),
            shard: 0,
            key: key.map(|k| k.as_bytes().to_vec()),
            headers: "[]".into(),
            payload: None,
            message_type: "T".into(),
            created_at: 0,
            attempts: 0,
            next_attempt_at: 0,
            last_error: None,
            state: row::PENDING,
        }
    }

    /// Issue 14, defect 8: r1 of key `a` fails delivery, r3 of `a` is
    /// delivered in the same batch. Deleting r3 would leave r1 to go out
    /// after it (a, then a's older row): r3 stays pending instead, and the
    /// other keys' rows are settled as usual.
    #[test]
    fn a_row_delivered_after_a_failed_row_of_its_key_is_kept() {
        let rows = vec![
            row(1, Some("a")),
            row(2, Some("b")),
            row(3, Some("a")),
            row(4, None),
            row(5, Some("b")),
        ];
        let outcomes = vec![
            Sent::Failed("timed out".into()),
            Sent::Delivered,
            Sent::Delivered,
            Sent::Delivered,
            Sent::Skipped,
        ];
        let (done, failed) = sort_outcomes(&rows, outcomes);
        assert_eq!(done, [2, 4], "r3 kept behind r1; r5 was not sent");
        let failed: Vec<(i64, &str)> = failed.iter().map(|(r, e)| (r.seq, e.as_str())).collect();
        assert_eq!(failed, [(1, "timed out")]);
    }

    /// A delivery whose outcome never comes (librdkafka's message timeout
    /// did not fire) fails the row at its bound instead of holding the
    /// batch, and with it the shard's lease, for ever.
    #[tokio::test]
    async fn a_delivery_that_never_settles_fails_at_its_bound() {
        let bound = Duration::from_millis(20);
        let never = std::future::pending::<
            std::result::Result<rdkafka::producer::future_producer::OwnedDeliveryResult, Canceled>,
        >();
        let started = tokio::time::Instant::now();
        let got = outcome(never, started + bound, bound).await;
        assert!(
            matches!(&got, Sent::Failed(e) if e.contains("no acknowledgement within 20ms")),
            "the row fails with the bound in its error"
        );
    }

    #[test]
    fn keyless_rows_do_not_hold_each_other() {
        let rows = vec![row(1, None), row(2, None)];
        let (done, failed) = sort_outcomes(&rows, vec![Sent::Failed("x".into()), Sent::Delivered]);
        assert_eq!(done, [2]);
        assert_eq!(failed.len(), 1);
    }
}
