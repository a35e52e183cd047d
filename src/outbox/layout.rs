//! The outbox table's shard count: a property of the table, not of a
//! process.
//!
//! A row's shard is a hash of its key modulo the count, and a key keeps its
//! order because all its rows are in one shard, sent under one lease. If
//! writers and relays each used a count of their own, a key's rows would
//! land in shards no relay walks, or in two shards sent at once. So the
//! count is stored once, in `kontext_outbox_layout`, seeded by the first
//! process that starts, and every insert computes its row's shard from it
//! in SQL (the writer sends only the key's hash).
//!
//! [`reshard`] changes it on a live system. It pauses the outbox (one
//! reshard at a time: `paused_until`/`paused_by` on the layout row; relays
//! and immediate sends take no lease and start no next batch meanwhile),
//! takes every shard's lease as its holders finish their batches, then in
//! one transaction renews those leases (their rows stay locked until it
//! commits, so nobody takes one), takes an exclusive lock that every
//! insert takes shared, stores the new count and moves every row to its
//! new shard. On PostgreSQL an insert reads the count through
//! `kontext_outbox_shards()`, which takes that lock shared and then reads
//! the count with a fresh snapshot, so an insert waiting on a reshard uses
//! the new count. Relays only ever see one layout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait as _};

use super::Inner;
use super::lease::{self, Lease, Reshard};
use crate::error::{DbContext as _, Error, Result};

/// The count a new table is given when the first process sets none.
pub(super) const DEFAULT_SHARDS: i32 = 16;

/// How long the transaction that moves rows waits for the layout lock
/// (writers' transactions in progress hold it shared) before it gives up
/// and tries again: writers that start meanwhile queue behind it.
const LOCK_WAIT: &str = "5s";

/// Tries of that transaction before the reshard fails.
const TRIES: u32 = 3;

/// Seeds the table's count with `wanted` (or the default) if it has none,
/// and returns it. A `wanted` count that differs from the table's is
/// refused, naming both.
pub(super) async fn adopt(db: &impl ConnectionTrait, wanted: Option<i32>) -> Result<i32> {
    const WHAT: &str = "read the outbox's shard count";
    let backend = db.get_database_backend();
    db.execute(Statement::from_sql_and_values(
        backend,
        match backend {
            DbBackend::Postgres => {
                "INSERT INTO kontext_outbox_layout (id, shards) VALUES (1, $1) ON CONFLICT (id) DO NOTHING"
            }
            _ => "INSERT INTO kontext_outbox_layout (id, shards) VALUES (1, ?) ON CONFLICT (id) DO NOTHING",
        },
        [wanted.unwrap_or(DEFAULT_SHARDS).into()],
    ))
    .await
    .db(WHAT)?;
    let stored = stored(db).await?;
    match wanted {
        Some(w) if w != stored => Err(Error::config(format!(
            "outbox `shards` is {w} in this process's settings, but the outbox table is sharded {stored} ways: \
             the count belongs to the table, which every writer and relay shares. Leave `shards` unset to use \
             the table's count, or change the table's with `Outbox::reshard({w})`"
        ))),
        _ => Ok(stored),
    }
}

/// The table's count.
async fn stored(db: &impl ConnectionTrait) -> Result<i32> {
    const WHAT: &str = "read the outbox's shard count";
    let row = db
        .query_one(Statement::from_string(
            db.get_database_backend(),
            "SELECT shards FROM kontext_outbox_layout WHERE id = 1",
        ))
        .await
        .db(WHAT)?
        .ok_or(sea_orm::DbErr::RecordNotFound(
            "kontext_outbox_layout".into(),
        ))
        .db(WHAT)?;
    row.try_get::<i32>("", "shards").db(WHAT)
}

/// What [`Outbox::reshard`](super::Outbox::reshard) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resharded {
    /// The table's count before.
    pub from: i32,
    /// The table's count now.
    pub to: i32,
    /// Rows (pending or failed) moved to another shard.
    pub moved: u64,
}

/// Changes the table's count to `shards` and moves every row to its shard
/// under the new count, pausing relays meanwhile (see the module's doc).
pub(super) async fn reshard(inner: &Inner, shards: i32) -> Result<Resharded> {
    if shards < 1 {
        return Err(Error::config("outbox `shards` must be at least 1"));
    }
    let db = &inner.db;
    let owner = format!("reshard:{}", uuid::Uuid::now_v7());
    let ttl = inner.settings.lease_ttl;
    // Long enough to take every lease (a stuck holder's expires after
    // `lease_ttl`) and move the rows; a crashed reshard's pause ends by
    // itself then.
    let pause = ttl * 3 + Duration::from_secs(30);
    pause_outbox(db, &owner, pause).await?;
    super::relay::ensure_lease_rows(db, 0..shards).await?;
    let mut held: Vec<Lease> = Vec::new();
    let result = async {
        let all = lease_shards(db).await?;
        take_every_lease(inner, &owner, &all, &mut held).await?;
        let from = stored(db).await?;
        let mut tries = 0;
        let moved = loop {
            tries += 1;
            match rewrite(inner, shards, &owner, held.len()).await {
                Ok(moved) => break moved,
                Err(e) if tries < TRIES && lock_wait_ended(&e) => {
                    tracing::info!(error = %e, "outbox reshard waited too long for writers; trying again");
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Resharded {
            from,
            to: shards,
            moved,
        })
    }
    .await;
    for l in &held {
        lease::release(db, l).await;
    }
    resume_outbox(db, &owner).await;
    match &result {
        Ok(r) => {
            tracing::info!(
                from = r.from,
                to = r.to,
                moved = r.moved,
                "outbox resharded"
            );
            inner.wake.notify_one();
        }
        Err(e) => tracing::warn!(error = %e, "outbox reshard failed; the count is unchanged"),
    }
    result
}

/// Marks the outbox paused by `owner` for at most `pause`, unless another
/// reshard has it paused.
async fn pause_outbox(db: &DatabaseConnection, owner: &str, pause: Duration) -> Result<()> {
    const WHAT: &str = "pause the outbox to reshard";
    let backend = db.get_database_backend();
    let pause_ms = i64::try_from(pause.as_millis()).unwrap_or(i64::MAX);
    let now = lease::db_now_sql(backend);
    let res = db
        .execute(Statement::from_sql_and_values(
            backend,
            match backend {
                DbBackend::Postgres => format!(
                    "UPDATE kontext_outbox_layout SET paused_until = {now} + $1, paused_by = $2 \
                     WHERE id = 1 AND paused_until <= {now}"
                ),
                _ => format!(
                    "UPDATE kontext_outbox_layout SET paused_until = {now} + ?, paused_by = ? \
                     WHERE id = 1 AND paused_until <= {now}"
                ),
            },
            [pause_ms.into(), owner.into()],
        ))
        .await
        .db(WHAT)?;
    if res.rows_affected() == 1 {
        Ok(())
    } else {
        Err(Error::Reshard(
            "another reshard is in progress (or the outbox's layout row is missing)".into(),
        ))
    }
}

/// Ends `owner`'s pause (it also ends by itself at `paused_until`).
async fn resume_outbox(db: &DatabaseConnection, owner: &str) {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => {
            "UPDATE kontext_outbox_layout SET paused_until = 0, paused_by = NULL WHERE id = 1 AND paused_by = $1"
        }
        _ => {
            "UPDATE kontext_outbox_layout SET paused_until = 0, paused_by = NULL WHERE id = 1 AND paused_by = ?"
        }
    };
    if let Err(e) = db
        .execute(Statement::from_sql_and_values(backend, sql, [owner.into()]))
        .await
    {
        tracing::warn!(error = %e, "could not end the outbox's reshard pause; it ends by itself");
    }
}

/// Whether `e` is PostgreSQL giving up on a lock (`lock_timeout`, 55P03).
fn lock_wait_ended(e: &Error) -> bool {
    match e {
        Error::Database { source, .. } => {
            let text = source.to_string();
            text.contains("55P03") || text.contains("lock timeout")
        }
        _ => false,
    }
}

/// Every shard that has a lease row.
async fn lease_shards(db: &impl ConnectionTrait) -> Result<Vec<i32>> {
    const WHAT: &str = "list the outbox leases";
    let rows = db
        .query_all(Statement::from_string(
            db.get_database_backend(),
            "SELECT shard FROM kontext_outbox_lease ORDER BY shard",
        ))
        .await
        .db(WHAT)?;
    rows.iter()
        .map(|r| r.try_get::<i32>("", "shard").db(WHAT))
        .collect()
}

/// Takes the lease of every shard in `all` for `owner`, waiting for relays
/// to give theirs up (a relay releases a shard after each pass; a stuck
/// one's lease expires after `lease_ttl`).
async fn take_every_lease(
    inner: &Inner,
    owner: &str,
    all: &[i32],
    held: &mut Vec<Lease>,
) -> Result<()> {
    let ttl = inner.settings.lease_ttl;
    let deadline = Instant::now() + ttl * 2;
    loop {
        for &shard in all {
            if held.iter().any(|l| l.shard == shard) {
                continue;
            }
            if let Some(l) = lease::acquire(&inner.db, shard, owner, ttl, Reshard::Ignore).await? {
                held.push(l);
            }
        }
        if held.len() == all.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Reshard(format!(
                "could not take every shard's lease within {:?}: {} of {} shards stayed leased",
                ttl * 2,
                all.len() - held.len(),
                all.len()
            )));
        }
        for l in held.iter_mut() {
            if l.renewed().elapsed() > ttl / 4
                && !lease::renew(&inner.db, l, ttl, Reshard::Ignore).await?
            {
                return Err(Error::Reshard(
                    "a shard's lease it took was lost; nothing was changed".into(),
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// In one transaction: renews `owner`'s leases (all `held` of them, or
/// nothing is done), takes the layout lock exclusively, stores `shards` and
/// moves every row whose shard differs under it. Returns the rows moved.
async fn rewrite(inner: &Inner, shards: i32, owner: &str, held: usize) -> Result<u64> {
    const WHAT: &str = "reshard the outbox";
    let backend = inner.db.get_database_backend();
    let txn = inner.db.begin().await.db(WHAT)?;
    let sql = |postgres: &str, other: &str| match backend {
        DbBackend::Postgres => postgres.to_owned(),
        _ => other.to_owned(),
    };
    if backend == DbBackend::Postgres {
        // Each statement below must see what committed before it ran (the
        // rows of inserts that waited for the layout lock included),
        // whatever the server's default isolation.
        txn.execute_unprepared("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .await
            .db(WHAT)?;
    }
    // First, the leases: renewed, and their rows locked until this commits
    // (on SQLite the write takes the database's write lock), so none of
    // them can be taken while the rows move. One lost lease: nothing done.
    let ttl_ms = i64::try_from(inner.settings.lease_ttl.as_millis()).unwrap_or(i64::MAX);
    let now = lease::db_now_sql(backend);
    let renewed = txn
        .execute(Statement::from_sql_and_values(
            backend,
            sql(
                &format!(
                    "UPDATE kontext_outbox_lease SET expires_at = {now} + $1 WHERE owner = $2"
                ),
                &format!("UPDATE kontext_outbox_lease SET expires_at = {now} + ? WHERE owner = ?"),
            ),
            [ttl_ms.into(), owner.into()],
        ))
        .await
        .db(WHAT)?
        .rows_affected();
    if usize::try_from(renewed).unwrap_or(0) != held {
        return Err(Error::Reshard(format!(
            "{} of the {held} shard leases it took were lost (it took longer than `lease_ttl`); the count is unchanged",
            held.saturating_sub(usize::try_from(renewed).unwrap_or(0))
        )));
    }
    if backend == DbBackend::Postgres {
        // Writers' transactions in progress hold the layout lock shared; a
        // long one fails this try instead of stalling the writers that
        // queue behind the exclusive request.
        txn.execute_unprepared(&format!("SET LOCAL lock_timeout = '{LOCK_WAIT}'"))
            .await
            .db(WHAT)?;
        txn.execute(Statement::from_sql_and_values(
            backend,
            "SELECT pg_advisory_xact_lock($1)",
            [crate::db::OUTBOX_LAYOUT_LOCK.into()],
        ))
        .await
        .db(WHAT)?;
    }
    txn.execute(Statement::from_sql_and_values(
        backend,
        sql(
            "UPDATE kontext_outbox_layout SET shards = $1 WHERE id = 1",
            "UPDATE kontext_outbox_layout SET shards = ? WHERE id = 1",
        ),
        [shards.into()],
    ))
    .await
    .db(WHAT)?;
    let rows = txn
        .query_all(Statement::from_string(
            backend,
            "SELECT seq, key, message_id, shard FROM kontext_outbox",
        ))
        .await
        .db(WHAT)?;
    let mut moves: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for r in &rows {
        let seq: i64 = r.try_get("", "seq").db(WHAT)?;
        let shard: i32 = r.try_get("", "shard").db(WHAT)?;
        let key: Option<Vec<u8>> = r.try_get("", "key").db(WHAT)?;
        let message_id: String = r.try_get("", "message_id").db(WHAT)?;
        let hash = match &key {
            Some(k) => super::key_hash(k),
            // Keyless rows are spread by their id, as the writer did.
            None => uuid::Uuid::parse_str(&message_id)
                .map(|id| super::key_hash(id.as_bytes()))
                .unwrap_or(0),
        };
        let to = super::shard_of_hash(hash, shards);
        if to != shard {
            moves.entry(to).or_default().push(seq);
        }
    }
    let mut moved = 0u64;
    for (to, seqs) in moves {
        for chunk in seqs.chunks(500) {
            let list = chunk
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let res = txn
                .execute_unprepared(&format!(
                    "UPDATE kontext_outbox SET shard = {to} WHERE seq IN ({list})"
                ))
                .await
                .db(WHAT)?;
            moved += res.rows_affected();
        }
    }
    txn.commit().await.db(WHAT)?;
    Ok(moved)
}
