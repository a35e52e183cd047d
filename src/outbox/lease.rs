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

use sea_orm::sea_query::{Alias, Expr, Query, SimpleExpr};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend};

use crate::db::lease_entity as lease;
use crate::error::DbContext as _;
use crate::error::Result;

/// The database's clock in milliseconds since the Unix epoch, as SQL.
pub(super) fn db_now(backend: DbBackend) -> SimpleExpr {
    Expr::cust(db_now_sql(backend))
}

/// [`db_now`] as SQL text, for statements written by hand.
pub(super) fn db_now_sql(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
        // julianday('now') has millisecond precision; 2440587.5 is 1970-01-01.
        _ => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
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
        settled_in_time(self.renewed, ttl, send_timeout)
    }

    /// When the last successful renewal (or the acquisition) was sent.
    pub(super) fn renewed(&self) -> Instant {
        self.renewed
    }
}

/// Whether a message handed over now, under a lease last renewed (its
/// renewal sent) at `renewed`, is delivered or failed before the lease can
/// expire.
pub(super) fn settled_in_time(renewed: Instant, ttl: Duration, send_timeout: Duration) -> bool {
    renewed.elapsed() + send_timeout < ttl
}

/// Whether taking or keeping a lease yields to a reshard in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reshard {
    /// Relays and immediate sends: no new lease (and no next batch) while
    /// a reshard has paused the outbox (`kontext_outbox_layout.paused_until`).
    Yield,
    /// The reshard itself.
    Ignore,
}

/// True while no reshard has paused the outbox, as SQL.
fn not_paused(backend: DbBackend) -> SimpleExpr {
    Expr::exists(
        Query::select()
            .expr(Expr::val(1))
            .from(Alias::new("kontext_outbox_layout"))
            .and_where(Expr::col(Alias::new("paused_until")).gt(db_now(backend)))
            .to_owned(),
    )
    .not()
}

/// Takes the lease of `shard` for `owner` if it is free or expired, with a
/// new generation. `None` if someone else holds it (or, yielding, while a
/// reshard runs).
pub(super) async fn acquire(
    db: &DatabaseConnection,
    shard: i32,
    owner: &str,
    ttl: Duration,
    reshard: Reshard,
) -> Result<Option<Lease>> {
    let backend = db.get_database_backend();
    let sent = Instant::now();
    let mut stmt = Query::update();
    if reshard == Reshard::Yield {
        stmt.and_where(not_paused(backend));
    }
    let stmt = stmt
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
        .db("take an outbox lease")?;
    let Some(row) = row else {
        return Ok(None);
    };
    let generation: i64 = row
        .try_get("", "generation")
        .db("read an outbox lease's generation")?;
    Ok(Some(Lease {
        shard,
        owner: owner.to_owned(),
        generation,
        renewed: sent,
    }))
}

/// Extends `lease` if it is still ours. `Ok(false)`: it was taken over
/// (or, yielding, a reshard waits for it).
pub(super) async fn renew(
    db: &DatabaseConnection,
    lease: &mut Lease,
    ttl: Duration,
    reshard: Reshard,
) -> Result<bool> {
    let backend = db.get_database_backend();
    let sent = Instant::now();
    let mut stmt = Query::update();
    if reshard == Reshard::Yield {
        stmt.and_where(not_paused(backend));
    }
    let stmt = stmt
        .table(lease::Entity)
        .value(lease::Column::ExpiresAt, db_now(backend).add(ms(ttl)))
        .and_where(held_by(lease))
        .to_owned();
    let res = db
        .execute(backend.build(&stmt))
        .await
        .db("renew an outbox lease")?;
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

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectionTrait as _, EntityTrait as _, Set};

    use super::*;
    use crate::db::outbox_entity as row;

    async fn database() -> DatabaseConnection {
        let path = std::env::temp_dir().join(format!("kontext-lease-{}.db", uuid::Uuid::new_v4()));
        let db = crate::db::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .unwrap();
        crate::db::migrate(&db).await.unwrap();
        db.execute_unprepared(
            "INSERT INTO kontext_outbox_lease (shard, owner, expires_at, generation) VALUES (0, NULL, 0, 0)",
        )
        .await
        .unwrap();
        db
    }

    async fn insert_row(db: &DatabaseConnection) -> i64 {
        let r = row::ActiveModel {
            message_id: Set(uuid::Uuid::new_v4().to_string()),
            topic: Set("t".into()),
            shard: Set(0),
            key: Set(None),
            headers: Set("[]".into()),
            payload: Set(None),
            message_type: Set("T".into()),
            created_at: Set(0),
            attempts: Set(0),
            next_attempt_at: Set(0),
            last_error: Set(None),
            state: Set(row::PENDING),
            ..Default::default()
        };
        row::Entity::insert(r)
            .exec(db)
            .await
            .unwrap()
            .last_insert_id
    }

    async fn fenced_delete(db: &DatabaseConnection, lease: &Lease, seq: i64) -> u64 {
        row::Entity::delete_by_id(seq)
            .filter(fence(lease))
            .exec(db)
            .await
            .unwrap()
            .rows_affected
    }

    use sea_orm::QueryFilter as _;

    #[tokio::test]
    async fn a_relay_that_lost_its_lease_can_neither_renew_nor_write() {
        let db = database().await;
        let ttl = Duration::from_secs(60);
        let mut a = acquire(&db, 0, "a", ttl, Reshard::Yield)
            .await
            .unwrap()
            .unwrap();
        assert!(
            acquire(&db, 0, "b", ttl, Reshard::Yield)
                .await
                .unwrap()
                .is_none(),
            "a live lease is not taken"
        );
        assert!(
            renew(&db, &mut a, ttl, Reshard::Yield).await.unwrap(),
            "its holder renews it"
        );

        // `a` stalls past its expiry and `b` takes over.
        db.execute_unprepared("UPDATE kontext_outbox_lease SET expires_at = 0")
            .await
            .unwrap();
        let b = acquire(&db, 0, "b", ttl, Reshard::Yield)
            .await
            .unwrap()
            .unwrap();
        assert!(
            b.generation > a.generation,
            "a takeover starts a new generation"
        );
        assert!(
            !renew(&db, &mut a, ttl, Reshard::Yield).await.unwrap(),
            "the old holder cannot renew"
        );

        let seq = insert_row(&db).await;
        assert_eq!(fenced_delete(&db, &a, seq).await, 0, "nor delete");
        release(&db, &a).await;
        assert_eq!(fenced_delete(&db, &b, seq).await, 1, "the new holder can");

        // Even the same owner name, once it re-acquired, is a new holder.
        release(&db, &b).await;
        let b2 = acquire(&db, 0, "b", ttl, Reshard::Yield)
            .await
            .unwrap()
            .unwrap();
        let seq = insert_row(&db).await;
        assert_eq!(fenced_delete(&db, &b, seq).await, 0);
        assert_eq!(fenced_delete(&db, &b2, seq).await, 1);
    }

    #[tokio::test]
    async fn expiry_follows_the_database_clock() {
        let db = database().await;
        let ttl = Duration::from_secs(60);
        let _a = acquire(&db, 0, "a", ttl, Reshard::Yield)
            .await
            .unwrap()
            .unwrap();
        let backend = db.get_database_backend();
        let stmt = Query::select()
            .expr_as(
                Expr::col(lease::Column::ExpiresAt).sub(db_now(backend)),
                sea_orm::sea_query::Alias::new("left_ms"),
            )
            .from(lease::Entity)
            .to_owned();
        let left: i64 = db
            .query_one(backend.build(&stmt))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "left_ms")
            .unwrap();
        assert!((55_000..=60_000).contains(&left), "{left} ms left of 60 s");
    }
}
