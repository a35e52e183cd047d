//! Scenario 5, memory: resident size while consuming a large backlog.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kontext::prelude::*;
use rdkafka::producer::FutureProducer;
use serde::{Deserialize, Serialize};

use crate::harness::*;

/// Peak resident memory while a slow handler works through a backlog much
/// larger than its buffer.
pub(crate) async fn scenario_memory(b: &Bench, n: u64) -> Result<(), BoxError> {
    #[derive(Serialize, Deserialize)]
    struct Tick {
        n: u64,
    }
    let topic = unique_name("bench-memory");
    let model = Model::builder()
        .topic::<Tick>(|t| {
            t.name(&topic)
                .partitions(12)
                .key(|e| e.n % 1000)
                .consumer(|c| c.max_buffered(1_000))
        })
        .build()?;
    b.provision(&model).await?;
    let producer: FutureProducer = b.lz4_producer()?;
    let ticks: Vec<Tick> = (0..n).map(|n| Tick { n }).collect();
    // In chunks, so the pending deliveries stay small.
    for chunk in ticks.chunks(100_000) {
        raw_produce(&producer, &topic, chunk, |t, k| {
            use std::fmt::Write;
            let _ = write!(k, "{}", t.n % 1000);
        })
        .await?;
    }
    drop(producer);
    let before = rss_kib();
    let handled = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&handled);
    let kontext = Kontext::builder(model)
        .settings(b.consumer_settings(&unique_name("bench-mem")))
        .broker(b.broker.clone())
        .consumers(move |c| {
            c.handler(move |_: Tick, _: MessageContext| {
                let h = Arc::clone(&h);
                async move {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    h.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            });
        })
        .start()
        .await?;
    let mut peak = before;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        peak = peak.max(rss_kib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = kontext.registry().type_status::<Tick>()?;
    kontext.shutdown(Duration::from_secs(2)).await?;
    println!(
        "| memory: backlog {n} small messages, buffer 1000, slow handler, 15 s | RSS before consuming {} MiB, peak while consuming {} MiB (+{} MiB) | handled {}, buffered {}/{} |",
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024,
        handled.load(Ordering::Relaxed),
        status.buffered,
        status.capacity
    );
    Ok(())
}
