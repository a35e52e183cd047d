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

pub use migration::migrations;

use crate::error::{DbContext as _, Result};

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
pub async fn connect(url: &str) -> Result<DatabaseConnection> {
    Database::connect(url).await.db("connect")
}

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
