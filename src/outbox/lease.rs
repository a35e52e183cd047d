//! Fenced shard leases: who may relay a shard, and proof that they still may.
//!
//! A lease row carries an owner, an expiry and a **generation** that grows
//! on every takeover. Every write a holder makes to the shard's rows is
//! conditional on the lease still carrying its owner and generation
//! ([`held_by`]), so a relay that lost its lease (it stalled past the expiry
//! and another took over) can neither delete nor mark anything. Expiry is
//! judged by the **database's** clock, never the local one: a relay whose
//! clock runs ahead cannot see live leases as expired.
//!
//! A holder hands messages to the producer only while its last renewal is
//! recent enough that every message it hands over is delivered or failed
//! (the relay producer's send timeout) before the lease can expire
//! ([`Lease::may_send`]); the relay renews on a heartbeat while a batch is
//! in flight. So a takeover never overlaps a delivery in the normal path.

use std::time::{Duration, Instant};

use sea_orm::sea_query::{Expr, Query, SimpleExpr};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};

use crate::db::lease_entity as lease;
use crate::error::{Error, Result};

/// The database's clock in milliseconds since the Unix epoch, as SQL.
pub(super) fn db_now(backend: DbBackend) -> SimpleExpr {
    Expr::cust(match backend {
        DbBackend::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
        // julianday('now') has millisecond precision; 2440587.5 is 1970-01-01.
        _ => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    })
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A shard lease this process holds (as far as it knows).
#[derive(Debug)]
pub(super) struct Lease {
    pub(super) shard: i32,
    owner: String,
    generation: i64,
    /// When the last successful renewal (or the acquisition) was *sent*:
    /// the database set the expiry no earlier than this.
    renewed: Instant,
}

impl Lease {
    /// Whether a message handed to the producer now is settled (delivered
    /// or failed, after at most `send_timeout`) before the lease can expire.
    pub(super) fn may_send(&self, ttl: Duration, send_timeout: Duration) -> bool {
        self.renewed.elapsed() + send_timeout < ttl
    }

    /// When the last successful renewal (or the acquisition) was sent.
    pub(super) fn renewed(&self) -> Instant {
        self.renewed
    }
}

/// Takes the lease of `shard` for `owner` if it is free or expired, with a
/// new generation. `None` if someone else holds it.
pub(super) async fn acquire(
    db: &DatabaseConnection,
    shard: i32,
    owner: &str,
    ttl: Duration,
) -> Result<Option<Lease>> {
    let backend = db.get_database_backend();
    let sent = Instant::now();
    let stmt = Query::update()
        .table(lease::Entity)
        .value(lease::Column::Owner, owner)
        .value(
            lease::Column::Generation,
            Expr::col(lease::Column::Generation).add(1),
        )
        .value(lease::Column::ExpiresAt, db_now(backend).add(ms(ttl)))
        .and_where(Expr::col(lease::Column::Shard).eq(shard))
        .and_where(
            Expr::col(lease::Column::Owner)
                .is_null()
                .or(Expr::col(lease::Column::ExpiresAt).lte(db_now(backend))),
        )
        .returning_col(lease::Column::Generation)
        .to_owned();
    let row = db
        .query_one(backend.build(&stmt))
        .await
        .map_err(db_err("take an outbox lease"))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let generation: i64 = row
        .try_get("", "generation")
        .map_err(db_err("read an outbox lease's generation"))?;
    Ok(Some(Lease {
        shard,
        owner: owner.to_owned(),
        generation,
        renewed: sent,
    }))
}

/// Extends `lease` if it is still ours. `Ok(false)`: it was taken over.
pub(super) async fn renew(
    db: &DatabaseConnection,
    lease: &mut Lease,
    ttl: Duration,
) -> Result<bool> {
    let backend = db.get_database_backend();
    let sent = Instant::now();
    let stmt = Query::update()
        .table(lease::Entity)
        .value(lease::Column::ExpiresAt, db_now(backend).add(ms(ttl)))
        .and_where(held_by(lease))
        .to_owned();
    let res = db
        .execute(backend.build(&stmt))
        .await
        .map_err(db_err("renew an outbox lease"))?;
    if res.rows_affected() == 1 {
        lease.renewed = sent;
        Ok(true)
    } else {
        Ok(false)
    }
}

/// Gives `lease` up, if it is still ours; otherwise it expires by itself.
pub(super) async fn release(db: &DatabaseConnection, lease: &Lease) {
    let backend = db.get_database_backend();
    let stmt = Query::update()
        .table(lease::Entity)
        .value(lease::Column::Owner, Option::<String>::None)
        .value(lease::Column::ExpiresAt, 0i64)
        .and_where(held_by(lease))
        .to_owned();
    if let Err(e) = db.execute(backend.build(&stmt)).await {
        tracing::debug!(shard = lease.shard, error = %e, "could not release an outbox lease; it expires by itself");
    }
}

/// The lease row still carries `lease`'s owner and generation. No expiry
/// check: a holder whose lease lapsed but was not taken over may still
/// settle what it sent (deleting a delivered row is right whoever does it).
fn held_by(lease: &Lease) -> SimpleExpr {
    // Qualified: inside `fence` this runs in a subquery of a statement on
    // `kontext_outbox`, which has a `shard` column too.
    let col = |c: lease::Column| Expr::col((lease::Entity, c));
    col(lease::Column::Shard)
        .eq(lease.shard)
        .and(col(lease::Column::Owner).eq(lease.owner.as_str()))
        .and(col(lease::Column::Generation).eq(lease.generation))
}

/// A condition for writes to outbox rows: true only while `lease` holds.
pub(super) fn fence(lease: &Lease) -> SimpleExpr {
    Expr::exists(
        Query::select()
            .expr(Expr::val(1))
            .from(lease::Entity)
            .and_where(held_by(lease))
            .to_owned(),
    )
}

fn db_err(operation: &'static str) -> impl FnOnce(sea_orm::DbErr) -> Error {
    move |source| Error::Database { operation, source }
}
