//! Run with `cargo run -p kontext-samples --bin orders-demo`
//!
//! The order events of an online shop (created, paid, shipped; keyed by order
//! id so each order's events stay in order) declared in a kontext model,
//! produced through kontext and read back with a plain rdkafka consumer.
//!
//! With no settings it runs on kontext's embedded broker. Point it at a real
//! cluster with `KONTEXT_BOOTSTRAP_SERVERS=host:9092`; any other setting can
//! come from `KONTEXT_*` variables too (see `kontext::config`).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kontext::headers;
use kontext::prelude::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Serialize, Deserialize)]
struct OrderCreated {
    order_id: Uuid,
    customer_id: Uuid,
    total_amount: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderPaid {
    order_id: Uuid,
    payment_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderShipped {
    order_id: Uuid,
    tracking_number: String,
}

/// The orders bounded context: one topic, three event types told apart by
/// their type header, all keyed by order id.
fn orders(m: &mut ModelBuilder) {
    m.topic::<OrderCreated>(|t| t.name("orders").partitions(6).key(|e| e.order_id));
    m.topic::<OrderPaid>(|t| t.name("orders").key(|e| e.order_id));
    m.topic::<OrderShipped>(|t| t.name("orders").key(|e| e.order_id));
}

const ORDERS: usize = 1_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kontext=info".into()),
        )
        .init();

    let model = Model::builder().configure(orders).build()?;
    let settings = KafkaSettings::from_env()?.client_id("orders-demo");
    let kontext = Kontext::builder(model)
        .settings(settings)
        .producer()
        .start()
        .await?;
    let topic = kontext
        .model()
        .topic_of::<OrderCreated>()
        .ok_or("model lost the orders topic")?
        .to_owned();
    let embedded = kontext.broker().as_embedded().is_some();
    println!(
        "broker: {} ({})",
        kontext.broker().bootstrap_servers(),
        if embedded { "embedded" } else { "external" }
    );

    // Produce: every order's events in order, each batch awaited as a whole.
    let started = Instant::now();
    let order_ids: Vec<Uuid> = (0..ORDERS).map(|_| Uuid::now_v7()).collect();
    let producer = kontext.producer()?;
    let created: Vec<OrderCreated> = order_ids
        .iter()
        .enumerate()
        .map(|(i, id)| OrderCreated {
            order_id: *id,
            customer_id: Uuid::now_v7(),
            total_amount: 10.0 + i as f64,
        })
        .collect();
    let paid: Vec<OrderPaid> = order_ids
        .iter()
        .map(|id| OrderPaid {
            order_id: *id,
            payment_id: format!("pay-{}", id.simple()),
        })
        .collect();
    let shipped: Vec<OrderShipped> = order_ids
        .iter()
        .map(|id| OrderShipped {
            order_id: *id,
            tracking_number: format!("TRK{}", &id.simple().to_string()[..10]),
        })
        .collect();
    let mut produced = producer.produce_batch(&created).await?.len();
    produced += producer.produce_batch(&paid).await?.len();
    produced += producer.produce_batch(&shipped).await?.len();
    let produce_elapsed = started.elapsed();

    // Read back with a plain rdkafka consumer group.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kontext.broker().bootstrap_servers())
        .set(
            "group.id",
            format!("orders-demo-{}", Uuid::now_v7().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[&topic])?;

    let mut per_partition: BTreeMap<i32, usize> = BTreeMap::new();
    let mut per_type: BTreeMap<String, usize> = BTreeMap::new();
    let mut stage: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut out_of_order = 0;
    let mut consumed = 0;
    let read_started = Instant::now();
    while consumed < produced {
        let Some(message) = next_message(&consumer, Duration::from_secs(30)).await? else {
            return Err(format!("only {consumed} of {produced} events arrived within 30 s").into());
        };
        consumed += 1;
        *per_partition.entry(message.partition()).or_default() += 1;
        let kind = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == headers::MESSAGE_TYPE))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| "<no type header>".into());
        let expected_stage = match kind.as_str() {
            "OrderCreated" => 0,
            "OrderPaid" => 1,
            _ => 2,
        };
        let key = message.key().unwrap_or_default().to_vec();
        let seen = stage.entry(key).or_insert(0);
        if *seen != expected_stage {
            out_of_order += 1;
        }
        *seen += 1;
        *per_type.entry(kind).or_default() += 1;
    }
    let read_elapsed = read_started.elapsed();

    println!("topic: {topic}");
    println!(
        "produced: {produced} events for {ORDERS} orders in {:.2?} ({:.0} msg/s)",
        produce_elapsed,
        produced as f64 / produce_elapsed.as_secs_f64()
    );
    println!("consumed: {consumed} in {read_elapsed:.2?}");
    println!("per partition: {per_partition:?}");
    println!("per type: {per_type:?}");
    println!("orders whose events arrived out of order: {out_of_order}");
    println!("total elapsed: {:.2?}", started.elapsed());

    drop(consumer);
    kontext.shutdown(Duration::from_secs(10)).await?;
    if out_of_order > 0 {
        return Err("per-key order was violated".into());
    }
    Ok(())
}

/// `StreamConsumer::recv` with a timeout; `None` when nothing arrived in time.
async fn next_message(
    consumer: &StreamConsumer,
    timeout: Duration,
) -> Result<Option<rdkafka::message::BorrowedMessage<'_>>, rdkafka::error::KafkaError> {
    match tokio::time::timeout(timeout, consumer.recv()).await {
        Ok(result) => result.map(Some),
        Err(_) => Ok(None),
    }
}
