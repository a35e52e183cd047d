//! Consumers across a broker that goes away and comes back. On the embedded
//! broker the outage is its broker set down in-process. With
//! `KONTEXT_TEST_BOOTSTRAP` set (CI's Apache Kafka phase, so the jars are at
//! hand) each test starts an Apache Kafka node of its own through
//! `scripts/kafka`, SIGKILLs it by PID and starts it again on its data: the
//! shared test broker is never taken down under the other tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kontext::Broker;
use kontext::outbox::OutboxMode;
use kontext::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shipment {
    key: u32,
    seq: u32,
}

const PARTITIONS: i32 = 4;

/// One handling of a record, in handling order.
#[derive(Debug, Clone, Copy)]
struct Handled {
    seq: u32,
    partition: i32,
    offset: i64,
}

type Log = Arc<Mutex<Vec<Handled>>>;

/// An Apache Kafka node of this test's own, in its own state directory and
/// on free ports; purged (stopped, data deleted) when dropped.
struct OwnNode {
    state: PathBuf,
    port_base: u16,
}

impl OwnNode {
    async fn start() -> (OwnNode, String) {
        let node = OwnNode {
            state: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target/kafka")
                .join(unique_name("outage")),
            port_base: free_port_pair(),
        };
        let servers = node.script(&["start", "--nodes", "1"]).await;
        (node, servers)
    }

    /// SIGKILL by the PID the script recorded when it started the node.
    async fn kill(&self) {
        self.script(&["kill-node", "--nodes", "1", "1"]).await;
    }

    /// Starts it again on its data; returns once it answers.
    async fn restart(&self) {
        self.script(&["start-node", "--nodes", "1", "1"]).await;
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka"));
        c.args(args)
            .env("KONTEXT_KAFKA_STATE", &self.state)
            .env("KONTEXT_KAFKA_PORT_BASE", self.port_base.to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        c
    }

    async fn script(&self, args: &[&str]) -> String {
        let mut command = self.command(args);
        let what = format!("scripts/kafka {}", args.join(" "));
        tokio::task::spawn_blocking(move || {
            let out = command.output().expect("scripts/kafka runs");
            assert!(out.status.success(), "{what} failed: {:?}", out.status);
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        })
        .await
        .unwrap()
    }
}

impl Drop for OwnNode {
    fn drop(&mut self) {
        let _ = self
            .command(&["purge", "--nodes", "1"])
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir(&self.state);
    }
}

/// A port whose successor is free too (a node listens on both).
fn free_port_pair() -> u16 {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// The broker a test takes down and brings back.
enum Outage {
    Embedded(Broker),
    Kafka(OwnNode, Broker),
}

impl Outage {
    async fn new() -> Outage {
        if external() {
            let (node, servers) = OwnNode::start().await;
            Outage::Kafka(node, Broker::external(servers))
        } else {
            Outage::Embedded(Broker::embedded().unwrap())
        }
    }

    fn broker(&self) -> &Broker {
        match self {
            Outage::Embedded(b) | Outage::Kafka(_, b) => b,
        }
    }

    async fn down(&self) {
        match self {
            Outage::Embedded(b) => b.as_embedded().unwrap().set_broker_up(1, false).unwrap(),
            Outage::Kafka(node, _) => node.kill().await,
        }
    }

    async fn up(&self) {
        match self {
            Outage::Embedded(b) => b.as_embedded().unwrap().set_broker_up(1, true).unwrap(),
            Outage::Kafka(node, _) => node.restart().await,
        }
    }
}

fn model(topic: &str) -> Model {
    Model::builder()
        .topic::<Shipment>(|t| {
            t.name(topic)
                .partitions(PARTITIONS)
                .key(|e| e.key)
                .consumer(|c| c.max_buffered(100))
        })
        .build()
        .unwrap()
}

/// `session_ms`: how long the group keeps a member it does not hear from,
/// and how long librdkafka holds a commit while no coordinator answers.
fn settings(group: &str, session_ms: u64) -> KafkaSettings {
    KafkaSettings::new().consumer(|c| {
        c.group_id = Some(group.to_owned());
        c.session_timeout_ms = Some(session_ms);
        c.heartbeat_interval_ms = Some(1_000);
    })
}

async fn producer(broker: &Broker, topic: &str) -> Kontext {
    Kontext::builder(model(topic))
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap()
}

async fn produce(producer: &Kontext, seqs: std::ops::Range<u32>) {
    let batch: Vec<Shipment> = seqs.map(|seq| Shipment { key: seq % 50, seq }).collect();
    producer
        .producer()
        .unwrap()
        .produce_batch(&batch)
        .await
        .unwrap();
}

/// A member that logs every record it handles, `delay` per record so that
/// an outage arrives mid-stream.
async fn member(broker: &Broker, topic: &str, settings: KafkaSettings, log: &Log) -> Kontext {
    let log = log.clone();
    Kontext::builder(model(topic))
        .settings(settings)
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |e: Shipment, ctx: MessageContext| {
                let log = log.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    log.lock().unwrap().push(Handled {
                        seq: e.seq,
                        partition: ctx.partition(),
                        offset: ctx.offset(),
                    });
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap()
}

async fn until_handled(log: &Log, n: usize) {
    wait_until(&format!("{n} handlings"), async || {
        let have = log.lock().unwrap().len();
        ready(have >= n, || format!("{have} handled"))
    })
    .await;
}

async fn until_all(log: &Log, records: u32) {
    wait_until(&format!("all {records} records"), async || {
        let seen: BTreeSet<u32> = log.lock().unwrap().iter().map(|h| h.seq).collect();
        ready(seen.len() == records as usize, || {
            format!("{} of {records} handled", seen.len())
        })
    })
    .await;
}

async fn until_health(
    kontext: &Kontext,
    what: &str,
    cond: impl Fn(&kontext::registry::Health) -> bool,
) {
    wait_until(what, async || {
        let h = kontext.health();
        ready(cond(&h), || format!("{h:?}"))
    })
    .await;
}

/// What the handlings say, checked against the offsets committed before
/// the outage: every record handled, each partition's records first
/// handled in offset order, and a record handled again only if its offset
/// was not committed before the outage. Returns how many were handled
/// again.
fn check(handled: &[Handled], records: u32, committed_before: &BTreeMap<i32, i64>) -> usize {
    let seqs: BTreeSet<u32> = handled.iter().map(|h| h.seq).collect();
    assert_eq!(seqs.len(), records as usize, "records lost");
    let mut first_seen: BTreeMap<i32, i64> = BTreeMap::new();
    let mut seen: BTreeSet<(i32, i64)> = BTreeSet::new();
    let mut again = 0;
    for h in handled {
        if !seen.insert((h.partition, h.offset)) {
            again += 1;
            let committed = committed_before.get(&h.partition).copied().unwrap_or(0);
            assert!(
                h.offset >= committed,
                "partition {} offset {} handled again, though offsets below {committed} were committed before the outage",
                h.partition,
                h.offset
            );
            continue;
        }
        let last = first_seen.insert(h.partition, h.offset);
        assert!(
            last.is_none_or(|l| l < h.offset),
            "partition {}: offset {} first handled after offset {last:?}",
            h.partition,
            h.offset
        );
    }
    again
}

/// Per partition, the offset after the last record handled.
fn ends(handled: &[Handled]) -> BTreeMap<i32, i64> {
    let mut out = BTreeMap::new();
    for h in handled {
        let end = out.entry(h.partition).or_insert(0);
        *end = (*end).max(h.offset + 1);
    }
    out
}

/// A member with a group session of `session_ms` at work on 2,000
/// records (400 handled), before its broker is taken away.
struct MidStream {
    outage: Outage,
    broker: Broker,
    topic: String,
    group: String,
    producer: Kontext,
    log: Log,
    member: Kontext,
    /// The group's committed offsets then.
    committed_before: BTreeMap<i32, i64>,
}

async fn mid_stream(session_ms: u64) -> MidStream {
    let outage = Outage::new().await;
    let broker = outage.broker().clone();
    let (topic, group) = (unique_name("outage"), unique_name("g"));
    let producer = producer(&broker, &topic).await;
    produce(&producer, 0..2_000).await;
    let log: Log = Arc::default();
    let member = member(&broker, &topic, settings(&group, session_ms), &log).await;
    until_handled(&log, 400).await;
    let committed_before = committed_offsets(&broker, &group, &topic).await;
    MidStream {
        outage,
        broker,
        topic,
        group,
        producer,
        log,
        member,
        committed_before,
    }
}

/// The broker dies mid-stream and stays away past the group session; the
/// member notices (not ready), goes on once the broker is back, and handles
/// what was produced before and after. Nothing lost, per-partition order
/// kept, nothing committed before the outage handled again, and at the end
/// every offset committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_rides_out_a_broker_restart_losing_nothing() {
    init_tracing();
    let MidStream {
        outage,
        broker,
        topic,
        group,
        producer,
        log,
        member: consumer,
        committed_before,
    } = mid_stream(6_000).await;

    outage.down().await;
    let handled_at_down = log.lock().unwrap().len();
    until_health(&consumer, "the member to see no broker", |h| {
        h.live && !h.ready && h.reasons.iter().any(|r| r.contains("no broker reachable"))
    })
    .await;
    outage.up().await;
    produce(&producer, 2_000..3_000).await;
    until_all(&log, 3_000).await;
    until_health(&consumer, "the member to be healthy again", |h| {
        h.is_healthy()
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();

    let handled = log.lock().unwrap().clone();
    let again = check(&handled, 3_000, &committed_before);
    figure(
        "a_member_rides_out_a_broker_restart_losing_nothing",
        format_args!(
            "{} handlings of 3000 records; {handled_at_down} before the outage; {again} handled again",
            handled.len()
        ),
    );
    assert_eq!(
        committed_offsets(&broker, &group, &topic).await,
        ends(&handled),
        "committed offsets at the end"
    );
}

/// A member shut down while the broker is away: its final commit cannot
/// reach a coordinator, yet the shutdown returns within its bound (the
/// default 45 s session would hold a blocking commit that long). The next
/// member, once the broker is back, handles what was not committed:
/// nothing lost, nothing committed before the outage handled again.
///
/// Only on Apache Kafka: the embedded broker kept a member that could not
/// leave during the outage in its group for more than a minute (the next
/// member's join waited that long), where Kafka drops it at its session
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_broker_outage_returns_in_time_and_loses_nothing() {
    if !external() {
        return;
    }
    init_tracing();
    let MidStream {
        outage,
        broker,
        topic,
        group,
        producer,
        log,
        member: first,
        committed_before,
    } = mid_stream(45_000).await;

    outage.down().await;
    let timeout = Duration::from_secs(3);
    let started = Instant::now();
    let stopped = first.shutdown(timeout).await;
    let took = started.elapsed();
    // The caller learns that the final commit was not confirmed, and what
    // the next member will handle again.
    match &stopped {
        Err(kontext::Error::ShutdownIncomplete { what }) => {
            assert!(
                what.contains("final commit was not confirmed")
                    && what.contains(&format!("{topic}[")),
                "{what}"
            );
            eprintln!("shutdown said: {what}");
        }
        other => panic!("a shutdown whose final commit cannot happen returned {other:?}"),
    }
    // `shutdown` promises `timeout` plus at most 2 s (README); three seconds
    // more are slack for a loaded machine, far below the 45 s a blocked
    // commit would take (measured: 4.0 s for a 3 s timeout).
    assert!(
        took < timeout + Duration::from_secs(5),
        "shutdown took {took:?} with the broker away"
    );
    let handled_by_first = log.lock().unwrap().len();

    outage.up().await;
    let second = member(&broker, &topic, settings(&group, 6_000), &log).await;
    until_all(&log, 2_000).await;
    second.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();

    let handled = log.lock().unwrap().clone();
    let again = check(&handled, 2_000, &committed_before);
    figure(
        "a_shutdown_during_a_broker_outage_returns_in_time_and_loses_nothing",
        format_args!(
            "shutdown took {took:?}; the first member handled {handled_by_first}, {again} handled again"
        ),
    );
    assert_eq!(
        committed_offsets(&broker, &group, &topic).await,
        ends(&handled),
        "committed offsets at the end"
    );
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Note {
    key: u32,
    seq: u32,
}

const NOTE_KEYS: u32 = 20;

/// Writes notes, ten to a transaction, until `stop`; `written` counts them.
fn spawn_writer(
    outbox: kontext::outbox::Outbox,
    written: Arc<std::sync::atomic::AtomicU32>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            let first = written.load(Ordering::SeqCst);
            let mut tx = outbox.begin().await.unwrap();
            for n in first..first + 10 {
                tx.publish(&Note {
                    key: n % NOTE_KEYS,
                    seq: n / NOTE_KEYS,
                })
                .await
                .unwrap();
            }
            tx.commit().await.unwrap();
            written.store(first + 10, Ordering::SeqCst);
        }
    })
}

async fn pending(kontext: &Kontext) -> u64 {
    kontext.outbox().unwrap().pending().await.unwrap()
}

/// The outbox relay across a broker that dies mid-stream while rows keep
/// being written. The relay's send timeout (half its 60 s lease) outlasts
/// the outage, so what was in flight is retried by the idempotent producer
/// rather than sent again as new messages: once the broker is back every
/// row is on the topic exactly once, each key in commit order, and none
/// failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_rides_out_a_broker_restart_sending_each_row_once_in_key_order() {
    init_tracing();
    let outage = Outage::new().await;
    let broker = outage.broker().clone();
    let db = kontext::testing::database().await.unwrap();
    let topic = unique_name("outage.note");
    let model = Model::builder()
        .topic::<Note>(|t| {
            t.name(&topic)
                .partitions(PARTITIONS)
                .key(|n| n.key)
                .producer(|p| p.outbox(OutboxMode::Background))
        })
        .build()
        .unwrap();
    let kontext = Kontext::builder(model)
        .settings(KafkaSettings::new().set("reconnect.backoff.max.ms", "100"))
        .broker(broker.clone())
        .database(db)
        .outbox_settings(patient_outbox(Duration::from_secs(60)))
        .start()
        .await
        .unwrap();

    // Rows are written all along, so the relay has messages in flight
    // when the broker is killed.
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let (written, stop) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let writer = spawn_writer(
        kontext.outbox().unwrap().clone(),
        written.clone(),
        stop.clone(),
    );
    let sent_some = async |n: u32| {
        let w = written.load(Ordering::SeqCst);
        let left = pending(&kontext).await;
        ready(w >= n && left < u64::from(w), || {
            format!("{w} written, {left} pending")
        })
    };
    wait_until("the relay at work", async || sent_some(500).await).await;
    outage.down().await;
    let at_down = written.load(Ordering::SeqCst);
    wait_until("rows written while the broker is away", async || {
        sent_some(at_down + 500).await
    })
    .await;
    outage.up().await;
    let at_up = written.load(Ordering::SeqCst);
    wait_until("rows written after it is back", async || {
        sent_some(at_up + 500).await
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    let total = written.load(Ordering::SeqCst);
    wait_until("the outbox to drain", async || {
        let left = pending(&kontext).await;
        ready(left == 0, || format!("{left} pending"))
    })
    .await;
    assert!(kontext.outbox().unwrap().failed().await.unwrap().is_empty());
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();

    let records = read_topic(&broker, &topic, total as usize + 1, Duration::from_secs(5))
        .await
        .unwrap();
    let mut per_key: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for r in &records {
        let n: Note = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        per_key.entry(n.key).or_default().push(n.seq);
    }
    figure(
        "the_relay_rides_out_a_broker_restart_sending_each_row_once_in_key_order",
        format_args!(
            "{} records on the topic for {total} rows ({at_down} written before the outage, {} during it)",
            records.len(),
            at_up - at_down
        ),
    );
    for key in 0..NOTE_KEYS {
        let rows_of_key = (total + NOTE_KEYS - 1 - key) / NOTE_KEYS;
        assert_eq!(
            per_key.remove(&key).unwrap_or_default(),
            (0..rows_of_key).collect::<Vec<_>>(),
            "key {key}: each row once, in commit order"
        );
    }
    assert_eq!(records.len(), total as usize);
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Recorded {
    seq: u32,
}

/// The whole pipeline across a broker restart past the group session:
/// units of work with the inbox write a business row and publish a
/// follow-up through the outbox. Kafka delivers a good part of the stream
/// again after the outage (the member's assignment was lost before it
/// could commit), yet each record has exactly one business row and one
/// follow-up on the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_of_work_with_the_inbox_have_each_effect_once_across_a_broker_restart() {
    use sea_orm::ConnectionTrait;
    init_tracing();
    let outage = Outage::new().await;
    let broker = outage.broker().clone();
    let db = kontext::testing::database().await.unwrap();
    db.execute_unprepared("CREATE TABLE effect (seq INTEGER NOT NULL)")
        .await
        .unwrap();
    let (topic, followups, group) = (
        unique_name("outage"),
        unique_name("outage.recorded"),
        unique_name("g"),
    );
    let model = Model::builder()
        .topic::<Shipment>(|t| {
            t.name(&topic)
                .partitions(PARTITIONS)
                .key(|e| e.key)
                .consumer(|c| c.max_buffered(100).inbox(|i| i))
        })
        .topic::<Recorded>(|t| t.name(&followups).partitions(PARTITIONS).key(|r| r.seq))
        .build()
        .unwrap();
    let producer = producer(&broker, &topic).await;
    produce(&producer, 0..2_000).await;

    let consumer = Kontext::builder(model)
        .settings(settings(&group, 6_000).set("reconnect.backoff.max.ms", "100"))
        .broker(broker.clone())
        .database(db.clone())
        .outbox_settings(patient_outbox(Duration::from_secs(60)))
        .consumers(|c| {
            c.transactional(
                |e: Shipment, _: MessageContext, uow: UnitOfWork| async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let backend = uow.get_database_backend();
                    uow.execute(sea_orm::Statement::from_sql_and_values(
                        backend,
                        if backend == sea_orm::DbBackend::Postgres {
                            "INSERT INTO effect (seq) VALUES ($1)"
                        } else {
                            "INSERT INTO effect (seq) VALUES (?)"
                        },
                        [(e.seq as i32).into()],
                    ))
                    .await?;
                    uow.publish(&Recorded { seq: e.seq })
                        .await
                        .map_err(HandlerError::retry)?;
                    Ok(())
                },
            );
        })
        .start()
        .await
        .unwrap();
    let effects = async || count(&db, "SELECT COUNT(*) AS n FROM effect").await;
    wait_until("400 effects", async || {
        let n = effects().await;
        ready(n >= 400, || format!("{n} effects"))
    })
    .await;

    outage.down().await;
    until_health(&consumer, "the member to see no broker", |h| {
        h.live && !h.ready && h.reasons.iter().any(|r| r.contains("no broker reachable"))
    })
    .await;
    outage.up().await;
    produce(&producer, 2_000..3_000).await;
    wait_until("an effect of every record", async || {
        let n = count(&db, "SELECT COUNT(DISTINCT seq) AS n FROM effect").await;
        ready(n == 3_000, || format!("{n} of 3000 records"))
    })
    .await;
    wait_until("the outbox to drain", async || {
        let left = pending(&consumer).await;
        ready(left == 0, || format!("{left} pending"))
    })
    .await;
    let status = consumer.registry().type_status::<Shipment>().unwrap();
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();

    let followed = read_topic(&broker, &followups, 3_001, Duration::from_secs(5))
        .await
        .unwrap();
    let mut seqs: Vec<u32> = followed
        .iter()
        .map(|r| {
            serde_json::from_slice::<Recorded>(r.payload.as_deref().unwrap())
                .unwrap()
                .seq
        })
        .collect();
    seqs.sort_unstable();
    figure(
        "units_of_work_with_the_inbox_have_each_effect_once_across_a_broker_restart",
        format_args!(
            "{} redelivered records acknowledged by the inbox; {} follow-ups",
            status.duplicates,
            followed.len()
        ),
    );
    assert_eq!(effects().await, 3_000, "one business row per record");
    assert_eq!(
        seqs,
        (0..3_000).collect::<Vec<_>>(),
        "one follow-up per record"
    );
}
