//! Fleet-wide commands across processes: a pause sent from one instance
//! stops the type in every consumer process, one started meanwhile starts
//! paused, and a resume restarts them all, losing nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use kontext::admin::{FleetReport, FleetSettings, Outcome, SeekTo, Target};
use kontext::prelude::*;
use kontext::testing::unique_name;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Note {
    id: u32,
}

const CHILD_BOOTSTRAP: &str = "KONTEXT_TEST_FLEET_BOOTSTRAP";
const CHILD_JOBS: &str = "KONTEXT_TEST_FLEET_JOBS";
const CHILD_NOTES: &str = "KONTEXT_TEST_FLEET_NOTES";
const CHILD_GROUP: &str = "KONTEXT_TEST_FLEET_GROUP";
const CHILD_CONTROL: &str = "KONTEXT_TEST_FLEET_CONTROL";
const CHILD_NAME: &str = "KONTEXT_TEST_FLEET_NAME";
const CHILD_LOG: &str = "KONTEXT_TEST_FLEET_LOG";
const SECRET: &str = "fleet-test-secret";
const PARTITIONS: i32 = 4;

/// Notes in a group of their own (named after their topic): the sticky
/// assignor balances each group's totals, so with one group per topic
/// every child owns some jobs (in one group of both it could hand one child
/// all the jobs and the other all the notes).
fn model(jobs: &str, notes: &str) -> Model {
    Model::builder()
        .topic::<Job>(|t| t.name(jobs).partitions(PARTITIONS).key(|j| j.id))
        .topic::<Note>(|t| {
            t.name(notes)
                .partitions(PARTITIONS)
                .key(|n| n.id)
                .consumer(|c| c.group(notes))
        })
        .build()
        .unwrap()
}

fn fleet(control: &str, name: &str) -> FleetSettings {
    FleetSettings::new()
        .topic(control)
        .secret(SECRET)
        .instance(name)
        // Members count as alive for three of these: 3 s, wide enough for
        // a loaded machine's scheduling.
        .heartbeat(Duration::from_secs(1))
}

/// A member of the group that logs `job <id>` or `note <id>` per record
/// handled, and says `ready` on stdout once started.
#[tokio::test]
#[ignore = "run by fleet_commands_reach_every_process as its child"]
async fn fleet_child_process() {
    let env = |k: &str| std::env::var(k).expect("started by its parent test");
    let log = std::sync::Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env(CHILD_LOG))
            .unwrap(),
    ));
    let (jobs_log, notes_log) = (log.clone(), log);
    let group = env(CHILD_GROUP);
    let kontext = Kontext::builder(model(&env(CHILD_JOBS), &env(CHILD_NOTES)))
        .broker(Broker::external(env(CHILD_BOOTSTRAP)))
        .settings(
            KafkaSettings::new()
                .provision_topics(false)
                .consumer(move |c| {
                    c.group_id = Some(group.clone());
                    c.session_timeout_ms = Some(6_000);
                    c.heartbeat_interval_ms = Some(1_000);
                }),
        )
        .fleet(fleet(&env(CHILD_CONTROL), &env(CHILD_NAME)))
        .consumers(move |c| {
            c.handler(move |j: Job, _ctx: MessageContext| {
                let log = jobs_log.clone();
                async move {
                    let line = format!("job {}\n", j.id);
                    log.lock().unwrap().write_all(line.as_bytes()).unwrap();
                    Ok(())
                }
            });
            c.handler(move |n: Note, _ctx: MessageContext| {
                let log = notes_log.clone();
                async move {
                    let line = format!("note {}\n", n.id);
                    log.lock().unwrap().write_all(line.as_bytes()).unwrap();
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    println!("ready");
    std::io::stdout().flush().unwrap();
    kontext
        .run_until(kontext::shutdown_signal(), Duration::from_secs(20))
        .await
        .unwrap();
}

struct Child {
    name: String,
    log: PathBuf,
    process: std::process::Child,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

struct Names {
    jobs: String,
    notes: String,
    group: String,
    control: String,
}

/// Starts a child and waits for its `ready`.
fn spawn(broker: &Broker, names: &Names, name: &str, dir: &Path) -> Child {
    let log = dir.join(format!("{name}.log"));
    let mut process = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fleet_child_process",
            "--ignored",
            "--quiet",
            "--nocapture",
        ])
        .env(CHILD_BOOTSTRAP, broker.bootstrap_servers())
        .env(CHILD_JOBS, &names.jobs)
        .env(CHILD_NOTES, &names.notes)
        .env(CHILD_GROUP, &names.group)
        .env(CHILD_CONTROL, &names.control)
        .env(CHILD_NAME, name)
        .env(CHILD_LOG, &log)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = process.stdout.take().unwrap();
    let child = Child {
        name: name.to_owned(),
        log,
        process,
    };
    // Read on a thread of its own, so a child that hangs fails the test
    // at the deadline instead of blocking it.
    let (said, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ready = std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("ready"));
        let _ = said.send(ready);
    });
    let ready = heard.recv_timeout(READ_TIMEOUT);
    assert_eq!(ready, Ok(true), "child {} never said ready", child.name);
    child
}

/// What each child logged: `(kind, id)` in handling order.
fn logged(children: &[&Child]) -> BTreeMap<String, Vec<(String, u32)>> {
    children
        .iter()
        .map(|c| {
            let lines = std::fs::read_to_string(&c.log).unwrap_or_default();
            let entries = lines
                .lines()
                .filter_map(|l| {
                    let (kind, id) = l.split_once(' ')?;
                    Some((kind.to_owned(), id.parse().ok()?))
                })
                .collect();
            (c.name.clone(), entries)
        })
        .collect()
}

fn ids(children: &[&Child], kind: &str) -> Vec<u32> {
    let mut all: Vec<u32> = logged(children)
        .into_values()
        .flatten()
        .filter(|(k, _)| k == kind)
        .map(|(_, id)| id)
        .collect();
    all.sort_unstable();
    all
}

/// Every instance named answered, each lane of theirs applied it.
fn all_applied(report: &FleetReport, names: &[&str]) -> Result<(), String> {
    for name in names {
        let Some(reports) = report.instances.get(*name) else {
            return Err(format!("no answer from {name}: {report:?}"));
        };
        if reports.is_empty()
            || !reports
                .iter()
                .all(|r| matches!(r.outcome, Outcome::Applied { .. }))
        {
            return Err(format!("{name} answered {reports:?}"));
        }
    }
    Ok(())
}

#[tokio::test]
async fn fleet_commands_reach_every_process() {
    let names = Names {
        jobs: unique_name("fleet-jobs"),
        notes: unique_name("fleet-notes"),
        group: unique_name("fleet"),
        control: unique_name("fleet-control"),
    };
    let dir = tempfile::tempdir().unwrap();
    // The issuer: in the fleet, producing, consuming nothing.
    let k = Kontext::builder(model(&names.jobs, &names.notes))
        .broker(broker())
        .producer()
        .fleet(fleet(&names.control, "issuer"))
        .start()
        .await
        .unwrap();
    let a = spawn(k.broker(), &names, "a", dir.path());
    let b = spawn(k.broker(), &names, "b", dir.path());
    let p = k.producer().unwrap();
    for id in 1..=20 {
        p.produce(&Job { id }).await.unwrap();
    }
    // Until each child owns some of the jobs' partitions (the group
    // settles after the second joins).
    let mut next_job = 21;
    wait_until("both children handling jobs", async || {
        let each = logged(&[&a, &b])
            .values()
            .all(|l| l.iter().any(|(k, _)| k == "job"));
        if !each {
            for id in next_job..next_job + 10 {
                p.produce(&Job { id }).await.unwrap();
            }
            next_job += 10;
        }
        let seen = ids(&[&a, &b], "job");
        let all = seen.len() >= usize::try_from(next_job - 1).unwrap();
        ready(each && all, || format!("{:?}", logged(&[&a, &b])))
    })
    .await;
    let before = next_job - 1;

    // Paused across the fleet: both children answer, each applied.
    let job = || {
        Target::topic(names.jobs.as_str())
            .group(names.group.as_str())
            .by("test")
    };
    wait_until("the issuer hearing both children", async || {
        let members = k.fleet_members().unwrap();
        ready(members == ["a", "b", "issuer"], || format!("{members:?}"))
    })
    .await;
    // One call reaches every instance.
    let paused = k.fleet_pause(job()).await.unwrap();
    all_applied(&paused, &["a", "b"]).unwrap();
    assert!(paused.silent.is_empty(), "{paused:?}");
    assert!(paused.instances.contains_key("issuer"), "{paused:?}");

    // Jobs wait; notes flow in both.
    for id in before + 1..=before + 20 {
        p.produce(&Job { id }).await.unwrap();
    }
    for id in 1..=40 {
        p.produce(&Note { id }).await.unwrap();
    }
    wait_until("the notes", async || {
        let n = ids(&[&a, &b], "note").len();
        ready(n >= 40, || format!("{n} notes"))
    })
    .await;
    assert_eq!(ids(&[&a, &b], "job"), (1..=before).collect::<Vec<_>>());

    // A third process starts while the pause stands: it starts paused.
    let c = spawn(k.broker(), &names, "c", dir.path());
    let mut next_note = 41;
    wait_until("the third child handling notes", async || {
        for id in next_note..next_note + 20 {
            p.produce(&Note { id }).await.unwrap();
        }
        next_note += 20;
        let has = logged(&[&c])
            .values()
            .any(|l| l.iter().any(|(k, _)| k == "note"));
        ready(has, || "no note in c's log yet".into())
    })
    .await;
    assert_eq!(
        ids(&[&a, &b, &c], "job"),
        (1..=before).collect::<Vec<_>>(),
        "no job handled while paused, in any process"
    );

    // Resumed across the fleet: every job arrives, once.
    wait_until("the issuer hearing the third child", async || {
        let members = k.fleet_members().unwrap();
        ready(members == ["a", "b", "c", "issuer"], || {
            format!("{members:?}")
        })
    })
    .await;
    // Until the jobs' group gave the third child its share (held since it
    // came): a pause again is applied once more, and says what it holds.
    wait_until("the third child holding job partitions", async || {
        let again = k.fleet_pause(job()).await.unwrap();
        let holds = again.instances.get("c").is_some_and(|answers| {
            answers.iter().any(|r| {
                matches!(&r.outcome, Outcome::Applied { partitions, .. } if !partitions.is_empty())
            })
        });
        if !holds {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ready(holds, || format!("{again:?}"))
    })
    .await;
    let started = Instant::now();
    let resumed = k.fleet_resume(job()).await.unwrap();
    all_applied(&resumed, &["a", "b", "c"]).unwrap();
    assert!(resumed.silent.is_empty(), "{resumed:?}");
    // The third child had job partitions, held since it started: its
    // resume released them.
    let released: Vec<i32> = resumed.instances["c"]
        .iter()
        .flat_map(|r| match &r.outcome {
            Outcome::Applied { partitions, .. } => partitions.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert!(!released.is_empty(), "{resumed:?}");
    wait_until("every job", async || {
        let seen = ids(&[&a, &b, &c], "job");
        let want = usize::try_from(before + 20).unwrap();
        ready(seen.len() >= want, || format!("{} jobs", seen.len()))
    })
    .await;
    assert_eq!(
        ids(&[&a, &b, &c], "job"),
        (1..=before + 20).collect::<Vec<_>>(),
        "every job once"
    );
    // A seek across the settled fleet: each job partition moved (and
    // committed) by the one instance that owns it; none left over.
    let sought = k.fleet_seek(job(), SeekTo::End).await.unwrap();
    assert!(sought.silent.is_empty(), "{sought:?}");
    assert!(sought.unapplied.is_empty(), "{sought:?}");
    let mut moved: Vec<i32> = sought
        .instances
        .values()
        .flatten()
        .flat_map(|r| match &r.outcome {
            Outcome::Applied { partitions, .. } => partitions.clone(),
            _ => Vec::new(),
        })
        .collect();
    moved.sort_unstable();
    assert_eq!(moved, (0..PARTITIONS).collect::<Vec<_>>(), "{sought:?}");
    figure(
        "fleet_commands_reach_every_process",
        format_args!("resume answered by 4 instances in {:?}", started.elapsed()),
    );
    drop((a, b, c));
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn unsigned_or_forged_commands_are_refused_and_nothing_crashes() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let names = Names {
        jobs: unique_name("fleet-forged-jobs"),
        notes: unique_name("fleet-forged-notes"),
        group: unique_name("fleet-forged"),
        control: unique_name("fleet-forged-control"),
    };
    init_tracing();
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = handled.clone();
    let group = names.group.clone();
    let k = Kontext::builder(model(&names.jobs, &names.notes))
        .broker(broker())
        .producer()
        .settings(KafkaSettings::new().consumer(move |c| c.group_id = Some(group.clone())))
        .fleet(fleet(&names.control, "only"))
        .consumers(move |c| {
            c.handler(move |_j: Job, _ctx: MessageContext| {
                let count = count.clone();
                async move {
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    // Written straight to the control topic: garbage, an unsigned pause
    // and one signed with another secret.
    let raw: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", k.broker().bootstrap_servers())
        .create()
        .unwrap();
    let body = format!(
        r#"{{"id":"x1","issuer":"mallory","issued_by":"m","op":"pause","topic":"{}","group":null,"partitions":null}}"#,
        names.jobs
    );
    let unsigned = serde_json::json!({"kind": "command", "body": body, "sig": null}).to_string();
    let forged =
        serde_json::json!({"kind": "command", "body": body.replace("x1", "x2"), "sig": "00ff"})
            .to_string();
    // Signed with the fleet's secret, but not a command.
    let nonsense = "{\"id\": 7}";
    let mut mac =
        <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    hmac::Mac::update(&mut mac, nonsense.as_bytes());
    let sig = hex::encode(hmac::Mac::finalize(mac).into_bytes());
    let signed_nonsense =
        serde_json::json!({"kind": "command", "body": nonsense, "sig": sig}).to_string();
    // Keyed: a compacted topic refuses records without a key.
    for payload in ["not json".to_owned(), unsigned, forged, signed_nonsense] {
        raw.send(
            FutureRecord::<str, str>::to(&names.control)
                .key("mallory")
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
    wait_until("the commands' refusals logged", async || {
        // Both warnings name the control topic, which is this test's own.
        let lines = common::logged(&names.control);
        let refused = |why: &str| {
            lines
                .iter()
                .any(|l| l.contains("refused") && l.contains(why))
        };
        ready(
            refused("why=unsigned")
                && refused("why=bad signature")
                && refused("why=malformed command"),
            || format!("{lines:?}"),
        )
    })
    .await;
    // Still consuming, not paused.
    let p = k.producer().unwrap();
    for id in 1..=5 {
        p.produce(&Job { id }).await.unwrap();
    }
    wait_until("the jobs", async || {
        let n = handled.load(std::sync::atomic::Ordering::Relaxed);
        ready(n == 5, || format!("{n} handled"))
    })
    .await;
    assert!(!k.registry().type_status::<Job>().unwrap().held);
    assert!(k.health().is_healthy(), "{:?}", k.health());
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}
