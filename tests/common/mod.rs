//! Shared test helpers: tracing to the test writer, the broker chosen by the
//! environment, unique names.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kontext::Broker;
#[allow(unused_imports)]
pub use kontext::testing::{RecordedMessage, read_topic, unique_name};

/// Installs a subscriber that writes through the test harness (shown for
/// failing tests only). `RUST_LOG` filters it.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kontext=debug,warn".into()),
        )
        .try_init();
}

/// The broker named by `KONTEXT_TEST_BOOTSTRAP`, else a new embedded one.
pub fn broker() -> Broker {
    kontext::testing::broker_from_env().expect("broker")
}

/// Whether the tests run against an external broker.
pub fn external() -> bool {
    matches!(broker_kind(), BrokerKind::External)
}

pub enum BrokerKind {
    Embedded,
    External,
}

pub fn broker_kind() -> BrokerKind {
    match std::env::var(kontext::testing::BOOTSTRAP_ENV) {
        Ok(s) if !s.trim().is_empty() => BrokerKind::External,
        _ => BrokerKind::Embedded,
    }
}

/// Generous: the real broker in CI shares two cores with the build.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
