//! What kontext reports through the `metrics` facade, read back through a
//! recorder installed for this test binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use kontext::prelude::*;
use kontext::telemetry;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

/// A metric's name and its labels, sorted.
type Id = (String, Vec<(String, String)>);

/// Keeps every counter, gauge and histogram it is asked for.
#[derive(Default)]
struct Recording {
    counters: Mutex<HashMap<Id, Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<Id, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<Id, Arc<Samples>>>,
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl metrics::HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

fn id(key: &Key) -> Id {
    let mut labels: Vec<(String, String)> = key
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    labels.sort();
    (key.name().to_owned(), labels)
}

struct Shared(Arc<Recording>);

impl Recorder for Shared {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let c = self
            .0
            .counters
            .lock()
            .unwrap()
            .entry(id(key))
            .or_default()
            .clone();
        Counter::from_arc(c)
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let g = self
            .0
            .gauges
            .lock()
            .unwrap()
            .entry(id(key))
            .or_default()
            .clone();
        Gauge::from_arc(g)
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let h = self
            .0
            .histograms
            .lock()
            .unwrap()
            .entry(id(key))
            .or_default()
            .clone();
        Histogram::from_arc(h)
    }
}

/// The recorder of this binary, installed on first use.
fn recording() -> Arc<Recording> {
    static R: OnceLock<Arc<Recording>> = OnceLock::new();
    R.get_or_init(|| {
        let r = Arc::new(Recording::default());
        metrics::set_global_recorder(Shared(Arc::clone(&r))).unwrap();
        r
    })
    .clone()
}

impl Recording {
    /// The counter `name` whose labels include `with`.
    fn counter(&self, name: &str, with: &[(&str, &str)]) -> u64 {
        find(&self.counters, name, with).map_or(0, |c| c.load(Ordering::SeqCst))
    }

    fn gauge(&self, name: &str, with: &[(&str, &str)]) -> Option<f64> {
        find(&self.gauges, name, with).map(|g| f64::from_bits(g.load(Ordering::SeqCst)))
    }

    fn samples(&self, name: &str, with: &[(&str, &str)]) -> Vec<f64> {
        find(&self.histograms, name, with)
            .map(|h| h.0.lock().unwrap().clone())
            .unwrap_or_default()
    }
}

fn find<T>(map: &Mutex<HashMap<Id, Arc<T>>>, name: &str, with: &[(&str, &str)]) -> Option<Arc<T>> {
    map.lock()
        .unwrap()
        .iter()
        .find(|((n, labels), _)| {
            n == name
                && with
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, v)| Arc::clone(v))
}

/// The outbox gauges carry no labels: one process's relays share them, so
/// the tests that read them take turns.
static OUTBOX_GAUGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    wait_until(what, async || ready(cond(), String::new)).await;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tick {
    seq: u32,
}

/// 20 produced and consumed, one retried once, one dead-lettered: the
/// counters say exactly that, the histograms have a sample per attempt and
/// per handled record, and the lag gauge follows a blocked backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_histograms_and_lag_say_what_happened() {
    init_tracing();
    let rec = recording();
    let broker = broker();
    let topic = unique_name("ticks");
    let group = unique_name("g");
    let t = topic.clone();
    let model = Model::builder()
        .topic::<Tick>(move |b| {
            b.name(&t).partitions(1).key(|e| e.seq).consumer(|c| {
                c.retry(RetryPolicy {
                    max_attempts: 3,
                    initial_backoff: Duration::from_millis(10),
                    max_backoff: Duration::from_millis(10),
                })
                // A small buffer: the blocked backlog pauses the partition.
                .max_buffered(2)
            })
        })
        .build()
        .unwrap();
    let producer = Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let ticks: Vec<Tick> = (0..20).map(|seq| Tick { seq }).collect();
    producer
        .producer()
        .unwrap()
        .produce_batch(&ticks)
        .await
        .unwrap();
    let ours = [("topic", topic.as_str()), ("type", "Tick")];
    assert_eq!(rec.counter(telemetry::PRODUCED, &ours), 20);
    assert_eq!(rec.samples(telemetry::PRODUCE_LATENCY, &ours).len(), 20);
    assert_eq!(rec.counter(telemetry::PRODUCE_ERRORS, &ours), 0);

    // The first five go through, then the handler blocks on seq 5.
    let gate = Arc::new(Semaphore::new(5));
    let g = gate.clone();
    let consumer = Kontext::builder(model)
        .settings(KafkaSettings::new().consumer(|c| {
            c.group_id = Some(group.clone());
            c.librdkafka.set("statistics.interval.ms", "100");
        }))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |e: Tick, ctx: MessageContext| {
                let g = g.clone();
                async move {
                    if e.seq == 3 && ctx.attempt() == 1 {
                        return Err(HandlerError::retry("once"));
                    }
                    if e.seq == 7 {
                        return Err(HandlerError::dead_letter("never"));
                    }
                    g.acquire().await.unwrap().forget();
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    let consumed = [
        ("topic", topic.as_str()),
        ("type", "Tick"),
        ("group", group.as_str()),
    ];
    let lag = [
        ("topic", topic.as_str()),
        ("group", group.as_str()),
        ("partition", "0"),
    ];
    // Five handled (seq 3 after its retry), the sixth blocked: 15 behind.
    until("the lag of the blocked backlog", || {
        rec.gauge(telemetry::CONSUMER_LAG, &lag) == Some(15.0)
    })
    .await;
    until("five handled", || {
        rec.counter(telemetry::HANDLED, &consumed) == 5
    })
    .await;
    let paused = [("group", group.as_str())];
    until("the partition paused behind the blocked handler", || {
        rec.gauge(telemetry::PAUSED_PARTITIONS, &paused) == Some(1.0)
    })
    .await;
    gate.add_permits(1_000);
    until("everything handled", || {
        rec.counter(telemetry::HANDLED, &consumed) == 19
            && rec.counter(telemetry::DEAD_LETTERED, &consumed) == 1
    })
    .await;
    until("the lag back to 0, nothing paused", || {
        rec.gauge(telemetry::CONSUMER_LAG, &lag) == Some(0.0)
            && rec.gauge(telemetry::PAUSED_PARTITIONS, &paused) == Some(0.0)
    })
    .await;
    assert_eq!(rec.counter(telemetry::CONSUMED, &consumed), 20);
    assert_eq!(rec.counter(telemetry::FAILED, &consumed), 2);
    assert_eq!(rec.counter(telemetry::RETRIED, &consumed), 1);
    assert_eq!(rec.counter(telemetry::DROPPED, &consumed), 0);
    // An attempt each (21: seq 3 twice), an age per handled record (19).
    assert_eq!(
        rec.samples(telemetry::HANDLER_DURATION, &consumed).len(),
        21
    );
    let ages = rec.samples(telemetry::END_TO_END, &consumed);
    assert_eq!(ages.len(), 19);
    assert!(ages.iter().all(|a| *a >= 0.0 && *a < 600.0), "{ages:?}");
    assert_eq!(
        rec.gauge(telemetry::BUFFERED, &[("topic", topic.as_str())]),
        Some(0.0)
    );
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Outbox rows written while the broker is down: the backlog gauges show
/// them waiting and ageing; once the broker is back they go out, counted,
/// and the backlog is 0. Needs a broker the test can take down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_backlog_gauges_follow_rows_waiting_for_a_broker() {
    init_tracing();
    let rec = recording();
    let _gauges = OUTBOX_GAUGES.lock().await;
    let broker = Broker::embedded().unwrap();
    let db = kontext::testing::database().await.unwrap();
    let topic = unique_name("ticks-out");
    let t = topic.clone();
    let model = Model::builder()
        .topic::<Tick>(move |b| b.name(&t).partitions(1).key(|e| e.seq))
        .build()
        .unwrap();
    let kontext = Kontext::builder(model)
        .broker(broker.clone())
        .database(db)
        .outbox_settings(kontext::outbox::OutboxSettings {
            poll_interval: Duration::from_millis(100),
            gauge_interval: Duration::from_millis(100),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            max_attempts: 1_000,
            ..Default::default()
        })
        .producer()
        .start()
        .await
        .unwrap();
    broker
        .as_embedded()
        .unwrap()
        .set_broker_up(1, false)
        .unwrap();
    let outbox = kontext.outbox().unwrap();
    for seq in 0..5 {
        let mut tx = outbox.begin().await.unwrap();
        tx.publish(&Tick { seq }).await.unwrap();
        tx.commit().await.unwrap();
    }
    until("a backlog of 5, ageing, none failed", || {
        rec.gauge(telemetry::OUTBOX_BACKLOG, &[]) == Some(5.0)
            && rec
                .gauge(telemetry::OUTBOX_OLDEST_AGE, &[])
                .is_some_and(|a| a >= 0.5)
            && rec.gauge(telemetry::OUTBOX_FAILED_ROWS, &[]) == Some(0.0)
    })
    .await;
    broker
        .as_embedded()
        .unwrap()
        .set_broker_up(1, true)
        .unwrap();
    until("the backlog sent", || {
        rec.gauge(telemetry::OUTBOX_BACKLOG, &[]) == Some(0.0)
            && rec.counter(telemetry::OUTBOX_PUBLISHED, &[("topic", topic.as_str())]) == 5
    })
    .await;
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A member once kept exporting its last lag for a partition that had
/// moved to another member (librdkafka stops reporting it after the
/// revoke), so a dashboard taking the maximum across members showed lag
/// that no longer existed. A, blocked, holds both partitions with lag on
/// each; B (which exports no statistics, so every value seen is A's) joins
/// and takes one: A's lag for it goes to 0 and its lag for the other stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_exports_lag_only_for_partitions_it_owns() {
    init_tracing();
    let rec = recording();
    let broker = broker();
    let (topic, group) = (unique_name("ticks"), unique_name("g"));
    let t = topic.clone();
    let model = Model::builder()
        .topic::<Tick>(move |b| b.name(&t).partitions(2).key(|e| e.seq))
        .build()
        .unwrap();
    let producer = Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let ticks: Vec<Tick> = (0..40).map(|seq| Tick { seq }).collect();
    producer
        .producer()
        .unwrap()
        .produce_batch(&ticks)
        .await
        .unwrap();
    let member = |stats: &'static str, handled: Arc<Semaphore>| {
        let g = group.clone();
        Kontext::builder(model.clone())
            .settings(KafkaSettings::new().consumer(move |c| {
                c.group_id = Some(g.clone());
                c.revoke_timeout_ms = Some(200);
                c.librdkafka.set("statistics.interval.ms", stats);
            }))
            .broker(broker.clone())
            .consumers(move |c| {
                c.handler(move |_: Tick, _: MessageContext| {
                    let h = handled.clone();
                    async move {
                        h.acquire().await.unwrap().forget();
                        Ok(())
                    }
                });
            })
            .start()
    };
    // A handles the first 40 (librdkafka reports a partition's lag once an
    // offset of it is stored), then nothing: its lag is the next 40.
    let a = member("100", Arc::new(Semaphore::new(40))).await.unwrap();
    let lag = |p: &'static str| {
        rec.gauge(
            telemetry::CONSUMER_LAG,
            &[
                ("topic", topic.as_str()),
                ("group", group.as_str()),
                ("partition", p),
            ],
        )
    };
    until("A's lag at 0 on both partitions", || {
        lag("0") == Some(0.0) && lag("1") == Some(0.0)
    })
    .await;
    producer
        .producer()
        .unwrap()
        .produce_batch(&ticks)
        .await
        .unwrap();
    until("A's lag on both partitions", || {
        lag("0").is_some_and(|l| l > 0.0) && lag("1").is_some_and(|l| l > 0.0)
    })
    .await;
    let b = member("0", Arc::new(Semaphore::new(1_000))).await.unwrap();
    wait_until("one partition to move to B", async || {
        let s = b.registry().service_of::<Tick>().unwrap();
        ready(s.assigned_partitions.len() == 1, || format!("{s:?}"))
    })
    .await;
    let moved = b
        .registry()
        .service_of::<Tick>()
        .unwrap()
        .assigned_partitions[0]
        .1;
    let (moved, kept) = if moved == 0 { ("0", "1") } else { ("1", "0") };
    until("A's lag for the partition it gave away to be 0", || {
        lag(moved) == Some(0.0)
    })
    .await;
    // Statistics keep coming for the partition A kept, and only for it.
    let kept_lag = lag(kept);
    assert!(kept_lag.is_some_and(|l| l > 0.0), "{kept_lag:?}");
    for _ in 0..3 {
        let seen = rec.gauge(
            telemetry::CONSUMER_LAG,
            &[("partition", moved), ("topic", topic.as_str())],
        );
        assert_eq!(seen, Some(0.0));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let _ = a.shutdown(Duration::from_secs(1)).await;
    b.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tock {
    seq: u32,
    blob: String,
}

/// The service-level counters README lists, with their `service` label:
/// records of a type this process ignores are `skipped`, a tombstone no
/// type can take is `rejected`; and a produce the broker side refuses
/// (larger than `message.max.bytes`) counts in `produce_errors`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_rejected_and_produce_errors_are_counted_per_service() {
    init_tracing();
    let rec = recording();
    let broker = broker();
    let (topic, group) = (unique_name("ticks"), unique_name("g"));
    let (t1, t2) = (topic.clone(), topic.clone());
    let model = Model::builder()
        .topic::<Tick>(move |b| b.name(&t1).partitions(1).key(|e| e.seq))
        .topic::<Tock>(move |b| b.name(&t2).key(|e| e.seq))
        .build()
        .unwrap();
    let producer = Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let p = producer.producer().unwrap();
    for seq in 0..3 {
        p.produce(&Tick { seq }).await.unwrap();
        p.produce(&Tock {
            seq,
            blob: String::new(),
        })
        .await
        .unwrap();
    }
    // Too large for the producer's `message.max.bytes` (1 MB): refused.
    let huge = Tock {
        seq: 9,
        blob: "x".repeat(2 << 20),
    };
    assert!(p.produce(&huge).await.is_err());
    assert_eq!(
        rec.counter(
            telemetry::PRODUCE_ERRORS,
            &[("topic", topic.as_str()), ("type", "Tock")]
        ),
        1
    );
    let raw: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    let tombstone: rdkafka::producer::FutureRecord<'_, [u8], [u8]> =
        rdkafka::producer::FutureRecord::to(&topic).key(&b"k"[..]);
    raw.send(tombstone, Duration::from_secs(10)).await.unwrap();
    let consumer = Kontext::builder(model)
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(group.clone())))
        .broker(broker.clone())
        .consumers(|c| {
            c.handler(|_: Tick, _: MessageContext| async { Ok(()) })
                .ignore::<Tock>();
        })
        .start()
        .await
        .unwrap();
    let service = format!("shared-{group}");
    let ours = [("group", group.as_str()), ("service", service.as_str())];
    until("3 skipped, 1 rejected, 3 handled", || {
        rec.counter(telemetry::SKIPPED, &ours) == 3
            && rec.counter(telemetry::REJECTED, &ours) == 1
            && rec.counter(
                telemetry::HANDLED,
                &[("topic", topic.as_str()), ("service", service.as_str())],
            ) == 3
    })
    .await;
    assert_eq!(rec.gauge(telemetry::PAUSED_PARTITIONS, &ours), Some(0.0));
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Visit {
    visitor: u32,
    blob: String,
}

/// The inbox's and the outbox's failure counters README lists: a record
/// the inbox already knows is counted as a duplicate (not as handled
/// twice), and every failed send of an outbox row is counted, with the row
/// counted as failed for good once its attempts are used up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_duplicates_and_failed_outbox_sends_are_counted() {
    init_tracing();
    let rec = recording();
    let _gauges = OUTBOX_GAUGES.lock().await;
    let broker = broker();
    let db = kontext::testing::database().await.unwrap();
    let (topic, group) = (unique_name("visits"), unique_name("g"));
    let t = topic.clone();
    let model = Model::builder()
        .topic::<Visit>(move |b| {
            b.name(&t)
                .partitions(1)
                .key(|e| e.visitor)
                // The visitor is the message's identity: a second record
                // for the same visitor is a redelivery to the inbox.
                .consumer(|c| c.inbox(|i| i.key_by(|e: &Visit| e.visitor.to_string())))
        })
        .build()
        .unwrap();
    let kontext = Kontext::builder(model)
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(group.clone())))
        .broker(broker.clone())
        .database(db)
        .outbox_settings(kontext::outbox::OutboxSettings {
            poll_interval: Duration::from_millis(100),
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            gauge_interval: Duration::from_millis(100),
            ..Default::default()
        })
        .consumers(|c| {
            c.transactional(|_: Visit, _: MessageContext, _: UnitOfWork| async { Ok(()) });
        })
        .start()
        .await
        .unwrap();
    let p = kontext.producer().unwrap();
    for visitor in [1, 2, 1] {
        p.produce(&Visit {
            visitor,
            blob: String::new(),
        })
        .await
        .unwrap();
    }
    let service = format!("shared-{group}");
    let ours = [
        ("topic", topic.as_str()),
        ("type", "Visit"),
        ("group", group.as_str()),
        ("service", service.as_str()),
    ];
    until("2 handled, 1 duplicate", || {
        rec.counter(telemetry::HANDLED, &ours) == 2
            && rec.counter(telemetry::INBOX_DUPLICATES, &ours) == 1
    })
    .await;

    // Larger than the broker accepts: each of its 2 attempts fails.
    let mut tx = kontext.outbox().unwrap().begin().await.unwrap();
    tx.publish(&Visit {
        visitor: 3,
        blob: "x".repeat(2 << 20),
    })
    .await
    .unwrap();
    tx.commit().await.unwrap();
    until("2 failed sends, 1 row failed for good", || {
        rec.counter(telemetry::OUTBOX_FAILED, &[("topic", topic.as_str())]) == 2
            && rec.gauge(telemetry::OUTBOX_FAILED_ROWS, &[]) == Some(1.0)
    })
    .await;
    assert_eq!(kontext.outbox().unwrap().failed().await.unwrap().len(), 1);
    assert_eq!(
        rec.counter(telemetry::HANDLED, &ours),
        2,
        "nothing handled twice"
    );
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Kafka transactions are counted by outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_are_counted_by_outcome() {
    init_tracing();
    let rec = recording();
    let broker = Broker::embedded().unwrap();
    let topic = unique_name("ticks-tx");
    let t = topic.clone();
    let model = Model::builder()
        .topic::<Tick>(move |b| b.name(&t).key(|e| e.seq))
        .build()
        .unwrap();
    let kontext = Kontext::builder(model)
        .broker(broker)
        .transactional_producer(unique_name("ticks-tx"))
        .start()
        .await
        .unwrap();
    let outcome = |o: &str| rec.counter(telemetry::TRANSACTIONS, &[("outcome", o)]);
    let (committed, aborted) = (outcome("committed"), outcome("aborted"));
    let tp = kontext.transactional_producer().unwrap();
    tp.transaction(async |t| {
        t.produce(&Tick { seq: 1 }).await?;
        Ok::<_, kontext::Error>(())
    })
    .await
    .unwrap();
    let gave_up = tp
        .transaction(async |t| {
            t.produce(&Tick { seq: 2 }).await?;
            Err::<(), _>(kontext::Error::Internal("changed its mind".into()))
        })
        .await;
    assert!(gave_up.is_err());
    // Other tests of this binary run no transactions.
    assert_eq!(
        (outcome("committed"), outcome("aborted")),
        (committed + 1, aborted + 1)
    );
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}
