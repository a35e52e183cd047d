//! Tests that need a real three-node Apache Kafka cluster
//! (`scripts/kafka start --nodes 3`): replication and leader failover.
//! `KONTEXT_TEST_CLUSTER` names its bootstrap servers; unset, each test
//! prints why it is skipped and passes. Tests that kill a node hold one lock,
//! so only one failover happens at a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kontext::broker::provision_topics;
use kontext::prelude::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::{Deserialize, Serialize};

const CLUSTER_ENV: &str = "KONTEXT_TEST_CLUSTER";
static FAILOVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Tick {
    key: String,
    seq: u32,
}

fn cluster(test: &str) -> Option<String> {
    match std::env::var(CLUSTER_ENV) {
        Ok(s) if !s.trim().is_empty() => Some(s),
        _ => {
            eprintln!("{test}: skipped, {CLUSTER_ENV} is unset (scripts/kafka start --nodes 3)");
            None
        }
    }
}

/// Runs `scripts/kafka <args> --nodes 3`: the script started the nodes and
/// holds their PIDs, so it is what kills and restarts them.
fn kafka_script(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka");
    let status = Command::new(script)
        .args(args)
        .args(["--nodes", "3"])
        .status()
        .expect("run scripts/kafka");
    assert!(status.success(), "scripts/kafka {args:?} failed: {status}");
}

fn admin_consumer(servers: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", unique_name("cluster-probe"))
        .create()
        .unwrap()
}

/// Leader and replica count of each partition of `topic`.
fn partitions(servers: &str, topic: &str) -> Vec<(i32, i32, usize)> {
    let c = admin_consumer(servers);
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    md.topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| {
            t.partitions()
                .iter()
                .map(|p| (p.id(), p.leader(), p.replicas().len()))
        })
        .collect()
}

/// The partitions once every one of the three has a leader: a topic just
/// created reaches each broker's metadata a moment later.
async fn led_partitions(servers: &str, topic: &str) -> Vec<(i32, i32, usize)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let parts = partitions(servers, topic);
        if parts.len() == 3 && parts.iter().all(|(_, leader, _)| *leader >= 0) {
            return parts;
        }
        assert!(
            Instant::now() < deadline,
            "no leaders for {topic}: {parts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Records stored in `topic`: the sum of the partitions' high watermarks
/// (no transactions, so every offset is a record).
fn stored_records(servers: &str, topic: &str, parts: &[(i32, i32, usize)]) -> i64 {
    let c = admin_consumer(servers);
    parts
        .iter()
        .map(|(p, _, _)| {
            let (low, high) = c
                .fetch_watermarks(topic, *p, Duration::from_secs(10))
                .unwrap();
            high - low
        })
        .sum()
}

async fn start(servers: &str, topic: &str) -> Kontext {
    init_tracing();
    let model = Model::builder()
        .topic::<Tick>(|t| {
            t.name(topic)
                .partitions(3)
                .replication(3)
                .key_ref(|e| &e.key)
        })
        .build()
        .unwrap();
    Kontext::builder(model)
        .settings(KafkaSettings::new().client_id("cluster-test"))
        .broker(Broker::external(servers))
        .producer()
        .start()
        .await
        .unwrap()
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_creates_replicated_topics_with_their_configs_and_reports_differences() {
    let Some(servers) = cluster("provisioning_creates_replicated_topics") else {
        return;
    };
    init_tracing();
    let topic = unique_name("replicated");
    let declared = |replication: i32, retention: &str| {
        let retention = retention.to_owned();
        let topic = topic.clone();
        Model::builder()
            .topic::<Tick>(move |t| {
                t.name(&topic)
                    .partitions(3)
                    .replication(replication)
                    .config("retention.ms", retention)
                    .config("min.insync.replicas", "2")
                    .key_ref(|e| &e.key)
            })
            .build()
            .unwrap()
    };
    let broker = Broker::external(&servers);
    let settings = KafkaSettings::new();
    let created = provision_topics(&broker, &settings, &declared(3, "3600000"))
        .await
        .unwrap();
    assert_eq!(created.created, vec![topic.clone()]);
    let parts = led_partitions(&servers, &topic).await;
    for (p, _, replicas) in &parts {
        assert_eq!(*replicas, 3, "partition {p} should have 3 replicas");
    }
    // The configs are the model's: provisioning again finds no difference.
    let same = provision_topics(&broker, &settings, &declared(3, "3600000"))
        .await
        .unwrap();
    assert_eq!(same.existing, vec![topic.clone()]);
    assert!(same.config_mismatches.is_empty(), "{same:?}");

    let differs = provision_topics(&broker, &settings, &declared(2, "7200000"))
        .await
        .unwrap();
    let mut found: Vec<(String, String, Option<String>)> = differs
        .config_mismatches
        .iter()
        .map(|m| (m.setting.clone(), m.declared.clone(), m.actual.clone()))
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            ("replication.factor".into(), "2".into(), Some("3".into())),
            (
                "retention.ms".into(),
                "7200000".into(),
                Some("3600000".into())
            ),
        ]
    );
    assert!(differs.partition_mismatches.is_empty(), "{differs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_survives_leader_failover_exactly_once_in_key_order() {
    let Some(servers) = cluster("produce_survives_leader_failover") else {
        return;
    };
    let _one_failover_at_a_time = FAILOVER.lock().await;
    let topic = unique_name("failover");
    let kontext = start(&servers, &topic).await;
    let producer = kontext.producer().unwrap();

    const TOTAL: usize = 50_000;
    const KEYS: usize = 100;
    const CHUNK: usize = 500;
    let mut next: HashMap<usize, u32> = HashMap::new();
    let events: Vec<Tick> = (0..TOTAL)
        .map(|i| {
            let k = (i * 7919) % KEYS;
            let seq = next.entry(k).or_default();
            *seq += 1;
            Tick {
                key: format!("key-{k}"),
                seq: *seq,
            }
        })
        .collect();

    let acked = Arc::new(AtomicUsize::new(0));
    let producing = {
        let acked = acked.clone();
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut longest = Duration::ZERO;
            for chunk in events.chunks(CHUNK) {
                let t = Instant::now();
                let deliveries = producer.produce_batch(chunk).await.unwrap();
                assert_eq!(deliveries.len(), chunk.len());
                longest = longest.max(t.elapsed());
                acked.fetch_add(chunk.len(), Ordering::SeqCst);
            }
            longest
        })
    };

    let parts = led_partitions(&servers, &topic).await;
    let leader = parts
        .iter()
        .find(|(p, _, _)| *p == 0)
        .map(|(_, l, _)| *l)
        .unwrap();
    wait_until("10k acknowledged", Duration::from_secs(120), || {
        acked.load(Ordering::SeqCst) >= 10_000
    })
    .await;
    let id = leader.to_string();
    kafka_script(&["kill-node", &id]);
    let killed_at = acked.load(Ordering::SeqCst);
    wait_until(
        "produce to go on after the kill",
        Duration::from_secs(180),
        || acked.load(Ordering::SeqCst) >= (killed_at + 10_000).min(TOTAL),
    )
    .await;
    kafka_script(&["start-node", &id]);
    let longest_batch = tokio::time::timeout(Duration::from_secs(300), producing)
        .await
        .expect("produce finishes")
        .unwrap();
    eprintln!(
        "killed node {id} (leader of partition 0); longest {CHUNK}-message batch: {longest_batch:?}"
    );

    // Exactly once: the partitions hold TOTAL records, no more.
    let stored = stored_records(&servers, &topic, &parts);
    assert_eq!(stored, TOTAL as i64, "records stored on the topic");
    let records = read_topic(kontext.broker(), &topic, TOTAL, Duration::from_secs(180))
        .await
        .unwrap();
    assert_eq!(
        records.len(),
        TOTAL,
        "every acknowledged message is readable"
    );
    let mut last: HashMap<String, u32> = HashMap::new();
    for r in &records {
        let t: Tick = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        let prev = last.insert(t.key.clone(), t.seq).unwrap_or(0);
        assert_eq!(t.seq, prev + 1, "key {} out of order or duplicated", t.key);
    }
    assert_eq!(last.len(), KEYS);
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A consumer group keeps going while the leader of partition 0 is killed
/// and comes back: every message is handled at least once, none is skipped,
/// each key's first deliveries come in the order it was produced, and once
/// the consumer stopped, the group's committed offsets are the end of every
/// partition. Redeliveries are allowed (the broker may lose the last commit
/// with the node); the test prints how many there were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_keeps_going_across_a_leader_failover() {
    let Some(servers) = cluster("a_consumer_group_keeps_going_across_a_leader_failover") else {
        return;
    };
    let _one_failover_at_a_time = FAILOVER.lock().await;
    let topic = unique_name("failover-consume");
    let group = unique_name("failover-group");
    const TOTAL: u32 = 30_000;
    const KEYS: u32 = 60;

    // Provisions the topic; the consumer joins before anything is produced.
    let producing = start(&servers, &topic).await;
    let parts = led_partitions(&servers, &topic).await;

    let handled: Arc<std::sync::Mutex<Vec<Tick>>> = Arc::default();
    let model = Model::builder()
        .topic::<Tick>(|t| {
            t.name(&topic)
                .partitions(3)
                .replication(3)
                .key_ref(|e| &e.key)
                .consumer(|c| c)
        })
        .build()
        .unwrap();
    let sink = handled.clone();
    let consumer = Kontext::builder(model)
        .settings(
            KafkaSettings::new()
                .client_id("cluster-consumer")
                .consumer(|c| c.group_id = Some(group.clone())),
        )
        .broker(Broker::external(&servers))
        .consumers(move |c| {
            c.handler(move |t: Tick, _ctx: MessageContext| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push(t);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    // Produced while the node dies and returns, so the consumer fetches and
    // commits across the failover rather than after it.
    let producer = producing.producer().unwrap().clone();
    let feeding = tokio::spawn(async move {
        let events: Vec<Tick> = (0..TOTAL)
            .map(|i| Tick {
                key: format!("key-{}", i % KEYS),
                seq: i / KEYS + 1,
            })
            .collect();
        for chunk in events.chunks(500) {
            producer.produce_batch(chunk).await.unwrap();
        }
    });
    let count = || handled.lock().unwrap().len();
    wait_until("5k handled", Duration::from_secs(120), || count() >= 5_000).await;

    let leader = parts
        .iter()
        .find(|(p, _, _)| *p == 0)
        .map(|(_, l, _)| *l)
        .unwrap();
    let id = leader.to_string();
    kafka_script(&["kill-node", &id]);
    let killed_at = count();
    let distinct = |h: &[Tick]| {
        h.iter()
            .map(|t| (t.key.clone(), t.seq))
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    wait_until(
        "every message handled with the node down",
        Duration::from_secs(180),
        || distinct(&handled.lock().unwrap()) >= TOTAL as usize,
    )
    .await;
    kafka_script(&["start-node", &id]);
    tokio::time::timeout(Duration::from_secs(60), feeding)
        .await
        .expect("produce finishes")
        .unwrap();
    consumer.shutdown(Duration::from_secs(30)).await.unwrap();

    let handled = handled.lock().unwrap().clone();
    let mut first_max: HashMap<String, u32> = HashMap::new();
    let mut redelivered = 0usize;
    for t in &handled {
        let max = first_max.entry(t.key.clone()).or_insert(0);
        if t.seq <= *max {
            redelivered += 1;
        } else {
            assert_eq!(t.seq, *max + 1, "key {} skipped a message", t.key);
            *max = t.seq;
        }
    }
    assert_eq!(first_max.len(), KEYS as usize);
    assert!(
        first_max.values().all(|m| *m == TOTAL / KEYS),
        "{first_max:?}"
    );
    eprintln!(
        "killed node {id} (leader of partition 0) after {killed_at} handled; {} deliveries for {TOTAL} messages, {redelivered} redelivered",
        handled.len()
    );

    // Everything handled is committed: the group's offsets are the ends.
    let committed = committed_offsets(&servers, &group, &topic, &parts);
    let ends: Vec<(i32, i64)> = {
        let c = admin_consumer(&servers);
        parts
            .iter()
            .map(|(p, _, _)| {
                let (_, high) = c
                    .fetch_watermarks(&topic, *p, Duration::from_secs(10))
                    .unwrap();
                (*p, high)
            })
            .collect()
    };
    assert_eq!(committed, ends, "committed offsets after shutdown");
    producing.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// The offsets `group` committed on each of `parts`, by partition.
fn committed_offsets(
    servers: &str,
    group: &str,
    topic: &str,
    parts: &[(i32, i32, usize)],
) -> Vec<(i32, i64)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (p, _, _) in parts {
        tpl.add_partition(topic, *p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(30)).unwrap();
    let out = committed
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1)))
        .collect();
    drop(committed);
    out
}
