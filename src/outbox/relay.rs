//! The relay: takes a shard's lease, publishes its pending rows in order,
//! deletes what the broker acknowledged, records failures with backoff.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt as _, stream};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait as _, DbBackend, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Set,
};
use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::db::{lease_entity as lease, now_ms, outbox_entity as row};
use crate::error::{Error, Result};

fn db_err(operation: &'static str) -> impl FnOnce(sea_orm::DbErr) -> Error {
    move |source| Error::Database { operation, source }
}

/// Creates the lease rows of every shard (idempotent).
pub(super) async fn ensure_leases(inner: &Inner) -> Result<()> {
    let rows: Vec<lease::ActiveModel> = (0..inner.settings.shards)
        .map(|shard| lease::ActiveModel {
            shard: Set(shard),
            owner: Set(None),
            expires_at: Set(0),
        })
        .collect();
    let result = lease::Entity::insert_many(rows)
        .on_conflict(
            OnConflict::column(lease::Column::Shard)
                .do_nothing()
                .to_owned(),
        )
        .exec(&inner.db)
        .await;
    match result {
        Ok(_) | Err(sea_orm::DbErr::RecordNotInserted) => Ok(()),
        Err(e) => Err(db_err("create outbox leases")(e)),
    }
}

/// Takes (or renews) the lease of `shard` for `owner`.
async fn acquire(inner: &Inner, shard: i32, owner: &str) -> Result<bool> {
    let now = now_ms();
    let ttl = i64::try_from(inner.settings.lease_ttl.as_millis()).unwrap_or(i64::MAX);
    let res = lease::Entity::update_many()
        .col_expr(lease::Column::Owner, Expr::value(owner))
        .col_expr(
            lease::Column::ExpiresAt,
            Expr::value(now.saturating_add(ttl)),
        )
        .filter(lease::Column::Shard.eq(shard))
        .filter(
            Condition::any()
                .add(lease::Column::Owner.eq(owner))
                .add(lease::Column::ExpiresAt.lt(now)),
        )
        .exec(&inner.db)
        .await
        .map_err(db_err("take an outbox lease"))?;
    Ok(res.rows_affected == 1)
}

async fn release(inner: &Inner, shard: i32, owner: &str) {
    let res = lease::Entity::update_many()
        .col_expr(lease::Column::Owner, Expr::value(Option::<String>::None))
        .col_expr(lease::Column::ExpiresAt, Expr::value(0i64))
        .filter(lease::Column::Shard.eq(shard))
        .filter(lease::Column::Owner.eq(owner))
        .exec(&inner.db)
        .await;
    if let Err(e) = res {
        // It expires by itself after the lease TTL.
        tracing::debug!(shard, error = %e, "could not release an outbox lease");
    }
}

/// Relays until cancelled: a pass over all shards whenever woken, and at
/// least every `poll_interval`.
pub(super) async fn run(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut failures = 0u32;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        // A pass is not interrupted: a batch sent but not yet deleted would
        // be sent again after a restart.
        let sent = pass(&inner).await;
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
        let pause = if failures > 0 {
            (inner.settings.poll_interval * failures.min(10)).min(Duration::from_secs(30))
        } else {
            inner.settings.poll_interval
        };
        tokio::select! {
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(pause) => {}
            () = cancel.cancelled() => break,
        }
    }
    // A last pass sends what was committed up to the stop (for example by
    // consumers' units of work drained during a graceful shutdown).
    match tokio::time::timeout(inner.settings.lease_ttl, pass(&inner)).await {
        Ok(Err(e)) => tracing::warn!(error = %e, "final outbox relay pass failed"),
        Err(_) => tracing::warn!("final outbox relay pass timed out"),
        Ok(Ok(_)) => {}
    }
    for shard in 0..inner.settings.shards {
        release(&inner, shard, &inner.relay_id).await;
    }
    tracing::debug!(relay = %inner.relay_id, "outbox relay stopped");
}

/// Shards relayed at once on PostgreSQL: a shard's database round trips
/// overlap another's wait for broker acknowledgements. SQLite has one
/// writer, so it relays one shard at a time.
const CONCURRENT_SHARDS: usize = 4;

/// One pass over every shard this relay can lease. Returns rows sent.
async fn pass(inner: &Inner) -> Result<usize> {
    let shards = inner.settings.shards;
    // Start at a different shard each pass so relays spread over shards.
    let start = i32::try_from(now_ms().rem_euclid(i64::from(shards.max(1)))).unwrap_or(0);
    let concurrency = match inner.db.get_database_backend() {
        DbBackend::Sqlite => 1,
        _ => CONCURRENT_SHARDS,
    };
    // Only shards with something to send: an idle shard would cost a lease
    // round trip and a query per pass for nothing.
    let waiting: HashSet<i32> = row::Entity::find()
        .select_only()
        .column(row::Column::Shard)
        .distinct()
        .filter(row::Column::State.eq(row::PENDING))
        .into_tuple::<i32>()
        .all(&inner.db)
        .await
        .map_err(db_err("find outbox shards with pending rows"))?
        .into_iter()
        .collect();
    let order = (0..shards)
        .map(|i| (start + i) % shards)
        .filter(|shard| waiting.contains(shard));
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
    if !acquire(inner, shard, &inner.relay_id).await? {
        return Ok(0);
    }
    let result = async {
        let mut total = 0;
        loop {
            let (n, full) = relay_batch(inner, shard).await?;
            total += n;
            if !full || n == 0 || !acquire(inner, shard, &inner.relay_id).await? {
                break;
            }
        }
        Ok::<usize, Error>(total)
    }
    .await;
    release(inner, shard, &inner.relay_id).await;
    result
}

/// Publishes the next batch of `shard`. Returns rows sent and whether the
/// batch was full (so more may wait).
async fn relay_batch(inner: &Inner, shard: i32) -> Result<(usize, bool)> {
    let now = now_ms();
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
        .filter(row::Column::NextAttemptAt.gt(now))
        .into_tuple::<Option<Vec<u8>>>()
        .all(&inner.db)
        .await
        .map_err(db_err("find outbox keys in backoff"))?;
    let held: Vec<Vec<u8>> = backing_off.into_iter().flatten().collect();
    let mut query = row::Entity::find()
        .filter(row::Column::Shard.eq(shard))
        .filter(row::Column::State.eq(row::PENDING))
        .filter(row::Column::NextAttemptAt.lte(now));
    if !held.is_empty() {
        query = query.filter(
            Condition::any()
                .add(row::Column::Key.is_null())
                .add(row::Column::Key.is_not_in(held)),
        );
    }
    let rows = query
        .order_by_asc(row::Column::Seq)
        .limit(inner.settings.batch_size)
        .all(&inner.db)
        .await
        .map_err(db_err("read the outbox"))?;
    let full = rows.len() as u64 >= inner.settings.batch_size;
    if rows.is_empty() {
        return Ok((0, false));
    }
    // A key whose earlier row could not be handed to the producer holds
    // back its later rows of this batch.
    let mut blocked: HashSet<Vec<u8>> = HashSet::new();
    let mut in_flight: Vec<(&row::Model, DeliveryFuture)> = Vec::with_capacity(rows.len());
    let mut failed: Vec<(&row::Model, String)> = Vec::new();
    for r in &rows {
        if let Some(k) = &r.key {
            if blocked.contains(k) {
                continue;
            }
        }
        match enqueue(inner, r, &mut in_flight).await {
            Ok(f) => in_flight.push((r, f)),
            Err(e) => {
                if let Some(k) = &r.key {
                    blocked.insert(k.clone());
                }
                failed.push((r, e));
            }
        }
    }
    let mut done: Vec<i64> = Vec::with_capacity(in_flight.len());
    for (r, f) in in_flight {
        match f.await {
            Ok(Ok(_)) => done.push(r.seq),
            Ok(Err((e, _))) => failed.push((r, e.to_string())),
            Err(_) => failed.push((r, "the producer went away before acknowledging".into())),
        }
    }
    let sent = done.len();
    for chunk in done.chunks(500) {
        row::Entity::delete_many()
            .filter(row::Column::Seq.is_in(chunk.iter().copied()))
            .exec(&inner.db)
            .await
            .map_err(db_err("delete sent outbox rows"))?;
    }
    for (r, error) in failed {
        record_failure(inner, r, error).await?;
    }
    Ok((sent, full))
}

/// Hands one row to the producer, waiting for room if its queue is full
/// (by awaiting the oldest delivery of this batch).
async fn enqueue(
    inner: &Inner,
    r: &row::Model,
    in_flight: &mut Vec<(&row::Model, DeliveryFuture)>,
) -> std::result::Result<DeliveryFuture, String> {
    let pairs: Vec<(String, String)> =
        serde_json::from_str(&r.headers).map_err(|e| format!("unreadable headers: {e}"))?;
    let mut headers = OwnedHeaders::new_with_capacity(pairs.len());
    for (k, v) in &pairs {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&r.topic)
        .headers(headers)
        .timestamp(r.created_at);
    if let Some(k) = &r.key {
        record = record.key(k.as_slice());
    }
    if let Some(p) = &r.payload {
        record = record.payload(p.as_slice());
    }
    let client = inner.producer.client();
    loop {
        match client.send_result(record) {
            Ok(f) => return Ok(f),
            Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                record = back;
                // Wait for an earlier message of this batch to make room.
                if let Some((_, oldest)) = in_flight.first_mut() {
                    let _ = std::pin::Pin::new(oldest).await;
                } else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Err((e, _)) => return Err(e.to_string()),
        }
    }
}

async fn record_failure(inner: &Inner, r: &row::Model, error: String) -> Result<()> {
    let attempts = r.attempts.saturating_add(1);
    let state = if attempts >= inner.settings.max_attempts {
        tracing::error!(message_id = %r.message_id, topic = %r.topic, attempts, %error, "outbox message failed for good; see Outbox::failed");
        row::FAILED
    } else {
        tracing::warn!(message_id = %r.message_id, topic = %r.topic, attempts, %error, "outbox message not sent; will retry");
        row::PENDING
    };
    row::Entity::update_many()
        .col_expr(row::Column::Attempts, Expr::value(attempts))
        .col_expr(row::Column::LastError, Expr::value(Some(error)))
        .col_expr(
            row::Column::NextAttemptAt,
            Expr::value(now_ms().saturating_add(inner.settings.backoff_ms(attempts))),
        )
        .col_expr(row::Column::State, Expr::value(state))
        .filter(row::Column::Seq.eq(r.seq))
        .exec(&inner.db)
        .await
        .map_err(db_err("record an outbox failure"))?;
    Ok(())
}

/// Sends freshly committed rows at once, each under its shard's lease;
/// whatever cannot go now is left to the relay.
///
/// Every commit leases under an owner of its own, so concurrent commits of
/// one process exclude each other as they exclude relays: a shared owner
/// would let them all "hold" a shard at once.
pub(super) async fn send_immediately(inner: &Inner, rows: &[(i64, i32)]) {
    let owner = format!("{}:immediate:{}", inner.relay_id, uuid::Uuid::now_v7());
    for &(seq, shard) in rows {
        if let Err(e) = send_one(inner, seq, shard, &owner).await {
            tracing::debug!(seq, error = %e, "immediate send skipped; the relay will send it");
        }
    }
}

async fn send_one(inner: &Inner, seq: i64, shard: i32, owner: &str) -> Result<()> {
    if !acquire(inner, shard, owner).await? {
        return Ok(());
    }
    let result = async {
        // Read under the lease: a relay that sent the row deleted it before
        // releasing, so a row still here has not been sent. (Read before the
        // lease, it could be a copy the relay sent in the meantime.)
        let Some(r) = row::Entity::find_by_id(seq)
            .filter(row::Column::State.eq(row::PENDING))
            .one(&inner.db)
            .await
            .map_err(db_err("read an outbox row"))?
        else {
            return Ok(());
        };
        if let Some(k) = &r.key {
            let earlier = row::Entity::find()
                .filter(row::Column::Shard.eq(r.shard))
                .filter(row::Column::Key.eq(k.clone()))
                .filter(row::Column::Seq.lt(r.seq))
                .filter(row::Column::State.eq(row::PENDING))
                .count(&inner.db)
                .await
                .map_err(db_err("check earlier outbox rows"))?;
            if earlier > 0 {
                return Ok(());
            }
        }
        let mut none = Vec::new();
        let delivered = match enqueue(inner, &r, &mut none).await {
            Ok(f) => matches!(f.await, Ok(Ok(_))),
            Err(_) => false,
        };
        if delivered {
            row::Entity::delete_by_id(r.seq)
                .exec(&inner.db)
                .await
                .map_err(db_err("delete a sent outbox row"))?;
        }
        Ok(())
    }
    .await;
    release(inner, shard, owner).await;
    result
}
