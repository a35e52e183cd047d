//! The harness: payloads, raw rdkafka produce (to fill backlogs, and as the
//! produce baseline), measuring a side (wall and process CPU time), the
//! report table, the broker (the mock in a child process, or a real one).

use std::future::Future;
use std::time::Instant;

use cpu_time::ProcessTime;
use kontext::prelude::*;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A topic, group or file name no earlier run used. The bench builds
/// kontext without its `testing` feature (whose fault hooks wrap every
/// handler), so it measures what a service ships.
pub(crate) fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}-{}-{n}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

/// `DATABASE_URL`'s database, or a new SQLite file when it is unset.
pub(crate) async fn bench_database() -> Result<sea_orm::DatabaseConnection, BoxError> {
    Ok(match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => kontext::db::connect(&url).await?,
        _ => {
            let path = std::env::temp_dir().join(format!("{}.db", unique_name("kontext-bench")));
            kontext::db::connect(&format!("sqlite://{}?mode=rwc", path.display())).await?
        }
    })
}

/// A ~200-byte JSON order event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OrderPlaced {
    pub(crate) id: u64,
    pub(crate) order_id: String,
    pub(crate) customer_id: String,
    pub(crate) amount_cents: u64,
    pub(crate) currency: String,
    pub(crate) items: Vec<String>,
    pub(crate) channel: String,
}

pub(crate) fn events(n: u64) -> Vec<OrderPlaced> {
    events_from(0, n)
}

pub(crate) fn events_from(first: u64, n: u64) -> Vec<OrderPlaced> {
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
pub(crate) struct Sample {
    pub(crate) secs: f64,
    pub(crate) cpu_secs: f64,
    pub(crate) messages: u64,
}

impl Sample {
    pub(crate) fn rate(&self) -> f64 {
        self.messages as f64 / self.secs
    }
    pub(crate) fn cpu_us(&self) -> f64 {
        self.cpu_secs * 1e6 / self.messages as f64
    }
}

pub(crate) async fn measure<F, Fut>(f: F) -> Result<Sample, BoxError>
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

pub(crate) fn stats(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    (values[0], values[n / 2], values[n - 1])
}

pub(crate) fn report(name: &str, raw: &[Sample], kontext: &[Sample]) {
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

pub(crate) struct Bench {
    pub(crate) broker: Broker,
    pub(crate) settings: KafkaSettings,
    /// The broker is librdkafka's mock cluster (in this process or a child).
    pub(crate) embedded: bool,
    /// The mock cluster's own process, when it runs in one (the default).
    pub(crate) mock: Option<MockProcess>,
}

/// librdkafka's mock cluster in a child process (this binary, run with
/// `--mock-broker`), so the process CPU time measured here is the clients'
/// alone: in-process, the mock's own work (which swings with its fetch
/// pacing) is charged to whichever side is running, and its stored records
/// count in the memory scenario's resident size. The mock answers no
/// CreateTopics request; topics are created by a line on the child's stdin.
pub(crate) struct MockProcess {
    pub(crate) child: std::process::Child,
    pub(crate) io: std::sync::Mutex<(
        std::process::ChildStdin,
        std::io::BufReader<std::process::ChildStdout>,
    )>,
}

impl MockProcess {
    /// Starts the child and returns it with its bootstrap servers.
    pub(crate) fn start() -> Result<(MockProcess, String), BoxError> {
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

    pub(crate) fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), BoxError> {
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
pub(crate) fn mock_broker_child() -> Result<(), BoxError> {
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
    pub(crate) fn model(
        &self,
        topic: &str,
        partitions: i32,
        dedicated: Option<&str>,
    ) -> Result<Model, BoxError> {
        self.model_with(topic, partitions, dedicated, None)
    }

    /// The model, its consumer with a worker pool of `workers` if given.
    /// The settings of a kontext consumer in `group` (the bench creates
    /// the topics itself).
    pub(crate) fn consumer_settings(&self, group: &str) -> KafkaSettings {
        self.settings
            .clone()
            .provision_topics(false)
            .consumer(|s| s.group_id = Some(group.to_owned()))
    }

    /// A raw producer that compresses with lz4, for backlogs: the mock
    /// keeps 5 MiB a partition.
    pub(crate) fn lz4_producer(&self) -> Result<rdkafka::producer::FutureProducer, BoxError> {
        Ok(self
            .settings
            .clone()
            .producer(|p| p.compression = kontext::config::Compression::Lz4)
            .producer_config(self.broker.bootstrap_servers())
            .create()?)
    }

    pub(crate) fn model_with(
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

    pub(crate) async fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), BoxError> {
        let model = self.model(topic, partitions, None)?;
        self.provision(&model).await
    }

    /// Creates the model's topics (through the mock's process when it has one).
    pub(crate) async fn provision(&self, model: &Model) -> Result<(), BoxError> {
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
    pub(crate) fn raw_consumer_config(&self, group: &str) -> ClientConfig {
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

/// Whether a side of a scenario runs: all do, unless `KONTEXT_BENCH_SIDES`
/// names some (`KONTEXT_BENCH_SIDES=raw,dedicated`, for profiling one side).
pub(crate) fn wanted(side: &str) -> bool {
    std::env::var("KONTEXT_BENCH_SIDES")
        .ok()
        .is_none_or(|s| s.split(',').any(|x| x == side))
}

pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

pub(crate) fn rss_kib() -> u64 {
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

pub(crate) fn order_key(e: &OrderPlaced, out: &mut String) {
    out.push_str(&e.order_id);
}

/// Raw rdkafka produce: serde_json encode, key, send, await every delivery.
pub(crate) async fn raw_produce<T: Serialize>(
    producer: &FutureProducer,
    topic: &str,
    events: &[T],
    key: impl Fn(&T, &mut String),
) -> Result<u64, BoxError> {
    raw_produce_with(producer, topic, events, key, Headers::None).await
}

/// Which headers the raw side writes.
#[derive(Clone, Copy)]
pub(crate) enum Headers {
    None,
    Lean,
    CloudEvents,
}

/// The same, and with `headers` the six CloudEvents headers kontext writes
/// (id, type, source, time, spec version, content type), built the obvious
/// way by hand: what a service without kontext would put on the wire.
pub(crate) async fn raw_produce_with<T: Serialize>(
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

/// The two headers of kontext's lean profile (id and type), by hand.
pub(crate) fn lean_headers() -> OwnedHeaders {
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
pub(crate) fn ce_headers() -> OwnedHeaders {
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
