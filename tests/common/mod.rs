//! Shared test helpers: tracing to the test writer, the broker chosen by the
//! environment, unique names.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
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

/// The one wait of the tests: calls `check` every 20 ms until it returns
/// `Ok`, and fails the test after [`READ_TIMEOUT`] with `what` and the last
/// state `check` described in its `Err`.
pub async fn wait_until<T>(what: &str, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(state) => assert!(
                std::time::Instant::now() < deadline,
                "timed out after {READ_TIMEOUT:?} waiting for {what}: {state}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `Ok(())` when `done`, else the state to report: for [`wait_until`].
pub fn ready(done: bool, state: impl FnOnce() -> String) -> Result<(), String> {
    if done { Ok(()) } else { Err(state()) }
}

/// Committed offsets of `group` on every partition of `topic`, read with a
/// plain client. The `TopicPartitionList` is dropped before its consumer.
pub async fn committed_offsets(broker: &Broker, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let servers = broker.bootstrap_servers().to_owned();
    let (group, topic) = (group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .set("group.id", &group)
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition(&topic, p.id());
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        let out = committed
            .elements()
            .iter()
            .filter_map(|e| {
                e.offset()
                    .to_raw()
                    .filter(|o| *o >= 0)
                    .map(|o| (e.partition(), o))
            })
            .collect();
        drop(committed);
        drop(consumer);
        out
    })
    .await
    .unwrap()
}

/// Outbox settings for tests that take the broker or the database away:
/// quick polls and retries, never giving up on a row, `lease_ttl` as given.
pub fn patient_outbox(lease_ttl: Duration) -> kontext::outbox::OutboxSettings {
    kontext::outbox::OutboxSettings {
        poll_interval: Duration::from_millis(100),
        lease_ttl,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_attempts: 1_000,
        ..kontext::outbox::OutboxSettings::default()
    }
}

/// The `n` column of the one row `sql` returns (a `COUNT(..) AS n`).
pub async fn count(db: &sea_orm::DatabaseConnection, sql: &str) -> i64 {
    use sea_orm::ConnectionTrait;
    let row = db
        .query_one(sea_orm::Statement::from_string(
            db.get_database_backend(),
            sql,
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}
