//! Scenario 2, consume: a typed handler on a shared and a dedicated poll
//! service, and worker pools, against a raw `BaseConsumer` loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cpu_time::ProcessTime;
use kontext::prelude::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::FutureProducer;
use sea_orm::ConnectionTrait;

use crate::harness::*;

/// Raw consumer loop: decode, store offset after the work; until `n`.
/// The measured window of a consume run: from the first message handled to
/// the last, so group join, start-up and shutdown (which differ in kind
/// between the two sides, not per message) stay out of the per-message
/// figures. Both sides mark it at the same points.
#[derive(Default)]
pub(crate) struct Window {
    pub(crate) count: AtomicU64,
    pub(crate) first: std::sync::OnceLock<(Instant, ProcessTime)>,
    pub(crate) last: std::sync::OnceLock<(Instant, ProcessTime)>,
    /// How many were in when the window closed (more may be handled while
    /// the consumer stops).
    pub(crate) at_last: AtomicU64,
    /// Notified once the last message is in.
    pub(crate) done: tokio::sync::Notify,
}

impl Window {
    /// Counts one handled message; `true` once all `n` are in.
    pub(crate) fn handled(&self, n: u64) -> bool {
        let k = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if k == 1 {
            let _ = self.first.set((Instant::now(), ProcessTime::now()));
        }
        if k == n {
            let _ = self.last.set((Instant::now(), ProcessTime::now()));
            self.at_last.store(k, Ordering::Relaxed);
            self.done.notify_one();
        }
        k >= n
    }

    /// With `KONTEXT_BENCH_VERBOSE`: when the window opened and closed,
    /// counted from the consumer's creation.
    pub(crate) fn report_start(&self, begun: Instant) {
        if std::env::var_os("KONTEXT_BENCH_VERBOSE").is_none() {
            return;
        }
        if let (Some((first, _)), Some((last, _))) = (self.first.get(), self.last.get()) {
            eprintln!(
                "first message handled {:?} after start, last {:?}",
                *first - begun,
                *last - begun
            );
        }
    }

    pub(crate) fn sample(&self) -> Result<Sample, BoxError> {
        let (Some(first), Some(last)) = (self.first.get(), self.last.get()) else {
            return Err(format!(
                "consume read {} messages: records were lost",
                self.count.load(Ordering::Relaxed)
            )
            .into());
        };
        Ok(Sample {
            secs: (last.0 - first.0).as_secs_f64(),
            cpu_secs: last.1.duration_since(first.1).as_secs_f64(),
            // The first message opens the window.
            messages: self.at_last.load(Ordering::Relaxed) - 1,
        })
    }
}

/// Raw consumer loop: decode, store offset after the work; until `n`.
pub(crate) fn raw_consume(config: ClientConfig, topic: &str, n: u64) -> Result<Sample, BoxError> {
    raw_consume_with(config, topic, n, || {})
}

/// Raw consumer loop running `work` for each message.
pub(crate) fn raw_consume_with(
    config: ClientConfig,
    topic: &str,
    n: u64,
    work: impl Fn(),
) -> Result<Sample, BoxError> {
    let begun = Instant::now();
    let consumer: BaseConsumer = config.create()?;
    consumer.subscribe(&[topic])?;
    let window = Window::default();
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let e: OrderPlaced = serde_json::from_slice(m.payload().unwrap_or_default())?;
                std::hint::black_box(&e);
                work();
                consumer.store_offset_from_message(&m)?;
                if window.handled(n) {
                    break;
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    window.report_start(begun);
    window.sample()
}

pub(crate) async fn kontext_consume(
    b: &Bench,
    topic: &str,
    n: u64,
    dedicated: bool,
    workers: Option<usize>,
) -> Result<Sample, BoxError> {
    let group = unique_name("bench-g");
    let model = b.model_with(topic, 6, dedicated.then_some(group.as_str()), workers)?;
    consume_window(b, model, &group, n, || {}, |_| {}).await
}

/// Runs a kontext consumer of `model` in `group` whose `OrderPlaced`
/// handler does `work`, with whatever else `also` registers, until `n`
/// records are handled; the measured window.
async fn consume_window(
    b: &Bench,
    model: Model,
    group: &str,
    n: u64,
    work: impl Fn() + Copy + Send + Sync + 'static,
    also: impl FnOnce(&mut kontext::consumer::Consumers),
) -> Result<Sample, BoxError> {
    let window = Arc::new(Window::default());
    let w = Arc::clone(&window);
    let begun = Instant::now();
    let kontext = Kontext::builder(model)
        .settings(b.consumer_settings(group))
        .broker(b.broker.clone())
        .consumers(move |cs| {
            cs.handler(move |e: OrderPlaced, _ctx: MessageContext| {
                let w = Arc::clone(&w);
                async move {
                    std::hint::black_box(&e);
                    work();
                    w.handled(n);
                    Ok(())
                }
            });
            also(cs);
        })
        .start()
        .await?;
    // Woken by the last message, not a polling timer: a timer waking every
    // few ms during the window would be charged to kontext's side only.
    let _ = tokio::time::timeout(Duration::from_secs(300), window.done.notified()).await;
    kontext.shutdown(Duration::from_secs(10)).await?;
    window.report_start(begun);
    window.sample()
}

pub(crate) async fn scenario_consume(b: &Bench, n: u64, rounds: usize) -> Result<(), BoxError> {
    // One backlog, lz4-compressed so 6 partitions stay under the mock's
    // 5 MiB each; every run reads it with its own group.
    let topic = unique_name("bench-consume");
    b.create_topic(&topic, 6).await?;
    let producer: FutureProducer = b.lz4_producer()?;
    raw_produce(&producer, &topic, &events(n), order_key).await?;
    drop(producer);

    const SIDES: [&str; 5] = ["raw", "shared", "dedicated", "pool1", "pool4"];
    let wanted = |side: u8| wanted(SIDES[side as usize]);
    let mut samples: [Vec<Sample>; 5] = Default::default();
    for round in 0..rounds {
        let order: [u8; 5] = if round % 2 == 0 {
            [0, 1, 2, 3, 4]
        } else {
            [4, 3, 2, 1, 0]
        };
        for side in order.into_iter().filter(|s| wanted(*s)) {
            let s = match side {
                0 => {
                    let config = b.raw_consumer_config(&unique_name("bench-g"));
                    let t = topic.clone();
                    tokio::task::spawn_blocking(move || raw_consume(config, &t, n)).await??
                }
                1 => kontext_consume(b, &topic, n, false, None).await?,
                2 => kontext_consume(b, &topic, n, true, None).await?,
                3 => kontext_consume(b, &topic, n, false, Some(1)).await?,
                _ => kontext_consume(b, &topic, n, false, Some(4)).await?,
            };
            if std::env::var_os("KONTEXT_BENCH_VERBOSE").is_some() {
                eprintln!(
                    "consume {}: {:.0} msg/s, {:.2} µs CPU/msg",
                    SIDES[side as usize],
                    s.rate(),
                    s.cpu_us()
                );
            }
            samples[side as usize].push(s);
        }
    }
    let [raw, shared, dedicated, pool1, pool4] = &samples;
    report(&format!("consume {n}, shared poll service"), raw, shared);
    report(
        &format!("consume {n}, dedicated poll service"),
        raw,
        dedicated,
    );
    report(
        &format!("consume {n}, workers(1), no-op handler"),
        raw,
        pool1,
    );
    report(
        &format!("consume {n}, workers(4), no-op handler"),
        raw,
        pool4,
    );
    Ok(())
}

/// Handlers that wait on I/O (a 1 ms timer), 6 partitions, 1,000 keys:
/// what a worker pool of 1, 4, 16 and 64 delivers against its ideal
/// (`workers` / the handler's measured mean time), and a raw rdkafka loop
/// doing the same 1 ms one record at a time, in the same run.
pub(crate) async fn scenario_workers(b: &Bench, quick: bool) -> Result<(), BoxError> {
    let per_worker: u64 = if quick { 500 } else { 2_000 };
    let counts = [1usize, 4, 16, 64];
    let most = (per_worker * 64).min(120_000);
    let topic = unique_name("bench-workers");
    b.create_topic(&topic, 6).await?;
    let producer: FutureProducer = b.lz4_producer()?;
    let mut backlog = events(most);
    for e in &mut backlog {
        e.order_id = format!("ord-{:04}", e.id % 1_000);
    }
    raw_produce(&producer, &topic, &backlog, order_key).await?;
    drop(producer);

    // The raw side: one record at a time, the same 1 ms on the same kind of
    // timer (tokio's, whose 1 ms granularity makes it about 2 ms).
    let raw_n = per_worker;
    let config = b.raw_consumer_config(&unique_name("bench-g"));
    let t = topic.clone();
    let raw = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        raw_consume_with(config, &t, raw_n, || {
            rt.block_on(tokio::time::sleep(Duration::from_millis(1)))
        })
    })
    .await??;
    println!(
        "| I/O handler (1 ms), raw rdkafka loop, one at a time | {:.0} msg/s, {:.1} µs CPU/msg | |",
        raw.rate(),
        raw.cpu_us()
    );
    for workers in counts {
        let n = (per_worker * workers as u64).min(most);
        let group = unique_name("bench-g");
        let model = b.model_with(&topic, 6, None, Some(workers))?;
        let window = Arc::new(Window::default());
        let busy_ns = Arc::new(AtomicU64::new(0));
        let (w, busy) = (Arc::clone(&window), Arc::clone(&busy_ns));
        let kontext = Kontext::builder(model)
            .settings(b.consumer_settings(&group))
            .broker(b.broker.clone())
            .consumers(move |cs| {
                cs.handler(move |e: OrderPlaced, _ctx: MessageContext| {
                    let (w, busy) = (Arc::clone(&w), Arc::clone(&busy));
                    async move {
                        std::hint::black_box(&e);
                        let began = Instant::now();
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let took = u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        busy.fetch_add(took, Ordering::Relaxed);
                        w.handled(n);
                        Ok(())
                    }
                });
            })
            .start()
            .await?;
        let _ = tokio::time::timeout(Duration::from_secs(300), window.done.notified()).await;
        // The mean handler time up to here; what is still buffered is not
        // waited for (it is the next run's group that reads it again).
        let handled = window.count.load(Ordering::Relaxed).max(1);
        let busy_total = busy_ns.load(Ordering::Relaxed);
        kontext.shutdown(Duration::from_millis(200)).await?;
        let sample = window.sample()?;
        let mean = busy_total as f64 / handled as f64 / 1e9;
        let ideal = workers as f64 / mean;
        println!(
            "| I/O handler (1 ms), workers({workers}), {n} msgs | {:.0} msg/s of an ideal {:.0} ({} / {:.2} ms mean handler time; {:.0} at exactly 1 ms): ratio {:.2}, {:.1} µs CPU/msg | {:.1}x the raw loop |",
            sample.rate(),
            ideal,
            workers,
            mean * 1e3,
            workers as f64 * 1_000.0,
            sample.rate() / ideal,
            sample.cpu_us(),
            sample.rate() / raw.rate(),
        );
    }
    Ok(())
}

/// A transactional handler with the inbox, one business row per record, on
/// PostgreSQL: one unit of work at a time against a pool of 16; counts the
/// business rows to show no effect happened twice.
pub(crate) async fn scenario_workers_inbox(b: &Bench, n: u64) -> Result<(), BoxError> {
    let topic = unique_name("bench-uow");
    b.create_topic(&topic, 6).await?;
    // Through kontext's own producer framing (ce_id), which the inbox keys on.
    let model = b.model(&topic, 6, None)?;
    let writer = Kontext::builder(model)
        .settings(b.settings.clone().provision_topics(false))
        .broker(b.broker.clone())
        .producer()
        .start()
        .await?;
    writer.producer()?.produce_batch(&events(n)).await?;
    writer.shutdown(Duration::from_secs(10)).await?;
    let mut rates = Vec::new();
    for workers in [None, Some(16)] {
        let db = bench_database().await?;
        db.execute_unprepared("CREATE TABLE IF NOT EXISTS bench_effect (id BIGINT NOT NULL)")
            .await?;
        db.execute_unprepared("DELETE FROM bench_effect").await?;
        let group = unique_name("bench-g");
        let model = Model::builder()
            .topic::<OrderPlaced>(|t| {
                t.name(&topic)
                    .partitions(6)
                    .key_ref(|e| &e.order_id)
                    .consumer(move |c| {
                        let c = c.inbox(|i| i).max_buffered(2_000);
                        match workers {
                            Some(n) => c.workers(n),
                            None => c,
                        }
                    })
            })
            .build()?;
        let window = Arc::new(Window::default());
        let w = Arc::clone(&window);
        let kontext = Kontext::builder(model)
            .settings(b.consumer_settings(&group))
            .broker(b.broker.clone())
            .database(db.clone())
            .consumers(move |cs| {
                cs.transactional(
                    move |e: OrderPlaced, _ctx: MessageContext, uow: UnitOfWork| {
                        let w = Arc::clone(&w);
                        async move {
                            uow.execute(sea_orm::Statement::from_sql_and_values(
                                sea_orm::DbBackend::Postgres,
                                "INSERT INTO bench_effect (id) VALUES ($1)",
                                [i64::try_from(e.id).unwrap_or(i64::MAX).into()],
                            ))
                            .await?;
                            w.handled(n);
                            Ok(())
                        }
                    },
                );
            })
            .start()
            .await?;
        let _ = tokio::time::timeout(Duration::from_secs(300), window.done.notified()).await;
        kontext.shutdown(Duration::from_secs(10)).await?;
        let sample = window.sample()?;
        let row = db
            .query_one(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT COUNT(*) AS n, COUNT(DISTINCT id) AS d FROM bench_effect",
            ))
            .await?
            .ok_or("no count")?;
        let (rows, distinct): (i64, i64) = (row.try_get("", "n")?, row.try_get("", "d")?);
        if rows != distinct || u64::try_from(distinct)? < n {
            return Err(format!(
                "unit-of-work pool: {rows} business rows for {distinct} distinct messages of {n}"
            )
            .into());
        }
        rates.push(sample.rate());
        println!(
            "| units of work + inbox on PostgreSQL, {}, {n} msgs | {:.0} msg/s, {:.1} µs CPU/msg, {rows} business rows, 0 duplicate effects | {} |",
            workers.map_or("one at a time".to_owned(), |w| format!("workers({w})")),
            sample.rate(),
            sample.cpu_us(),
            match rates[..] {
                [one, pool] => format!("{:.1}x one at a time", pool / one),
                _ => String::new(),
            }
        );
    }
    Ok(())
}

/// A message of a topic nobody produces to: its lane sits idle beside the
/// busy one on the same shared poll service.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Quiet {
    pub(crate) n: u64,
}

/// The handlers' work in the backpressure scenario: 20 µs of CPU.
fn busy_work() {
    let started = Instant::now();
    while started.elapsed() < Duration::from_micros(20) {
        std::hint::spin_loop();
    }
}

/// A handler of 20 µs of CPU, slower than fetching, so the lane fills and
/// its partitions pause and resume (a buffer of 1,000): kontext's shared
/// poll service with a second, idle topic, against a raw loop doing the
/// same work. The idle lane keeps the poll thread polling rather than
/// waiting for room, so the paused lane resumes only when the poll thread
/// looks again.
pub(crate) async fn scenario_backpressure(
    b: &Bench,
    n: u64,
    rounds: usize,
) -> Result<(), BoxError> {
    let topic = unique_name("bench-backpressure");
    let quiet = unique_name("bench-quiet");
    b.create_topic(&topic, 6).await?;
    b.create_topic(&quiet, 1).await?;
    let producer: FutureProducer = b.lz4_producer()?;
    raw_produce(&producer, &topic, &events(n), order_key).await?;
    drop(producer);

    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            if side == 0 && wanted("raw") {
                let config = b.raw_consumer_config(&unique_name("bench-g"));
                let t = topic.clone();
                let s =
                    tokio::task::spawn_blocking(move || raw_consume_with(config, &t, n, busy_work))
                        .await??;
                raw.push(s);
            } else if side == 1 && wanted("shared") {
                ours.push(kontext_backpressured(b, &topic, &quiet, n).await?);
            }
        }
    }
    report(
        &format!("consume {n}, 20 µs handler, buffer 1000, beside an idle topic"),
        &raw,
        &ours,
    );
    Ok(())
}

async fn kontext_backpressured(
    b: &Bench,
    topic: &str,
    quiet: &str,
    n: u64,
) -> Result<Sample, BoxError> {
    let group = unique_name("bench-g");
    let (t, q) = (topic.to_owned(), quiet.to_owned());
    let model = Model::builder()
        .topic::<OrderPlaced>(move |m| {
            m.name(&t)
                .partitions(6)
                .key_ref(|e| &e.order_id)
                .consumer(|c| c.max_buffered(1_000))
        })
        .topic::<Quiet>(move |m| m.name(&q).partitions(1).key(|e| e.n))
        .build()?;
    consume_window(b, model, &group, n, busy_work, |cs| {
        cs.handler(|e: Quiet, _ctx: MessageContext| async move {
            std::hint::black_box(&e);
            Ok(())
        });
    })
    .await
}
