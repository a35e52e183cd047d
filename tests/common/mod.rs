//! Shared test helpers: tracing to the test writer, the broker chosen by the
//! environment, unique names.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use kontext::Broker;
#[allow(unused_imports)]
pub use kontext::testing::{RecordedMessage, read_topic, unique_name};

/// Installs a subscriber that writes through the test harness (shown for
/// failing tests only; `RUST_LOG` filters it) and keeps kontext's warnings
/// and errors for [`logged`].
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{Layer as _, filter};
    let shown = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kontext=debug,warn".into()),
        );
    let kept =
        Kept.with_filter(filter::Targets::new().with_target("kontext", tracing::Level::WARN));
    let _ = tracing_subscriber::registry()
        .with(shown)
        .with(kept)
        .try_init();
}

/// kontext's warnings and errors so far in this test binary, each as its
/// message followed by its fields (`name=value`), that contain `needle`.
/// Tests filter by a name of their own: tests run side by side.
pub fn logged(needle: &str) -> Vec<String> {
    KEPT.lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .cloned()
        .collect()
}

static KEPT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

struct Kept;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Kept {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Line(String);
        impl tracing::field::Visit for Line {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write as _;
                if field.name() == "message" {
                    let _ = write!(self.0, "{value:?}");
                } else {
                    let _ = write!(self.0, " {}={value:?}", field.name());
                }
            }
        }
        let mut line = Line(String::new());
        event.record(&mut line);
        KEPT.lock().unwrap().push(line.0);
    }
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

/// Prints a figure README or BENCHMARKS.md quotes, on a line that starts
/// with `figure:` and names the test and the broker and database it ran on.
/// Run the test with `-- --exact --nocapture` and `grep figure:` to see it.
pub fn figure(test: &str, what: std::fmt::Arguments<'_>) {
    let broker = match broker_kind() {
        BrokerKind::Embedded => "embedded broker",
        BrokerKind::External => "external broker (KONTEXT_TEST_BOOTSTRAP)",
    };
    figure_labelled(test, broker, what);
}

/// [`figure`] for a test that runs on a broker of its own choosing.
pub fn figure_on(test: &str, broker: &Broker, what: std::fmt::Arguments<'_>) {
    let label = if broker.as_embedded().is_some() {
        "embedded broker"
    } else {
        "external broker"
    };
    figure_labelled(test, label, what);
}

fn figure_labelled(test: &str, broker: &str, what: std::fmt::Arguments<'_>) {
    let database = match kontext::testing::database_url() {
        Some(u) if u.starts_with("postgres") => "PostgreSQL",
        _ => "SQLite",
    };
    eprintln!("figure: {test} [{broker}, {database}]: {what}");
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

/// How many records `topic` holds: the sum of its partitions' high
/// watermarks (topics written without transactions, from offset 0).
pub async fn records_on(broker: &Broker, topic: &str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let servers = broker.bootstrap_servers().to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .create()
            .unwrap();
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        md.topics()[0]
            .partitions()
            .iter()
            .map(|p| {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p.id(), Duration::from_secs(10))
                    .unwrap();
                usize::try_from(high).unwrap()
            })
            .sum()
    })
    .await
    .unwrap()
}

/// Every record of `topic`, read once the watermarks say how many there
/// are: no fixed window to wait out, nothing left unread.
pub async fn read_all(broker: &Broker, topic: &str) -> Vec<RecordedMessage> {
    let n = records_on(broker, topic).await;
    let records = read_topic(broker, topic, n, READ_TIMEOUT).await.unwrap();
    assert_eq!(records.len(), n, "read what the watermarks count");
    records
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
