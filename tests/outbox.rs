//! The transactional outbox, on SQLite (default) or on PostgreSQL when
//! `DATABASE_URL` is set, against the broker the environment names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use kontext::outbox::{OutboxMode, OutboxSettings};
use kontext::prelude::*;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ShipmentCreated {
    shipment: u32,
    seq: u32,
    note: String,
}

/// A `ShipmentCreated` of key `shipment`, the key's `seq`-th.
fn created(shipment: u32, seq: u32) -> ShipmentCreated {
    ShipmentCreated {
        shipment,
        seq,
        note: String::new(),
    }
}

fn model(topic: &str, partitions: i32, mode: OutboxMode) -> Model {
    Model::builder()
        .topic::<ShipmentCreated>(|t| {
            t.name(topic)
                .partitions(partitions)
                .key(|e| e.shipment)
                .producer(|p| p.outbox(mode))
        })
        .build()
        .unwrap()
}

async fn start(
    model: &Model,
    broker: &Broker,
    db: &DatabaseConnection,
    settings: OutboxSettings,
) -> Kontext {
    Kontext::builder(model.clone())
        .broker(broker.clone())
        .database(db.clone())
        .outbox_settings(settings)
        .start()
        .await
        .unwrap()
}

fn fast() -> OutboxSettings {
    OutboxSettings {
        poll_interval: Duration::from_millis(100),
        ..OutboxSettings::default()
    }
}

fn no_relay() -> OutboxSettings {
    OutboxSettings {
        run_relay: false,
        ..fast()
    }
}

/// For tests that take the broker down: quick retries, never giving up.
fn patient() -> OutboxSettings {
    OutboxSettings {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_attempts: 1_000,
        ..fast()
    }
}

/// An instance whose application producer waits `message_timeout_ms` for
/// a delivery and reconnects quickly once the broker is back.
async fn outage_instance(
    model: &Model,
    broker: &Broker,
    db: &DatabaseConnection,
    message_timeout_ms: u64,
    settings: OutboxSettings,
) -> Kontext {
    Kontext::builder(model.clone())
        .settings(
            KafkaSettings::new()
                .producer(|p| p.message_timeout_ms = Some(message_timeout_ms))
                .set("reconnect.backoff.max.ms", "100"),
        )
        .broker(broker.clone())
        .database(db.clone())
        .outbox_settings(settings)
        .start()
        .await
        .unwrap()
}

async fn business_table(db: &DatabaseConnection) {
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS shipment (id INTEGER PRIMARY KEY, note TEXT NOT NULL)",
    )
    .await
    .unwrap();
}

async fn count_shipments(db: &DatabaseConnection) -> i64 {
    let row = db
        .query_one(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM shipment",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

fn decode(records: &[RecordedMessage]) -> Vec<ShipmentCreated> {
    records
        .iter()
        .map(|r| serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap())
        .collect()
}

async fn wait_pending_zero(kontext: &Kontext) {
    wait_until("the outbox to drain", async || {
        let pending = kontext.outbox().unwrap().pending().await.unwrap();
        ready(pending == 0, || format!("{pending} pending"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_publishes_nothing_and_a_committed_one_exactly_its_messages() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let kontext = start(
        &model(&topic, 2, OutboxMode::Background),
        &broker,
        &db,
        fast(),
    )
    .await;
    business_table(&db).await;
    let outbox = kontext.outbox().unwrap();

    let mut tx = outbox.begin().await.unwrap();
    tx.execute_unprepared("INSERT INTO shipment (id, note) VALUES (1, 'rolled back')")
        .await
        .unwrap();
    tx.publish(&ShipmentCreated {
        shipment: 1,
        seq: 0,
        note: "rolled back".into(),
    })
    .await
    .unwrap();
    tx.rollback().await.unwrap();

    let mut tx = outbox.begin().await.unwrap();
    tx.execute_unprepared("INSERT INTO shipment (id, note) VALUES (2, 'committed')")
        .await
        .unwrap();
    for seq in 0..3 {
        tx.publish(&ShipmentCreated {
            shipment: 2,
            seq,
            note: "committed".into(),
        })
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    // Dropped without commit: rolled back too.
    {
        let mut tx = outbox.begin().await.unwrap();
        tx.publish(&ShipmentCreated {
            shipment: 3,
            seq: 0,
            note: "dropped".into(),
        })
        .await
        .unwrap();
    }

    wait_pending_zero(&kontext).await;
    let records = read_topic(&broker, &topic, 4, Duration::from_secs(5))
        .await
        .unwrap();
    let got = decode(&records);
    assert_eq!(
        got.iter().map(|e| (e.shipment, e.seq)).collect::<Vec<_>>(),
        vec![(2, 0), (2, 1), (2, 2)]
    );
    assert_eq!(count_shipments(&db).await, 1);
    // Standard headers travel through the outbox.
    assert_eq!(records[0].header("ce_type"), Some("ShipmentCreated"));
    assert!(uuid::Uuid::parse_str(records[0].header("ce_id").unwrap()).is_ok());
    assert_eq!(records[0].key_str(), Some("2"));
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_messages_survive_a_crash_before_the_relay_sent_them() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 3, OutboxMode::Background);

    // The first instance commits and "crashes" before any relay sends.
    let first = start(&model, &broker, &db, no_relay()).await;
    let outbox = first.outbox().unwrap();
    for shipment in 0..20 {
        let mut tx = outbox.begin().await.unwrap();
        for seq in 0..5 {
            tx.publish(&created(shipment, seq)).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    assert_eq!(outbox.pending().await.unwrap(), 100);
    drop(first);
    assert!(
        read_topic(&broker, &topic, 1, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty()
    );

    // A new instance's relay sends every committed message, once, in key order.
    let second = start(&model, &broker, &db, fast()).await;
    wait_pending_zero(&second).await;
    let records = read_topic(&broker, &topic, 100, READ_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(records.len(), 100);
    assert_per_key_order(&decode(&records), 5);
    second.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Every `(shipment, seq)` appears once, and each shipment's seqs in order.
fn assert_per_key_order(events: &[ShipmentCreated], per_key: u32) {
    let mut per: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for e in events {
        per.entry(e.shipment).or_default().push(e.seq);
    }
    for (k, seqs) in per {
        assert_eq!(seqs, (0..per_key).collect::<Vec<_>>(), "shipment {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_send_each_message_once_in_key_order() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 6, OutboxMode::Background);
    let keys = 100u32;
    let per_key = 10_000u32 / keys;

    let writer = start(&model, &broker, &db, no_relay()).await;
    let outbox = writer.outbox().unwrap();
    let mut tx = outbox.begin().await.unwrap();
    for seq in 0..per_key {
        for shipment in 0..keys {
            tx.publish(&created(shipment, seq)).await.unwrap();
        }
    }
    tx.commit().await.unwrap();

    let small_batches = OutboxSettings {
        batch_size: 200,
        ..fast()
    };
    let a = start(&model, &broker, &db, small_batches.clone()).await;
    let b = start(&model, &broker, &db, small_batches).await;
    wait_pending_zero(&a).await;
    let total = (keys * per_key) as usize;
    let records = read_topic(&broker, &topic, total + 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(records.len(), total, "each message published once");
    let ids: BTreeSet<&str> = records.iter().map(|r| r.header("ce_id").unwrap()).collect();
    assert_eq!(ids.len(), total);
    assert_per_key_order(&decode(&records), per_key);
    a.shutdown(Duration::from_secs(10)).await.unwrap();
    b.shutdown(Duration::from_secs(10)).await.unwrap();
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_during_a_broker_outage_go_out_in_order_when_it_returns() {
    init_tracing();
    // Needs a broker the test can take down: the embedded one.
    let broker = Broker::embedded().unwrap();
    let db = kontext::testing::database().await.unwrap();
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 2, OutboxMode::Background);
    let kontext = outage_instance(&model, &broker, &db, 1_000, patient()).await;
    broker
        .as_embedded()
        .unwrap()
        .set_broker_up(1, false)
        .unwrap();
    let outbox = kontext.outbox().unwrap();
    for seq in 0..30 {
        let mut tx = outbox.begin().await.unwrap();
        tx.publish(&created(seq % 3, seq / 3)).await.unwrap();
        tx.commit().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        outbox.pending().await.unwrap(),
        30,
        "rows accumulate while the broker is down"
    );
    broker
        .as_embedded()
        .unwrap()
        .set_broker_up(1, true)
        .unwrap();
    wait_pending_zero(&kontext).await;
    let records = read_topic(&broker, &topic, 31, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(records.len(), 30);
    assert_per_key_order(&decode(&records), 10);
    assert!(outbox.failed().await.unwrap().is_empty());
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_row_fails_after_bounded_attempts_and_the_rest_go_on() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let kontext = start(
        &model(&topic, 1, OutboxMode::Background),
        &broker,
        &db,
        OutboxSettings {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            ..fast()
        },
    )
    .await;
    let outbox = kontext.outbox().unwrap();
    let mut tx = outbox.begin().await.unwrap();
    tx.publish(&created(1, 0)).await.unwrap();
    // Larger than the broker accepts (message.max.bytes is 1 MB).
    let poison_id = tx
        .publish(&ShipmentCreated {
            shipment: 2,
            seq: 0,
            note: "x".repeat(2_000_000),
        })
        .await
        .unwrap();
    tx.publish(&created(3, 0)).await.unwrap();
    tx.commit().await.unwrap();

    let failed = wait_until("the poison row to fail, the rest sent", async || {
        let failed = outbox.failed().await.unwrap();
        let pending = outbox.pending().await.unwrap();
        if !failed.is_empty() && pending == 0 {
            Ok(failed)
        } else {
            Err(format!("failed: {failed:?}, pending: {pending}"))
        }
    })
    .await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].message_id, poison_id.to_string());
    assert_eq!(failed[0].attempts, 3);
    assert!(
        failed[0]
            .last_error
            .as_deref()
            .unwrap()
            .to_lowercase()
            .contains("size"),
        "{failed:?}"
    );
    let records = read_topic(&broker, &topic, 3, Duration::from_secs(3))
        .await
        .unwrap();
    // Different keys: no order between them (a message that shared the
    // poison row's batch may be failed with it and sent on the retry).
    let mut shipments: Vec<u32> = decode(&records).iter().map(|e| e.shipment).collect();
    shipments.sort_unstable();
    assert_eq!(shipments, vec![1, 3], "the rest was sent");

    // Failed rows are visible and retryable (this one fails again).
    assert_eq!(outbox.retry_failed().await.unwrap(), 1);
    assert_eq!(outbox.failed().await.unwrap().len(), 0);
    let poison = poison_id.to_string();
    wait_until("the retried poison row to fail again", async || {
        let failed = outbox.failed().await.unwrap();
        ready(failed.len() == 1, || format!("failed: {failed:?}"))
    })
    .await;
    // One by one: retried by id, failed again, then discarded by id. An id
    // that names no failed row changes nothing.
    assert_eq!(outbox.retry(&["no-such-id"]).await.unwrap(), 0);
    assert_eq!(outbox.retry(&[poison.as_str()]).await.unwrap(), 1);
    wait_until("the poison row to fail a third time", async || {
        let failed = outbox.failed().await.unwrap();
        ready(failed.len() == 1, || format!("failed: {failed:?}"))
    })
    .await;
    assert_eq!(outbox.discard(&["no-such-id"]).await.unwrap(), 0);
    assert_eq!(outbox.discard(&[poison.as_str()]).await.unwrap(), 1);
    assert!(outbox.failed().await.unwrap().is_empty());
    assert_eq!(outbox.pending().await.unwrap(), 0);
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM kontext_outbox").await,
        0,
        "the discarded row is gone"
    );
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Issue 14, defect 2: concurrent immediate commits of one process shared
/// one lease owner, so they did not exclude each other or the relay, and a
/// row read before its lease was taken could be sent again after the relay
/// had sent and deleted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_immediate_commits_send_each_row_once_in_key_order() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 3, OutboxMode::ImmediateWithFallback);
    let kontext = start(&model, &broker, &db, fast()).await;
    let (writers, per_key) = (8u32, 40u32);
    let mut tasks = tokio::task::JoinSet::new();
    for shipment in 0..writers {
        let outbox = kontext.outbox().unwrap().clone();
        // One key per writer, so each key's commit order is its seq order;
        // eight keys over 16 shards share shards, so commits contend.
        tasks.spawn(async move {
            for seq in 0..per_key {
                let mut tx = outbox.begin().await.unwrap();
                tx.publish(&created(shipment, seq)).await.unwrap();
                tx.commit().await.unwrap();
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    wait_pending_zero(&kontext).await;
    let expected = usize::try_from(writers * per_key).unwrap();
    let records = read_topic(&broker, &topic, expected + 1, Duration::from_secs(5))
        .await
        .unwrap();
    let events = decode(&records);
    let distinct: BTreeSet<(u32, u32)> = events.iter().map(|e| (e.shipment, e.seq)).collect();
    assert_eq!(distinct.len(), expected, "nothing lost");
    assert_eq!(events.len(), expected, "nothing sent twice");
    assert_per_key_order(&events, per_key);
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_mode_sends_at_commit_once() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 2, OutboxMode::ImmediateWithFallback);
    // A relay runs too: it must not send the immediate messages again.
    let kontext = start(&model, &broker, &db, fast()).await;
    let outbox = kontext.outbox().unwrap();
    for seq in 0..20 {
        let mut tx = outbox.begin().await.unwrap();
        tx.publish(&created(seq % 2, seq / 2)).await.unwrap();
        tx.commit().await.unwrap();
    }
    wait_pending_zero(&kontext).await;
    let records = read_topic(&broker, &topic, 21, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(records.len(), 20, "sent once");
    assert_per_key_order(&decode(&records), 10);
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();

    // Without a relay, immediate mode alone empties the outbox at commit.
    let topic2 = unique_name("shipping.shipment.created");
    let only_immediate = start(
        &self::model(&topic2, 1, OutboxMode::ImmediateWithFallback),
        &broker,
        &db,
        no_relay(),
    )
    .await;
    let mut tx = only_immediate.outbox().unwrap().begin().await.unwrap();
    tx.publish(&created(9, 0)).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(only_immediate.outbox().unwrap().pending().await.unwrap(), 0);
    assert_eq!(
        read_topic(&broker, &topic2, 1, READ_TIMEOUT)
            .await
            .unwrap()
            .len(),
        1
    );
}

const CHILD_DB: &str = "KONTEXT_CHILD_DATABASE_URL";
const CHILD_TOPIC: &str = "KONTEXT_CHILD_TOPIC";
const CHILD_GO: &str = "KONTEXT_CHILD_GO_FILE";

/// Issue 14, defect 6: replicas that start together on a fresh PostgreSQL
/// database raced in kontext's migrations and most of them died at start.
/// Four processes start at once (released together by a file); each must
/// start and write a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_starting_together_on_a_fresh_database_all_start() {
    init_tracing();
    let url = kontext::testing::fresh_database_url().await.unwrap();
    let topic = unique_name("shipping.shipment.created");
    let go = std::env::temp_dir().join(unique_name("kontext-go"));
    let exe = std::env::current_exe().unwrap();
    let children: Vec<std::process::Child> = (0..4)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["--exact", "instance_child_process", "--ignored", "--quiet"])
                .env(CHILD_DB, &url)
                .env(CHILD_TOPIC, &topic)
                .env(CHILD_GO, &go)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    std::fs::write(&go, b"go").unwrap();
    let outputs = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&go);
    for (i, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "instance {i} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let db = kontext::db::connect(&url).await.unwrap();
    let rows = db
        .query_one(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM kontext_outbox",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(rows, 4, "each instance wrote its row");
}

/// The body of one instance of the test above, run in a process of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of four_instances_starting_together_on_a_fresh_database_all_start"]
async fn instance_child_process() {
    let url = std::env::var(CHILD_DB).expect("started by its parent test");
    let topic = std::env::var(CHILD_TOPIC).unwrap();
    let go = std::path::PathBuf::from(std::env::var(CHILD_GO).unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !go.exists() {
        assert!(Instant::now() < deadline, "never released");
        std::thread::yield_now();
    }
    let db = kontext::db::connect(&url).await.unwrap();
    let kontext = Kontext::builder(model(&topic, 1, OutboxMode::Background))
        .broker(broker())
        .database(db)
        .outbox_settings(no_relay())
        .start()
        .await
        .unwrap();
    let mut tx = kontext.outbox().unwrap().begin().await.unwrap();
    tx.publish(&created(std::process::id(), 0)).await.unwrap();
    tx.commit().await.unwrap();
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Issue 14, defect 5: a relay batch read the first `batch_size` pending
/// rows of a shard; when they all belonged to a key in backoff, the pass
/// ended and the keys behind them starved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_backoff_holds_back_only_its_own_rows() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 1, OutboxMode::Background);
    // One shard, so both keys share the relay's batches.
    let one_shard = |run_relay| OutboxSettings {
        shards: Some(1),
        batch_size: 50,
        run_relay,
        ..fast()
    };
    let writer = start(&model, &broker, &db, one_shard(false)).await;
    let mut tx = writer.outbox().unwrap().begin().await.unwrap();
    for (shipment, count) in [(1u32, 120u32), (2, 5)] {
        for seq in 0..count {
            tx.publish(&created(shipment, seq)).await.unwrap();
        }
    }
    tx.commit().await.unwrap();
    writer.shutdown(Duration::from_secs(10)).await.unwrap();
    // Shipment 1's first row failed once and waits an hour for its retry.
    let in_an_hour = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 3_600_000;
    db.execute_unprepared(&format!(
        "UPDATE kontext_outbox SET attempts = 1, next_attempt_at = {in_an_hour} \
         WHERE seq = (SELECT MIN(seq) FROM kontext_outbox)"
    ))
    .await
    .unwrap();

    let relay = start(&model, &broker, &db, one_shard(true)).await;
    let records = read_topic(&broker, &topic, 5, READ_TIMEOUT).await.unwrap();
    let events = decode(&records);
    assert_eq!(
        events
            .iter()
            .map(|e| (e.shipment, e.seq))
            .collect::<Vec<_>>(),
        (0..5).map(|seq| (2, seq)).collect::<Vec<_>>(),
        "shipment 2 went out, in order, and nothing of shipment 1"
    );
    // Shipment 1 stays held: all its rows wait behind the first. (The
    // relay deletes shipment 2's rows once their acknowledgements are in,
    // which can be after a reader already sees them on the topic.)
    let pending = wait_until("shipment 2's rows to settle", async || {
        let pending = relay.outbox().unwrap().pending().await.unwrap();
        if pending <= 120 {
            Ok(pending)
        } else {
            Err(format!("{pending} rows pending"))
        }
    })
    .await;
    assert_eq!(
        pending, 120,
        "shipment 2's rows settled, shipment 1's all held"
    );
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    let after = read_topic(&broker, &topic, 6, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(after.len(), 5, "shipment 1 was not sent out of order");
}

/// The outbox's lease row of `shard`: (owner, generation).
async fn lease_of(db: &DatabaseConnection, shard: i32) -> (Option<String>, i64) {
    let row = db
        .query_one(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!("SELECT owner, generation FROM kontext_outbox_lease WHERE shard = {shard}"),
        ))
        .await
        .unwrap()
        .unwrap();
    (
        row.try_get::<Option<String>>("", "owner").unwrap(),
        row.try_get::<i64>("", "generation").unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_and_a_broker_stall_longer_than_the_lease_send_each_row_once() {
    init_tracing();
    // Needs a broker the test can take down: the embedded one.
    let broker = Broker::embedded().unwrap();
    let db = kontext::testing::database().await.unwrap();
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 2, OutboxMode::Background);
    // One shard, so both relays contend for every row; a lease of 1 s
    // against an application producer that waits 10 s for a delivery.
    let settings = OutboxSettings {
        shards: Some(1),
        lease_ttl: Duration::from_secs(1),
        poll_interval: Duration::from_millis(50),
        ..patient()
    };
    let relay = async |run_relay: bool| {
        let settings = OutboxSettings {
            run_relay,
            ..settings.clone()
        };
        outage_instance(&model, &broker, &db, 10_000, settings).await
    };
    let writer = relay(false).await;
    let (keys, per_key) = (10u32, 10u32);
    let mut tx = writer.outbox().unwrap().begin().await.unwrap();
    for seq in 0..per_key {
        for shipment in 0..keys {
            tx.publish(&created(shipment, seq)).await.unwrap();
        }
    }
    tx.commit().await.unwrap();
    let (_, generation_before) = lease_of(&db, 0).await;

    let embedded = broker.as_embedded().unwrap();
    embedded.set_broker_up(1, false).unwrap();
    let a = relay(true).await;
    let b = relay(true).await;
    // The fault: a stall three leases long, with both relays trying.
    tokio::time::sleep(Duration::from_secs(3)).await;
    embedded.set_broker_up(1, true).unwrap();
    wait_pending_zero(&a).await;

    let total = (keys * per_key) as usize;
    let records = read_topic(&broker, &topic, total + 1, Duration::from_secs(5))
        .await
        .unwrap();
    let ids: BTreeSet<&str> = records.iter().map(|r| r.header("ce_id").unwrap()).collect();
    assert_eq!(ids.len(), total, "nothing lost");
    assert_eq!(records.len(), total, "nothing sent twice");
    assert_per_key_order(&decode(&records), per_key);
    let (_, generation_after) = lease_of(&db, 0).await;
    assert!(
        generation_after >= generation_before + 2,
        "the shard's lease changed hands during the stall ({generation_before} -> {generation_after})"
    );
    a.shutdown(Duration::from_secs(10)).await.unwrap();
    b.shutdown(Duration::from_secs(10)).await.unwrap();
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_one_key_go_out_in_commit_order_not_insert_order() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 2, OutboxMode::Background);
    let kontext = start(&model, &broker, &db, fast()).await;
    let outbox = kontext.outbox().unwrap().clone();
    let event = |seq| created(7, seq);
    // T1 publishes K#0 and stays open.
    let mut t1 = outbox.begin().await.unwrap();
    t1.publish(&event(0)).await.unwrap();
    // T2 publishes K#1 and commits (on PostgreSQL it waits for T1's turn).
    let t1_committed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t2 = {
        let (outbox, t1_committed) = (outbox.clone(), t1_committed.clone());
        tokio::spawn(async move {
            let mut t2 = outbox.begin().await.unwrap();
            t2.publish(&event(1)).await.unwrap();
            t2.commit().await.unwrap();
            t1_committed.load(std::sync::atomic::Ordering::SeqCst)
        })
    };
    // Give T2 every chance to overtake: if it can commit, let the relay
    // send its row before T1 commits.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !t2.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if t2.is_finished() {
        let _ = read_topic(&broker, &topic, 1, READ_TIMEOUT).await.unwrap();
    }
    t1_committed.store(true, std::sync::atomic::Ordering::SeqCst);
    t1.commit().await.unwrap();
    let t2_after_t1 = t2.await.unwrap();
    wait_pending_zero(&kontext).await;
    let records = read_topic(&broker, &topic, 3, Duration::from_secs(3))
        .await
        .unwrap();
    let seqs: Vec<u32> = decode(&records).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![0, 1], "the key's rows in commit order");
    if db.get_database_backend() == sea_orm::DbBackend::Postgres {
        assert!(t2_after_t1, "T2 waited for T1 (serialized at publish)");
    }
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_commit_during_a_broker_outage_returns_within_its_bound_and_sends_once() {
    init_tracing();
    // Needs a broker the test can take down: the embedded one.
    let broker = Broker::embedded().unwrap();
    let db = kontext::testing::database().await.unwrap();
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 2, OutboxMode::ImmediateWithFallback);
    let settings = OutboxSettings {
        immediate_timeout: Duration::from_millis(500),
        ..patient()
    };
    let kontext = outage_instance(&model, &broker, &db, 60_000, settings).await;
    let embedded = broker.as_embedded().unwrap();
    embedded.set_broker_up(1, false).unwrap();
    let outbox = kontext.outbox().unwrap();
    let mut tx = outbox.begin().await.unwrap();
    tx.publish(&created(1, 0)).await.unwrap();
    let started = Instant::now();
    let committed = tx.commit().await.unwrap();
    let waited = started.elapsed();
    assert_eq!(
        (committed.delivered, committed.pending),
        (0, 1),
        "the commit returns with its message pending"
    );
    // A bound, not a measurement: without one the call waits for the
    // producer's 60 s message timeout.
    assert!(waited < Duration::from_secs(10), "commit took {waited:?}");
    embedded.set_broker_up(1, true).unwrap();
    wait_pending_zero(&kontext).await;
    let records = read_topic(&broker, &topic, 2, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(records.len(), 1, "sent once after the broker returned");
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

const CHILD_BOOTSTRAP: &str = "KONTEXT_TEST_CHILD_BOOTSTRAP";
const CHILD_INDEX: &str = "KONTEXT_TEST_CHILD_INDEX";
/// Processes of the test below, each a writer and a relay.
const INSTANCES: u32 = 4;
/// Keys per instance, rows per key.
const KEYS_PER_INSTANCE: u32 = 50;
const ROWS_PER_KEY: u32 = 250;

/// Four service instances in four processes against one PostgreSQL
/// database, each writing 12,500 rows (50 keys of its own) while relaying
/// with the others: every message on the topic exactly once, every key in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relay_processes_send_50k_rows_exactly_once_in_key_order() {
    init_tracing();
    if kontext::testing::database_url().is_none_or(|u| !u.starts_with("postgres")) {
        eprintln!("skipped: four processes writing at once need PostgreSQL (DATABASE_URL)");
        return;
    }
    let broker = broker();
    let url = kontext::testing::fresh_database_url().await.unwrap();
    let topic = unique_name("shipping.shipment.created");
    // Provisions the topic (the children do not).
    let setup = Kontext::builder(model(&topic, 8, OutboxMode::Background))
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let go = std::env::temp_dir().join(unique_name("kontext-go"));
    let exe = std::env::current_exe().unwrap();
    let children: Vec<std::process::Child> = (0..INSTANCES)
        .map(|i| {
            std::process::Command::new(&exe)
                .args(["--exact", "relay_child_process", "--ignored", "--quiet"])
                .env(CHILD_DB, &url)
                .env(CHILD_TOPIC, &topic)
                .env(CHILD_GO, &go)
                .env(CHILD_INDEX, i.to_string())
                .env(CHILD_BOOTSTRAP, broker.bootstrap_servers())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    std::fs::write(&go, b"go").unwrap();
    let outputs = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&go);
    for (i, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "instance {i} failed: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let total = (INSTANCES * KEYS_PER_INSTANCE * ROWS_PER_KEY) as usize;
    let records = read_topic(&broker, &topic, total + 1, Duration::from_secs(5))
        .await
        .unwrap();
    let ids: BTreeSet<&str> = records.iter().map(|r| r.header("ce_id").unwrap()).collect();
    assert_eq!(ids.len(), total, "nothing lost");
    assert_eq!(records.len(), total, "nothing sent twice");
    assert_per_key_order(&decode(&records), ROWS_PER_KEY);
    figure(
        "four_relay_processes_send_50k_rows_exactly_once_in_key_order",
        format_args!(
            "{total} rows written and relayed by {INSTANCES} processes in {:.1} s: {:.0} msg/s",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64()
        ),
    );
    drop(setup);
}

/// One instance of the test above, run in a process of its own: five
/// writers, ten keys each, one row per key per transaction, and a relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of four_relay_processes_send_50k_rows_exactly_once_in_key_order"]
async fn relay_child_process() {
    let url = std::env::var(CHILD_DB).expect("started by its parent test");
    let topic = std::env::var(CHILD_TOPIC).unwrap();
    let go = std::path::PathBuf::from(std::env::var(CHILD_GO).unwrap());
    let index: u32 = std::env::var(CHILD_INDEX).unwrap().parse().unwrap();
    let bootstrap = std::env::var(CHILD_BOOTSTRAP).unwrap();
    let db = kontext::db::connect(&url).await.unwrap();
    let kontext = Kontext::builder(model(&topic, 8, OutboxMode::Background))
        .settings(KafkaSettings::new().provision_topics(false))
        .broker(Broker::external(bootstrap))
        .database(db)
        .outbox_settings(fast())
        .start()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !go.exists() {
        assert!(Instant::now() < deadline, "never released");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..5u32 {
        let outbox = kontext.outbox().unwrap().clone();
        writers.spawn(async move {
            let first = index * KEYS_PER_INSTANCE + w * 10;
            for seq in 0..ROWS_PER_KEY {
                let mut tx = outbox.begin().await.unwrap();
                for shipment in first..first + 10 {
                    tx.publish(&created(shipment, seq)).await.unwrap();
                }
                tx.commit().await.unwrap();
            }
        });
    }
    while let Some(joined) = writers.join_next().await {
        joined.unwrap();
    }
    // Every instance relays until the whole outbox is empty.
    wait_pending_zero(&kontext).await;
    kontext.shutdown(Duration::from_secs(30)).await.unwrap();
}

/// Issue 14, defect 7 and item 8: a process that only writes outbox rows
/// opens no Kafka connection, and on PostgreSQL its commits wake the relays
/// of other instances at once, however long their polling interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_only_instance_opens_no_kafka_connection_and_wakes_other_relays() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 2, OutboxMode::ImmediateWithFallback);
    let relay = start(
        &model,
        &broker,
        &db,
        OutboxSettings {
            // Only a notification can wake it within the test.
            poll_interval: Duration::from_secs(3_600),
            ..OutboxSettings::default()
        },
    )
    .await;
    let writer = Kontext::builder(model.clone())
        .broker(broker.clone())
        .outbox_writer(db.clone())
        .start()
        .await
        .unwrap();
    assert_eq!(
        writer.clients(),
        kontext::runtime::ClientCounts::default(),
        "no Kafka client in the writer"
    );
    let mut tx = writer.outbox().unwrap().begin().await.unwrap();
    for seq in 0..3 {
        tx.publish(&created(1, seq)).await.unwrap();
    }
    let committed = tx.commit().await.unwrap();
    assert_eq!((committed.delivered, committed.pending), (0, 3));
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        eprintln!("skipped the wake-up: LISTEN/NOTIFY is PostgreSQL's");
        return;
    }
    let records = read_topic(&broker, &topic, 3, READ_TIMEOUT).await.unwrap();
    assert_eq!(records.len(), 3, "the other instance's relay was woken");
    assert_per_key_order(&decode(&records), 3);
    wait_pending_zero(&relay).await;
    writer.shutdown(Duration::from_secs(10)).await.unwrap();
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

const CHILD_PARENT_NOW_MS: &str = "KONTEXT_TEST_CHILD_PARENT_NOW_MS";

/// The live lease the test below gives shard X on the database's clock:
/// 30 minutes, so a relay reading its own clock an hour ahead would see it
/// as expired for half an hour.
const LIVE_FOR_MS: i64 = 30 * 60 * 1000;

/// libfaketime, preloaded into the relay's process (not through the
/// `faketime` wrapper, so the PID the test holds is the relay's).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

fn faketime_available() -> bool {
    std::path::Path::new(LIBFAKETIME).exists()
}

/// Issue 14, defect 1: a relay whose clock runs an hour ahead (a process of
/// its own under libfaketime) does not take a lease another relay holds,
/// because expiry is judged by the database's clock. It relays the other
/// shards meanwhile (so it does make passes), and takes the shard over as
/// soon as the lease really expires: every row on the topic once, key order
/// kept. PostgreSQL: on SQLite the database's clock is the process's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_clock_runs_ahead_does_not_take_a_live_lease() {
    init_tracing();
    if kontext::testing::database_url().is_none_or(|u| !u.starts_with("postgres")) {
        eprintln!("skipped: the database's clock is the relay's own on SQLite (DATABASE_URL)");
        return;
    }
    if !faketime_available() {
        eprintln!("skipped: libfaketime is not installed (apt-get install faketime)");
        return;
    }
    let broker = broker();
    let url = kontext::testing::fresh_database_url().await.unwrap();
    let db = kontext::db::connect(&url).await.unwrap();
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 4, OutboxMode::Background);
    let setup = Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let writer = Kontext::builder(model.clone())
        .broker(broker.clone())
        .outbox_writer(db.clone())
        .start()
        .await
        .unwrap();
    let write = |shipment: u32, seq: u32| {
        let outbox = writer.outbox().unwrap().clone();
        async move {
            let mut tx = outbox.begin().await.unwrap();
            tx.publish(&created(shipment, seq)).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    const KEYS: u32 = 20;
    for seq in 0..3 {
        for shipment in 0..KEYS {
            write(shipment, seq).await;
        }
    }
    let shard_of = |rows: Vec<sea_orm::QueryResult>| -> BTreeMap<u32, i32> {
        rows.iter()
            .map(|r| {
                let key: Vec<u8> = r.try_get("", "key").unwrap();
                let shard: i32 = r.try_get("", "shard").unwrap();
                (String::from_utf8(key).unwrap().parse().unwrap(), shard)
            })
            .collect()
    };
    let shards = shard_of(
        db.query_all(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT DISTINCT key, shard FROM kontext_outbox",
        ))
        .await
        .unwrap(),
    );
    let x = shards[&0];
    let in_x: Vec<u32> = shards
        .iter()
        .filter(|(_, s)| **s == x)
        .map(|(k, _)| *k)
        .collect();
    let elsewhere: u32 = *shards.iter().find(|(_, s)| **s != x).unwrap().0;
    let rows_in_x = 3 * in_x.len() as i64;

    // Another relay holds shard X, live for 30 minutes by the database.
    let sql = |q: String| {
        let db = db.clone();
        async move { db.execute_unprepared(&q).await.unwrap() }
    };
    sql(format!(
        "UPDATE kontext_outbox_lease SET owner = 'another-relay', generation = generation + 1, \
         expires_at = (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT + {LIVE_FOR_MS} \
         WHERE shard = {x}"
    ))
    .await;
    let held = lease_of(&db, x).await;
    let pending_in = |shard: Option<i32>| {
        let db = db.clone();
        async move {
            let filter = shard.map_or(String::new(), |s| format!(" WHERE shard = {s}"));
            let r = db
                .query_one(sea_orm::Statement::from_string(
                    db.get_database_backend(),
                    format!("SELECT COUNT(*) AS n FROM kontext_outbox{filter}"),
                ))
                .await
                .unwrap()
                .unwrap();
            r.try_get::<i64>("", "n").unwrap()
        }
    };

    // The relay, an hour ahead; monotonic clocks are left alone (timers).
    let parent_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let exe = std::env::current_exe().unwrap();
    // Its log goes to a file (shown if the test fails).
    let log = std::env::temp_dir().join(format!("{}.log", unique_name("skewed-relay")));
    let child = std::process::Command::new(&exe)
        .args([
            "--exact",
            "skewed_relay_child_process",
            "--ignored",
            "--quiet",
            "--nocapture",
        ])
        .env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME", "+1h")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("FAKETIME_NO_CACHE", "1")
        .env(CHILD_DB, &url)
        .env(CHILD_TOPIC, &topic)
        .env(CHILD_BOOTSTRAP, broker.bootstrap_servers())
        .env(CHILD_PARENT_NOW_MS, parent_now.to_string())
        .env("RUST_LOG", "kontext=debug")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let mut child = Relay { child, log };
    // It relays every other shard: proof that it makes passes. Then one
    // more row elsewhere, and its relay: a later pass that tried X again.
    let deadline = Instant::now() + READ_TIMEOUT;
    while pending_in(None).await > rows_in_x {
        child.check(Instant::now() < deadline, "the skewed relay sent nothing");
        let alive = child.child.try_wait().unwrap().is_none();
        child.check(alive, "the relay process ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    write(elsewhere, 3).await;
    while pending_in(None).await > rows_in_x {
        child.check(Instant::now() < deadline, "the extra row was not sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pending_in(Some(x)).await, rows_in_x, "shard X untouched");
    assert_eq!(lease_of(&db, x).await, held, "the live lease was not taken");
    let on_topic = read_topic(&broker, &topic, usize::MAX, Duration::from_secs(2))
        .await
        .unwrap();
    let keys: BTreeSet<u32> = decode(&on_topic).iter().map(|e| e.shipment).collect();
    assert!(
        in_x.iter().all(|k| !keys.contains(k)),
        "nothing of shard X was sent: {keys:?}"
    );

    // The lease really expires: the skewed relay takes it over.
    sql(format!(
        "UPDATE kontext_outbox_lease SET expires_at = 0 WHERE shard = {x}"
    ))
    .await;
    while pending_in(None).await > 0 {
        child.check(Instant::now() < deadline, "shard X was not taken over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (owner, generation) = lease_of(&db, x).await;
    assert!(generation > held.1, "a takeover bumps the generation");
    assert_ne!(owner.as_deref(), Some("another-relay"));
    let output = child.stop();
    assert!(!output.contains("panicked"), "{output}");

    let total = (3 * KEYS + 1) as usize;
    let records = read_topic(&broker, &topic, total + 1, Duration::from_secs(5))
        .await
        .unwrap();
    let ids: BTreeSet<&str> = records.iter().map(|r| r.header("ce_id").unwrap()).collect();
    assert_eq!(ids.len(), total, "nothing lost");
    assert_eq!(records.len(), total, "nothing sent twice");
    let mut per: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for e in decode(&records) {
        per.entry(e.shipment).or_default().push(e.seq);
    }
    for (k, seqs) in per {
        let expected: Vec<u32> = (0..if k == elsewhere { 4 } else { 3 }).collect();
        assert_eq!(seqs, expected, "shipment {k} in order");
    }
    drop(writer);
    drop(setup);
}

/// The skewed relay's process: killed by PID when the test ends, however
/// it ends; its log shown when a check fails.
struct Relay {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Relay {
    fn output(&self) -> String {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        let err = std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default();
        format!("{out}{err}")
    }

    fn check(&mut self, ok: bool, what: &str) {
        if !ok {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("{what}; the relay's log:\n{}", self.output());
        }
    }

    /// Kills the relay (it relays until killed); its log.
    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.output()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(self.log.with_extension("err"));
    }
}

/// The relay of the test above, in a process whose wall clock libfaketime
/// sets an hour ahead. Relays until its parent kills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of a_relay_whose_clock_runs_ahead_does_not_take_a_live_lease"]
async fn skewed_relay_child_process() {
    init_tracing();
    let url = std::env::var(CHILD_DB).expect("started by its parent test");
    let topic = std::env::var(CHILD_TOPIC).unwrap();
    let bootstrap = std::env::var(CHILD_BOOTSTRAP).unwrap();
    let parent_now: u128 = std::env::var(CHILD_PARENT_NOW_MS).unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    assert!(
        now > parent_now + 50 * 60 * 1000,
        "the clock is not ahead: libfaketime did not apply"
    );
    let db = kontext::db::connect(&url).await.unwrap();
    let kontext = Kontext::builder(model(&topic, 4, OutboxMode::Background))
        // librdkafka's idempotent producer stalls now and then under
        // libfaketime (about one run in eight here: its timed waits); what
        // this test checks, the lease, does not depend on it.
        .settings(
            KafkaSettings::new()
                .provision_topics(false)
                .producer(|p| p.idempotence = false),
        )
        .broker(Broker::external(bootstrap))
        .database(db)
        .outbox_settings(OutboxSettings {
            poll_interval: Duration::from_millis(50),
            ..OutboxSettings::default()
        })
        .migrate(false)
        .start()
        .await
        .unwrap();
    std::future::pending::<()>().await;
    drop(kontext);
}

/// Message ids are kontext's own UUIDv7s and never looked up, so on
/// PostgreSQL they carry no unique index (it cost writers 4-5% of their
/// commit rate). Migrating a database twice, as every start does, works;
/// the other tests here write and send rows through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_message_id_carries_no_unique_index() {
    init_tracing();
    let db = kontext::testing::database().await.unwrap();
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return;
    }
    kontext::db::migrate(&db).await.unwrap();
    kontext::db::migrate(&db).await.unwrap();
    let constraints = db
        .query_one(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT count(*) AS n FROM pg_constraint WHERE conname = 'kontext_outbox_message_id_key'",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(constraints.try_get::<i64>("", "n").unwrap(), 0);
}

/// An instance whose producers (the relay's included) hold at most `max`
/// messages in librdkafka's local queue.
async fn small_queue_instance(
    model: &Model,
    broker: &Broker,
    db: &DatabaseConnection,
    max: &str,
    settings: OutboxSettings,
) -> Kontext {
    Kontext::builder(model.clone())
        .settings(KafkaSettings::new().producer(|p| {
            p.librdkafka.set("queue.buffering.max.messages", max);
        }))
        .broker(broker.clone())
        .database(db.clone())
        .outbox_settings(settings)
        .start()
        .await
        .unwrap()
}

/// The relay's producer queue holds 16 messages and a batch has 300 rows of
/// one key: the relay waits for room by settling its oldest deliveries, and
/// keeps each delivery's outcome. Every row arrives once, in order, and no
/// delivered row is counted as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_sends_each_row_once_and_fails_none() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 1, OutboxMode::Background);
    let rows = 300u32;
    let writer = start(&model, &broker, &db, no_relay()).await;
    let outbox = writer.outbox().unwrap();
    let mut tx = outbox.begin().await.unwrap();
    for seq in 0..rows {
        tx.publish(&created(7, seq)).await.unwrap();
    }
    tx.commit().await.unwrap();

    let relay = small_queue_instance(&model, &broker, &db, "16", fast()).await;
    wait_pending_zero(&relay).await;
    let failed = relay.outbox().unwrap().failed().await.unwrap();
    assert!(
        failed.is_empty(),
        "delivered rows counted as failed: {failed:?}"
    );
    let records = read_topic(&broker, &topic, rows as usize + 1, Duration::from_secs(3))
        .await
        .unwrap();
    let seqs: Vec<u32> = decode(&records).iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (0..rows).collect::<Vec<_>>(),
        "each row once, in order"
    );
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    drop(writer);
}

/// Immediate mode while the broker is down and the relay producer's queue
/// is full: each commit still returns within `immediate_timeout` (plus a
/// margin), and every row goes out once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_commit_waiting_for_queue_room_returns_within_its_bound() {
    init_tracing();
    let broker = Broker::embedded().unwrap();
    let db = kontext::testing::database().await.unwrap();
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 2, OutboxMode::ImmediateWithFallback);
    let settings = OutboxSettings {
        immediate_timeout: Duration::from_millis(500),
        ..patient()
    };
    let kontext = small_queue_instance(&model, &broker, &db, "1", settings).await;
    let embedded = broker.as_embedded().unwrap();
    embedded.set_broker_up(1, false).unwrap();
    let outbox = kontext.outbox().unwrap();
    // Keys over several shards: the first fills the queue, the others find
    // it full under a lease of their own.
    for shipment in 0..6 {
        let mut tx = outbox.begin().await.unwrap();
        tx.publish(&created(shipment, 0)).await.unwrap();
        let started = Instant::now();
        let committed = tx.commit().await.unwrap();
        let waited = started.elapsed();
        assert_eq!(committed.delivered, 0);
        // A bound, not a measurement: without one a commit waits for queue
        // room until the first message times out (15 s here).
        assert!(
            waited < Duration::from_secs(5),
            "commit {shipment} took {waited:?}"
        );
    }
    embedded.set_broker_up(1, true).unwrap();
    wait_pending_zero(&kontext).await;
    let records = read_topic(&broker, &topic, 7, Duration::from_secs(5))
        .await
        .unwrap();
    let mut keys: Vec<u32> = decode(&records).iter().map(|e| e.shipment).collect();
    keys.sort_unstable();
    assert_eq!(keys, (0..6).collect::<Vec<_>>(), "each row once");
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// `shutdown` while the relay is draining a backlog: it returns within its
/// timeout (plus the documented 2 s), and when it returns `Ok` the relay
/// has stopped: no shard lease is held and nothing more is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_drain_stops_the_relay_before_it_returns() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 3, OutboxMode::Background);
    let writer = start(&model, &broker, &db, no_relay()).await;
    let outbox = writer.outbox().unwrap();
    let total = 20_000u32;
    let mut tx = outbox.begin().await.unwrap();
    for seq in 0..total / 100 {
        for shipment in 0..100 {
            tx.publish(&created(shipment, seq)).await.unwrap();
        }
    }
    tx.commit().await.unwrap();

    // Batches of 50: what is in flight at the deadline (four shards' at
    // most) settles well within the second a halted relay gets.
    let relay = start(
        &model,
        &broker,
        &db,
        OutboxSettings {
            batch_size: 50,
            ..fast()
        },
    )
    .await;
    wait_until("the relay to start draining", async || {
        let pending = outbox.pending().await.unwrap();
        ready(pending < u64::from(total), || format!("{pending} pending"))
    })
    .await;
    let started = Instant::now();
    let stopped = relay.shutdown(Duration::from_millis(200)).await;
    let took = started.elapsed();
    // README's bound (timeout + 2 s), with half a second for scheduling.
    assert!(
        took < Duration::from_millis(200 + 2_000 + 500),
        "shutdown took {took:?}"
    );
    match stopped {
        Ok(()) => {
            let held = count(
                &db,
                "SELECT COUNT(*) AS n FROM kontext_outbox_lease WHERE owner IS NOT NULL",
            )
            .await;
            assert_eq!(held, 0, "shutdown returned Ok with relay leases held");
        }
        Err(e) => panic!("a relay on a healthy broker stops in time: {e}"),
    }

    // What is left goes out once, in order, with the next relay.
    let next = start(&model, &broker, &db, fast()).await;
    wait_pending_zero(&next).await;
    let records = read_topic(&broker, &topic, total as usize + 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(records.len(), total as usize, "each row once");
    assert_per_key_order(&decode(&records), total / 100);
    next.shutdown(Duration::from_secs(10)).await.unwrap();
    drop(writer);
}
/// A writer-only instance configured with 32 shards beside a relay with
/// the default: the shard count belongs to the table, so both use the same
/// one and every row is sent, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_and_a_relay_configured_with_different_shard_counts_send_every_row() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 3, OutboxMode::Background);
    let writer = start(
        &model,
        &broker,
        &db,
        OutboxSettings {
            shards: Some(32),
            ..no_relay()
        },
    )
    .await;
    let outbox = writer.outbox().unwrap();
    let mut tx = outbox.begin().await.unwrap();
    for shipment in 0..200 {
        tx.publish(&created(shipment, 0)).await.unwrap();
    }
    tx.commit().await.unwrap();

    // The writer seeded the table's count; its rows are in those shards.
    assert_eq!(
        count(
            &db,
            "SELECT CAST(shards AS BIGINT) AS n FROM kontext_outbox_layout"
        )
        .await,
        32
    );
    assert!(
        count(
            &db,
            "SELECT CAST(MAX(shard) AS BIGINT) AS n FROM kontext_outbox"
        )
        .await
            >= 16
    );
    assert_eq!(
        relay_all(&model, &broker, &db, &topic).await,
        200,
        "every row sent once"
    );
    drop(writer);
}

/// A process whose explicit shard count differs from the table's is
/// refused at start, with both counts in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_with_another_explicit_shard_count_is_refused_at_start() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 1, OutboxMode::Background);
    let first = start(&model, &broker, &db, no_relay()).await;
    let refused = refused_with_shards(&model, &broker, &db, 32).await;
    assert!(
        refused.contains("is 32 in this process's settings") && refused.contains("sharded 16 ways"),
        "{refused}"
    );
    drop(first);
}

/// Rows in a shard beyond the table's count (written by a process of an
/// older release, or by hand) are sent all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_in_a_shard_beyond_the_count_are_sent() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 2, OutboxMode::Background);
    let writer = start(&model, &broker, &db, no_relay()).await;
    let outbox = writer.outbox().unwrap();
    let mut tx = outbox.begin().await.unwrap();
    for shipment in 0..50 {
        tx.publish(&created(shipment, 0)).await.unwrap();
    }
    tx.commit().await.unwrap();
    db.execute_unprepared("UPDATE kontext_outbox SET shard = 40 + shard")
        .await
        .unwrap();
    assert_eq!(
        relay_all(&model, &broker, &db, &topic).await,
        50,
        "every row sent once"
    );
    drop(writer);
}

/// The shard count changed on a live system: a writer keeps committing
/// rows of 40 keys, and the table goes from 16 shards to 5 (moving a
/// backlog) and then, while two relays send, to 32. Every row arrives once and every key
/// in commit order; a process with the old explicit count is then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_a_live_outbox_keeps_every_row_once_and_each_key_in_order() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 4, OutboxMode::Background);
    let keys = 40u32;
    let rounds = 60u32;
    let writer = start(&model, &broker, &db, no_relay()).await;
    let small_batches = OutboxSettings {
        batch_size: 50,
        ..fast()
    };

    let written = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let writing = {
        let outbox = writer.outbox().unwrap().clone();
        let written = written.clone();
        tokio::spawn(async move {
            for seq in 0..rounds {
                let mut tx = outbox.begin().await.unwrap();
                for shipment in 0..keys {
                    tx.publish(&created(shipment, seq)).await.unwrap();
                }
                tx.commit().await.unwrap();
                written.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let rounds_written = |n: u32| {
        let written = written.clone();
        async move {
            wait_until("the writer to get on", async || {
                let w = written.load(std::sync::atomic::Ordering::SeqCst);
                ready(w >= n, || format!("{w} rounds written"))
            })
            .await;
        }
    };
    // The first change moves a backlog while the writer goes on; the
    // second happens while two relays send.
    rounds_written(10).await;
    let down = writer.outbox().unwrap().reshard(5).await.unwrap();
    assert_eq!((down.from, down.to), (16, 5));
    assert!(down.moved > 0, "the backlog moved to its new shards");
    assert_eq!(split_keys(&db).await, 0, "no key in two shards");
    let a = start(&model, &broker, &db, small_batches.clone()).await;
    let b = start(&model, &broker, &db, small_batches).await;
    rounds_written(30).await;
    let up = b.outbox().unwrap().reshard(32).await.unwrap();
    assert_eq!((up.from, up.to), (5, 32));
    assert_eq!(split_keys(&db).await, 0, "no key in two shards");
    writing.await.unwrap();
    wait_pending_zero(&a).await;

    let total = (keys * rounds) as usize;
    let records = read_topic(&broker, &topic, total + 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(records.len(), total, "each row once");
    assert_per_key_order(&decode(&records), rounds);
    let leases = count(&db, "SELECT COUNT(*) AS n FROM kontext_outbox_lease").await;
    assert!(
        leases >= 32,
        "a lease row per shard of the new count: {leases}"
    );

    let refused = refused_with_shards(&model, &broker, &db, 16).await;
    assert!(refused.contains("sharded 32 ways"), "{refused}");
    a.shutdown(Duration::from_secs(10)).await.unwrap();
    b.shutdown(Duration::from_secs(10)).await.unwrap();
    drop(writer);
}

/// Keys whose pending or failed rows are in more than one shard.
async fn split_keys(db: &DatabaseConnection) -> i64 {
    count(
        db,
        "SELECT COUNT(*) AS n FROM (SELECT key FROM kontext_outbox WHERE key IS NOT NULL \
         GROUP BY key HAVING COUNT(DISTINCT shard) > 1) AS split",
    )
    .await
}

/// The error of starting an instance with an explicit count of `shards`.
async fn refused_with_shards(
    model: &Model,
    broker: &Broker,
    db: &DatabaseConnection,
    shards: i32,
) -> String {
    Kontext::builder(model.clone())
        .broker(broker.clone())
        .database(db.clone())
        .outbox_settings(OutboxSettings {
            shards: Some(shards),
            ..fast()
        })
        .start()
        .await
        .unwrap_err()
        .to_string()
}

/// Starts a relay, lets it send everything pending, stops it and returns
/// how many records `topic` holds.
async fn relay_all(model: &Model, broker: &Broker, db: &DatabaseConnection, topic: &str) -> usize {
    let relay = start(model, broker, db, fast()).await;
    wait_pending_zero(&relay).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    read_topic(broker, topic, usize::MAX, Duration::from_secs(3))
        .await
        .unwrap()
        .len()
}

/// README: a commit wakes the relay of its own process at once, however
/// long its polling interval (an hour here: only the wake-up can deliver
/// within the test). The second commit comes after the relay has passed
/// over the table at least once, so no start-up pass can deliver it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_wakes_the_relay_of_its_own_process() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let topic = unique_name("shipping.shipment.created");
    let kontext = start(
        &model(&topic, 2, OutboxMode::Background),
        &broker,
        &db,
        OutboxSettings {
            poll_interval: Duration::from_secs(3_600),
            ..OutboxSettings::default()
        },
    )
    .await;
    for (round, seq) in [(1usize, 0u32), (2, 1)] {
        let mut tx = kontext.outbox().unwrap().begin().await.unwrap();
        tx.publish(&created(1, seq)).await.unwrap();
        let committed = Instant::now();
        tx.commit().await.unwrap();
        // Without the wake-up the row would wait for the hourly poll:
        // the read's deadline (a minute) cannot be met.
        let records = read_topic(&broker, &topic, round, READ_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(records.len(), round, "round {round}: the relay was woken");
        figure(
            "a_commit_wakes_the_relay_of_its_own_process",
            format_args!(
                "round {round}: on the topic {:?} after the commit",
                committed.elapsed()
            ),
        );
        wait_pending_zero(&kontext).await;
    }
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// The rows with failed send attempts, by message id: how many each had.
async fn failed_attempts(db: &DatabaseConnection) -> BTreeMap<String, i64> {
    let rows = db
        .query_all(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT message_id, attempts FROM kontext_outbox WHERE attempts > 0",
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            (
                r.try_get::<String>("", "message_id").unwrap(),
                i64::from(r.try_get::<i32>("", "attempts").unwrap()),
            )
        })
        .collect()
}

/// README's duplicate window, case (a): a delivery that times out after the
/// broker wrote it. The embedded broker answers late (it writes each record
/// at once), so the relay's send times out and the row is retried. What goes
/// out twice is bounded by the rows in flight: one batch of one key here (one
/// shard, on SQLite and on PostgreSQL alike), each row at most once per
/// failed attempt; nothing is lost, and the key's last copies are in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_that_times_out_after_the_broker_wrote_it_duplicates_at_most_one_batch() {
    init_tracing();
    // Needs a broker whose answers the test can delay: the embedded one.
    let broker = Broker::embedded().unwrap();
    let db = kontext::testing::database().await.unwrap();
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 1, OutboxMode::Background);
    const BATCH: u64 = 10;
    let settings = OutboxSettings {
        batch_size: BATCH,
        // Long enough that the first relay makes one attempt before the
        // test stops it (a second one would be counted, not a failure).
        initial_backoff: Duration::from_secs(5),
        max_backoff: Duration::from_secs(5),
        ..patient()
    };
    // A relay whose sends time out after 1 s.
    let first = outage_instance(&model, &broker, &db, 1_000, settings.clone()).await;
    let outbox = first.outbox().unwrap();
    // Connected, with its producer id, before answers are delayed.
    let mut tx = outbox.begin().await.unwrap();
    tx.publish(&created(0, 0)).await.unwrap();
    tx.commit().await.unwrap();
    wait_pending_zero(&first).await;

    let embedded = broker.as_embedded().unwrap();
    embedded
        .set_round_trip_time(1, Duration::from_secs(3))
        .unwrap();
    let rows = 3 * BATCH as u32;
    let mut tx = outbox.begin().await.unwrap();
    for seq in 1..=rows {
        tx.publish(&created(1, seq)).await.unwrap();
    }
    tx.commit().await.unwrap();
    wait_until("the first batch's sends to time out", async || {
        let failed = failed_attempts(&db).await;
        ready(!failed.is_empty(), || "no failed attempt yet".into())
    })
    .await;
    first.shutdown(Duration::from_secs(10)).await.unwrap();
    let failed = failed_attempts(&db).await;
    embedded.set_round_trip_time(1, Duration::ZERO).unwrap();
    let second = outage_instance(&model, &broker, &db, 10_000, settings).await;
    wait_pending_zero(&second).await;

    let total = rows as usize + 1;
    let records = read_all(&broker, &topic).await;
    let mut copies: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &records {
        *copies.entry(r.header("ce_id").unwrap()).or_default() += 1;
    }
    assert_eq!(copies.len(), total, "nothing lost");
    let twice: Vec<(&str, i64)> = copies
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (*id, *n))
        .collect();
    assert!(
        !twice.is_empty(),
        "the fault wrote records whose delivery failed ({} records)",
        records.len()
    );
    assert!(
        twice.len() as u64 <= BATCH,
        "at most one batch goes out twice: {twice:?}"
    );
    for (id, n) in &twice {
        let attempts = failed.get(*id).copied().unwrap_or(0);
        assert!(
            *n <= 1 + attempts,
            "{id} went out {n} times after {attempts} failed attempts"
        );
    }
    // The failed attempts' copies came first; then the key went out whole,
    // in commit order, so its last record is its latest row.
    let key: Vec<u32> = decode(&records)
        .iter()
        .filter(|e| e.shipment == 1)
        .map(|e| e.seq)
        .collect();
    let (copied, whole) = key.split_at(key.len() - rows as usize);
    assert_eq!(
        whole,
        (1..=rows).collect::<Vec<_>>(),
        "the key in order after the copies"
    );
    assert!(
        copied.windows(2).all(|w| w[0] < w[1]),
        "the failed attempt's copies in order: {copied:?}"
    );
    figure_on(
        "a_delivery_that_times_out_after_the_broker_wrote_it_duplicates_at_most_one_batch",
        &broker,
        format_args!(
            "{} of {rows} rows went out twice (batch {BATCH}), {} records for {total} rows",
            twice.len(),
            records.len()
        ),
    );
    second.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// README's duplicate window, case (b): a relay process frozen (SIGSTOP,
/// by PID) for longer than its lease after it handed a batch to Kafka. The
/// embedded broker writes the batch at once and holds back its answer, so
/// the frozen relay has not settled it when another relay takes the shard
/// over and sends every row. What goes out twice is the frozen relay's
/// batch, no more; nothing is lost; the key's last copies are in order.
/// PostgreSQL only: the test checks that the frozen process holds no
/// transaction (a frozen lock holder would stall the other relay, which is
/// not what this case is about).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_frozen_past_its_lease_duplicates_at_most_its_batch() {
    init_tracing();
    if kontext::testing::database_url().is_none_or(|u| !u.starts_with("postgres")) {
        eprintln!("skipped: needs PostgreSQL (DATABASE_URL)");
        return;
    }
    let broker = Broker::embedded().unwrap();
    let url = kontext::testing::fresh_database_url().await.unwrap();
    let db = kontext::db::connect(&url).await.unwrap();
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 1, OutboxMode::Background);
    let writer = start(&model, &broker, &db, no_relay()).await;
    let rows = 3 * FROZEN_BATCH as u32;
    let mut tx = writer.outbox().unwrap().begin().await.unwrap();
    for seq in 0..rows {
        tx.publish(&created(1, seq)).await.unwrap();
    }
    tx.commit().await.unwrap();

    // The next produce request is written at once and answered in a minute.
    let embedded = broker.as_embedded().unwrap();
    embedded
        .delay_requests(
            1,
            rdkafka::types::RDKafkaApiKey::Produce,
            1,
            Duration::from_secs(60),
        )
        .unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(&exe)
        .args([
            "--exact",
            "frozen_relay_child_process",
            "--ignored",
            "--quiet",
        ])
        .env(CHILD_DB, &url)
        .env(CHILD_TOPIC, &topic)
        .env(CHILD_BOOTSTRAP, broker.bootstrap_servers())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    wait_until("the child's batch written", async || {
        let n = records_on(&broker, &topic).await;
        ready(n > 0, || "nothing on the topic yet".into())
    })
    .await;
    // Frozen outside any transaction of its own.
    let busy = async || {
        count(
            &db,
            "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND state <> 'idle'",
        )
        .await
    };
    wait_until("the child frozen outside a transaction", async || {
        signal("-STOP");
        let n = busy().await;
        if n == 0 {
            Ok(())
        } else {
            signal("-CONT");
            Err(format!("{n} sessions busy"))
        }
    })
    .await;
    let written_by_the_frozen = records_on(&broker, &topic).await;

    // Another relay takes the shard once the lease ran out, and sends all.
    let other = start(&model, &broker, &db, frozen_relay_settings()).await;
    wait_pending_zero(&other).await;
    signal("-CONT");
    let _ = child.kill();
    let _ = child.wait();

    let records = read_all(&broker, &topic).await;
    let mut copies: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &records {
        *copies.entry(r.header("ce_id").unwrap()).or_default() += 1;
    }
    assert_eq!(copies.len(), rows as usize, "nothing lost");
    let twice = records.len() - rows as usize;
    assert!(copies.values().all(|n| *n <= 2), "{copies:?}");
    assert!(
        (1..=FROZEN_BATCH as usize).contains(&twice),
        "the frozen relay's batch ({written_by_the_frozen} records) and no more went out twice: {twice}"
    );
    let key: Vec<u32> = decode(&records).iter().map(|e| e.seq).collect();
    let (_, whole) = key.split_at(key.len() - rows as usize);
    assert_eq!(
        whole,
        (0..rows).collect::<Vec<_>>(),
        "the key in order after the copies"
    );
    figure_on(
        "a_relay_frozen_past_its_lease_duplicates_at_most_its_batch",
        &broker,
        format_args!("{twice} of {rows} rows went out twice (batch {FROZEN_BATCH})"),
    );
    other.shutdown(Duration::from_secs(10)).await.unwrap();
    drop(writer);
}

const FROZEN_BATCH: u64 = 10;

/// The relays of the frozen-relay test: a short lease, so the test is
/// quick, still longer than a relay needs for a pass.
fn frozen_relay_settings() -> OutboxSettings {
    OutboxSettings {
        batch_size: FROZEN_BATCH,
        lease_ttl: Duration::from_secs(6),
        poll_interval: Duration::from_millis(50),
        ..patient()
    }
}

/// The relay that the test above freezes, in a process of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of a_relay_frozen_past_its_lease_duplicates_at_most_its_batch"]
async fn frozen_relay_child_process() {
    let url = std::env::var(CHILD_DB).expect("started by its parent test");
    let topic = std::env::var(CHILD_TOPIC).unwrap();
    let bootstrap = std::env::var(CHILD_BOOTSTRAP).unwrap();
    let db = kontext::db::connect(&url).await.unwrap();
    let _relay = Kontext::builder(model(&topic, 1, OutboxMode::Background))
        .settings(KafkaSettings::new().provision_topics(false))
        .broker(Broker::external(bootstrap))
        .database(db)
        .outbox_settings(frozen_relay_settings())
        .start()
        .await
        .unwrap();
    // Relays until its parent kills it.
    tokio::time::sleep(Duration::from_secs(300)).await;
}

/// FNV-1a of a key's bytes modulo the default 16 shards: the shard the
/// outbox gives the key (the test picks keys of different shards).
fn default_shard_of(key: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.to_string().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % 16
}

/// README's duplicate window on PostgreSQL, where a relay works on four
/// shards at once: the embedded broker answers late (writing each record at
/// once), so the sends of four shards time out together. What goes out
/// twice is bounded by four batches, each row at most once per failed
/// attempt; nothing is lost and each key's last copies are in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_delivery_timeout_duplicates_at_most_four_batches() {
    init_tracing();
    if kontext::testing::database_url().is_none_or(|u| !u.starts_with("postgres")) {
        eprintln!("skipped: four shards at once is PostgreSQL's (DATABASE_URL)");
        return;
    }
    let broker = Broker::embedded().unwrap();
    let db = kontext::testing::database().await.unwrap();
    let topic = unique_name("shipping.shipment.created");
    let model = model(&topic, 1, OutboxMode::Background);
    const BATCH: u64 = 10;
    let settings = OutboxSettings {
        batch_size: BATCH,
        initial_backoff: Duration::from_secs(5),
        max_backoff: Duration::from_secs(5),
        ..patient()
    };
    let first = outage_instance(&model, &broker, &db, 1_000, settings.clone()).await;
    let outbox = first.outbox().unwrap();
    let mut tx = outbox.begin().await.unwrap();
    tx.publish(&created(1_000, 0)).await.unwrap();
    tx.commit().await.unwrap();
    wait_pending_zero(&first).await;

    // Four keys of four different shards: what a relay takes at once. (With
    // more, the relay would go on to other shards while the first are in
    // backoff, each a fault of its own.)
    let mut keys: Vec<u32> = Vec::new();
    for k in 0.. {
        if !keys
            .iter()
            .any(|x| default_shard_of(*x) == default_shard_of(k))
        {
            keys.push(k);
        }
        if keys.len() == 4 {
            break;
        }
    }
    let embedded = broker.as_embedded().unwrap();
    embedded
        .set_round_trip_time(1, Duration::from_secs(3))
        .unwrap();
    let per_key = 2 * BATCH as u32;
    let mut tx = outbox.begin().await.unwrap();
    for seq in 0..per_key {
        for key in &keys {
            tx.publish(&created(*key, seq)).await.unwrap();
        }
    }
    tx.commit().await.unwrap();
    wait_until("the first sends to time out", async || {
        let failed = failed_attempts(&db).await;
        ready(!failed.is_empty(), || "no failed attempt yet".into())
    })
    .await;
    // Settles what it has in flight (failed by now or soon) and stops.
    first.shutdown(Duration::from_secs(10)).await.unwrap();
    let failed = failed_attempts(&db).await;
    embedded.set_round_trip_time(1, Duration::ZERO).unwrap();
    let second = outage_instance(&model, &broker, &db, 10_000, settings).await;
    wait_pending_zero(&second).await;

    let records = read_all(&broker, &topic).await;
    let mut copies: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &records {
        *copies.entry(r.header("ce_id").unwrap()).or_default() += 1;
    }
    let rows = keys.len() * per_key as usize;
    assert_eq!(copies.len(), rows + 1, "nothing lost");
    let twice: Vec<(&str, i64)> = copies
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (*id, *n))
        .collect();
    assert!(
        !twice.is_empty(),
        "the fault wrote records whose delivery failed"
    );
    assert!(
        twice.len() as u64 <= 4 * BATCH,
        "at most four batches go out twice: {} rows",
        twice.len()
    );
    for (id, n) in &twice {
        let attempts = failed.get(*id).copied().unwrap_or(0);
        assert!(
            *n <= 1 + attempts,
            "{id} went out {n} times after {attempts} failed attempts"
        );
    }
    for key in &keys {
        let seqs: Vec<u32> = decode(&records)
            .iter()
            .filter(|e| e.shipment == *key)
            .map(|e| e.seq)
            .collect();
        let (_, whole) = seqs.split_at(seqs.len() - per_key as usize);
        assert_eq!(
            whole,
            (0..per_key).collect::<Vec<_>>(),
            "key {key} in order after the copies"
        );
    }
    figure_on(
        "on_postgres_a_delivery_timeout_duplicates_at_most_four_batches",
        &broker,
        format_args!(
            "{} of {rows} rows of 4 shards went out twice (batch {BATCH})",
            twice.len()
        ),
    );
    second.shutdown(Duration::from_secs(10)).await.unwrap();
}
