//! Scenario, exactly once: consume-transform-produce in Kafka transactions
//! (a kontext `exactly_once` handler) against the same flow at least once,
//! written by hand on raw rdkafka the way it is usually done: produce
//! without waiting, and every commit interval flush the producer and then
//! commit the consumer's offsets. Same input records, same output records
//! and headers; both measured from the first input handled until every
//! output is durable and every input offset committed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cpu_time::ProcessTime;
use kontext::prelude::*;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::harness::*;

/// What the flow makes of each order.
#[derive(Serialize, Deserialize)]
pub(crate) struct OrderPriced {
    pub(crate) order_id: String,
    pub(crate) customer_id: String,
    pub(crate) total_cents: u64,
}

impl OrderPriced {
    fn of(e: &OrderPlaced) -> OrderPriced {
        OrderPriced {
            order_id: e.order_id.clone(),
            customer_id: e.customer_id.clone(),
            total_cents: e.amount_cents * 119 / 100,
        }
    }
}

const PARTITIONS: i32 = 3;

pub(crate) async fn scenario_exactly_once(
    b: &Bench,
    n: u64,
    rounds: usize,
) -> Result<(), BoxError> {
    for interval_ms in [100u64, 1_000] {
        let (mut raw, mut kontext) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let input = unique_name("bench-eo-in");
            let (raw_out, k_out) = (unique_name("bench-eo-raw"), unique_name("bench-eo-k"));
            let model = model(&input, &k_out)?;
            b.provision(&model).await?;
            b.create_topic(&raw_out, PARTITIONS).await?;
            raw_produce(&b.lz4_producer()?, &input, &events(n), order_key).await?;
            let interval = Duration::from_millis(interval_ms);
            for side in if round % 2 == 0 {
                ["raw", "kontext"]
            } else {
                ["kontext", "raw"]
            } {
                if side == "raw" && wanted("raw") {
                    let (b2, input, out) = (b.raw_config(), input.clone(), raw_out.clone());
                    let sample = tokio::task::spawn_blocking(move || {
                        raw_at_least_once(b2, &input, &out, n, interval)
                    })
                    .await??;
                    raw.push(sample);
                } else if side == "kontext" && wanted("kontext") {
                    kontext.push(kontext_exactly_once(b, &model, n, interval).await?);
                }
            }
        }
        report(
            &format!(
                "exactly once: consume-transform-produce, commit every {interval_ms} ms (raw: the same at least once)"
            ),
            &raw,
            &kontext,
        );
    }
    Ok(())
}

fn model(input: &str, output: &str) -> Result<Model, BoxError> {
    Ok(Model::builder()
        .topic::<OrderPlaced>(|t| {
            t.name(input)
                .partitions(PARTITIONS)
                .key_ref(|e| &e.order_id)
                .consumer(|c| c.max_buffered(10_000))
        })
        .topic::<OrderPriced>(|t| {
            t.name(output)
                .partitions(PARTITIONS)
                .key_ref(|e| &e.order_id)
        })
        .build()?)
}

/// What the raw loop is built from: the same client settings as kontext's.
pub(crate) struct RawConfig {
    consumer: rdkafka::ClientConfig,
    producer: rdkafka::ClientConfig,
}

impl Bench {
    fn raw_config(&self) -> RawConfig {
        let mut consumer = self.raw_consumer_config(&unique_name("bench-eo-raw-g"));
        consumer.set("enable.auto.commit", "false");
        RawConfig {
            consumer,
            producer: self
                .settings
                .producer_config(self.broker.bootstrap_servers()),
        }
    }
}

/// At least once by hand: decode, transform, encode, send without waiting;
/// every `interval`, flush, then commit the offsets after what was sent.
fn raw_at_least_once(
    config: RawConfig,
    input: &str,
    output: &str,
    n: u64,
    interval: Duration,
) -> Result<Sample, BoxError> {
    let consumer: BaseConsumer = config.consumer.create()?;
    let producer: BaseProducer = config.producer.create()?;
    consumer.subscribe(&[input])?;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut done = 0u64;
    let mut first: Option<(Instant, ProcessTime)> = None;
    let mut last_commit = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if Instant::now() > deadline {
            return Err(format!("raw: {done} of {n} in 300 s").into());
        }
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            first.get_or_insert_with(|| (Instant::now(), ProcessTime::now()));
            let e: OrderPlaced = serde_json::from_slice(m.payload().unwrap_or_default())?;
            let payload = serde_json::to_vec(&OrderPriced::of(&e))?;
            let mut record = BaseRecord::to(output)
                .key(e.order_id.as_str())
                .payload(payload.as_slice())
                .headers(ce_headers());
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((err, back))
                        if err.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) =>
                    {
                        record = back;
                        producer.poll(Duration::from_millis(1));
                    }
                    Err((err, _)) => return Err(err.into()),
                }
            }
            producer.poll(Duration::ZERO);
            next.insert(m.partition(), m.offset() + 1);
            done += 1;
        }
        if done > 0 && (last_commit.elapsed() >= interval || done >= n) {
            producer.flush(Duration::from_secs(30))?;
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &next {
                tpl.add_partition_offset(input, *p, Offset::Offset(*o))?;
            }
            consumer.commit(&tpl, CommitMode::Sync)?;
            last_commit = Instant::now();
            if done >= n {
                break;
            }
        }
    }
    let (wall, cpu) = first.ok_or("raw: nothing consumed")?;
    Ok(Sample {
        secs: wall.elapsed().as_secs_f64(),
        cpu_secs: cpu.elapsed().as_secs_f64(),
        messages: n,
    })
}

/// kontext: an exactly-once handler sends each output in the lane's
/// transaction; done when every input's transaction committed.
async fn kontext_exactly_once(
    b: &Bench,
    model: &Model,
    n: u64,
    interval: Duration,
) -> Result<Sample, BoxError> {
    let first: Arc<std::sync::OnceLock<(Instant, ProcessTime)>> = Arc::default();
    let runs = Arc::new(AtomicU64::new(0));
    let (f, r) = (Arc::clone(&first), Arc::clone(&runs));
    let kontext = Kontext::builder(model.clone())
        .settings(
            b.consumer_settings(&unique_name("bench-eo-k-g"))
                .consumer(|c| {
                    // The interval bounds each transaction, as it bounds the
                    // raw loop's commits (and the lane's buffer, 10,000).
                    c.transaction_interval_ms = Some(interval.as_millis() as u64);
                    c.transaction_max_records = Some(1_000_000);
                }),
        )
        .broker(b.broker.clone())
        .transactional_producer(unique_name("bench-eo"))
        .consumers(move |c| {
            c.exactly_once(move |e: OrderPlaced, _: MessageContext, tx: Transaction| {
                let (f, r) = (Arc::clone(&f), Arc::clone(&r));
                async move {
                    let _ = f.set((Instant::now(), ProcessTime::now()));
                    r.fetch_add(1, Ordering::Relaxed);
                    tx.send(&OrderPriced::of(&e)).await?;
                    Ok(())
                }
            });
        })
        .start()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let end = loop {
        let handled = kontext.registry().type_status::<OrderPlaced>()?.handled;
        if handled >= n {
            break (Instant::now(), ProcessTime::now());
        }
        if Instant::now() > deadline {
            return Err(format!("kontext: {handled} of {n} committed in 300 s").into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    kontext.shutdown(Duration::from_secs(10)).await?;
    let (wall, cpu) = *first.get().ok_or("kontext: nothing consumed")?;
    let extra = runs.load(Ordering::Relaxed).saturating_sub(n);
    if extra > 0 && std::env::var_os("KONTEXT_BENCH_VERBOSE").is_some() {
        eprintln!("kontext: {extra} handler runs beyond one per input (aborted transactions)");
    }
    Ok(Sample {
        secs: (end.0 - wall).as_secs_f64(),
        cpu_secs: end.1.duration_since(cpu).as_secs_f64(),
        messages: n,
    })
}
