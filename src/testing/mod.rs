//! Helpers for tests of services built on kontext (feature `testing`):
//! unique names, the broker and database chosen by the environment, and a
//! reader that fetches what landed on a topic.

mod reader;

use std::sync::atomic::{AtomicU64, Ordering};

pub use reader::{RecordedMessage, read_topic};

use crate::broker::Broker;
use crate::error::Result;

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

/// `DATABASE_URL`, or an in-memory SQLite database when it is unset.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "sqlite::memory:".to_owned())
}
