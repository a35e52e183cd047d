//! Run with `cargo run -p kontext-samples --bin orders-demo`
//!
//! The order events of an online shop (created, paid, shipped; keyed by order
//! id so each order's events stay in order) declared in a kontext model,
//! produced through kontext and consumed by typed handlers on kontext's
//! shared poll service, which check that each order's events arrive in order.
//!
//! As seed 000 configures its consumer, the handlers run on a worker pool
//! that follows the lag (`workers_by_lag(10, 100, 25)`); each waits 1 ms,
//! like a call to another service. Seed 000 distributes to any free worker;
//! here the distribution is by key, so that each order's events still
//! arrive in order while different orders run side by side.
//!
//! With no settings it runs on kontext's embedded broker. Point it at a real
//! cluster with `KONTEXT_BOOTSTRAP_SERVERS=host:9092`; any other setting can
//! come from `KONTEXT_*` variables too (see `kontext::config`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kontext::prelude::*;
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
    m.topic::<OrderCreated>(|t| {
        t.name("orders")
            .partitions(6)
            .key(|e| e.order_id)
            // Types sharing a topic share its pool: declared once.
            .consumer(|c| c.max_buffered(500).workers_by_lag(10, 100, 25))
    });
    m.topic::<OrderPaid>(|t| t.name("orders").key(|e| e.order_id).consumer(|c| c));
    m.topic::<OrderShipped>(|t| t.name("orders").key(|e| e.order_id).consumer(|c| c));
}

/// What the handlers saw: per partition, per type, and each order's stage.
#[derive(Default)]
struct Tally {
    per_partition: BTreeMap<i32, usize>,
    per_type: BTreeMap<&'static str, usize>,
    stage: HashMap<Uuid, usize>,
    out_of_order: usize,
    total: usize,
}

impl Tally {
    fn record(&mut self, kind: &'static str, stage: usize, order: Uuid, ctx: &MessageContext) {
        *self.per_partition.entry(ctx.partition()).or_default() += 1;
        *self.per_type.entry(kind).or_default() += 1;
        let seen = self.stage.entry(order).or_insert(0);
        if *seen != stage {
            self.out_of_order += 1;
        }
        *seen += 1;
        self.total += 1;
    }
}

/// One handler per type, as a struct holding its dependencies.
struct Track {
    tally: Arc<Mutex<Tally>>,
}

impl Handler<OrderCreated> for Track {
    async fn handle(&self, e: OrderCreated, ctx: MessageContext) -> Result<(), HandlerError> {
        simulated_io().await;
        lock(&self.tally).record("OrderCreated", 0, e.order_id, &ctx);
        Ok(())
    }
}

impl Handler<OrderPaid> for Track {
    async fn handle(&self, e: OrderPaid, ctx: MessageContext) -> Result<(), HandlerError> {
        simulated_io().await;
        lock(&self.tally).record("OrderPaid", 1, e.order_id, &ctx);
        Ok(())
    }
}

impl Handler<OrderShipped> for Track {
    async fn handle(&self, e: OrderShipped, ctx: MessageContext) -> Result<(), HandlerError> {
        simulated_io().await;
        lock(&self.tally).record("OrderShipped", 2, e.order_id, &ctx);
        Ok(())
    }
}

/// A call to another service (inventory, payments): 1 ms of waiting.
async fn simulated_io() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn lock(t: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

const ORDERS: usize = 5_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kontext=info".into()),
        )
        .init();

    // The application picks the metrics exporter, before kontext starts:
    // Prometheus' text format here, printed at the end (a service would
    // serve `handle.render()` on `/metrics`).
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;

    let model = Model::builder().configure(orders).build()?;
    let settings = KafkaSettings::from_env()?.client_id("orders-demo");
    let tally = Arc::new(Mutex::new(Tally::default()));
    let track = || Track {
        tally: Arc::clone(&tally),
    };
    let (t1, t2, t3) = (track(), track(), track());
    let kontext = Kontext::builder(model)
        .settings(settings)
        .producer()
        .consumers(|c| {
            c.handler::<OrderCreated>(t1)
                .handler::<OrderPaid>(t2)
                .handler::<OrderShipped>(t3);
        })
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

    // The handlers run on kontext's shared poll service; wait for them.
    let read_started = Instant::now();
    let mut peak_workers = 0;
    while lock(&tally).total < produced {
        if let Ok(t) = kontext.registry().type_status::<OrderCreated>() {
            peak_workers = peak_workers.max(t.workers);
        }
        if read_started.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "only {} of {produced} events handled within 60 s",
                lock(&tally).total
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let read_elapsed = read_started.elapsed();
    let services = kontext.registry().services();
    kontext.shutdown(Duration::from_secs(10)).await?;
    let tally = lock(&tally);

    println!("topic: {topic}");
    println!(
        "produced: {produced} events for {ORDERS} orders in {:.2?} ({:.0} msg/s)",
        produce_elapsed,
        produced as f64 / produce_elapsed.as_secs_f64()
    );
    println!(
        "handled: {} (last one {read_elapsed:.2?} after the produce finished)",
        tally.total
    );
    println!(
        "poll services: {:?}",
        services.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    println!("worker pool: 10 to 100 by lag, peak {peak_workers}");
    println!("per partition: {:?}", tally.per_partition);
    println!("per type: {:?}", tally.per_type);
    println!(
        "orders whose events arrived out of order: {}",
        tally.out_of_order
    );
    println!("total elapsed: {:.2?}", started.elapsed());
    println!("metrics (Prometheus text format, counters and gauges):");
    for line in metrics.render().lines() {
        let histogram = line.contains("_seconds");
        if line.starts_with("kontext_") && !histogram {
            println!("  {line}");
        }
    }
    if tally.out_of_order > 0 {
        return Err("per-key order was violated".into());
    }
    Ok(())
}
