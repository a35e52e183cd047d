//! Producing against the broker the environment names (embedded by default).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture;
use std::time::{Duration, SystemTime};

use common::*;
use kontext::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderCreated {
    order_id: String,
    seq: u32,
    tenant: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPaid {
    order_id: String,
    payment_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct NotInModel {
    x: u8,
}

/// A type serde_json cannot encode: map keys must be strings.
#[derive(Debug, Serialize, Deserialize)]
struct Unencodable {
    map: HashMap<(u8, u8), u8>,
}

async fn start(topic: &str, partitions: i32, client_id: &str) -> Kontext {
    start_with(topic, partitions, KafkaSettings::new().client_id(client_id)).await
}

async fn start_with(topic: &str, partitions: i32, settings: KafkaSettings) -> Kontext {
    init_tracing();
    let topic_for_paid = topic.to_owned();
    let model = Model::builder()
        .topic::<OrderCreated>(|t| {
            t.name(topic)
                .partitions(partitions)
                .key_ref(|e| &e.order_id)
                .header("app", "shop")
                .header_with("tenant", |e| e.tenant.clone())
        })
        .topic::<OrderPaid>(move |t| t.name(topic_for_paid).key(|e| e.order_id.clone()))
        .topic::<Unencodable>(|t| t.name(format!("{topic}-bad")))
        .build()
        .unwrap();
    Kontext::builder(model)
        .settings(settings)
        .broker(broker())
        .producer()
        .start()
        .await
        .unwrap()
}

/// Kafka's murmur2 (as in the Java client's `Utils.murmur2`), to check that
/// keys land where a JVM producer would put them.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    let seed: u32 = 0x9747_b28c;
    let m: u32 = 0x5bd1_e995;
    let len = key.len() as u32;
    let mut h: u32 = seed ^ len;
    let chunks = key.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(m);
        k ^= k >> 24;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= u32::from(tail[2]) << 16;
            h ^= u32::from(tail[1]) << 8;
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(m);
        }
        2 => {
            h ^= u32::from(tail[1]) << 8;
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(m);
        }
        1 => {
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(m);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    ((h & 0x7fff_ffff) % partitions as u32) as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_for_10k_messages_across_6_partitions() {
    let topic = unique_name("orders");
    let kontext = start(&topic, 6, "orders-api").await;
    let producer = kontext.producer().unwrap();

    let keys: Vec<String> = (0..60).map(|i| format!("order-{i}")).collect();
    let mut next_seq: HashMap<&str, u32> = HashMap::new();
    let total = 10_000;
    let events: Vec<OrderCreated> = (0..total)
        .map(|i| {
            let key = &keys[(i * 7919) % keys.len()];
            let seq = next_seq.entry(key).or_default();
            *seq += 1;
            OrderCreated {
                order_id: key.clone(),
                seq: *seq,
                tenant: "eu".into(),
            }
        })
        .collect();

    let deliveries = producer.produce_batch(&events).await.unwrap();
    assert_eq!(deliveries.len(), total);
    // Deliveries come back in input order and say where each message went.
    for (event, d) in events.iter().zip(&deliveries) {
        assert_eq!(
            d.partition,
            java_partition(event.order_id.as_bytes(), 6),
            "{event:?}"
        );
    }

    let records = read_topic(kontext.broker(), &topic, total, READ_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(records.len(), total, "every message must arrive");

    let mut partitions_used = std::collections::BTreeSet::new();
    let mut last: HashMap<String, (i32, u32)> = HashMap::new();
    for r in &records {
        let event: OrderCreated = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        assert_eq!(r.key_str(), Some(event.order_id.as_str()));
        partitions_used.insert(r.partition);
        if let Some((partition, seq)) = last.get(&event.order_id) {
            assert_eq!(
                *partition, r.partition,
                "key {} moved partitions",
                event.order_id
            );
            assert_eq!(event.seq, seq + 1, "key {} out of order", event.order_id);
        } else {
            assert_eq!(event.seq, 1);
        }
        last.insert(event.order_id.clone(), (r.partition, event.seq));
    }
    assert_eq!(
        partitions_used.len(),
        6,
        "60 keys should spread over all partitions"
    );
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_calls_wait_for_queue_room_and_keep_their_call_order() {
    let topic = unique_name("orders");
    // Room for 16 messages in librdkafka's queue: most calls below wait.
    let settings = KafkaSettings::new().client_id("orders-api").producer(|p| {
        p.librdkafka.set("queue.buffering.max.messages", "16");
    });
    let kontext = start_with(&topic, 3, settings).await;
    let producer = kontext.producer().unwrap();

    let total = 2_000;
    let events: Vec<OrderCreated> = (0..total)
        .map(|i| OrderCreated {
            order_id: format!("order-{}", i % 5),
            seq: (i / 5 + 1) as u32,
            tenant: "eu".into(),
        })
        .collect();
    // Every call is started before the first acknowledgement comes back.
    let calls = events.iter().map(|e| producer.produce(e).into_future());
    let deliveries = futures::future::try_join_all(calls).await.unwrap();

    // Calls got queue room in the order they were made: per key, offsets
    // follow the calls.
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (event, d) in events.iter().zip(&deliveries) {
        if let Some(before) = last.insert(&event.order_id, d.offset) {
            assert!(d.offset > before, "{event:?} overtook an earlier call");
        }
    }
    let records = read_topic(kontext.broker(), &topic, total, READ_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(records.len(), total, "every message arrives");
    let sent: std::collections::BTreeSet<String> = deliveries
        .iter()
        .map(|d| d.message_id.to_string())
        .collect();
    let arrived: std::collections::BTreeSet<String> = records
        .iter()
        .filter_map(|r| r.header("ce_id").map(str::to_owned))
        .collect();
    assert_eq!(sent.len(), total);
    assert_eq!(arrived, sent, "each message exactly once");
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_model_and_call_headers_are_written() {
    let topic = unique_name("orders");
    let kontext = start(&topic, 2, "orders-api").await;
    let producer = kontext.producer().unwrap();
    let before = SystemTime::now();

    let created = OrderCreated {
        order_id: "o-1".into(),
        seq: 1,
        tenant: "eu-west".into(),
    };
    let d1 = producer
        .produce(&created)
        .correlation_id("req-42")
        .header("trace-note", "hello")
        .await
        .unwrap();
    let d2 = producer
        .produce_owned(OrderPaid {
            order_id: "o-1".into(),
            payment_id: "p-9".into(),
        })
        .await
        .unwrap();
    assert_eq!(&*d1.topic, topic.as_str());
    assert_eq!(d1.partition, d2.partition, "same key, same partition");
    assert!(d2.offset > d1.offset);

    let records = read_topic(kontext.broker(), &topic, 2, READ_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(records.len(), 2);
    let (r1, r2) = (&records[0], &records[1]);

    let id1 = uuid::Uuid::parse_str(r1.header("ce_id").unwrap()).unwrap();
    assert_eq!(id1, d1.message_id);
    assert_eq!(id1.get_version_num(), 7);
    assert!(
        d2.message_id > d1.message_id,
        "v7 ids sort by creation time"
    );
    assert_eq!(r1.header("ce_specversion"), Some("1.0"));
    assert_eq!(r1.header("ce_type"), Some("OrderCreated"));
    assert_eq!(r2.header("ce_type"), Some("OrderPaid"));
    assert_eq!(r1.header("ce_source"), Some("orders-api"));
    assert_eq!(r1.header("content-type"), Some("application/json"));
    assert_eq!(r1.header("ce_correlationid"), Some("req-42"));
    assert_eq!(r2.header("ce_correlationid"), None);
    assert_eq!(r1.header("app"), Some("shop"));
    assert_eq!(r1.header("tenant"), Some("eu-west"));
    assert_eq!(r1.header("trace-note"), Some("hello"));
    assert_eq!(r2.header("app"), None, "model headers belong to their type");
    assert_eq!(r1.key_str(), Some("o-1"));

    let time = humantime::parse_rfc3339(r1.header("ce_time").unwrap()).unwrap();
    let skew = time
        .duration_since(before - Duration::from_secs(1))
        .expect("ce_time is not before the call");
    assert!(skew < Duration::from_secs(60));
    let ts = r1.timestamp.unwrap();
    let header_ms = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert_eq!(ts, header_ms, "record timestamp and ce_time agree");

    let back: OrderCreated = serde_json::from_slice(r1.payload.as_deref().unwrap()).unwrap();
    assert_eq!(back, created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_are_errors_not_panics_and_send_nothing() {
    let topic = unique_name("orders");
    let kontext = start(&topic, 1, "orders-api").await;
    let producer = kontext.producer().unwrap();

    let err = producer.produce(&NotInModel { x: 1 }).await.unwrap_err();
    assert!(matches!(err, Error::UnknownType { type_name } if type_name.ends_with("NotInModel")));
    assert!(!err.is_retriable());

    let mut map = HashMap::new();
    map.insert((1, 2), 3);
    let err = producer.produce(&Unencodable { map }).await.unwrap_err();
    assert!(
        matches!(&err, Error::Encode { topic: t, .. } if *t == format!("{topic}-bad")),
        "{err:?}"
    );

    let err = producer
        .produce(&OrderPaid {
            order_id: "o".into(),
            payment_id: "p".into(),
        })
        .header("ce_type", "Forged")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReservedHeader { .. }), "{err:?}");

    // An encoding failure inside a batch sends none of the batch.
    let fine = OrderPaid {
        order_id: "o".into(),
        payment_id: "p".into(),
    };
    let batch = vec![fine.clone(), fine.clone()];
    producer.produce_batch(&batch).await.unwrap();
    let records = read_topic(kontext.broker(), &topic, 3, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(records.len(), 2, "only the valid batch arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_only_registration_holds_no_consumer() {
    init_tracing();
    let topic = unique_name("orders");
    let model = Model::builder()
        .topic::<OrderPaid>(|t| t.name(&topic))
        .build()
        .unwrap();
    let broker = broker();
    let api = Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    assert_eq!(api.clients().producers, 1);
    assert_eq!(api.clients().consumers, 0);

    // The same model without the producer role: no client at all, and
    // asking for the producer is a clear error.
    let worker = Kontext::builder(model)
        .broker(broker)
        .start()
        .await
        .unwrap();
    assert_eq!(worker.clients(), kontext::runtime::ClientCounts::default());
    let err = worker.producer().unwrap_err();
    assert!(matches!(err, Error::RoleNotRegistered { role: "producer" }));
    assert!(err.to_string().contains("KontextBuilder::producer()"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_settings_rename_the_physical_topic() {
    init_tracing();
    let logical = "orders";
    let physical = unique_name("orders-eu");
    let model = Model::builder()
        .topic::<OrderPaid>(|t| t.name(logical).key(|e| e.order_id.clone()))
        .build()
        .unwrap();
    let mut topics = BTreeMap::new();
    topics.insert(
        logical.to_owned(),
        kontext::config::TopicSettings::default()
            .name(&physical)
            .partitions(3),
    );
    let settings = KafkaSettings {
        topics,
        ..KafkaSettings::default()
    };
    let kontext = Kontext::builder(model)
        .settings(settings)
        .broker(broker())
        .producer()
        .start()
        .await
        .unwrap();
    let d = kontext
        .producer()
        .unwrap()
        .produce(&OrderPaid {
            order_id: "o-7".into(),
            payment_id: "p".into(),
        })
        .await
        .unwrap();
    assert_eq!(&*d.topic, physical.as_str());
    assert_eq!(d.partition, java_partition(b"o-7", 3));
    assert_eq!(kontext.provisioned().unwrap().created, vec![physical]);
}

/// The embedded broker can be taken down, which no external broker test can
/// do cheaply: a message produced during an outage is delivered once the
/// broker is back, and one that outlives its delivery timeout fails with a
/// retriable error instead of hanging or panicking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_delays_or_fails_delivery_cleanly() {
    init_tracing();
    let broker = Broker::embedded().unwrap();
    let topic = unique_name("orders");
    let model = Model::builder()
        .topic::<OrderPaid>(|t| t.name(&topic).key(|e| e.order_id.clone()))
        .build()
        .unwrap();
    let kontext = Kontext::builder(model)
        .settings(
            KafkaSettings::new()
                .producer(|p| p.message_timeout_ms = Some(3_000))
                // Reconnect quickly once the broker is back.
                .set("reconnect.backoff.ms", "20")
                .set("reconnect.backoff.max.ms", "100"),
        )
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let producer = kontext.producer().unwrap().clone();
    let paid = |n: u32| OrderPaid {
        order_id: "o-1".into(),
        payment_id: format!("p-{n}"),
    };
    producer.produce(&paid(0)).await.unwrap();

    let embedded = broker.as_embedded().unwrap();
    embedded.set_broker_up(1, false).unwrap();
    let err = producer.produce(&paid(1)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Produce { topic: t, .. } if *t == topic),
        "{err:?}"
    );
    assert!(
        err.is_retriable(),
        "a timed-out delivery is worth retrying: {err:?}"
    );

    // Down again briefly, back before the timeout: the message gets through.
    let during = {
        let producer = producer.clone();
        let msg = paid(2);
        tokio::spawn(async move { producer.produce(&msg).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    embedded.set_broker_up(1, true).unwrap();
    let d = during.await.unwrap().unwrap();
    assert!(d.offset >= 1);

    let records = read_topic(&broker, &topic, 2, READ_TIMEOUT).await.unwrap();
    let payments: Vec<String> = records
        .iter()
        .map(|r| {
            serde_json::from_slice::<OrderPaid>(r.payload.as_deref().unwrap())
                .unwrap()
                .payment_id
        })
        .collect();
    assert!(
        payments.contains(&"p-0".to_owned()) && payments.contains(&"p-2".to_owned()),
        "{payments:?}"
    );
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Tick {
    sensor: String,
    seq: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Calibrated {
    sensor: String,
    seq: u32,
}

/// Issue 18: a lean type writes only `ce_id` and `ce_type` (plus what the
/// call and the model add); a CloudEvents type on the same topic keeps the
/// six; one consumer handles both, every message once, with the ids the
/// producer reported and an empty source for the lean ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_and_cloudevents_profiles_share_a_topic_and_one_consumer_reads_both() {
    use kontext::headers::HeaderProfile;
    use std::sync::{Arc, Mutex};

    init_tracing();
    let topic = unique_name("sensors");
    let group = unique_name("sensors-g");
    let t2 = topic.clone();
    let model = Model::builder()
        .topic::<Tick>(|t| {
            t.name(&topic)
                .partitions(2)
                .key_ref(|e| &e.sensor)
                .header_profile(HeaderProfile::Lean)
                .header("app", "meters")
        })
        .topic::<Calibrated>(move |t| t.name(t2).key_ref(|e| &e.sensor))
        .build()
        .unwrap();
    let kontext = Kontext::builder(model.clone())
        .settings(KafkaSettings::new().client_id("meters"))
        .broker(broker())
        .producer()
        .start()
        .await
        .unwrap();
    let p = kontext.producer().unwrap();
    let n = 50u32;
    let mut ids: BTreeMap<(String, u32), uuid::Uuid> = BTreeMap::new();
    for seq in 0..n {
        let sensor = format!("s-{}", seq % 5);
        let tick = Tick {
            sensor: sensor.clone(),
            seq,
        };
        let d = if seq == 0 {
            p.produce(&tick).correlation_id("req-1").await.unwrap()
        } else {
            p.produce(&tick).await.unwrap()
        };
        ids.insert(("Tick".into(), seq), d.message_id);
        let d = p.produce(&Calibrated { sensor, seq }).await.unwrap();
        ids.insert(("Calibrated".into(), seq), d.message_id);
    }

    let records = read_topic(kontext.broker(), &topic, (2 * n) as usize, READ_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(records.len(), (2 * n) as usize);
    for r in &records {
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
        match r.header("ce_type") {
            Some("Tick") if r.header("ce_correlationid").is_some() => {
                assert_eq!(names, ["ce_id", "ce_type", "ce_correlationid", "app"])
            }
            Some("Tick") => assert_eq!(names, ["ce_id", "ce_type", "app"]),
            Some("Calibrated") => assert_eq!(
                names,
                [
                    "ce_specversion",
                    "ce_id",
                    "ce_type",
                    "ce_source",
                    "ce_time",
                    "content-type"
                ]
            ),
            other => panic!("unexpected ce_type {other:?}"),
        }
    }

    // (type, seq, message id, source, correlation id)
    type Seen = Arc<
        Mutex<
            Vec<(
                String,
                u32,
                Option<uuid::Uuid>,
                Option<String>,
                Option<String>,
            )>,
        >,
    >;
    let seen: Seen = Arc::default();
    let (s1, s2) = (seen.clone(), seen.clone());
    let consumer = Kontext::builder(model)
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(group.clone())))
        .broker(kontext.broker().clone())
        .consumers(move |c| {
            c.handler(move |e: Tick, ctx: MessageContext| {
                let s = s1.clone();
                async move {
                    s.lock().unwrap().push((
                        "Tick".into(),
                        e.seq,
                        ctx.message_id(),
                        ctx.source().map(str::to_owned),
                        ctx.correlation_id().map(str::to_owned),
                    ));
                    Ok(())
                }
            })
            .handler(move |e: Calibrated, ctx: MessageContext| {
                let s = s2.clone();
                async move {
                    s.lock().unwrap().push((
                        "Calibrated".into(),
                        e.seq,
                        ctx.message_id(),
                        ctx.source().map(str::to_owned),
                        ctx.correlation_id().map(str::to_owned),
                    ));
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    while seen.lock().unwrap().len() < (2 * n) as usize {
        assert!(
            std::time::Instant::now() < deadline,
            "handled {} of {}",
            seen.lock().unwrap().len(),
            2 * n
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), (2 * n) as usize, "each message handled once");
    for (kind, seq, id, source, correlation) in &seen {
        assert_eq!(
            *id,
            Some(ids[&(kind.clone(), *seq)]),
            "{kind} {seq}: the id the producer reported"
        );
        match kind.as_str() {
            "Tick" => assert_eq!(source.as_deref(), None, "lean: no ce_source"),
            _ => assert_eq!(source.as_deref(), Some("meters")),
        }
        let expected = (kind == "Tick" && *seq == 0).then_some("req-1");
        assert_eq!(correlation.as_deref(), expected);
    }
}

/// librdkafka's queue full **by bytes** (not by message count): a call that
/// met the full queue keeps its place, so later calls for the same key do
/// not overtake it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_keep_their_call_order_when_the_queue_is_full_by_bytes() {
    let topic = unique_name("orders");
    // 2 KiB of queue: two or three ~750-byte messages fill it.
    let settings = KafkaSettings::new().client_id("orders-api").producer(|p| {
        p.librdkafka.set("queue.buffering.max.kbytes", "2");
    });
    let kontext = start_with(&topic, 1, settings).await;
    let producer = kontext.producer().unwrap();

    let total = 400;
    let events: Vec<OrderCreated> = (0..total)
        .map(|i| OrderCreated {
            order_id: "order-1".into(),
            seq: i as u32,
            tenant: "x".repeat(700),
        })
        .collect();
    let calls = events.iter().map(|e| producer.produce(e).into_future());
    let deliveries = futures::future::try_join_all(calls).await.unwrap();
    let out_of_order = deliveries
        .windows(2)
        .filter(|w| w[1].offset <= w[0].offset)
        .count();
    assert_eq!(out_of_order, 0, "calls for one key overtook earlier calls");

    let records = read_topic(kontext.broker(), &topic, total + 1, Duration::from_secs(3))
        .await
        .unwrap();
    let seqs: Vec<u32> = records
        .iter()
        .map(|r| {
            serde_json::from_slice::<OrderCreated>(r.payload.as_deref().unwrap())
                .unwrap()
                .seq
        })
        .collect();
    assert_eq!(
        seqs,
        (0..total as u32).collect::<Vec<_>>(),
        "each once, in call order"
    );
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// `queue.buffering.max.messages = 0` is librdkafka's "no limit": every
/// call goes into the queue at once instead of waiting in line for room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlimited_queue_lets_every_call_in_at_once() {
    let topic = unique_name("orders");
    let settings = KafkaSettings::new().client_id("orders-api").producer(|p| {
        p.librdkafka.set("queue.buffering.max.messages", "0");
        // Nothing is acknowledged while the calls are first polled.
        p.linger_ms = 2_000;
    });
    let kontext = start_with(&topic, 1, settings).await;
    let producer = kontext.producer().unwrap();
    let events: Vec<OrderCreated> = (0..200)
        .map(|i| OrderCreated {
            order_id: format!("order-{i}"),
            seq: i,
            tenant: "eu".into(),
        })
        .collect();
    let mut calls: Vec<_> = events
        .iter()
        .map(|e| Box::pin(producer.produce(e).into_future()))
        .collect();
    for call in &mut calls {
        assert!(futures::poll!(call.as_mut()).is_pending());
    }
    let waiting = calls
        .iter()
        .filter(|c| format!("{c:?}").contains("waiting for queue room"))
        .count();
    assert_eq!(
        waiting, 0,
        "calls made to wait for room in an unlimited queue"
    );
    let deliveries = futures::future::try_join_all(calls).await.unwrap();
    assert_eq!(deliveries.len(), 200);
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// README: `shutdown` flushes what is queued. Messages whose produce calls
/// were given up on after they were queued (the future dropped: that does
/// not recall them) sit in librdkafka's queue, held there by a 5 s linger;
/// all of them are on the topic once `shutdown` returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_messages_queued_but_not_yet_delivered() {
    let topic = unique_name("orders");
    let mut settings = KafkaSettings::new().client_id("orders-api");
    settings.producer.linger_ms = 5_000;
    let kontext = start_with(&topic, 2, settings).await;
    let broker = kontext.broker().clone();
    let p = kontext.producer().unwrap();
    let n = 20u32;
    for seq in 0..n {
        let event = OrderCreated {
            order_id: format!("order-{}", seq % 3),
            seq,
            tenant: "eu".into(),
        };
        // Queued on the first poll; the wait for its delivery is dropped.
        let waited = tokio::time::timeout(Duration::from_millis(20), p.produce(&event)).await;
        assert!(waited.is_err(), "delivered within the linger: {waited:?}");
    }
    assert_eq!(p.in_flight(), n as i32, "queued, not delivered");
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
    let records = read_topic(&broker, &topic, n as usize, READ_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(records.len(), n as usize);
}
