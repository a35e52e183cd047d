//! `kontext::db::connect` on PostgreSQL: the pool pings a connection before
//! handing it out only when it has been idle for `db::IDLE_CHECK`, so a
//! server that dropped idle connections (a restart, a proxy's idle timeout)
//! costs no failed transaction, while busy connections save the round trip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};

/// Ends every other session on the test's database, as a server restart
/// or a proxy would.
async fn end_other_sessions(url: &str) {
    let admin = kontext::db::connect(url).await.unwrap();
    admin
        .execute(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        ))
        .await
        .unwrap();
    admin.close().await.unwrap();
}

async fn one_transaction(db: &sea_orm::DatabaseConnection) -> Result<(), sea_orm::DbErr> {
    let txn = db.begin().await?;
    txn.execute(Statement::from_string(DbBackend::Postgres, "SELECT 1"))
        .await?;
    txn.commit().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_server_ended_while_idle_is_replaced_without_a_failed_transaction() {
    init_tracing();
    let url = kontext::testing::fresh_database_url().await.unwrap();
    if !url.starts_with("postgres") {
        return;
    }
    let db = kontext::db::connect(&url).await.unwrap();
    one_transaction(&db).await.unwrap();
    end_other_sessions(&url).await;
    // Idle past the check (the condition under test, not a wait for one).
    tokio::time::sleep(kontext::db::IDLE_CHECK + Duration::from_millis(100)).await;
    for _ in 0..5 {
        one_transaction(&db).await.unwrap();
    }
}
