//! Run with `cargo run -p kontext-samples --bin dedicated-demo`
//!
//! Seed 003's scenario: critical alerts on a dedicated connection with a
//! small buffer, bulk events on another dedicated connection with a large
//! buffer and a slow handler, regular events on the shared poll service.
//! It prints per-type throughput and produce-to-handler latency, showing
//! that the slow bulk handler holds back neither alerts nor regular events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use kontext::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct CriticalAlert {
    id: u64,
}

#[derive(Serialize, Deserialize)]
struct BulkEvent {
    id: u64,
    blob: String,
}

#[derive(Serialize, Deserialize)]
struct RegularEvent {
    id: u64,
}

fn model() -> kontext::Result<Model> {
    let mut m = ModelBuilder::new();
    m.topic::<CriticalAlert>(|t| {
        t.name("ops.alerts")
            .partitions(2)
            .key(|e| e.id)
            .consumer(|c| c.dedicated(|d| d.group("demo-alerts-dedicated").max_buffered(16)))
    });
    m.topic::<BulkEvent>(|t| {
        t.name("analytics.bulk")
            .partitions(6)
            .key(|e| e.id)
            .consumer(|c| {
                c.dedicated(|d| {
                    d.group("demo-bulk-dedicated")
                        .max_buffered(5_000)
                        .backpressure(Backpressure::Apply)
                })
            })
    });
    m.topic::<RegularEvent>(|t| {
        t.name("shop.events")
            .partitions(3)
            .key(|e| e.id)
            .consumer(|c| c)
    });
    Ok(m.build()?)
}

/// Per type: when each message was handled and how long after it was produced.
#[derive(Default)]
struct Stats {
    first: Option<Instant>,
    last: Option<Instant>,
    latencies_ms: Vec<f64>,
}

type Board = Arc<Mutex<BTreeMap<&'static str, Stats>>>;

fn record(board: &Board, kind: &'static str, ctx: &MessageContext) {
    let now = Instant::now();
    let latency = ctx
        .timestamp()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0);
    let mut b = board.lock().unwrap_or_else(|e| e.into_inner());
    let s = b.entry(kind).or_default();
    s.first.get_or_insert(now);
    s.last = Some(now);
    s.latencies_ms.push(latency);
}

const BULK: u64 = 20_000;
const REGULAR: u64 = 2_000;
const ALERTS: u64 = 200;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let board: Board = Arc::default();
    let (b1, b2, b3) = (board.clone(), board.clone(), board.clone());
    let kontext = Kontext::builder(model()?)
        .settings(KafkaSettings::from_env()?.client_id("dedicated-demo"))
        .producer()
        .consumers(move |c| {
            c.handler(move |_: CriticalAlert, ctx: MessageContext| {
                let b = b1.clone();
                async move {
                    record(&b, "CriticalAlert (dedicated, buffer 16)", &ctx);
                    Ok(())
                }
            })
            .handler(move |_: BulkEvent, ctx: MessageContext| {
                let b = b2.clone();
                async move {
                    // A slow handler: 0.5 ms per event, 2k events/s at most.
                    tokio::time::sleep(Duration::from_micros(500)).await;
                    record(&b, "BulkEvent (dedicated, buffer 5000, slow)", &ctx);
                    Ok(())
                }
            })
            .handler(move |_: RegularEvent, ctx: MessageContext| {
                let b = b3.clone();
                async move {
                    record(&b, "RegularEvent (shared)", &ctx);
                    Ok(())
                }
            });
        })
        .start()
        .await?;
    let producer = kontext.producer()?;

    // Let every poll service join its group first, so the latencies below
    // measure steady state rather than group joins.
    let joined = Instant::now();
    while kontext
        .registry()
        .services()
        .iter()
        .any(|s| s.assigned_partitions.is_empty())
        && joined.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The bulk backlog lands first; alerts and regular events trickle in after.
    let started = Instant::now();
    let bulk: Vec<BulkEvent> = (0..BULK)
        .map(|id| BulkEvent {
            id,
            blob: "x".repeat(100),
        })
        .collect();
    producer.produce_batch(&bulk).await?;
    for round in 0..10 {
        let regular: Vec<RegularEvent> = (0..REGULAR / 10)
            .map(|i| RegularEvent {
                id: round * 1000 + i,
            })
            .collect();
        let alerts: Vec<CriticalAlert> = (0..ALERTS / 10)
            .map(|i| CriticalAlert {
                id: round * 1000 + i,
            })
            .collect();
        producer.produce_batch(&regular).await?;
        producer.produce_batch(&alerts).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Wait until alerts and regular events are all handled, then look at bulk.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = {
            let b = board.lock().unwrap_or_else(|e| e.into_inner());
            let n = |prefix: &str| {
                b.iter()
                    .find(|(k, _)| k.starts_with(prefix))
                    .map_or(0, |(_, s)| s.latencies_ms.len() as u64)
            };
            n("CriticalAlert") == ALERTS && n("RegularEvent") == REGULAR
        };
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let bulk_status = kontext.registry().type_status::<BulkEvent>()?;

    println!("after {elapsed:.2?}:");
    println!(
        "{:<44} {:>8} {:>12} {:>10} {:>10}",
        "type", "handled", "msg/s", "p50 ms", "p99 ms"
    );
    {
        let b = board.lock().unwrap_or_else(|e| e.into_inner());
        for (kind, s) in b.iter() {
            let mut l = s.latencies_ms.clone();
            l.sort_by(f64::total_cmp);
            let pct = |p: f64| {
                l.get(((l.len() as f64 - 1.0) * p) as usize)
                    .copied()
                    .unwrap_or(0.0)
            };
            let span = match (s.first, s.last) {
                (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
                _ => f64::NAN,
            };
            println!(
                "{:<44} {:>8} {:>12.0} {:>10.1} {:>10.1}",
                kind,
                l.len(),
                l.len() as f64 / span,
                pct(0.5),
                pct(0.99)
            );
        }
    }
    println!(
        "bulk backlog still waiting: {} of {BULK} (buffer {}/{}, paused: {})",
        BULK - bulk_status.handled,
        bulk_status.buffered,
        bulk_status.capacity,
        bulk_status.paused
    );
    for s in kontext.registry().services() {
        println!(
            "poll service {:<36} group {:<24} {:?}",
            s.name, s.group_id, s.state
        );
    }
    // The bulk buffer cannot drain in 2 s: its handlers are cancelled and the
    // unfinished events, never committed, are delivered again on the next start.
    println!("shutting down (bulk events left in the buffer are redelivered on the next start)");
    kontext.shutdown(Duration::from_secs(2)).await?;
    Ok(())
}
