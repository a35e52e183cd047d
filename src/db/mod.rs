//! kontext's own tables (outbox, relay leases, inbox) as sea-orm entities
//! and migrations an application composes with its own migrator:
//!
//! ```no_run
//! use sea_orm_migration::prelude::*;
//!
//! struct Migrator;
//!
//! impl MigratorTrait for Migrator {
//!     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
//!         let mut all: Vec<Box<dyn MigrationTrait>> = vec![/* the app's own */];
//!         all.extend(kontext::db::migrations());
//!         all
//!     }
//! }
//! ```
//!
//! Times are stored as milliseconds since the Unix epoch (BIGINT), so the
//! same schema and queries work on SQLite and PostgreSQL.

pub mod inbox_entity;
pub mod lease_entity;
mod migration;
pub mod outbox_entity;

use std::time::{SystemTime, UNIX_EPOCH};

use sea_orm::{
    ConnectionTrait as _, Database, DatabaseConnection, DbBackend, DbErr, SqlErr, Statement,
    TransactionTrait as _,
};
use sea_orm_migration::{MigrationTrait, MigratorTrait};

pub(crate) use migration::OUTBOX_LAYOUT_LOCK;
pub use migration::migrations;

use crate::error::{DbContext as _, Error, Result};

/// A migrator with kontext's migrations only, for applications that do not
/// manage their own schema with sea-orm-migration.
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        migrations()
    }

    fn migration_table_name() -> sea_orm::DynIden {
        sea_orm::sea_query::Alias::new("kontext_migrations").into_iden()
    }
}

use sea_orm::sea_query::IntoIden as _;

/// The PostgreSQL advisory lock that serializes kontext's migrations
/// (an arbitrary constant: "kontext" in ASCII).
const MIGRATION_LOCK: i64 = 0x006b_6f6e_7465_7874;

/// Creates or updates kontext's tables.
///
/// Replicas starting together on a fresh database race in their migrations
/// (on PostgreSQL `CREATE TABLE IF NOT EXISTS` is not atomic and the loser
/// fails on `pg_type_typname_nsp_index`; on SQLite two processes both record
/// the migration's version), so the migrations run in one transaction that
/// first takes a lock: a transaction-scoped advisory lock on PostgreSQL, the
/// database's write lock on SQLite (taken by a write as the transaction's
/// first statement). The lock ends with the transaction, so a crashed
/// instance cannot leave it held.
pub async fn migrate(db: &DatabaseConnection) -> Result<()> {
    const MIGRATE: &str = "migrate kontext's tables";
    let backend = db.get_database_backend();
    let lock = match backend {
        DbBackend::Postgres => format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"),
        DbBackend::Sqlite => {
            db.execute_unprepared(
                "CREATE TABLE IF NOT EXISTS kontext_migration_lock (id INTEGER PRIMARY KEY)",
            )
            .await
            .db(MIGRATE)?;
            "INSERT OR REPLACE INTO kontext_migration_lock (id) VALUES (1)".to_owned()
        }
        DbBackend::MySql => return Migrator::up(db, None).await.db(MIGRATE),
    };
    let txn = db.begin().await.db(MIGRATE)?;
    txn.execute(Statement::from_string(backend, lock))
        .await
        .db(MIGRATE)?;
    Migrator::up(&txn, None).await.db(MIGRATE)?;
    txn.commit().await.db(MIGRATE)
}

/// Connects to `url` (`sqlite://...`, `postgres://...`).
///
/// On PostgreSQL the pool checks a connection before handing it out only
/// when it has been idle for [`IDLE_CHECK`] (the rule HikariCP follows).
/// sqlx's default pings every connection at every acquire: one more round
/// trip per transaction, about a fifth of the rate of short transactions
/// such as a unit of work or an outbox commit (BENCHMARKS.md). A connection
/// that died while in steady use fails its next statement instead, which
/// the relay and the unit of work retry.
///
/// Errors never quote the URL's password: drivers that quote the
/// connection string in their errors have it replaced by `***`.
pub async fn connect(url: &str) -> Result<DatabaseConnection> {
    connect_unredacted(url).await.map_err(|e| match e {
        Error::Database { operation, source } => {
            let text = source.to_string();
            let scrubbed = crate::config::scrub_url(&text, url);
            if scrubbed == text {
                return Error::Database { operation, source };
            }
            // Rewritten only when it quoted the password; a connection
            // error stays one (retriable, recognised as an outage).
            let source = match source {
                DbErr::Conn(_) => DbErr::Conn(sea_orm::RuntimeErr::Internal(scrubbed)),
                _ => DbErr::Custom(scrubbed),
            };
            Error::Database { operation, source }
        }
        other => other,
    })
}

async fn connect_unredacted(url: &str) -> Result<DatabaseConnection> {
    if !["postgres://", "postgresql://", "sqlite:"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
    {
        // Only a plausible scheme is quoted: the text before a `:` may
        // also be a user name and password written without one.
        let scheme = url
            .split_once("://")
            .map(|(s, _)| s)
            .filter(|s| {
                s.len() <= 20
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
            })
            .unwrap_or("(none)");
        return Err(DbErr::Custom(format!(
            "the database URL's scheme `{scheme}` is not one kontext supports (postgres://, postgresql:// or sqlite:)"
        )))
        .db("connect");
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        use sqlx::ConnectOptions as _;
        let options = url
            .parse::<sqlx::postgres::PgConnectOptions>()
            .map_err(|e| DbErr::Conn(sea_orm::RuntimeErr::SqlxError(e)))
            .db("parse the database URL")?
            // sqlx logs every statement at INFO by default (sea-orm's
            // connect does too): an application's log would fill with them.
            .disable_statement_logging();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_CHECK {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| DbErr::Conn(sea_orm::RuntimeErr::SqlxError(e)))
            .db("connect")?;
        return Ok(sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(
            pool,
        ));
    }
    Database::connect(url).await.db("connect")
}

/// A pooled connection idle for this long is pinged before it is handed out.
pub const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whether a database error is a unique-key violation.
pub(crate) fn is_unique_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// Whether `error`, or an error it wraps, says that the database could not
/// be reached rather than that a statement failed: no connection from the
/// pool, a connection refused or lost, a server shutting down or still
/// starting (SQLSTATE class 08, 57P01-57P03). Failing handlers with such an
/// error are retried without spending the message's attempts: an outage is
/// not the message's fault.
pub(crate) fn is_unreachable(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(DbErr::ConnectionAcquire(_) | DbErr::Conn(_)) = e.downcast_ref::<DbErr>() {
            return true;
        }
        if let Some(e) = e.downcast_ref::<sqlx::Error>() {
            return match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(d) => d.code().is_some_and(|c| {
                    c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")
                }),
                _ => false,
            };
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod unreachable_tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn outages_are_told_from_failed_statements() {
        let refused = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let exec = DbErr::Exec(sea_orm::RuntimeErr::SqlxError(refused));
        assert!(is_unreachable(&exec));
        assert!(is_unreachable(&DbErr::ConnectionAcquire(
            sea_orm::ConnAcquireErr::Timeout
        )));
        // Wrapped by kontext, then boxed as a handler's error.
        let wrapped: Box<dyn std::error::Error + Send + Sync> =
            Box::new(Error::TransactionAborted { source: exec });
        assert!(is_unreachable(&*wrapped));

        let statement = DbErr::Exec(sea_orm::RuntimeErr::Internal("syntax error".into()));
        assert!(!is_unreachable(&statement));
        assert!(!is_unreachable(&DbErr::RecordNotFound("x".into())));
        assert!(!is_unreachable(&std::io::Error::other("not a database")));
    }
}
