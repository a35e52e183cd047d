//! W3C trace context through a kontext hop: what a handler produces, directly
//! or through the outbox, carries the `traceparent`/`tracestate` of the
//! message it handles.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use kontext::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ping {
    n: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pong {
    n: u32,
}

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const STATE: &str = "congo=t61rcWkgMzE";

fn model(pings: &str, pongs: &str) -> Model {
    model_with(pings, pongs, 0)
}

/// With `workers` > 0 the pings are handled by a worker pool.
fn model_with(pings: &str, pongs: &str, workers: usize) -> Model {
    Model::builder()
        .topic::<Ping>(|t| {
            t.name(pings)
                .partitions(1)
                .key(|e| e.n)
                .consumer(|c| if workers > 0 { c.workers(workers) } else { c })
        })
        .topic::<Pong>(|t| t.name(pongs).partitions(1).key(|e| e.n))
        .build()
        .unwrap()
}

fn header<'a>(r: &'a RecordedMessage, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Produces Ping 1 with a trace context and Ping 2 without.
async fn send_pings(model: &Model, broker: &Broker) {
    let producer = Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let p = producer.producer().unwrap();
    p.produce(&Ping { n: 1 })
        .header("traceparent", PARENT)
        .header("tracestate", STATE)
        .await
        .unwrap();
    p.produce(&Ping { n: 2 }).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// The pongs on `topic`, by their number.
async fn pongs(broker: &Broker, topic: &str) -> Vec<RecordedMessage> {
    let mut out = read_topic(broker, topic, 2, READ_TIMEOUT).await.unwrap();
    out.sort_by_key(|r| r.key.clone());
    out
}

fn assert_carried(pongs: &[RecordedMessage]) {
    assert_eq!(pongs.len(), 2);
    // Keys are the JSON numbers 1 and 2.
    assert_eq!(header(&pongs[0], "traceparent"), Some(PARENT));
    assert_eq!(header(&pongs[0], "tracestate"), Some(STATE));
    assert_eq!(
        header(&pongs[1], "traceparent"),
        None,
        "no context, none made up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_produces_carries_the_trace_on() {
    handler_carries_the_trace_on(0, false).await;
}

/// A batch takes the trace context once for all its messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_produces_a_batch_carries_the_trace_on() {
    handler_carries_the_trace_on(0, true).await;
}

/// A pool runs several handlers in one task: each carries its own message's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_in_a_worker_pool_carries_the_trace_on() {
    handler_carries_the_trace_on(4, false).await;
}

/// A one-worker pool runs its records one after another in one future.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_in_a_one_worker_pool_carries_the_trace_on() {
    handler_carries_the_trace_on(1, false).await;
}

async fn handler_carries_the_trace_on(workers: usize, batch: bool) {
    init_tracing();
    let broker = broker();
    let (pings, pongs_topic, group) =
        (unique_name("pings"), unique_name("pongs"), unique_name("g"));
    let model = model_with(&pings, &pongs_topic, workers);
    send_pings(&model, &broker).await;
    let out = Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let producer = out.producer().unwrap().clone();
    let consumer = Kontext::builder(model)
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(group.clone())))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |e: Ping, _: MessageContext| {
                let producer = producer.clone();
                async move {
                    let pong = Pong { n: e.n };
                    if batch {
                        producer
                            .produce_batch([&pong])
                            .await
                            .map_err(HandlerError::retry)?;
                    } else {
                        producer.produce(&pong).await.map_err(HandlerError::retry)?;
                    }
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    assert_carried(&pongs(&broker, &pongs_topic).await);
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    out.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_of_work_carries_the_trace_through_the_outbox() {
    init_tracing();
    let broker = broker();
    let db = kontext::testing::database().await.unwrap();
    let (pings, pongs_topic, group) =
        (unique_name("pings"), unique_name("pongs"), unique_name("g"));
    let model = model(&pings, &pongs_topic);
    send_pings(&model, &broker).await;
    let consumer = Kontext::builder(model)
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(group.clone())))
        .broker(broker.clone())
        .database(db)
        .consumers(|c| {
            c.transactional(|e: Ping, _: MessageContext, uow: UnitOfWork| async move {
                uow.publish(&Pong { n: e.n })
                    .await
                    .map_err(HandlerError::retry)?;
                Ok(())
            });
        })
        .start()
        .await
        .unwrap();
    assert_carried(&pongs(&broker, &pongs_topic).await);
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Outside a handler nothing is added; a call's own `traceparent` wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_a_handler_no_trace_is_added() {
    init_tracing();
    let broker = broker();
    let (pings, pongs_topic) = (unique_name("pings"), unique_name("pongs"));
    let model = model(&pings, &pongs_topic);
    send_pings(&model, &broker).await;
    let read = read_topic(&broker, &pings, 2, READ_TIMEOUT).await.unwrap();
    let traced: Vec<Option<&str>> = read.iter().map(|r| header(r, "traceparent")).collect();
    assert!(
        traced.contains(&Some(PARENT)) && traced.contains(&None),
        "{traced:?}"
    );
}
