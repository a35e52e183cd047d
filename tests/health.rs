//! `Kontext::health()`: liveness and readiness with reasons, through a
//! broker outage, a group join and a hung handler.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use kontext::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ping {
    n: u32,
}

fn model(topic: &str) -> Model {
    Model::builder()
        .topic::<Ping>(|t| t.name(topic).partitions(1).key(|e| e.n).consumer(|c| c))
        .build()
        .unwrap()
}

async fn until(what: &str, kontext: &Kontext, cond: impl Fn(&kontext::registry::Health) -> bool) {
    wait_until(what, async || {
        let h = kontext.health();
        ready(cond(&h), || format!("{h:?}"))
    })
    .await;
}

fn says(h: &kontext::registry::Health, words: &str) -> bool {
    h.reasons.iter().any(|r| r.contains(words))
}

/// Not ready before the group join and while no broker is reachable past
/// the session timeout (but alive: a restart would not help); healthy once
/// the broker is back and the group joined. Needs a broker the test can
/// take down: the embedded one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_without_a_broker_or_before_the_join_ready_after() {
    init_tracing();
    let broker = Broker::embedded().unwrap();
    let (topic, group) = (unique_name("pings"), unique_name("g"));
    let producer = Kontext::builder(model(&topic))
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    producer
        .producer()
        .unwrap()
        .produce(&Ping { n: 1 })
        .await
        .unwrap();
    broker
        .as_embedded()
        .unwrap()
        .set_broker_up(1, false)
        .unwrap();

    let handled = Arc::new(AtomicU32::new(0));
    let h = handled.clone();
    let consumer = Kontext::builder(model(&topic))
        .settings(KafkaSettings::new().provision_topics(false).consumer(|c| {
            c.group_id = Some(group.clone());
            c.librdkafka.set("statistics.interval.ms", "100");
        }))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |_: Ping, _: MessageContext| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    let first = consumer.health();
    assert!(first.live && !first.ready, "{first:?}");
    assert!(says(&first, "has not joined"), "{first:?}");
    // The embedded broker's session timeout is 2 s.
    until("no broker reachable", &consumer, |h| {
        h.live && !h.ready && says(h, "no broker reachable")
    })
    .await;

    broker
        .as_embedded()
        .unwrap()
        .set_broker_up(1, true)
        .unwrap();
    until("healthy again", &consumer, |h| h.is_healthy()).await;
    wait_until("the record to be handled", async || {
        ready(handled.load(Ordering::SeqCst) > 0, || {
            "not handled".to_owned()
        })
    })
    .await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A handler that hangs past the stall limit makes the process not live
/// (a restart is the cure), with a reason; once it returns, live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_past_the_stall_limit_is_not_live_until_it_returns() {
    init_tracing();
    let broker = broker();
    let (topic, group) = (unique_name("pings"), unique_name("g"));
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let consumer = Kontext::builder(model(&topic))
        .settings(KafkaSettings::new().consumer(|c| {
            c.group_id = Some(group.clone());
            c.stall_limit_ms = Some(300);
        }))
        .broker(broker.clone())
        .producer()
        .consumers(move |c| {
            c.handler(move |_: Ping, _: MessageContext| {
                let g = g.clone();
                async move {
                    g.acquire().await.unwrap().forget();
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    until("the join", &consumer, |h| h.is_healthy()).await;
    consumer
        .producer()
        .unwrap()
        .produce(&Ping { n: 1 })
        .await
        .unwrap();
    until("not live", &consumer, |h| {
        !h.live && says(h, "has finished no record")
    })
    .await;
    gate.add_permits(1);
    until("live again", &consumer, |h| h.is_healthy()).await;
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// The producer is not ready once it has reached no broker for longer than
/// a message's delivery timeout, and ready again when the broker is back
/// (statistics tell it without traffic). Embedded broker: it can be taken
/// down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_without_a_broker_past_its_delivery_timeout_is_not_ready() {
    init_tracing();
    let broker = Broker::embedded().unwrap();
    let topic = unique_name("pings");
    let kontext = Kontext::builder(model(&topic))
        .settings(KafkaSettings::new().producer(|p| {
            p.message_timeout_ms = Some(1500);
            p.librdkafka.set("statistics.interval.ms", "100");
        }))
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let p = kontext.producer().unwrap();
    p.produce(&Ping { n: 1 }).await.unwrap();
    assert!(kontext.health().is_healthy(), "{:?}", kontext.health());

    let embedded = broker.as_embedded().unwrap();
    embedded.set_broker_up(1, false).unwrap();
    // A message during the outage fails at its timeout, with an error.
    let failed = p.produce(&Ping { n: 2 }).await;
    assert!(failed.is_err(), "{failed:?}");
    until("producer not ready", &kontext, |h| {
        h.live && !h.ready && says(h, "producer: no broker reachable")
    })
    .await;

    embedded.set_broker_up(1, true).unwrap();
    until("ready again", &kontext, |h| h.is_healthy()).await;
    // Producing works again (a message may still time out at 1.5 s while
    // the partition leader's connection comes back: reconnect backoff).
    let deadline = Instant::now() + READ_TIMEOUT;
    while let Err(e) = p.produce(&Ping { n: 3 }).await {
        assert!(
            Instant::now() < deadline,
            "no delivery after the outage: {e}"
        );
    }
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// The outbox relay's own producer follows the producer's rule: with no
/// broker reachable past its send timeout, the process is not ready, saying
/// it is the relay's producer; a row written meanwhile goes out once the
/// broker is back, and the process is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_producer_reaches_no_broker_is_not_ready_and_recovers() {
    use kontext::outbox::OutboxSettings;
    init_tracing();
    let broker = Broker::embedded().unwrap();
    let topic = unique_name("pings");
    let db = kontext::testing::database().await.unwrap();
    let kontext = Kontext::builder(model(&topic))
        .settings(KafkaSettings::new().producer(|p| {
            p.message_timeout_ms = Some(1500);
            p.librdkafka.set("statistics.interval.ms", "100");
            p.librdkafka.set("reconnect.backoff.max.ms", "100");
        }))
        .broker(broker.clone())
        .database(db)
        .outbox_settings(OutboxSettings {
            poll_interval: Duration::from_millis(50),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            max_attempts: 1_000,
            ..OutboxSettings::default()
        })
        .start()
        .await
        .unwrap();
    let outbox = kontext.outbox().unwrap();
    let publish = async |n: u32| {
        let mut tx = outbox.begin().await.unwrap();
        tx.publish(&Ping { n }).await.unwrap();
        tx.commit().await.unwrap();
    };
    publish(1).await;
    let pending = async || outbox.pending().await.unwrap();
    wait_until("the first row sent", async || {
        let p = pending().await;
        ready(p == 0, || format!("{p} pending"))
    })
    .await;
    assert!(kontext.health().is_healthy(), "{:?}", kontext.health());

    let embedded = broker.as_embedded().unwrap();
    embedded.set_broker_up(1, false).unwrap();
    publish(2).await;
    until("not ready: the relay's producer", &kontext, |h| {
        h.live && !h.ready && says(h, "outbox relay's producer: no broker reachable")
    })
    .await;

    embedded.set_broker_up(1, true).unwrap();
    until("ready again", &kontext, |h| h.is_healthy()).await;
    wait_until("the row written during the outage sent", async || {
        let p = pending().await;
        ready(p == 0, || format!("{p} pending"))
    })
    .await;
    let records = read_all(&broker, &topic).await;
    let ns: Vec<u32> = records
        .iter()
        .map(|r| {
            serde_json::from_slice::<Ping>(r.payload.as_deref().unwrap())
                .unwrap()
                .n
        })
        .collect();
    assert_eq!(ns, vec![1, 2], "each row once");
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// An outbox relay whose passes fail (its table is gone) past a lease's
/// time is not ready, naming the database error; when the table is back,
/// the relay recovers, the row written before goes out, and it is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_failing_past_its_lease_is_not_ready_and_recovers() {
    use kontext::outbox::OutboxSettings;
    use sea_orm::{ConnectionTrait, TransactionTrait};

    init_tracing();
    let broker = broker();
    let topic = unique_name("pings");
    let db = kontext::testing::database().await.unwrap();
    let kontext = Kontext::builder(model(&topic))
        .broker(broker.clone())
        .database(db.clone())
        .outbox_settings(OutboxSettings {
            lease_ttl: Duration::from_millis(600),
            poll_interval: Duration::from_millis(50),
            ..OutboxSettings::default()
        })
        .start()
        .await
        .unwrap();
    until("healthy at start", &kontext, |h| h.is_healthy()).await;

    db.execute_unprepared("ALTER TABLE kontext_outbox RENAME TO kontext_outbox_away")
        .await
        .unwrap();
    until("relay not ready", &kontext, |h| {
        h.live && !h.ready && says(h, "outbox relay: passes failing")
    })
    .await;
    let h = kontext.health();
    // The database's error names the table: in the details, for logs and
    // authenticated views, not in the reasons an open endpoint serves.
    assert!(
        h.details.iter().any(|d| d.contains("kontext_outbox")),
        "the details name the table: {h:?}"
    );
    assert!(
        !says(&h, "kontext_outbox"),
        "no error text in the reasons: {h:?}"
    );

    db.execute_unprepared("ALTER TABLE kontext_outbox_away RENAME TO kontext_outbox")
        .await
        .unwrap();
    let tx = db.begin().await.unwrap();
    let outbox = kontext.outbox().unwrap();
    let id = outbox.publish(&tx, &Ping { n: 7 }).await.unwrap();
    tx.commit().await.unwrap();
    until("ready again", &kontext, |h| h.is_healthy()).await;
    let records = read_topic(&broker, &topic, 1, READ_TIMEOUT).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].header("ce_id"), Some(id.to_string().as_str()));
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A member the coordinator dropped (its heartbeats answered
/// UNKNOWN_MEMBER_ID, as for an expired session) loses its assignment: the
/// registry counts it, the process is not ready until it rejoins, and it
/// rejoins by itself and handles what comes next, all once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_dropped_by_its_group_is_counted_and_rejoins() {
    init_tracing();
    let broker = Broker::embedded().unwrap();
    let (topic, group) = (unique_name("pings"), unique_name("g"));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let s = seen.clone();
    let consumer = Kontext::builder(model(&topic))
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(group.clone())))
        .broker(broker.clone())
        .producer()
        .consumers(move |c| {
            c.handler(move |e: Ping, _: MessageContext| {
                let s = s.clone();
                async move {
                    s.lock().unwrap().push(e.n);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    until("the join", &consumer, |h| h.is_healthy()).await;
    let p = consumer.producer().unwrap();
    p.produce(&Ping { n: 1 }).await.unwrap();

    broker.as_embedded().unwrap().drop_group_members(1).unwrap();
    wait_until("the lost assignment to be counted", async || {
        let status = consumer.registry().services()[0].clone();
        ready(status.assignments_lost >= 1, || format!("{status:?}"))
    })
    .await;
    until("rejoined", &consumer, |h| h.is_healthy()).await;
    p.produce(&Ping { n: 2 }).await.unwrap();
    let deadline = Instant::now() + READ_TIMEOUT;
    while seen.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "{:?}", seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    // Ping 1 may be handled again if its offset was not committed before
    // the assignment was lost (a member that is gone cannot commit): at
    // most once more. Ping 2 came after the rejoin: once.
    let ones = seen.iter().filter(|n| **n == 1).count();
    assert!((1..=2).contains(&ones), "{seen:?}");
    assert_eq!(seen.iter().filter(|n| **n == 2).count(), 1, "{seen:?}");
}

/// README: a broker back within the group session leaves the member its
/// partitions: no assignment lost after a 3 s outage, the same partitions,
/// and a record produced once it is back is handled by it and committed.
/// Embedded broker: the test takes it down and brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_back_within_the_session_leaves_the_member_its_partitions() {
    init_tracing();
    let broker = Broker::embedded().unwrap();
    let (topic, group) = (unique_name("pings"), unique_name("g"));
    let producer = Kontext::builder(model(&topic))
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let handled = Arc::new(AtomicU32::new(0));
    let h = handled.clone();
    let consumer = Kontext::builder(model(&topic))
        .settings(KafkaSettings::new().consumer(|c| {
            c.group_id = Some(group.clone());
            // A session far longer than the outage.
            c.librdkafka.set("session.timeout.ms", "30000");
        }))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |_: Ping, _: MessageContext| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    until("joined", &consumer, |h| h.is_healthy()).await;
    let before = consumer.registry().services()[0].clone();
    assert!(!before.assigned_partitions.is_empty(), "{before:?}");
    let embedded = broker.as_embedded().unwrap();
    embedded.set_broker_up(1, false).unwrap();
    // Away for over 3 s: longer than a session of the embedded broker's
    // quick defaults would allow, well within this member's 30 s.
    wait_until("the broker to be away for 3 s", async || {
        let s = consumer.registry().services()[0].clone();
        ready(
            s.brokers_down_for
                .is_some_and(|d| d > Duration::from_secs(3)),
            || format!("{s:?}"),
        )
    })
    .await;
    embedded.set_broker_up(1, true).unwrap();
    producer
        .producer()
        .unwrap()
        .produce(&Ping { n: 1 })
        .await
        .unwrap();
    wait_until("the record produced after the outage handled", async || {
        ready(handled.load(Ordering::SeqCst) > 0, || "not yet".to_owned())
    })
    .await;
    let after = consumer.registry().services()[0].clone();
    assert_eq!(after.assignments_lost, 0, "{after:?}");
    assert_eq!(after.assigned_partitions, before.assigned_partitions);
    // The commits go through: the record's offset is committed.
    wait_until("the record committed", async || {
        let committed = committed_offsets(&broker, &group, &topic).await;
        ready(committed.get(&0) == Some(&1), || format!("{committed:?}"))
    })
    .await;
    assert!(consumer.health().is_healthy(), "{:?}", consumer.health());
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();
}
