//! Run with `cargo run --release -p kontext-bench` (`-- --quick` for a short run)
//!
//! kontext against a hand-written raw rdkafka equivalent, in the same
//! process, on the same broker, with the same payloads and client settings;
//! rounds alternate which side goes first so machine noise hits both. For
//! each side it reports throughput and process CPU time (user + system) per
//! message, min/median/max over the rounds, and the ratio kontext/raw.
//!
//! Embedded mock cluster by default, run in a child process so that the
//! CPU measured is the clients' (`--in-process-mock` keeps it in this one);
//! `KONTEXT_BOOTSTRAP_SERVERS=host:port` for a real broker. `DATABASE_URL` runs the outbox scenario on PostgreSQL
//! too. See BENCHMARKS.md for what each scenario measures.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cpu_time::ProcessTime;
use kontext::outbox::OutboxSettings;
use kontext::prelude::*;
use kontext::testing::unique_name;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use sea_orm::ConnectionTrait;
use serde::{Deserialize, Serialize};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A ~200-byte JSON order event.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderPlaced {
    id: u64,
    order_id: String,
    customer_id: String,
    amount_cents: u64,
    currency: String,
    items: Vec<String>,
    channel: String,
}

fn events(n: u64) -> Vec<OrderPlaced> {
    events_from(0, n)
}

fn events_from(first: u64, n: u64) -> Vec<OrderPlaced> {
    (first..first + n)
        .map(|id| OrderPlaced {
            id,
            order_id: format!("ord-{:08}", id % 5_000),
            customer_id: format!("cus-{:06}", id % 977),
            amount_cents: 1_000 + id % 90_000,
            currency: "EUR".into(),
            items: vec!["sku-12345".into(), "sku-67890".into(), "sku-24680".into()],
            channel: "web-checkout-eu-west".into(),
        })
        .collect()
}

/// One measured run of one side.
#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    cpu_secs: f64,
    messages: u64,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.secs
    }
    fn cpu_us(&self) -> f64 {
        self.cpu_secs * 1e6 / self.messages as f64
    }
}

async fn measure<F, Fut>(f: F) -> Result<Sample, BoxError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<u64, BoxError>>,
{
    let (wall, cpu) = (Instant::now(), ProcessTime::now());
    let messages = f().await?;
    Ok(Sample {
        secs: wall.elapsed().as_secs_f64(),
        cpu_secs: cpu.elapsed().as_secs_f64(),
        messages,
    })
}

fn stats(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    (values[0], values[n / 2], values[n - 1])
}

fn report(name: &str, raw: &[Sample], kontext: &[Sample]) {
    if raw.is_empty() || kontext.is_empty() {
        return;
    }
    let rate = |s: &[Sample]| stats(&mut s.iter().map(Sample::rate).collect::<Vec<_>>());
    let cpu = |s: &[Sample]| stats(&mut s.iter().map(Sample::cpu_us).collect::<Vec<_>>());
    let (r_rate, k_rate) = (rate(raw), rate(kontext));
    let (r_cpu, k_cpu) = (cpu(raw), cpu(kontext));
    println!(
        "| {name} | {:.0} ({:.0}-{:.0}) | {:.0} ({:.0}-{:.0}) | {:.2} | {:.2} ({:.2}-{:.2}) | {:.2} ({:.2}-{:.2}) | {:.2} |",
        r_rate.1,
        r_rate.0,
        r_rate.2,
        k_rate.1,
        k_rate.0,
        k_rate.2,
        k_rate.1 / r_rate.1,
        r_cpu.1,
        r_cpu.0,
        r_cpu.2,
        k_cpu.1,
        k_cpu.0,
        k_cpu.2,
        k_cpu.1 / r_cpu.1,
    );
}

struct Bench {
    broker: Broker,
    settings: KafkaSettings,
    /// The broker is librdkafka's mock cluster (in this process or a child).
    embedded: bool,
    /// The mock cluster's own process, when it runs in one (the default).
    mock: Option<MockProcess>,
}

/// librdkafka's mock cluster in a child process (this binary, run with
/// `--mock-broker`), so the process CPU time measured here is the clients'
/// alone: in-process, the mock's own work (which swings with its fetch
/// pacing) is charged to whichever side is running, and its stored records
/// count in the memory scenario's resident size. The mock answers no
/// CreateTopics request; topics are created by a line on the child's stdin.
struct MockProcess {
    child: std::process::Child,
    io: std::sync::Mutex<(
        std::process::ChildStdin,
        std::io::BufReader<std::process::ChildStdout>,
    )>,
}

impl MockProcess {
    /// Starts the child and returns it with its bootstrap servers.
    fn start() -> Result<(MockProcess, String), BoxError> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--mock-broker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("mock broker process: no pipes".into());
        };
        let mut stdout = std::io::BufReader::new(stdout);
        let mut servers = String::new();
        stdout.read_line(&mut servers)?;
        let servers = servers.trim().to_owned();
        if servers.is_empty() {
            return Err("the mock broker process did not start".into());
        }
        let mock = MockProcess {
            child,
            io: std::sync::Mutex::new((stdin, stdout)),
        };
        Ok((mock, servers))
    }

    fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), BoxError> {
        use std::io::{BufRead, Write};
        let mut io = self.io.lock().map_err(|_| "mock broker pipe poisoned")?;
        writeln!(io.0, "create {topic} {partitions}")?;
        io.0.flush()?;
        let mut answer = String::new();
        io.1.read_line(&mut answer)?;
        match answer.trim() {
            "ok" => Ok(()),
            other => Err(format!("mock broker: creating {topic}: {other}").into()),
        }
    }
}

impl Drop for MockProcess {
    fn drop(&mut self) {
        // Closing stdin ends the child's command loop; kill in case it hangs.
        if let Ok(mut io) = self.io.lock() {
            let _ = std::io::Write::flush(&mut io.0);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child side of [`MockProcess`]: starts the mock cluster, prints its
/// bootstrap servers, then creates topics as stdin asks until stdin closes.
fn mock_broker_child() -> Result<(), BoxError> {
    use std::io::{BufRead, Write};
    let broker = kontext::broker::EmbeddedBroker::start(1)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", broker.bootstrap_servers())?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        let answer = match parts.as_slice() {
            ["create", topic, partitions] => match partitions.parse::<i32>() {
                Ok(p) => match broker.create_topic(topic, p, 1) {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => format!("error: {e}"),
                },
                Err(e) => format!("error: partitions {partitions:?}: {e}"),
            },
            _ => format!("error: unknown command {line:?}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

impl Bench {
    fn model(
        &self,
        topic: &str,
        partitions: i32,
        dedicated: Option<&str>,
    ) -> Result<Model, BoxError> {
        self.model_with(topic, partitions, dedicated, None)
    }

    /// The model, its consumer with a worker pool of `workers` if given.
    fn model_with(
        &self,
        topic: &str,
        partitions: i32,
        dedicated: Option<&str>,
        workers: Option<usize>,
    ) -> Result<Model, BoxError> {
        let dedicated = dedicated.map(str::to_owned);
        Ok(Model::builder()
            .topic::<OrderPlaced>(move |t| {
                t.name(topic)
                    .partitions(partitions)
                    .key_ref(|e| &e.order_id)
                    .consumer(move |c| {
                        let c = match workers {
                            Some(n) => c.workers(n),
                            None => c,
                        };
                        match dedicated {
                            Some(g) => c.dedicated(|d| d.group(g).max_buffered(10_000)),
                            None => c.max_buffered(10_000),
                        }
                    })
            })
            .build()?)
    }

    async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), BoxError> {
        let model = self.model(topic, partitions, None)?;
        self.provision(&model).await
    }

    /// Creates the model's topics (through the mock's process when it has one).
    async fn provision(&self, model: &Model) -> Result<(), BoxError> {
        match &self.mock {
            Some(mock) => {
                for t in model.topics() {
                    mock.create_topic(t.name(), t.partitions())?;
                }
            }
            None => {
                kontext::broker::provision_topics(&self.broker, &self.settings, model).await?;
            }
        }
        Ok(())
    }

    /// The raw side's consumer settings: the same as kontext's poll service.
    fn raw_consumer_config(&self, group: &str) -> ClientConfig {
        let mut c = self.settings.client_config(self.broker.bootstrap_servers());
        if self.embedded {
            c.set("session.timeout.ms", "2000")
                .set("heartbeat.interval.ms", "500")
                .set("fetch.wait.max.ms", "10");
        }
        c.set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            .set("enable.partition.eof", "false");
        c
    }
}

fn order_key(e: &OrderPlaced, out: &mut String) {
    out.push_str(&e.order_id);
}

/// Raw rdkafka produce: serde_json encode, key, send, await every delivery.
async fn raw_produce<T: Serialize>(
    producer: &FutureProducer,
    topic: &str,
    events: &[T],
    key: impl Fn(&T, &mut String),
) -> Result<u64, BoxError> {
    raw_produce_with(producer, topic, events, key, Headers::None).await
}

/// Which headers the raw side writes.
#[derive(Clone, Copy)]
enum Headers {
    None,
    Lean,
    CloudEvents,
}

/// The same, and with `headers` the six CloudEvents headers kontext writes
/// (id, type, source, time, spec version, content type), built the obvious
/// way by hand: what a service without kontext would put on the wire.
async fn raw_produce_with<T: Serialize>(
    producer: &FutureProducer,
    topic: &str,
    events: &[T],
    key: impl Fn(&T, &mut String),
    headers: Headers,
) -> Result<u64, BoxError> {
    let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(events.len());
    let mut done = 0;
    // One reused key buffer: the raw side pays a copy, as kontext does.
    let mut key_buf = String::new();
    for e in events {
        let payload = serde_json::to_vec(e)?;
        key_buf.clear();
        key(e, &mut key_buf);
        let mut record = FutureRecord::to(topic)
            .key(key_buf.as_str())
            .payload(payload.as_slice());
        match headers {
            Headers::None => {}
            Headers::Lean => record = record.headers(lean_headers()),
            Headers::CloudEvents => record = record.headers(ce_headers()),
        }
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((err, back))
                    if err.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) =>
                {
                    record = back;
                    if let Some(f) = pending.get_mut(done) {
                        let _ = std::pin::Pin::new(f).await;
                        done += 1;
                    }
                }
                Err((err, _)) => return Err(err.into()),
            }
        }
    }
    // The first `done` were awaited while the queue was full.
    for f in pending.into_iter().skip(done) {
        f.await?.map_err(|(e, _)| e)?;
    }
    Ok(events.len() as u64)
}

/// Whether a side of a scenario runs: all do, unless `KONTEXT_BENCH_SIDES`
/// names some (`KONTEXT_BENCH_SIDES=raw,dedicated`, for profiling one side).
fn wanted(side: &str) -> bool {
    std::env::var("KONTEXT_BENCH_SIDES")
        .ok()
        .is_none_or(|s| s.split(',').any(|x| x == side))
}

/// The two headers of kontext's lean profile (id and type), by hand.
fn lean_headers() -> OwnedHeaders {
    let id = uuid::Uuid::now_v7().to_string();
    OwnedHeaders::new_with_capacity(2)
        .insert(Header {
            key: "ce_id",
            value: Some(id.as_str()),
        })
        .insert(Header {
            key: "ce_type",
            value: Some("order-placed"),
        })
}

/// The six CloudEvents headers kontext writes, built the obvious way by hand.
fn ce_headers() -> OwnedHeaders {
    let id = uuid::Uuid::now_v7().to_string();
    let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    [
        ("ce_specversion", "1.0"),
        ("ce_id", id.as_str()),
        ("ce_type", "order-placed"),
        ("ce_source", "kontext"),
        ("ce_time", time.as_str()),
        ("content-type", "application/json"),
    ]
    .into_iter()
    .fold(OwnedHeaders::new_with_capacity(6), |h, (key, v)| {
        h.insert(Header {
            key,
            value: Some(v),
        })
    })
}

/// Raw rdkafka, one call per message: what a service awaiting each send
/// writes. `FutureProducer::send` per message (it waits for queue room
/// itself), the same headers, every future joined: the like-for-like
/// baseline for kontext's one `produce` call per message.
async fn raw_produce_each(
    producer: &FutureProducer,
    topic: &str,
    events: &[OrderPlaced],
) -> Result<u64, BoxError> {
    let calls = events.iter().map(|e| async move {
        let payload = serde_json::to_vec(e)?;
        let record = FutureRecord::to(topic)
            .key(e.order_id.as_str())
            .payload(payload.as_slice())
            .headers(ce_headers());
        // The delivery (partition, offset) is what a caller gets back, as
        // kontext's `produce` returns its own.
        let delivery = producer
            .send(record, Timeout::Never)
            .await
            .map_err(|(e, _)| e)?;
        Ok::<_, BoxError>(delivery)
    });
    Ok(futures::future::try_join_all(calls).await?.len() as u64)
}

async fn scenario_produce(b: &Bench, n: u64, rounds: usize) -> Result<(), BoxError> {
    let events = Arc::new(events(n));
    let (mut raw, mut raw_h, mut raw_each, mut batch, mut single) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut raw_lean, mut lean) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // 32 partitions keep each under the mock's 5 MiB per partition.
        let (raw_topic, raw_h_topic, raw1_topic, k_topic, k1_topic) = (
            unique_name("bench-raw"),
            unique_name("bench-rawh"),
            unique_name("bench-raw1"),
            unique_name("bench-kx"),
            unique_name("bench-kx1"),
        );
        let (raw_l_topic, kl_topic) = (unique_name("bench-rawl"), unique_name("bench-kxl"));
        for t in [
            &raw_topic,
            &raw_h_topic,
            &raw1_topic,
            &k_topic,
            &k1_topic,
            &raw_l_topic,
            &kl_topic,
        ] {
            b.create_topic(t, 32).await?;
        }
        let producer: FutureProducer = b
            .settings
            .producer_config(b.broker.bootstrap_servers())
            .create()?;
        let kontext = Kontext::builder(b.model(&k_topic, 32, None)?)
            .settings(b.settings.clone().provision_topics(false))
            .broker(b.broker.clone())
            .producer()
            .start()
            .await?;
        let k = kontext.producer()?;
        // Its own topic for the one-call-per-message run.
        let kontext1 = Kontext::builder(b.model(&k1_topic, 32, None)?)
            .settings(b.settings.clone().provision_topics(false))
            .broker(b.broker.clone())
            .producer()
            .start()
            .await?;
        let k1 = kontext1.producer()?;
        // The same type with the lean header profile, on its own topic.
        let lean_model = Model::builder()
            .topic::<OrderPlaced>(|t| {
                t.name(&kl_topic)
                    .partitions(32)
                    .key_ref(|e| &e.order_id)
                    .header_profile(kontext::HeaderProfile::Lean)
            })
            .build()?;
        let kontext_l = Kontext::builder(lean_model)
            .settings(b.settings.clone().provision_topics(false))
            .broker(b.broker.clone())
            .producer()
            .start()
            .await?;
        let kl = kontext_l.producer()?;
        let order: [u8; 7] = if round % 2 == 0 {
            [0, 1, 2, 3, 4, 5, 6]
        } else {
            [6, 5, 4, 3, 2, 1, 0]
        };
        let names = [
            "raw",
            "raw-headers",
            "batch",
            "single",
            "raw-each",
            "raw-lean",
            "lean",
        ];
        for side in order.into_iter().filter(|s| wanted(names[*s as usize])) {
            match side {
                0 => raw.push(
                    measure(|| raw_produce(&producer, &raw_topic, &events, order_key)).await?,
                ),
                1 => raw_h.push(
                    measure(|| {
                        raw_produce_with(
                            &producer,
                            &raw_h_topic,
                            &events,
                            order_key,
                            Headers::CloudEvents,
                        )
                    })
                    .await?,
                ),
                5 => raw_lean.push(
                    measure(|| {
                        raw_produce_with(&producer, &raw_l_topic, &events, order_key, Headers::Lean)
                    })
                    .await?,
                ),
                6 => lean.push(
                    measure(|| async { Ok(kl.produce_batch(events.iter()).await?.len() as u64) })
                        .await?,
                ),
                2 => batch.push(
                    measure(|| async { Ok(k.produce_batch(events.iter()).await?.len() as u64) })
                        .await?,
                ),
                4 => raw_each
                    .push(measure(|| raw_produce_each(&producer, &raw1_topic, &events)).await?),
                _ => single.push(
                    measure(|| async {
                        let calls = events.iter().map(|e| k1.produce(e).into_future());
                        Ok(futures::future::try_join_all(calls).await?.len() as u64)
                    })
                    .await?,
                ),
            }
        }
        kontext.shutdown(Duration::from_secs(10)).await?;
        kontext1.shutdown(Duration::from_secs(10)).await?;
        kontext_l.shutdown(Duration::from_secs(10)).await?;
    }
    report(
        &format!("produce {n} (batch), raw with the same 6 headers"),
        &raw_h,
        &batch,
    );
    report(
        &format!("produce {n} (batch), raw without headers"),
        &raw,
        &batch,
    );
    report(
        &format!("produce {n} (one call per message), raw: one send per message, same headers"),
        &raw_each,
        &single,
    );
    report(
        &format!("produce {n} (batch), lean headers, raw with the same 2 headers"),
        &raw_lean,
        &lean,
    );
    report(
        &format!("produce {n} (batch), lean headers, raw without headers"),
        &raw,
        &lean,
    );

    Ok(())
}

/// Raw consumer loop: decode, store offset after the work; until `n`.
/// The measured window of a consume run: from the first message handled to
/// the last, so group join, start-up and shutdown (which differ in kind
/// between the two sides, not per message) stay out of the per-message
/// figures. Both sides mark it at the same points.
#[derive(Default)]
struct Window {
    count: AtomicU64,
    first: std::sync::OnceLock<(Instant, ProcessTime)>,
    last: std::sync::OnceLock<(Instant, ProcessTime)>,
    /// How many were in when the window closed (more may be handled while
    /// the consumer stops).
    at_last: AtomicU64,
    /// Notified once the last message is in.
    done: tokio::sync::Notify,
}

impl Window {
    /// Counts one handled message; `true` once all `n` are in.
    fn handled(&self, n: u64) -> bool {
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
    fn report_start(&self, begun: Instant) {
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

    fn sample(&self) -> Result<Sample, BoxError> {
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
fn raw_consume(config: ClientConfig, topic: &str, n: u64) -> Result<Sample, BoxError> {
    raw_consume_with(config, topic, n, || {})
}

/// Raw consumer loop running `work` for each message.
fn raw_consume_with(
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

async fn kontext_consume(
    b: &Bench,
    topic: &str,
    n: u64,
    dedicated: bool,
    workers: Option<usize>,
) -> Result<Sample, BoxError> {
    let group = unique_name("bench-g");
    let model = b.model_with(topic, 6, dedicated.then_some(group.as_str()), workers)?;
    let window = Arc::new(Window::default());
    let w = Arc::clone(&window);
    let begun = Instant::now();
    let kontext = Kontext::builder(model)
        .settings(
            b.settings
                .clone()
                .provision_topics(false)
                .consumer(|s| s.group_id = Some(group.clone())),
        )
        .broker(b.broker.clone())
        .consumers(move |cs| {
            cs.handler(move |e: OrderPlaced, _ctx: MessageContext| {
                let w = Arc::clone(&w);
                async move {
                    std::hint::black_box(&e);
                    w.handled(n);
                    Ok(())
                }
            });
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

async fn scenario_consume(b: &Bench, n: u64, rounds: usize) -> Result<(), BoxError> {
    // One backlog, lz4-compressed so 6 partitions stay under the mock's
    // 5 MiB each; every run reads it with its own group.
    let topic = unique_name("bench-consume");
    b.create_topic(&topic, 6).await?;
    let producer: FutureProducer = b
        .settings
        .clone()
        .producer(|p| p.compression = kontext::config::Compression::Lz4)
        .producer_config(b.broker.bootstrap_servers())
        .create()?;
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
async fn scenario_workers(b: &Bench, quick: bool) -> Result<(), BoxError> {
    let per_worker: u64 = if quick { 500 } else { 2_000 };
    let counts = [1usize, 4, 16, 64];
    let most = (per_worker * 64).min(120_000);
    let topic = unique_name("bench-workers");
    b.create_topic(&topic, 6).await?;
    let producer: FutureProducer = b
        .settings
        .clone()
        .producer(|p| p.compression = kontext::config::Compression::Lz4)
        .producer_config(b.broker.bootstrap_servers())
        .create()?;
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
            .settings(
                b.settings
                    .clone()
                    .provision_topics(false)
                    .consumer(|s| s.group_id = Some(group.clone())),
            )
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
async fn scenario_workers_inbox(b: &Bench, n: u64) -> Result<(), BoxError> {
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
        let db = kontext::testing::database().await?;
        db.execute_unprepared("CREATE TABLE bench_effect (id BIGINT NOT NULL)")
            .await?;
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
            .settings(
                b.settings
                    .clone()
                    .provision_topics(false)
                    .consumer(|s| s.group_id = Some(group.clone())),
            )
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

async fn scenario_outbox(
    b: &Bench,
    label: &str,
    url: Option<&str>,
    n: u64,
    writers: u64,
) -> Result<(), BoxError> {
    let db = match url {
        Some(u) => kontext::db::connect(u).await?,
        // Not `testing::database()`: that follows DATABASE_URL.
        None => {
            let path = std::env::temp_dir().join(format!("{}.db", unique_name("kontext-bench")));
            kontext::db::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?
        }
    };
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS bench_order (id BIGINT PRIMARY KEY, amount BIGINT NOT NULL)",
    )
    .await?;
    db.execute_unprepared("DELETE FROM bench_order").await?;
    let topic = unique_name("bench-outbox");
    b.create_topic(&topic, 32).await?;
    let kontext = Kontext::builder(b.model(&topic, 32, None)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .database(db.clone())
        .outbox_settings(OutboxSettings {
            poll_interval: Duration::from_millis(50),
            ..OutboxSettings::default()
        })
        .start()
        .await?;
    // The same business transactions without their message, then with it:
    // the outbox's cost is the ratio of the commit rates. First with no
    // relay running (the write path alone), then with the relay sending
    // while the writers commit (the deployment).
    let plain = measure(|| {
        business_transactions(
            kontext.outbox(),
            Arc::new(events_from(10 * n, n)),
            writers,
            false,
        )
    })
    .await?;
    let writer_only = Kontext::builder(b.model(&topic, 32, None)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .outbox_writer(db.clone())
        .start()
        .await?;
    let write_path = measure(|| {
        business_transactions(
            writer_only.outbox(),
            Arc::new(events_from(20 * n, n)),
            writers,
            true,
        )
    })
    .await?;
    writer_only.shutdown(Duration::from_secs(10)).await?;
    {
        let outbox = kontext.outbox()?;
        outbox.wake();
        while outbox.pending().await? > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let events = Arc::new(events(n));
    let with_outbox =
        measure(|| business_transactions(kontext.outbox(), events, writers, true)).await?;
    let to_delivery = measure(|| async {
        let outbox = kontext.outbox()?;
        while outbox.pending().await? > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(n)
    })
    .await?;
    kontext.shutdown(Duration::from_secs(10)).await?;
    println!(
        "| business transactions on {label}: {n} (1 row each), {writers} writers, no outbox | {:.0} tx/s | {:.1} µs CPU/tx |",
        plain.rate(),
        plain.cpu_us()
    );
    println!(
        "| the same with 1 outbox message each, no relay running (commit rate; ratio to no outbox {:.2}) | {:.0} tx/s | {:.1} µs CPU/tx |",
        write_path.rate() / plain.rate(),
        write_path.rate(),
        write_path.cpu_us()
    );
    println!(
        "| the same with 1 outbox message each, the relay sending meanwhile (commit rate; ratio to no outbox {:.2}) | {:.0} tx/s | {:.1} µs CPU/tx |",
        with_outbox.rate() / plain.rate(),
        with_outbox.rate(),
        with_outbox.cpu_us()
    );
    println!(
        "| outbox on {label}: those {n} messages, first commit to last acknowledged delivery | {:.0} msg/s | |",
        n as f64 / (with_outbox.secs + to_delivery.secs)
    );
    commit_latency(b, label, &db, &topic).await?;

    // The relay alone: a backlog committed while no relay ran, then drained
    // by a freshly started one (the case after an outage, and the relay's
    // capacity whatever the writers' commit rate).
    let backlog = n * 10;
    let writer = Kontext::builder(b.model(&topic, 32, None)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .database(db.clone())
        .outbox_settings(OutboxSettings {
            run_relay: false,
            ..OutboxSettings::default()
        })
        .start()
        .await?;
    let outbox = writer.outbox()?.clone();
    let more = events_from(n, backlog);
    for chunk in more.chunks(500) {
        let mut tx = outbox.begin().await?;
        for e in chunk {
            tx.publish(e).await?;
        }
        tx.commit().await?;
    }
    writer.shutdown(Duration::from_secs(10)).await?;
    let drained = measure(|| async {
        let relay = Kontext::builder(b.model(&topic, 32, None)?)
            .settings(b.settings.clone())
            .broker(b.broker.clone())
            .database(db.clone())
            .start()
            .await?;
        let outbox = relay.outbox()?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while outbox.pending().await? > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let left = outbox.pending().await?;
        relay.shutdown(Duration::from_secs(10)).await?;
        if left > 0 {
            return Err(format!("the relay left {left} messages").into());
        }
        Ok(backlog)
    })
    .await?;
    println!(
        "| outbox relay on {label}: a backlog of {backlog} committed messages, drained to acknowledged delivery | {:.0} msg/s | {:.1} µs CPU/msg |",
        drained.rate(),
        drained.cpu_us()
    );
    Ok(())
}

/// `writers` tasks commit one transaction per event: a business row, and
/// with `with_message` the event through the outbox.
async fn business_transactions(
    outbox: kontext::Result<&kontext::outbox::Outbox>,
    events: Arc<Vec<OrderPlaced>>,
    writers: u64,
    with_message: bool,
) -> Result<u64, BoxError> {
    let outbox = outbox?;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let outbox = outbox.clone();
        let events = Arc::clone(&events);
        tasks.push(tokio::spawn(async move {
            for e in events.iter().skip(w as usize).step_by(writers as usize) {
                let mut tx = outbox.begin().await?;
                let backend = tx.get_database_backend();
                let sql = if backend == sea_orm::DbBackend::Postgres {
                    "INSERT INTO bench_order (id, amount) VALUES ($1, $2)"
                } else {
                    "INSERT INTO bench_order (id, amount) VALUES (?, ?)"
                };
                tx.execute(sea_orm::Statement::from_sql_and_values(
                    backend,
                    sql,
                    [(e.id as i64).into(), (e.amount_cents as i64).into()],
                ))
                .await?;
                if with_message {
                    tx.publish(e).await?;
                }
                tx.commit().await?;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(events.len() as u64)
}

/// Commit-to-acknowledged latency, one transaction at a time: in immediate
/// mode with the relay idle (`commit()` returns once Kafka acknowledged),
/// and on PostgreSQL from a writer-only instance to a relay in another
/// instance woken by `LISTEN/NOTIFY` (until the relay deleted the row,
/// polled every millisecond).
async fn commit_latency(
    b: &Bench,
    label: &str,
    db: &sea_orm::DatabaseConnection,
    topic: &str,
) -> Result<(), BoxError> {
    use kontext::db::outbox_entity as row;
    use kontext::outbox::OutboxMode;
    use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
    let model = |mode: OutboxMode| {
        Model::builder()
            .topic::<OrderPlaced>(move |t| {
                t.name(topic)
                    .partitions(32)
                    .key_ref(|e| &e.order_id)
                    .producer(|p| p.outbox(mode))
            })
            .build()
    };
    let rounds = 300u64;
    let kontext = Kontext::builder(model(OutboxMode::ImmediateWithFallback)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .database(db.clone())
        .start()
        .await?;
    let outbox = kontext.outbox()?.clone();
    let mut lat = Vec::with_capacity(rounds as usize);
    let mut pending = 0;
    for e in events_from(20_000_000, rounds) {
        let begun = Instant::now();
        let mut tx = outbox.begin().await?;
        tx.publish(&e).await?;
        pending += tx.commit().await?.pending;
        lat.push(begun.elapsed().as_micros() as u64);
    }
    kontext.shutdown(Duration::from_secs(10)).await?;
    lat.sort_unstable();
    println!(
        "| outbox on {label}, immediate mode, relay idle: commit to acknowledged, {rounds} sequential transactions ({pending} left pending) | p50 {:.2} ms | p99 {:.2} ms |",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(());
    }
    let relay = Kontext::builder(model(OutboxMode::Background)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .database(db.clone())
        .outbox_settings(OutboxSettings {
            // Only a notification wakes it in time.
            poll_interval: Duration::from_secs(60),
            ..OutboxSettings::default()
        })
        .start()
        .await?;
    let writer = Kontext::builder(model(OutboxMode::Background)?)
        .settings(b.settings.clone())
        .broker(b.broker.clone())
        .outbox_writer(db.clone())
        .start()
        .await?;
    let outbox = writer.outbox()?.clone();
    let mut lat = Vec::with_capacity(rounds as usize);
    for e in events_from(30_000_000, rounds) {
        let begun = Instant::now();
        let mut tx = outbox.begin().await?;
        let id = tx.publish(&e).await?.to_string();
        tx.commit().await?;
        let deadline = begun + Duration::from_secs(30);
        while row::Entity::find()
            .filter(row::Column::MessageId.eq(id.as_str()))
            .count(db)
            .await?
            > 0
        {
            if Instant::now() > deadline {
                return Err("the relay was not woken".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(begun.elapsed().as_micros() as u64);
    }
    writer.shutdown(Duration::from_secs(10)).await?;
    relay.shutdown(Duration::from_secs(10)).await?;
    lat.sort_unstable();
    println!(
        "| outbox on {label}, writer-only instance to another instance's relay (LISTEN/NOTIFY): commit to acknowledged and deleted, {rounds} sequential transactions | p50 {:.2} ms | p99 {:.2} ms |",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct Fast {
    n: u64,
    /// When it was produced, microseconds since the Unix epoch.
    sent_us: u64,
}

#[derive(Serialize, Deserialize)]
struct Slow {
    n: u64,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Produce-to-handler latency of a fast type: alone, next to a saturated
/// slow type on the same shared poll service, and with the slow type on a
/// dedicated poll service.
async fn scenario_isolation(b: &Bench, fast_count: u64) -> Result<(), BoxError> {
    let mut alone_p = (0.0, 0.0);
    for mode in ["alone", "shared", "dedicated"] {
        let (fast_topic, slow_topic) = (unique_name("bench-fast"), unique_name("bench-slow"));
        let slow_group = unique_name("bench-slow-g");
        let dedicated = mode == "dedicated";
        let model = Model::builder()
            .topic::<Fast>(|t| t.name(&fast_topic).partitions(3).key(|e| e.n))
            .topic::<Slow>(|t| {
                t.name(&slow_topic)
                    .partitions(3)
                    .key(|e| e.n)
                    .consumer(move |c| {
                        if dedicated {
                            c.dedicated(|d| d.group(slow_group).max_buffered(100))
                        } else {
                            c.max_buffered(100)
                        }
                    })
            })
            .build()?;
        b.provision(&model).await?;
        let latencies = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
        let l = Arc::clone(&latencies);
        let with_slow = mode != "alone";
        let kontext = Kontext::builder(model)
            .settings(
                b.settings
                    .clone()
                    .consumer(|c| c.group_id = Some(unique_name("bench-iso"))),
            )
            .broker(b.broker.clone())
            .producer()
            .consumers(move |c| {
                c.handler(move |e: Fast, _: MessageContext| {
                    let l = Arc::clone(&l);
                    async move {
                        let took = now_us().saturating_sub(e.sent_us);
                        if let Ok(mut v) = l.lock() {
                            v.push(took);
                        }
                        Ok(())
                    }
                });
                if with_slow {
                    c.handler(|_: Slow, _: MessageContext| async {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        Ok(())
                    });
                }
            })
            .start()
            .await?;
        let p = kontext.producer()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        // Measure from a settled state: partitions assigned, slow type saturated.
        while kontext
            .registry()
            .service_of::<Fast>()?
            .assigned_partitions
            .is_empty()
        {
            if Instant::now() > deadline {
                return Err("the fast type's partitions were never assigned".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if with_slow {
            let slow: Vec<Slow> = (0..20_000).map(|n| Slow { n }).collect();
            p.produce_batch(&slow).await?;
            while {
                let st = kontext.registry().type_status::<Slow>()?;
                !st.paused && st.buffered < st.capacity
            } {
                if Instant::now() > deadline {
                    return Err("the slow type never filled its buffer".into());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        for n in 0..fast_count {
            p.produce(&Fast {
                n,
                sent_us: now_us(),
            })
            .await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        while latencies.lock().map_or(0, |v| v.len() as u64) < fast_count {
            if Instant::now() > deadline {
                return Err("fast messages went missing".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        kontext.shutdown(Duration::from_secs(5)).await?;
        let mut v = latencies.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort_unstable();
        let (p50, p99) = (percentile(&v, 0.50), percentile(&v, 0.99));
        if mode == "alone" {
            alone_p = (p50, p99);
        }
        let label = match mode {
            "alone" => "fast type alone",
            "shared" => "fast type, saturated slow type on the same shared poll service",
            _ => "fast type, saturated slow type on a dedicated poll service",
        };
        println!(
            "| isolation: {label} ({fast_count} messages) | p50 {p50:.2} ms, p99 {p99:.2} ms | p50 {:.2}x, p99 {:.2}x of alone |",
            p50 / alone_p.0,
            p99 / alone_p.1
        );
    }
    Ok(())
}

/// Peak resident memory while a slow handler works through a backlog much
/// larger than its buffer.
async fn scenario_memory(b: &Bench, n: u64) -> Result<(), BoxError> {
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
    let producer: FutureProducer = b
        .settings
        .clone()
        .producer(|p| p.compression = kontext::config::Compression::Lz4)
        .producer_config(b.broker.bootstrap_servers())
        .create()?;
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
        .settings(
            b.settings
                .clone()
                .provision_topics(false)
                .consumer(|c| c.group_id = Some(unique_name("bench-mem"))),
        )
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

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // `RUST_LOG=kontext=info` shows what the runtime does; silent by default.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--mock-broker") {
        return mock_broker_child();
    }
    // `--prometheus`: kontext's metrics go to a Prometheus recorder (no
    // HTTP listener; rendered once at the end), as a service exporting them
    // would run; without it, the facade's no-op recorder.
    let prometheus = args
        .iter()
        .any(|a| a == "--prometheus")
        .then(|| metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder());
    let prometheus = prometheus.transpose()?;
    let quick = args.iter().any(|a| a == "--quick");
    // `--only produce,consume` runs a subset (for profiling one path).
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_owned).collect());
    let run = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|s| s == name));
    let settings = KafkaSettings::from_env()?;
    let in_process = args.iter().any(|a| a == "--in-process-mock");
    let b = if settings.bootstrap_servers.is_none() && !in_process {
        let (mock, servers) = MockProcess::start()?;
        // What kontext sets itself on its embedded broker (see
        // `Broker::consumer_defaults`), for both sides alike; kontext does
        // not provision, the mock cannot (topics are made by the child).
        let settings = settings.provision_topics(false).consumer(|c| {
            c.session_timeout_ms = Some(2000);
            c.heartbeat_interval_ms = Some(500);
            c.librdkafka.set("fetch.wait.max.ms", "10");
        });
        Bench {
            broker: Broker::external(servers),
            settings,
            embedded: true,
            mock: Some(mock),
        }
    } else {
        let broker = Broker::from_settings(&settings)?;
        Bench {
            embedded: broker.as_embedded().is_some(),
            broker,
            settings,
            mock: None,
        }
    };
    let (n, rounds) = if quick { (20_000, 3) } else { (200_000, 3) };
    println!(
        "kontext-bench: {} broker, {n} messages, {rounds} rounds ({} for consume), {} cores",
        match (&b.mock, b.embedded) {
            (Some(_), _) => "embedded (mock, in its own process)",
            (None, true) => "embedded (mock, in this process)",
            (None, false) => "external",
        },
        rounds + 2,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    println!();
    println!(
        "| scenario | raw msg/s median (min-max) | kontext msg/s median (min-max) | throughput ratio | raw µs CPU/msg | kontext µs CPU/msg | CPU ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    if run("produce") {
        scenario_produce(&b, n, rounds).await?;
    }
    if run("consume") {
        // Consume swings most from run to run (see BENCHMARKS.md): more rounds.
        scenario_consume(&b, n, rounds + 2).await?;
    }
    println!();
    println!("| scenario | result | |");
    println!("|---|---|---|");
    let tx = if quick { 500 } else { 3_000 };
    if run("outbox") {
        scenario_outbox(&b, "SQLite", None, tx, 1).await?;
        if let Ok(url) = std::env::var("DATABASE_URL") {
            scenario_outbox(&b, "PostgreSQL", Some(&url), tx * 3, 32).await?;
        }
    }
    if run("workers") {
        scenario_workers(&b, quick).await?;
        if std::env::var("DATABASE_URL").is_ok_and(|u| u.starts_with("postgres")) {
            scenario_workers_inbox(&b, if quick { 1_000 } else { 3_000 }).await?;
        }
    }
    if run("isolation") {
        scenario_isolation(&b, if quick { 300 } else { 1_000 }).await?;
    }
    if run("memory") {
        scenario_memory(&b, if quick { 100_000 } else { 1_000_000 }).await?;
    }
    if let Some(handle) = prometheus {
        // What the recorder holds after the run: its series and their size.
        let text = handle.render();
        let series = text.lines().filter(|l| l.starts_with("kontext_")).count();
        println!(
            "\nPrometheus recorder: {series} kontext series, {} bytes rendered",
            text.len()
        );
    }
    Ok(())
}
