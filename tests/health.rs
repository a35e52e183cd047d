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
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        let h = kontext.health();
        if cond(&h) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let deadline = Instant::now() + READ_TIMEOUT;
    while handled.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the record was not handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
