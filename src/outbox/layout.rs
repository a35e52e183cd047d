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
//! [`reshard`] changes it on a live system: it takes every shard's lease
//! (relays pause), then, under an exclusive lock that every writer's insert
//! takes shared, stores the new count and moves every row to its new shard.
//! On PostgreSQL an insert that began before the change can still commit
//! after it with the old count (its snapshot predates the change); a second
//! exclusive lock waits for those transactions and moves their rows too,
//! before the leases are released. Relays only ever see the new layout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait as _};

use super::Inner;
use super::lease::{self, Lease};
use crate::error::{DbContext as _, Error, Result};

/// The count a new table is given when the first process sets none.
pub(super) const DEFAULT_SHARDS: i32 = 16;

/// The PostgreSQL advisory lock (one 64-bit key: "kontxlay") every insert
/// takes shared and [`reshard`] exclusively.
pub(super) const LAYOUT_LOCK: i64 = 0x6b6f_6e74_786c_6179;

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
    super::relay::ensure_lease_rows(db, 0..shards).await?;
    let all = lease_shards(db).await?;
    let mut held: Vec<Lease> = Vec::with_capacity(all.len());
    let result = async {
        take_every_lease(inner, &owner, &all, &mut held).await?;
        let from = stored(db).await?;
        let mut moved = rewrite(inner, shards, &owner, held.len()).await?;
        if db.get_database_backend() == DbBackend::Postgres {
            // Inserts whose snapshot predates the change: waited for by the
            // exclusive lock, their rows moved.
            moved += rewrite(inner, shards, &owner, held.len()).await?;
        }
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
    if let Ok(r) = &result {
        tracing::info!(
            from = r.from,
            to = r.to,
            moved = r.moved,
            "outbox resharded"
        );
        inner.wake.notify_one();
    }
    result
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
    let deadline = Instant::now() + ttl * 2 + Duration::from_secs(5);
    loop {
        for &shard in all {
            if held.iter().any(|l| l.shard == shard) {
                continue;
            }
            if let Some(l) = lease::acquire(&inner.db, shard, owner, ttl).await? {
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
            if l.renewed().elapsed() > ttl / 4 && !lease::renew(&inner.db, l, ttl).await? {
                return Err(Error::Reshard(
                    "a shard's lease it took was lost; nothing was changed".into(),
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// In one transaction under the exclusive layout lock: checks the leases
/// are still `owner`'s, stores `shards` and moves every row whose shard
/// differs under it. Returns the rows moved.
async fn rewrite(inner: &Inner, shards: i32, owner: &str, held: usize) -> Result<u64> {
    const WHAT: &str = "reshard the outbox";
    let backend = inner.db.get_database_backend();
    let txn = inner.db.begin().await.db(WHAT)?;
    let sql = |postgres: &str, other: &str| match backend {
        DbBackend::Postgres => postgres.to_owned(),
        _ => other.to_owned(),
    };
    if backend == DbBackend::Postgres {
        // A writer holding the lock shared for long (a long transaction)
        // fails the reshard instead of stalling every other writer behind it.
        txn.execute_unprepared("SET LOCAL lock_timeout = '30s'")
            .await
            .db(WHAT)?;
        txn.execute(Statement::from_sql_and_values(
            backend,
            "SELECT pg_advisory_xact_lock($1)",
            [LAYOUT_LOCK.into()],
        ))
        .await
        .db(WHAT)?;
    }
    // First a write, which on SQLite takes the database's write lock.
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
    let ours = txn
        .query_one(Statement::from_sql_and_values(
            backend,
            sql(
                "SELECT COUNT(*) AS n FROM kontext_outbox_lease WHERE owner = $1",
                "SELECT COUNT(*) AS n FROM kontext_outbox_lease WHERE owner = ?",
            ),
            [owner.into()],
        ))
        .await
        .db(WHAT)?
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()
        .db(WHAT)?
        .unwrap_or(0);
    if usize::try_from(ours).unwrap_or(0) != held {
        return Err(Error::Reshard(
            "a shard's lease it took was lost (it took longer than `lease_ttl`); nothing was changed".into(),
        ));
    }
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
