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

use sea_orm::{Database, DatabaseConnection, DbErr, SqlErr};
use sea_orm_migration::{MigrationTrait, MigratorTrait};

pub use migration::migrations;

use crate::error::{Error, Result};

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

/// Creates or updates kontext's tables.
pub async fn migrate(db: &DatabaseConnection) -> Result<()> {
    Migrator::up(db, None)
        .await
        .map_err(|source| Error::Database {
            operation: "migrate kontext's tables",
            source,
        })
}

/// Connects to `url` (`sqlite://...`, `postgres://...`).
pub async fn connect(url: &str) -> Result<DatabaseConnection> {
    Database::connect(url)
        .await
        .map_err(|source| Error::Database {
            operation: "connect",
            source,
        })
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
