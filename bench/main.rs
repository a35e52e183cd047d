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

mod consume;
mod exactly_once;
mod harness;
mod isolation;
mod memory;
mod outbox;
mod produce;

use kontext::prelude::*;

use consume::{scenario_backpressure, scenario_consume, scenario_workers, scenario_workers_inbox};
use exactly_once::scenario_exactly_once;
use harness::*;
use isolation::scenario_isolation;
use memory::scenario_memory;
use outbox::scenario_outbox;
use produce::scenario_produce;

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
        // In process on purpose, PostgreSQL or not.
        let mut settings = settings;
        settings.embedded_broker.get_or_insert(true);
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
    if run("backpressure") {
        scenario_backpressure(&b, n / 2, rounds).await?;
    }
    if run("exactly-once") {
        scenario_exactly_once(&b, n / 2, rounds).await?;
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
            scenario_workers_inbox(&b, if quick { 1_000 } else { 30_000 }).await?;
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
