//! Consumers: routing by topic and type, skipped, ignored and unclaimed
//! types, streams, dedicated settings, the registry, and start-up checks.
//! Against the broker the environment names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod consumer_common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use kontext::consumer::dlq_headers;
use kontext::prelude::*;

use consumer_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_types_over_two_topics_reach_their_handlers_exactly_once() {
    let Orders {
        broker,
        group,
        model,
        producer,
        ..
    } = orders(3, |c| c).await;
    let p = producer.producer().unwrap();

    let n = 10_000u32;
    let per_type = n / 3;
    let created: Vec<OrderCreated> = (0..per_type)
        .map(|i| OrderCreated {
            order: i % 50,
            seq: i,
        })
        .collect();
    let paid: Vec<OrderPaid> = (0..per_type)
        .map(|i| OrderPaid {
            order: i % 50,
            seq: i,
        })
        .collect();
    let alerts_v: Vec<Alert> = (0..per_type).map(|n| Alert { n }).collect();
    p.produce_batch(&created).await.unwrap();
    p.produce_batch(&paid).await.unwrap();
    p.produce_batch(&alerts_v).await.unwrap();

    let seen = Seen::default();
    let (s1, s2, s3) = (seen.clone(), seen.clone(), seen.clone());
    let consumer = Kontext::builder(model)
        .settings(settings(&group))
        .broker(broker)
        .consumers(move |c| {
            c.handler(move |e: OrderCreated, ctx: MessageContext| {
                let s = s1.clone();
                async move {
                    assert_eq!(ctx.message_type(), Some("OrderCreated"));
                    s.push("created", e.order, e.seq, &ctx);
                    Ok(())
                }
            })
            .handler(s2.handler::<OrderPaid>("paid", |e| (e.order, e.seq), None))
            .handler(s3.handler::<Alert>("alert", |e| (e.n, e.n), None));
        })
        .start()
        .await
        .unwrap();

    for kind in ["created", "paid", "alert"] {
        assert!(
            seen.wait_for(kind, per_type as usize, READ_TIMEOUT).await,
            "{kind}: {}",
            seen.count(kind)
        );
    }
    // One shared poll service (one Kafka consumer) serves all three types.
    let services = consumer.registry().services();
    assert_eq!(services.len(), 1, "{services:?}");
    assert_eq!(consumer.clients().consumers, 1);
    // The dead-letter producer is made on the first dead letter only.
    assert_eq!(consumer.clients().producers, 0);
    assert_eq!(services[0].types.len(), 3);
    assert_eq!(services[0].group_id, group);
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();

    let all = seen.all();
    for kind in ["created", "paid", "alert"] {
        let seqs: BTreeSet<u32> = all.iter().filter(|e| e.0 == kind).map(|e| e.2).collect();
        assert_eq!(
            seqs.len(),
            per_type as usize,
            "{kind}: no duplicates, none lost"
        );
        assert_eq!(
            all.iter().filter(|e| e.0 == kind).count(),
            per_type as usize
        );
    }
    // Per key, handlers saw messages in produced order.
    let mut last: HashMap<(&str, u32), u32> = HashMap::new();
    for (kind, key, seq, _, _) in &all {
        if let Some(prev) = last.insert((kind, *key), *seq) {
            assert!(*seq > prev, "{kind} key {key}: {seq} after {prev}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_deliver_in_order_and_redeliver_unacknowledged_messages() {
    init_tracing();
    let broker = broker();
    let (topic, group) = (unique_name("orders"), unique_name("g"));
    let model = Model::builder()
        .topic::<OrderCreated>(|t| {
            t.name(&topic).key(|e| e.order).consumer(|c| {
                c.retry(RetryPolicy {
                    max_attempts: 3,
                    initial_backoff: Duration::from_millis(5),
                    max_backoff: Duration::from_millis(5),
                })
            })
        })
        .build()
        .unwrap();
    let producer = producer_for(&model, &broker).await;
    let events: Vec<OrderCreated> = (0..20).map(|seq| OrderCreated { order: 1, seq }).collect();
    producer
        .producer()
        .unwrap()
        .produce_batch(&events)
        .await
        .unwrap();

    let consumer = Kontext::builder(model)
        .settings(settings(&group))
        .broker(broker)
        .consumers(|c| {
            c.stream::<OrderCreated>();
        })
        .start()
        .await
        .unwrap();
    let mut stream = consumer.stream::<OrderCreated>().unwrap();
    assert!(
        consumer.stream::<OrderCreated>().is_err(),
        "a stream is taken once"
    );
    let mut got = Vec::new();
    let mut dropped_once = false;
    while got.len() < 20 {
        let item = tokio::time::timeout(READ_TIMEOUT, stream.next())
            .await
            .unwrap()
            .unwrap();
        if item.message.seq == 7 && !dropped_once {
            // Dropped unacknowledged: delivered again as the next attempt.
            dropped_once = true;
            drop(item);
            continue;
        }
        if item.message.seq == 7 {
            assert_eq!(item.context.attempt(), 2);
        }
        got.push(item.message.seq);
        item.ack();
    }
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_settings_reach_the_broker_and_waiting_services_wait() {
    init_tracing();
    let broker = broker();
    let topic = unique_name("alerts");
    let group = unique_name("alerts-dedicated");
    let g = group.clone();
    let model = Model::builder()
        .topic::<Alert>(move |t| {
            t.name(&topic).key(|e| e.n).consumer(move |c| {
                c.dedicated(|d| {
                    d.group(g)
                        .start_immediately(false)
                        .set("fetch.wait.max.ms", "50")
                })
            })
        })
        .build()
        .unwrap();
    let topic = model.topic_of::<Alert>().unwrap().to_owned();
    let producer = producer_for(&model, &broker).await;
    let events: Vec<Alert> = (0..10).map(|n| Alert { n }).collect();
    producer
        .producer()
        .unwrap()
        .produce_batch(&events)
        .await
        .unwrap();

    let seen = Seen::default();
    let s = seen.clone();
    let consumer = Kontext::builder(model)
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(s.handler::<Alert>("alert", |e| (e.n, e.n), None));
        })
        .start()
        .await
        .unwrap();
    let status = consumer.registry().service_of::<Alert>().unwrap();
    assert_eq!(status.state, kontext::consumer::ServiceState::Waiting);
    // A service waiting for its start is ready (README, "Health").
    let health = consumer.health();
    assert!(health.live && health.ready, "{health:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(seen.count("alert"), 0, "nothing consumed before start");

    consumer.start_service::<Alert>().unwrap();
    assert!(seen.wait_for("alert", 10, READ_TIMEOUT).await);
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();

    // The broker knows the dedicated group, with its offsets committed.
    let committed = committed_offsets(&broker, &group, &topic).await;
    let offsets: Vec<i64> = seen.all().iter().map(|e| e.4).collect();
    assert_eq!(
        committed.values().sum::<i64>(),
        10,
        "{committed:?} after handling offsets {offsets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_errors_are_clear() {
    init_tracing();
    let topic = unique_name("orders");
    let model = Model::builder()
        .topic::<OrderCreated>(|t| t.name(&topic))
        .topic::<OrderPaid>(|t| t.name(&topic))
        .build()
        .unwrap();
    let kontext = Kontext::builder(model.clone())
        .broker(broker())
        .consumers(|c| {
            c.handler(|_: OrderCreated, _: MessageContext| async { Ok(()) });
        })
        .start()
        .await
        .unwrap();
    let err = kontext.registry().service_of::<OrderPaid>().unwrap_err();
    assert!(matches!(err, Error::NotConsumed { .. }), "{err}");
    assert!(err.to_string().contains("OrderPaid"));
    kontext.shutdown(Duration::from_secs(5)).await.unwrap();

    let err = Kontext::builder(model)
        .broker(broker())
        .consumers(|c| {
            c.handler(|_: OrderCreated, _: MessageContext| async { Ok(()) })
                .stream::<OrderCreated>();
        })
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("two consumers"), "{err}");

    let err = Kontext::builder(Model::builder().build().unwrap())
        .broker(broker())
        .consumers(|c| {
            c.stream::<Alert>();
        })
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownType { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_sharing_a_topic_are_handled_in_partition_order() {
    let Orders {
        broker,
        group,
        model,
        producer,
        ..
    } = orders(2, |c| c).await;
    let p = producer.producer().unwrap();
    // Created then paid for every order, interleaved across orders.
    for order in 0..100u32 {
        p.produce(&OrderCreated { order, seq: 0 }).await.unwrap();
        p.produce(&OrderPaid { order, seq: 1 }).await.unwrap();
    }
    let seen = Seen::default();
    let (s1, s2) = (seen.clone(), seen.clone());
    let consumer = Kontext::builder(model)
        .settings(settings(&group))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |e: OrderCreated, ctx: MessageContext| {
                let s = s1.clone();
                async move {
                    // A slower handler for the first type must not let the
                    // second type overtake it on the same partition.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    s.push("created", e.order, e.seq, &ctx);
                    Ok(())
                }
            })
            .handler(s2.handler::<OrderPaid>("paid", |e| (e.order, e.seq), None));
            // Alert is in the model but not consumed here.
        })
        .start()
        .await
        .unwrap();
    assert!(seen.wait_for("paid", 100, READ_TIMEOUT).await);
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let all = seen.all();
    for order in 0..100u32 {
        let kinds: Vec<&str> = all.iter().filter(|e| e.1 == order).map(|e| e.0).collect();
        assert_eq!(kinds, ["created", "paid"], "order {order}");
    }
}

/// How a consumer of `OrderCreated` alone treats the `OrderPaid` records
/// that share its topic: returns the dead letters and the committed offsets.
async fn one_of_two_types(
    declare: fn(kontext::consumer::ConsumerBuilder) -> kontext::consumer::ConsumerBuilder,
    ignore: bool,
) -> (Vec<RecordedMessage>, i64) {
    init_tracing();
    let broker = broker();
    let (topic, group) = (unique_name("orders"), unique_name("g"));
    let model = Model::builder()
        .topic::<OrderCreated>(|t| t.name(&topic).key(|e| e.order))
        .topic::<OrderPaid>(|t| t.name(&topic).key(|e| e.order).consumer(declare))
        .build()
        .unwrap();
    let producer = producer_for(&model, &broker).await;
    let p = producer.producer().unwrap();
    for order in 0..20u32 {
        p.produce(&OrderPaid { order, seq: 0 }).await.unwrap();
        p.produce(&OrderCreated { order, seq: 1 }).await.unwrap();
    }
    let seen = Seen::default();
    let s = seen.clone();
    let consumer = Kontext::builder(model)
        .settings(settings(&group))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(s.handler::<OrderCreated>("created", |e| (e.order, e.seq), None));
            if ignore {
                c.ignore::<OrderPaid>();
            }
        })
        .start()
        .await
        .unwrap();
    assert!(seen.wait_for("created", 20, READ_TIMEOUT).await);
    wait_until("40 offsets to be committed", async || {
        let committed = committed_offsets(&broker, &group, &topic).await;
        ready(committed.values().sum::<i64>() == 40, || {
            format!("{committed:?}")
        })
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let dlq = read_topic(&broker, &format!("{topic}.dlq"), 20, Duration::from_secs(2))
        .await
        .unwrap();
    let committed = committed_offsets(&broker, &group, &topic).await;
    (dlq, committed.values().sum::<i64>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_the_model_gives_another_group_are_skipped_and_committed() {
    let (dlq, committed) = one_of_two_types(|c| c.group("payments"), false).await;
    assert!(dlq.is_empty(), "{dlq:?}");
    assert_eq!(
        committed, 40,
        "everything committed, skipped records included"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_types_are_skipped_and_committed() {
    let (dlq, committed) = one_of_two_types(|c| c, true).await;
    assert!(dlq.is_empty(), "{dlq:?}");
    assert_eq!(committed, 40);
}

/// Issue 13, defect 3: a type of the model that this group neither consumes
/// nor leaves to another group was committed unhandled, which loses it when
/// another member of the same group (another service on the default group)
/// is the one that consumes it. Now it is dead-lettered: kept, and said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclaimed_types_are_dead_lettered_not_committed_unhandled() {
    let (dlq, committed) = one_of_two_types(|c| c, false).await;
    assert_eq!(dlq.len(), 20, "{dlq:?}");
    assert!(
        dlq.iter()
            .all(|r| r.header(dlq_headers::REASON) == Some("not-consumed"))
    );
    assert!(
        dlq[0]
            .header(dlq_headers::ERROR)
            .unwrap()
            .contains("OrderPaid")
    );
    assert_eq!(committed, 40);
}

/// Issue 13, defect 3: two services reading one topic for different types,
/// each on its own client id, so each in its own default group: each
/// handles every record of its type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_with_their_own_client_ids_each_handle_all_their_records() {
    init_tracing();
    let broker = broker();
    let topic = unique_name("orders");
    let model = Model::builder()
        .topic::<OrderCreated>(|t| t.name(&topic).partitions(2).key(|e| e.order))
        .topic::<OrderPaid>(|t| t.name(&topic).key(|e| e.order))
        .build()
        .unwrap();
    let producer = producer_for(&model, &broker).await;
    let p = producer.producer().unwrap();
    let seen = Seen::default();
    let (s1, s2) = (seen.clone(), seen.clone());
    let (orders_id, payments_id) = (unique_name("orders-svc"), unique_name("payments-svc"));
    let orders = Kontext::builder(model.clone())
        .settings(KafkaSettings::new().client_id(&orders_id))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(s1.handler::<OrderCreated>("created", |e| (e.order, e.seq), None))
                .ignore::<OrderPaid>();
        })
        .start()
        .await
        .unwrap();
    let payments = Kontext::builder(model.clone())
        .settings(KafkaSettings::new().client_id(&payments_id))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(s2.handler::<OrderPaid>("paid", |e| (e.order, e.seq), None))
                .ignore::<OrderCreated>();
        })
        .start()
        .await
        .unwrap();
    for order in 0..50u32 {
        p.produce(&OrderCreated { order, seq: 0 }).await.unwrap();
        p.produce(&OrderPaid { order, seq: 1 }).await.unwrap();
    }
    assert!(seen.wait_for("created", 50, READ_TIMEOUT).await);
    assert!(seen.wait_for("paid", 50, READ_TIMEOUT).await);
    let handled = seen.all();
    assert_eq!(handled.len(), 100, "each record once, by its own service");
    orders.shutdown(Duration::from_secs(10)).await.unwrap();
    payments.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Ignoring a type that is also consumed, or one the model does not
/// declare, fails `start()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignoring_a_consumed_type_fails_start() {
    let o = orders(1, |c| c).await;
    let err = Kontext::builder(o.model.clone())
        .settings(settings(&o.group))
        .broker(o.broker.clone())
        .consumers(|c| {
            c.handler(|_: OrderCreated, _: MessageContext| async { Ok(()) })
                .ignore::<OrderCreated>();
        })
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("both consumed and ignored"),
        "{err}"
    );
}

/// Handlers may keep their context (log it later, hand it to another task):
/// it still reads the key and headers of its own message after the handler
/// has returned and the consumer has moved on, whether or not the handler
/// read them first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_kept_past_its_handler_still_reads_its_own_key_and_headers() {
    let Orders {
        broker,
        alerts,
        group,
        model,
        producer,
        ..
    } = orders(1, |c| c).await;
    let p = producer.producer().unwrap();
    for n in 0..40u32 {
        p.produce(&Alert { n })
            .correlation_id(format!("corr-{n}"))
            .header("x-n", n.to_string())
            .await
            .unwrap();
    }
    type Kept = Arc<Mutex<Vec<(u32, Option<String>, MessageContext)>>>;
    let kept: Kept = Arc::default();
    let k = Arc::clone(&kept);
    let consumer = Kontext::builder(model)
        .settings(settings(&group))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |a: Alert, ctx: MessageContext| {
                let k = Arc::clone(&k);
                async move {
                    // Every third handler reads a header before keeping the context.
                    let read = (a.n % 3 == 0).then(|| ctx.header_str("x-n").map(str::to_owned));
                    k.lock().unwrap().push((a.n, read.flatten(), ctx));
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    wait_until("every alert to be handled", async || {
        let n = kept.lock().unwrap().len();
        ready(n >= 40, || format!("{n} of 40"))
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    // Read after the consumer is gone.
    let kept = std::mem::take(&mut *kept.lock().unwrap());
    for (n, read, ctx) in &kept {
        let n_text = n.to_string();
        assert_eq!(ctx.topic(), alerts);
        assert_eq!(ctx.key_str(), Some(n_text.as_str()), "key of alert {n}");
        assert_eq!(ctx.header_str("x-n"), Some(n_text.as_str()));
        assert_eq!(ctx.correlation_id(), Some(format!("corr-{n}").as_str()));
        assert_eq!(ctx.message_type(), Some("Alert"));
        assert!(ctx.message_id().is_some());
        if n % 3 == 0 {
            assert_eq!(read.as_deref(), Some(n_text.as_str()));
        }
    }
    let ids: BTreeSet<_> = kept.iter().map(|(_, _, c)| c.message_id()).collect();
    assert_eq!(ids.len(), 40, "every context keeps its own message id");
}

/// Issue 13, defect 10: a bad consumer-only librdkafka property passed
/// `start()` and the service then showed `Failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_consumer_property_fails_start_naming_it() {
    let o = orders(2, |c| c).await;
    let err = Kontext::builder(o.model.clone())
        .settings(settings(&o.group).consumer(|c| c.librdkafka.set("fetch.wait.max.ms", "later")))
        .broker(o.broker.clone())
        .consumers(|c| {
            c.handler(|_: OrderCreated, _: MessageContext| async { Ok(()) });
        })
        .start()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("fetch.wait.max.ms"), "{text}");
    assert!(text.contains("consumer"), "{text}");
}

/// Issue 13, defect 3 (in one process): a dedicated type that keeps the
/// shared group on a topic the shared poll service also reads would split
/// the topic's partitions, each service committing past the other's types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_poll_services_of_one_group_on_one_topic_are_rejected() {
    init_tracing();
    let broker = broker();
    let (topic, group) = (unique_name("orders"), unique_name("g"));
    let g = group.clone();
    let model = Model::builder()
        .topic::<OrderCreated>(|t| t.name(&topic).key(|e| e.order))
        .topic::<OrderPaid>(|t| {
            t.name(&topic)
                .key(|e| e.order)
                .consumer(move |c| c.dedicated(move |d| d.group(g.clone())))
        })
        .build()
        .unwrap();
    let err = Kontext::builder(model)
        .settings(settings(&group))
        .broker(broker)
        .consumers(|c| {
            c.handler(|_: OrderCreated, _: MessageContext| async { Ok(()) })
                .handler(|_: OrderPaid, _: MessageContext| async { Ok(()) });
        })
        .start()
        .await
        .unwrap_err();
    let text = err.to_string();
    for part in [group.as_str(), topic.as_str(), "OrderCreated", "OrderPaid"] {
        assert!(text.contains(part), "{part} missing from: {text}");
    }
}

/// Issue 13, defect 10: there was no public way to read a consumer's
/// effective settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_shows_each_consumer_s_effective_settings() {
    let o = orders(1, |c| c).await;
    let consumer = Kontext::builder(o.model.clone())
        .settings(settings(&o.group).consumer(|c| c.session_timeout_ms = Some(7_000)))
        .broker(o.broker.clone())
        .consumers(|c| {
            c.handler(|_: OrderCreated, _: MessageContext| async { Ok(()) });
        })
        .start()
        .await
        .unwrap();
    let service = consumer.registry().services()[0].clone();
    let get = |k: &str| {
        service
            .settings
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("group.id"), Some(o.group.as_str()));
    assert_eq!(get("session.timeout.ms"), Some("7000"));
    assert_eq!(get("enable.auto.offset.store"), Some("false"));
    assert_eq!(get("auto.commit.interval.ms"), Some("1000"));
    assert_eq!(
        get("partition.assignment.strategy"),
        Some("cooperative-sticky")
    );
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Issue 12, defect 5: a failed `start()` left live work behind: the poll
/// services planned before the failing one were already running, so a
/// zombie member of the group kept handling and committing records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_no_member_running() {
    init_tracing();
    let broker = broker();
    let (topic, alerts, group) = (
        unique_name("orders"),
        unique_name("alerts"),
        unique_name("g"),
    );
    let dedicated_group = unique_name("g-alerts");
    let model = Model::builder()
        .topic::<OrderCreated>(|t| t.name(&topic).key(|e| e.order))
        .topic::<Alert>(|t| {
            t.name(&alerts)
                .key(|e| e.n)
                .consumer(|c| c.dedicated(|d| d.group(&dedicated_group)).inbox(|i| i))
        })
        .build()
        .unwrap();
    let producer = producer_for(&model, &broker).await;
    let zombie = Seen::default();
    let z = zombie.clone();
    // `Alert` declares an inbox but gets a plain handler: `start()` fails
    // after the `OrderCreated` service was planned.
    let db = kontext::testing::database().await.unwrap();
    let err = Kontext::builder(model.clone())
        .settings(settings(&group))
        .broker(broker.clone())
        .database(db)
        .consumers(move |c| {
            c.handler(z.handler::<OrderCreated>("zombie", |e| (e.order, e.seq), None))
                .handler(|_: Alert, _: MessageContext| async { Ok(()) });
        })
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("inbox"), "{err}");

    // A record produced now goes to the next member of the group, not to
    // a leftover of the failed start.
    producer
        .producer()
        .unwrap()
        .produce(&OrderCreated { order: 1, seq: 42 })
        .await
        .unwrap();
    let next = Seen::default();
    let b = recording_consumer(&model, &broker, &group, &next, Duration::ZERO).await;
    assert!(
        next.wait_for("created", 1, READ_TIMEOUT).await,
        "the record never reached the new member"
    );
    assert_eq!(next.all()[0].2, 42);
    assert_eq!(
        zombie.count("zombie"),
        0,
        "nothing left of the failed start handled it"
    );
    b.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A record whose header name is not UTF-8 (any producer can write one)
/// once panicked whoever read its headers: the poll thread on a topic of
/// several types (the whole service failed, and failed again on the same
/// record after a restart), a lane's worker on a topic of one type (the
/// lane stopped silently). Now it is dead-lettered `bad-header` where
/// kontext must read headers, and handled with its name shown lossily
/// where it need not; the records after it flow either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_is_dead_lettered_and_stops_nothing() {
    let Orders {
        broker,
        topic,
        alerts,
        group,
        model,
        producer,
    } = orders(1, |c| c).await;
    let raw = rdkafka_producer(&broker);
    let send = async |topic: &str, payload: &[u8]| {
        let headers = kontext::testing::headers_with_raw_names(&[
            (b"ce_type", Some(b"whatever")),
            (b"bad\xff\xfe", Some(b"v")),
        ]);
        let record: rdkafka::producer::FutureRecord<'_, [u8], [u8]> =
            rdkafka::producer::FutureRecord::to(topic)
                .headers(headers)
                .key(&b"1"[..])
                .partition(0)
                .payload(payload);
        raw.send(record, Duration::from_secs(10)).await.unwrap();
    };
    // Two types share `topic`: the router reads the headers.
    send(&topic, br#"{"order":1,"seq":0}"#).await;
    // `alerts` carries one type: an undecodable record, then a good one
    // whose handler reads its headers.
    send(&alerts, b"not json").await;
    let good_alert = kontext::testing::headers_with_raw_names(&[(b"bad\xff\xfe", Some(b"v"))]);
    let record: rdkafka::producer::FutureRecord<'_, [u8], [u8]> =
        rdkafka::producer::FutureRecord::to(&alerts)
            .headers(good_alert)
            .partition(0)
            .payload(br#"{"n":1000}"#);
    raw.send(record, Duration::from_secs(10)).await.unwrap();
    let p = producer.producer().unwrap();
    for order in 0..5u32 {
        p.produce(&OrderCreated { order, seq: 1 }).await.unwrap();
        p.produce(&Alert { n: order }).await.unwrap();
    }
    let seen = Seen::default();
    let names: Arc<Mutex<Vec<String>>> = Arc::default();
    let (s1, s2, n) = (seen.clone(), seen.clone(), Arc::clone(&names));
    let consumer = Kontext::builder(model)
        .settings(settings(&group))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(s1.handler::<OrderCreated>("created", |e| (e.order, e.seq), None))
                .ignore::<OrderPaid>()
                .handler(move |e: Alert, ctx: MessageContext| {
                    let (s, n) = (s2.clone(), Arc::clone(&n));
                    async move {
                        let names: Vec<String> = ctx.headers().map(|(k, _)| k.to_owned()).collect();
                        n.lock().unwrap().extend(names);
                        s.push("alert", e.n, 0, &ctx);
                        Ok(())
                    }
                });
        })
        .start()
        .await
        .unwrap();
    assert!(
        seen.wait_for("created", 5, READ_TIMEOUT).await,
        "{:?}",
        seen.all()
    );
    assert!(
        seen.wait_for("alert", 6, READ_TIMEOUT).await,
        "{:?}",
        seen.all()
    );
    let orders_dlq = read_topic(&broker, &format!("{topic}.dlq"), 1, READ_TIMEOUT)
        .await
        .unwrap();
    let alerts_dlq = read_topic(&broker, &format!("{alerts}.dlq"), 1, READ_TIMEOUT)
        .await
        .unwrap();
    for dlq in [&orders_dlq, &alerts_dlq] {
        assert_eq!(dlq.len(), 1, "{dlq:?}");
        let d = &dlq[0];
        assert_eq!(d.header(dlq_headers::REASON), Some("bad-header"), "{d:?}");
        let error = d.header(dlq_headers::ERROR).unwrap();
        assert!(error.contains("bytes 62 61 64 ff fe"), "{error}");
        // The original header travels with its bytes (read back lossily).
        assert!(
            d.headers.iter().any(|(k, _)| k.starts_with("bad\u{fffd}")),
            "{d:?}"
        );
    }
    // The handler that read the bad name saw it lossily.
    assert!(
        names
            .lock()
            .unwrap()
            .iter()
            .any(|k| k.contains("bytes 62 61 64 ff fe")),
        "{:?}",
        names.lock().unwrap()
    );
    let health = consumer.health();
    assert!(health.live && health.ready, "{health:?}");
    for s in consumer.registry().services() {
        assert_eq!(s.state, kontext::registry::ServiceState::Running, "{s:?}");
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A topic's `group` setting (`[kafka.topics.<name>] group = ".."`) was
/// applied only to types that declared consumer settings in the model, so
/// README's own model (no `.consumer(..)`) joined the default group and
/// the setting was dropped without a word. It applies to every type now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_s_group_setting_applies_to_a_type_without_consumer_settings() {
    init_tracing();
    let broker = broker();
    let (topic, group) = (unique_name("orders"), unique_name("from-settings"));
    let model = Model::builder()
        .topic::<OrderCreated>(|t| t.name(&topic).partitions(2).key(|e| e.order))
        .build()
        .unwrap();
    let producer = producer_for(&model, &broker).await;
    producer
        .producer()
        .unwrap()
        .produce_batch(&created_batch(0..10, 5))
        .await
        .unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    let consumer = Kontext::builder(model)
        .settings(
            KafkaSettings::new()
                .client_id(unique_name("svc"))
                .topic(&topic, |t| t.group(&group)),
        )
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(s.handler::<OrderCreated>("created", |e| (e.order, e.seq), None));
        })
        .start()
        .await
        .unwrap();
    assert_eq!(
        consumer
            .registry()
            .service_of::<OrderCreated>()
            .unwrap()
            .group_id,
        group
    );
    assert!(seen.wait_for("created", 10, READ_TIMEOUT).await);
    wait_until(
        "the offsets committed under the topic's group",
        async || {
            let committed = committed_offsets(&broker, &group, &topic).await;
            ready(committed.values().sum::<i64>() == 10, || {
                format!("{committed:?}")
            })
        },
    )
    .await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// DEDICATED_CONNECTIONS.md says a dedicated connection inherits what it
/// does not set, and that raw librdkafka properties win; three places
/// did not: the shared `auto_offset_reset` never reached a dedicated
/// service (its own default, earliest, always applied), a dedicated
/// `dead_letter_topic` was ignored, and on the embedded broker kontext's
/// quick defaults overrode `[kafka.librdkafka]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_connections_inherit_and_raw_properties_win() {
    init_tracing();
    let broker = broker();
    let (topic, alerts, group) = order_names();
    let dlq = unique_name("alerts-dead");
    let d = dlq.clone();
    let model = Model::builder()
        .topic::<OrderCreated>(|t| t.name(&topic).key(|e| e.order))
        .topic::<Alert>(|t| {
            t.name(&alerts).key(|e| e.n).consumer(move |c| {
                c.dedicated(move |x| {
                    x.group(unique_name("alerts-g"))
                        .settings(|s| s.dead_letter_topic = Some(d.clone()))
                })
            })
        })
        // A dedicated connection that chooses the default explicitly keeps it.
        .topic::<OrderPaid>(|t| {
            t.name(unique_name("paid")).key(|e| e.order).consumer(|c| {
                c.dedicated(|x| {
                    x.group(unique_name("paid-g")).settings(|s| {
                        s.auto_offset_reset = Some(kontext::config::OffsetReset::Earliest)
                    })
                })
            })
        })
        .build()
        .unwrap();
    let mut s = settings(&group)
        .consumer(|c| c.auto_offset_reset = Some(kontext::config::OffsetReset::Latest));
    s.librdkafka.set("session.timeout.ms", "7000");
    s.librdkafka.set("heartbeat.interval.ms", "900");
    s.librdkafka.set("fetch.wait.max.ms", "25");
    let consumer = Kontext::builder(model)
        .settings(s)
        .broker(broker.clone())
        .consumers(|c| {
            c.handler(|_: OrderCreated, _: MessageContext| async { Ok(()) })
                .handler(|_: Alert, _: MessageContext| async { Ok(()) })
                .handler(|_: OrderPaid, _: MessageContext| async { Ok(()) });
        })
        .start()
        .await
        .unwrap();
    let services = consumer.registry().services();
    assert_eq!(services.len(), 3);
    for service in services {
        let get = |k: &str| {
            service
                .settings
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let reset = if service.name == "dedicated-OrderPaid" {
            "earliest"
        } else {
            "latest"
        };
        assert_eq!(
            get("auto.offset.reset").as_deref(),
            Some(reset),
            "{}",
            service.name
        );
        assert_eq!(
            get("session.timeout.ms").as_deref(),
            Some("7000"),
            "{}",
            service.name
        );
        assert_eq!(
            get("fetch.wait.max.ms").as_deref(),
            Some("25"),
            "{}",
            service.name
        );
        assert_eq!(
            get("heartbeat.interval.ms").as_deref(),
            Some("900"),
            "{}",
            service.name
        );
    }
    assert_eq!(
        consumer
            .registry()
            .type_status::<Alert>()
            .unwrap()
            .dead_letter_topic,
        dlq
    );
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// README, "Consume": types sharing a topic share its buffer, so the
/// largest `max_buffered` applies, their backpressure modes must agree
/// and so must their worker pools (`start()` fails naming both types);
/// poll services are named `shared-<group>` and `dedicated-<Type>`, the
/// names dashboards are told to watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_sharing_a_topic_share_its_buffer_and_services_are_named_as_documented() {
    init_tracing();
    let broker = broker();
    let (topic, alerts, group) = order_names();
    let start = |created: fn(
        kontext::consumer::ConsumerBuilder,
    ) -> kontext::consumer::ConsumerBuilder,
                 paid: fn(
        kontext::consumer::ConsumerBuilder,
    ) -> kontext::consumer::ConsumerBuilder| {
        let dedicated = unique_name("alerts-g");
        let model = Model::builder()
            .topic::<OrderCreated>(|t| t.name(&topic).key(|e| e.order).consumer(created))
            .topic::<OrderPaid>(|t| t.name(&topic).key(|e| e.order).consumer(paid))
            .topic::<Alert>(|t| {
                t.name(&alerts)
                    .key(|e| e.n)
                    .consumer(move |c| c.dedicated(move |d| d.group(dedicated.clone())))
            })
            .build()
            .unwrap();
        Kontext::builder(model)
            .settings(settings(&group))
            .broker(broker.clone())
            .consumers(|c| {
                c.handler(|_: OrderCreated, _: MessageContext| async { Ok(()) })
                    .handler(|_: OrderPaid, _: MessageContext| async { Ok(()) })
                    .handler(|_: Alert, _: MessageContext| async { Ok(()) });
            })
            .start()
    };
    let k = start(|c| c.max_buffered(10), |c| c.max_buffered(300))
        .await
        .unwrap();
    let registry = k.registry();
    assert_eq!(
        registry.type_status::<OrderCreated>().unwrap().capacity,
        300
    );
    assert_eq!(registry.type_status::<OrderPaid>().unwrap().capacity, 300);
    let names: Vec<String> = registry.services().into_iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        ["dedicated-Alert".to_owned(), format!("shared-{group}")]
    );
    k.shutdown(Duration::from_secs(10)).await.unwrap();

    let refused = start(
        |c| c.backpressure(Backpressure::Apply),
        |c| c.backpressure(Backpressure::DropOldest),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("OrderCreated")
            && refused.contains("OrderPaid")
            && refused.contains("backpressure"),
        "{refused}"
    );
    let refused = start(|c| c.workers(2), |c| c.workers(4))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("OrderCreated")
            && refused.contains("OrderPaid")
            && refused.contains("worker pools"),
        "{refused}"
    );
}

/// A codec of the user's own: what it encodes is the record's payload,
/// byte for byte, with its content type in `content-type`, and what the
/// handler gets is what it decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_codec_round_trips_with_its_content_type_and_bytes() {
    struct Csv;
    impl kontext::Codec<OrderCreated> for Csv {
        fn content_type(&self) -> &'static str {
            "text/csv"
        }
        fn encode(
            &self,
            v: &OrderCreated,
            buf: &mut Vec<u8>,
        ) -> Result<(), kontext::codec::CodecError> {
            buf.extend_from_slice(format!("{},{}", v.order, v.seq).as_bytes());
            Ok(())
        }
        fn decode(&self, bytes: &[u8]) -> Result<OrderCreated, kontext::codec::CodecError> {
            let text = std::str::from_utf8(bytes)
                .map_err(|e| kontext::codec::CodecError::from(e.to_string()))?;
            let (o, s) = text
                .split_once(',')
                .ok_or_else(|| kontext::codec::CodecError::from("no comma".to_owned()))?;
            let n = |x: &str| {
                x.parse::<u32>()
                    .map_err(|e| kontext::codec::CodecError::from(e.to_string()))
            };
            Ok(OrderCreated {
                order: n(o)?,
                seq: n(s)?,
            })
        }
    }
    init_tracing();
    let broker = broker();
    let (topic, group) = (unique_name("csv"), unique_name("g"));
    let model = Model::builder()
        .topic::<OrderCreated>(|t| t.name(&topic).partitions(1).key(|e| e.order).codec(Csv))
        .build()
        .unwrap();
    let producer = producer_for(&model, &broker).await;
    for seq in 0..3 {
        producer
            .producer()
            .unwrap()
            .produce(&OrderCreated { order: 7, seq })
            .await
            .unwrap();
    }
    let raw = read_topic(&broker, &topic, 3, READ_TIMEOUT).await.unwrap();
    let payloads: Vec<&[u8]> = raw.iter().map(|r| r.payload.as_deref().unwrap()).collect();
    assert_eq!(payloads, [&b"7,0"[..], b"7,1", b"7,2"]);
    assert!(
        raw.iter()
            .all(|r| r.header("content-type") == Some("text/csv")),
        "{raw:?}"
    );
    let seen = Seen::default();
    let s = seen.clone();
    let consumer = Kontext::builder(model)
        .settings(settings(&group))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(s.handler::<OrderCreated>("created", |e| (e.order, e.seq), None));
        })
        .start()
        .await
        .unwrap();
    assert!(seen.wait_for("created", 3, READ_TIMEOUT).await);
    let got: Vec<(u32, u32)> = seen.all().iter().map(|e| (e.1, e.2)).collect();
    assert_eq!(got, [(7, 0), (7, 1), (7, 2)]);
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// README: kontext warns at start when consumers run in the built-in
/// `kontext` group (no `client_id`, no `consumer.group_id`), which every
/// other unnamed service shares; a service with its own client id hears
/// nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_in_the_built_in_group_are_warned_about_at_start() {
    use tracing::instrument::WithSubscriber as _;
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let broker = broker();
    let topic = unique_name("orders");
    let model = Model::builder()
        .topic::<OrderCreated>(|t| t.name(&topic).key(|e| e.order))
        .build()
        .unwrap();
    let started = async |settings: KafkaSettings| {
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_env_filter("kontext=warn")
            .finish();
        let k = Kontext::builder(model.clone())
            .settings(settings)
            .broker(broker.clone())
            .consumers(|c| {
                c.handler(|_: OrderCreated, _: MessageContext| async { Ok(()) });
            })
            .start()
            .with_subscriber(subscriber)
            .await
            .unwrap();
        k.shutdown(Duration::from_secs(10)).await.unwrap();
        String::from_utf8(log.0.lock().unwrap().clone()).unwrap()
    };
    let unnamed = started(KafkaSettings::new()).await;
    assert!(
        unnamed.contains("built-in default group `kontext`"),
        "{unnamed}"
    );
    let named = started(KafkaSettings::new().client_id(unique_name("svc"))).await;
    assert!(!named.contains("built-in default group"), "{named}");
}
