//! Helpers for tests of services built on kontext (feature `testing`):
//! tracked sessions that wait until everything a test's action caused is
//! done ([`track`]), fault injection into handlers, the embedded broker and
//! the database ([`HandlerFault`], [`BrokerFault`], [`DatabaseFault`]),
//! unique names, the broker and database chosen by the environment, and a
//! reader that fetches what landed on a topic.

mod faults;
mod reader;
mod session;

use std::sync::atomic::{AtomicU64, Ordering};

pub use faults::{BrokerFault, DatabaseFault, HandlerFault};
pub use reader::{RecordedMessage, read_topic};
pub use session::{Activity, Tracked, Tracker, TypeActivity, track};

/// Headers whose names are any bytes, for a test's own producer: records
/// as a producer that does not check its header names writes them (Kafka
/// header names are meant to be UTF-8; nothing enforces it), to test how
/// a service meets them.
pub fn headers_with_raw_names(
    headers: &[(&[u8], Option<&[u8]>)],
) -> rdkafka::message::OwnedHeaders {
    headers
        .iter()
        .fold(rdkafka::message::OwnedHeaders::new(), |h, (name, value)| {
            crate::client::raw_headers::add(h, name, *value)
        })
}

use crate::broker::Broker;
use crate::error::{DbContext as _, Result};

/// Environment variable naming an external broker for tests
/// (`host:port`); unset means each test gets an embedded broker.
pub const BOOTSTRAP_ENV: &str = "KONTEXT_TEST_BOOTSTRAP";

/// A topic or group name no other test (or earlier run against the same
/// broker) uses: `prefix-<pid>-<n>-<random>`.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}-{n}-{}", std::process::id(), &random[..8])
}

/// The external broker named by [`BOOTSTRAP_ENV`], or a new embedded one.
pub fn broker_from_env() -> Result<Broker> {
    match std::env::var(BOOTSTRAP_ENV) {
        Ok(servers) if !servers.trim().is_empty() => Ok(Broker::external(servers)),
        _ => Broker::embedded(),
    }
}

/// `DATABASE_URL`, or `None` for the embedded default (SQLite).
pub fn database_url() -> Option<String> {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// A database of its own for one test: a new database on the PostgreSQL
/// server of `DATABASE_URL`, or a new SQLite file in the temp directory when
/// it is unset. Tables are not created; kontext migrates them at start.
pub async fn database() -> Result<sea_orm::DatabaseConnection> {
    crate::db::connect(&fresh_database_url().await?).await
}

/// The URL of a new, empty database, made as [`database`] makes it: for
/// tests that hand it to other processes.
pub async fn fresh_database_url() -> Result<String> {
    use sea_orm::ConnectionTrait;
    match database_url() {
        Some(url) if url.starts_with("postgres") => {
            let name = unique_name("kontext_test").replace('-', "_");
            let admin = crate::db::connect(&url).await?;
            admin
                .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                .await
                .db("create a test database")?;
            drop(admin);
            Ok(with_database(&url, &name))
        }
        Some(url) => Ok(url),
        None => {
            let path = std::env::temp_dir().join(format!("{}.db", unique_name("kontext")));
            Ok(format!("sqlite://{}?mode=rwc", path.display()))
        }
    }
}

/// `url` naming database `name` instead of its own, its query string
/// (`sslmode=require` and the like) kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
    match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn a_fresh_database_keeps_the_url_s_options() {
        assert_eq!(
            with_database(
                "postgres://u:p@db:5432/app?sslmode=require&application_name=t",
                "x"
            ),
            "postgres://u:p@db:5432/x?sslmode=require&application_name=t"
        );
        assert_eq!(
            with_database("postgres://u:p@db/app", "x"),
            "postgres://u:p@db/x"
        );
    }
}
