//! Units of work across a database that dies and comes back: a PostgreSQL
//! server of the test's own (initdb in a temporary directory, on a free
//! port), SIGKILLed by PID mid-stream and started again on its data. Needs
//! PostgreSQL's server binaries (`/usr/lib/postgresql/*/bin`); skipped
//! without them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kontext::prelude::*;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shipment {
    key: u32,
    seq: u32,
}

/// A PostgreSQL server of this test's own; stopped and deleted when dropped.
struct OwnPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Run the server tools as `postgres` (they refuse root).
    as_postgres: bool,
}

impl OwnPostgres {
    /// `None` where PostgreSQL's server binaries are not installed.
    fn start() -> Option<OwnPostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()?;
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let dir = std::env::temp_dir().join(unique_name("kontext-pg"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = OwnPostgres {
            bin,
            dir,
            port,
            as_postgres,
        };
        if as_postgres {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&pg.dir);
            checked(chown);
        }
        let data = pg.data();
        pg.tool(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        pg.start_server();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.join("data").to_str().unwrap().to_owned()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server on its data and waits until it accepts connections.
    fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        self.tool(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        );
    }

    /// SIGKILL to the postmaster and every process it started, by PID, as a
    /// crash would leave it; returns once they are all gone.
    fn kill(&self) {
        let pidfile = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).unwrap();
        let postmaster = pidfile.lines().next().unwrap().trim().to_owned();
        let children = Command::new("pgrep")
            .args(["-P", &postmaster])
            .output()
            .unwrap();
        let mut pids = vec![postmaster];
        pids.extend(
            String::from_utf8(children.stdout)
                .unwrap()
                .split_whitespace()
                .map(str::to_owned),
        );
        let mut args = vec!["-KILL".to_owned()];
        args.extend(pids.iter().cloned());
        let _ = Command::new("kill").args(&args).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while pids.iter().any(|p| {
            Command::new("kill")
                .args(["-0", p])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        }) {
            assert!(
                Instant::now() < deadline,
                "postgres processes outlived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// PostgreSQL's tool `name` with `args`, as `postgres` when needed.
    fn command(&self, name: &str, args: &[&str]) -> Command {
        let path = self.bin.join(name);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        command.args(args);
        command
    }

    fn tool(&self, name: &str, args: &[&str]) {
        checked(self.command(name, args));
    }
}

/// Runs `command`, failing the test with its output if it fails.
fn checked(mut command: Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl", &["-D", &data, "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server of this test's own and a pool on it whose acquire gives up
/// after a second (with sqlx's default of 30 s, each attempt during an
/// outage would wait that long for a connection); `None` without
/// PostgreSQL's server binaries.
async fn own_postgres() -> Option<(std::sync::Arc<OwnPostgres>, DatabaseConnection)> {
    let Some(pg) = tokio::task::spawn_blocking(OwnPostgres::start)
        .await
        .unwrap()
    else {
        eprintln!("skipped: no PostgreSQL server binaries under /usr/lib/postgresql");
        return None;
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect(&pg.url())
        .await
        .unwrap();
    let db = sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(pool);
    Some((std::sync::Arc::new(pg), db))
}

/// Kills the server; returns once every process of it is gone.
async fn kill(pg: &std::sync::Arc<OwnPostgres>) {
    let pg = pg.clone();
    tokio::task::spawn_blocking(move || pg.kill())
        .await
        .unwrap();
}

/// Starts the server again on its data; returns once it accepts
/// connections.
async fn restart(pg: &std::sync::Arc<OwnPostgres>) {
    let pg = pg.clone();
    tokio::task::spawn_blocking(move || pg.start_server())
        .await
        .unwrap();
}

/// The database dies while units of work run (consumer with the inbox, the
/// default retry policy of three attempts within a third of a second) and
/// is back only after many attempts failed. An outage is not the message's
/// fault: the attempts that could not reach the database are retried until
/// it is back, none is dead-lettered, and each record has its effect once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_of_work_wait_out_a_database_restart_and_dead_letter_nothing() {
    wait_out_a_database_restart(None).await;
}

/// The same with a pool of eight workers, whose retries are parked with
/// their key held (the attempt that could not reach the database is not
/// counted there either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_pool_of_units_of_work_waits_out_a_database_restart() {
    wait_out_a_database_restart(Some(8)).await;
}

async fn wait_out_a_database_restart(workers: Option<usize>) {
    init_tracing();
    let Some((pg, db)) = own_postgres().await else {
        return;
    };
    db.execute_unprepared("CREATE TABLE effect (seq INTEGER NOT NULL)")
        .await
        .unwrap();
    let broker = broker();
    let (topic, group) = (unique_name("dbout"), unique_name("g"));
    let model = Model::builder()
        .topic::<Shipment>(|t| {
            t.name(&topic)
                .partitions(4)
                .key(|e| e.key)
                .consumer(move |c| {
                    let c = c.max_buffered(100).inbox(|i| i);
                    match workers {
                        Some(n) => c.workers(n),
                        None => c,
                    }
                })
        })
        .build()
        .unwrap();
    let producer = Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let records = 3_000u32;
    let all: Vec<Shipment> = (0..records)
        .map(|seq| Shipment { key: seq % 50, seq })
        .collect();
    producer
        .producer()
        .unwrap()
        .produce_batch(&all)
        .await
        .unwrap();

    let consumer = Kontext::builder(model)
        .settings(KafkaSettings::new().consumer(|c| {
            c.group_id = Some(group.clone());
            // An outage outlasts it below: waiting for the database is no stall.
            c.stall_limit_ms = Some(2_000);
        }))
        .broker(broker.clone())
        .database(db.clone())
        .consumers(|c| {
            c.transactional(
                |e: Shipment, _: MessageContext, uow: UnitOfWork| async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    uow.execute(Statement::from_sql_and_values(
                        sea_orm::DbBackend::Postgres,
                        "INSERT INTO effect (seq) VALUES ($1)",
                        [(e.seq as i32).into()],
                    ))
                    .await?;
                    Ok(())
                },
            );
        })
        .start()
        .await
        .unwrap();
    let status = || consumer.registry().type_status::<Shipment>().unwrap();
    wait_until("500 records handled", async || {
        let s = status();
        ready(s.handled >= 500, || format!("{s:?}"))
    })
    .await;

    kill(&pg).await;
    let retried_at_kill = status().retried;
    // Twice the attempts the policy allows one record (the old code
    // dead-lettered by then).
    wait_until("attempts failing while the database is away", async || {
        let s = status();
        ready(
            s.retried >= retried_at_kill + 6 || s.dead_lettered > 0,
            || format!("{s:?}"),
        )
    })
    .await;
    // Past the stall limit the consumer once said not live, and an
    // orchestrator restarted it in the middle of the outage: it is not
    // ready, with the reason, and live.
    wait_until(
        "the outage to outlast the stall limit, the consumer live but not ready",
        async || {
            let h = consumer.health();
            assert!(h.live, "{h:?}");
            let s = consumer.registry().service_of::<Shipment>().unwrap();
            let waited = s.database_down_for.as_ref().map(|(d, _)| *d);
            ready(
                !h.ready
                    && h.reasons
                        .iter()
                        .any(|r| r.contains("cannot reach its database"))
                    && waited.is_some_and(|d| d > Duration::from_secs(3)),
                || format!("{h:?}, waiting for the database for {waited:?}"),
            )
        },
    )
    .await;
    restart(&pg).await;
    wait_until("every record handled or dead-lettered", async || {
        let s = status();
        ready(
            s.handled + s.duplicates + s.dead_lettered >= u64::from(records),
            || format!("{s:?}"),
        )
    })
    .await;
    wait_until("the consumer ready again", async || {
        let h = consumer.health();
        ready(h.ready && h.live, || format!("{h:?}"))
    })
    .await;
    let s = status();
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    producer.shutdown(Duration::from_secs(10)).await.unwrap();
    figure(
        if workers.is_some() {
            "a_worker_pool_of_units_of_work_waits_out_a_database_restart"
        } else {
            "units_of_work_wait_out_a_database_restart_and_dead_letter_nothing"
        },
        format_args!(
            "{} attempts failed and were retried, {} dead-lettered, {} duplicates acknowledged",
            s.retried, s.dead_lettered, s.duplicates
        ),
    );
    assert_eq!(s.dead_lettered, 0, "records dead-lettered for an outage");
    assert_eq!(
        (
            count(&db, "SELECT COUNT(*) AS n FROM effect").await,
            count(&db, "SELECT COUNT(DISTINCT seq) AS n FROM effect").await
        ),
        (i64::from(records), i64::from(records)),
        "each record's effect once"
    );
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Note {
    key: u32,
    seq: u32,
}

/// The outbox relay across a database that dies mid-drain and stays away
/// past the relay's lease (its health says so): once the database is back
/// the relay drains the rest. Every row is on the topic, each key's rows
/// first sent in commit order, and a row is sent again only if it was in
/// a batch in flight when the database died (its deletion failed): at
/// most four batches, as a relay on PostgreSQL works on four shards at
/// once (README, "The duplicate window").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_rides_out_a_database_restart_within_its_duplicate_window() {
    use kontext::outbox::{OutboxMode, OutboxSettings};
    init_tracing();
    let Some((pg, db)) = own_postgres().await else {
        return;
    };
    let broker = broker();
    let topic = unique_name("dbout.note");
    let model = Model::builder()
        .topic::<Note>(|t| {
            t.name(&topic)
                .partitions(4)
                .key(|n| n.key)
                .producer(|p| p.outbox(OutboxMode::Background))
        })
        .build()
        .unwrap();
    let (rows, keys, batch) = (20_000u32, 20u32, 50u64);
    let writer = Kontext::builder(model.clone())
        .outbox_writer(db.clone())
        .start()
        .await
        .unwrap();
    let outbox = writer.outbox().unwrap();
    for first in (0..rows).step_by(100) {
        let mut tx = outbox.begin().await.unwrap();
        for n in first..first + 100 {
            tx.publish(&Note {
                key: n % keys,
                seq: n / keys,
            })
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }

    let relay = Kontext::builder(model)
        .broker(broker.clone())
        .database(db.clone())
        .outbox_settings(OutboxSettings {
            batch_size: batch,
            ..patient_outbox(Duration::from_secs(4))
        })
        .start()
        .await
        .unwrap();
    let pending = async || relay.outbox().unwrap().pending().await.unwrap();
    wait_until("the relay at work", async || {
        let left = pending().await;
        ready(left < u64::from(rows) * 3 / 4, || format!("{left} pending"))
    })
    .await;
    kill(&pg).await;
    wait_until("the relay to be not ready", async || {
        let h = relay.health();
        ready(
            !h.ready && h.reasons.iter().any(|r| r.contains("relay")),
            || format!("{h:?}"),
        )
    })
    .await;
    restart(&pg).await;
    wait_until("the outbox to drain", async || {
        let left = pending().await;
        ready(left == 0, || format!("{left} pending"))
    })
    .await;
    assert!(relay.outbox().unwrap().failed().await.unwrap().is_empty());
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    writer.shutdown(Duration::from_secs(10)).await.unwrap();

    // Everything there is: reads until the time is up.
    let records = read_topic(&broker, &topic, 2 * rows as usize, Duration::from_secs(10))
        .await
        .unwrap();
    let mut per_key: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    for r in &records {
        let n: Note = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        per_key.entry(n.key).or_default().push(n.seq);
    }
    let again = records.len() - rows as usize;
    figure(
        "the_relay_rides_out_a_database_restart_within_its_duplicate_window",
        format_args!(
            "{} records for {rows} rows: {again} sent again",
            records.len()
        ),
    );
    for key in 0..keys {
        let seqs = per_key.remove(&key).unwrap_or_default();
        let mut first_sent = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for s in seqs {
            if seen.insert(s) {
                first_sent.push(s);
            }
        }
        assert_eq!(
            first_sent,
            (0..rows / keys).collect::<Vec<_>>(),
            "key {key}: every row, first sent in commit order"
        );
    }
    assert!(
        again <= 4 * batch as usize,
        "{again} rows sent again, more than four batches in flight ({batch} rows each)"
    );
}
