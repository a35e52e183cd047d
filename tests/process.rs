//! Consumer processes stopped the way deployments stop them: SIGTERM (a
//! rolling restart) and SIGKILL (a crash), each a real child process
//! running README's recipe against the broker the environment names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::time::{Duration, Instant};

use common::*;
use kontext::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shipment {
    key: u32,
    seq: u32,
}

const CHILD_BOOTSTRAP: &str = "KONTEXT_TEST_CHILD_BOOTSTRAP";
const CHILD_TOPIC: &str = "KONTEXT_TEST_CHILD_TOPIC";
const CHILD_GROUP: &str = "KONTEXT_TEST_CHILD_GROUP";
const CHILD_LOG: &str = "KONTEXT_TEST_CHILD_LOG";
const CHILD_PARTITIONS: &str = "KONTEXT_TEST_CHILD_PARTITIONS";
const CHILD_DELAY_US: &str = "KONTEXT_TEST_CHILD_DELAY_US";
/// Set: the child runs its handler on a worker pool of this size.
const CHILD_WORKERS: &str = "KONTEXT_TEST_CHILD_WORKERS";

/// Records per run; the child handles one every 2 ms, so a signal arrives
/// mid-stream.
const RECORDS: u32 = 3_000;

fn model(topic: &str, partitions: i32) -> Model {
    model_with(topic, partitions, None)
}

/// The model, its consumer on a worker pool of `workers` if given.
fn model_with(topic: &str, partitions: i32, workers: Option<usize>) -> Model {
    Model::builder()
        .topic::<Shipment>(|t| {
            t.name(topic)
                .partitions(partitions)
                .key(|e| e.key)
                .consumer(move |c| match workers {
                    Some(n) => c.max_buffered(100).workers(n),
                    None => c.max_buffered(100),
                })
        })
        .build()
        .unwrap()
}

/// A short session (Kafka's minimum) so that the group notices a killed
/// member within seconds, not the default 45 s.
fn settings(group: &str) -> KafkaSettings {
    KafkaSettings::new().provision_topics(false).consumer(|c| {
        c.group_id = Some(group.to_owned());
        c.session_timeout_ms = Some(6_000);
        c.heartbeat_interval_ms = Some(1_000);
    })
}

/// The seqs a child logged as handled (one line each, written after the
/// handler's work).
fn logged(path: &std::path::Path) -> Vec<u32> {
    handled(path).into_iter().map(|h| h.seq).collect()
}

/// One record a child handled.
#[derive(Debug, Clone, Copy)]
struct Handled {
    seq: u32,
    partition: i32,
    offset: i64,
}

/// What a child logged, in its handling order; a line cut short by a kill
/// is left out.
fn handled(path: &std::path::Path) -> Vec<Handled> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ').map(str::parse::<i64>);
            let (Some(Ok(seq)), Some(Ok(partition)), Some(Ok(offset))) =
                (f.next(), f.next(), f.next())
            else {
                return None;
            };
            Some(Handled {
                seq: u32::try_from(seq).ok()?,
                partition: i32::try_from(partition).ok()?,
                offset,
            })
        })
        .collect()
}

/// Starts README's recipe as a child process: a member of `group` that
/// logs each record it handles to `log`, taking `delay` per record.
fn spawn_child(
    broker: &Broker,
    (topic, partitions): (&str, i32),
    group: &str,
    log: &std::path::Path,
    delay: Duration,
) -> std::process::Child {
    spawn_child_with(broker, (topic, partitions), group, log, delay, None)
}

/// [`spawn_child`], its handler on a worker pool of `workers` if given.
fn spawn_child_with(
    broker: &Broker,
    (topic, partitions): (&str, i32),
    group: &str,
    log: &std::path::Path,
    delay: Duration,
    workers: Option<usize>,
) -> std::process::Child {
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    if let Some(n) = workers {
        command.env(CHILD_WORKERS, n.to_string());
    }
    command
        .args(["--exact", "consumer_child_process", "--ignored", "--quiet"])
        .env(CHILD_BOOTSTRAP, broker.bootstrap_servers())
        .env(CHILD_TOPIC, topic)
        .env(CHILD_PARTITIONS, partitions.to_string())
        .env(CHILD_DELAY_US, delay.as_micros().to_string())
        .env(CHILD_GROUP, group)
        .env(CHILD_LOG, log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Sends `signal` to a child and waits for it to end; a SIGTERM must end it
/// cleanly.
async fn stop(mut child: std::process::Child, signal: &str) {
    let killed = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    if signal == "-TERM" {
        assert!(
            status.success(),
            "the child stopped cleanly on SIGTERM: {status}"
        );
    }
}

/// Waits until `log` holds at least `n` records.
async fn wait_logged(log: &std::path::Path, n: usize, child: &mut std::process::Child) {
    let deadline = Instant::now() + READ_TIMEOUT;
    while handled(log).len() < n {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the child handled {} records", handled(log).len());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a consumer child, waits until it handled `before` records, sends
/// it `signal`, and waits for it to end. Returns what it handled and what a
/// consumer started afterwards in the same group handled until every record
/// was handled once.
/// What a stopped child and the member after it handled.
struct Stopped {
    /// The child's records, in its handling order.
    first: Vec<u32>,
    /// The next member's.
    second: Vec<u32>,
    /// Records the child handled in the 2 s before the signal.
    last_two_seconds: usize,
}

impl Stopped {
    /// The child's rate in the 2 s before the signal, records a second.
    fn rate(&self) -> f64 {
        self.last_two_seconds as f64 / 2.0
    }
}

async fn stop_child_with(signal: &str, before: usize) -> (Vec<u32>, Vec<u32>) {
    let s = stop_child_after(signal, before, (RECORDS, 2), Duration::from_millis(2), None).await;
    (s.first, s.second)
}

/// `records` over `partitions`: the embedded broker keeps 5 MiB a partition.
async fn stop_child_after(
    signal: &str,
    before: usize,
    (records, partitions): (u32, i32),
    delay: Duration,
    workers: Option<usize>,
) -> Stopped {
    init_tracing();
    let broker = broker();
    let (topic, group) = (unique_name("shipments"), unique_name("g"));
    let model = model(&topic, partitions);
    let producer = Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let all: Vec<Shipment> = (0..records)
        .map(|seq| Shipment { key: seq % 50, seq })
        .collect();
    for chunk in all.chunks(20_000) {
        producer
            .producer()
            .unwrap()
            .produce_batch(chunk)
            .await
            .unwrap();
    }

    let log = std::env::temp_dir().join(unique_name("kontext-handled"));
    let mut child = spawn_child_with(&broker, (&topic, partitions), &group, &log, delay, workers);
    // How many the child had handled when, to tell its recent rate.
    let mut samples: Vec<(Instant, usize)> = Vec::new();
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        let n = handled(&log).len();
        samples.push((Instant::now(), n));
        if n >= before {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the child handled {n} records");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop(child, signal).await;
    let killed_at = Instant::now();
    let two_seconds_before = samples
        .iter()
        .rev()
        .find(|(t, _)| killed_at.duration_since(*t) >= Duration::from_secs(2))
        .map_or(0, |(_, n)| *n);
    let first = logged(&log);
    let _ = std::fs::remove_file(&log);

    // The next member of the group takes over from the committed offsets.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let next = Kontext::builder(model)
        .settings(settings(&group).provision_topics(true))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |e: Shipment, _: MessageContext| {
                let s = s.clone();
                async move {
                    s.lock().unwrap().push(e.seq);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        let handled: BTreeSet<u32> = first
            .iter()
            .chain(seen.lock().unwrap().iter())
            .copied()
            .collect();
        if handled.len() == records as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {records} records handled",
            handled.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    next.shutdown(Duration::from_secs(10)).await.unwrap();
    let second = seen.lock().unwrap().clone();
    let last_two_seconds = first.len().saturating_sub(two_seconds_before);
    Stopped {
        first,
        second,
        last_two_seconds,
    }
}

/// Issue 13, defect 9, under load: 100k records at several thousand a
/// second, SIGKILL after 50k. What comes again is what the child handled
/// since its last commit: stored offsets are committed every second, so at
/// most about a second's worth, never more than it handled in its last two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_redelivers_at_most_the_last_commit_interval() {
    // About 8,000 records a second: killed several seconds in, after
    // several commits.
    let s = stop_child_after(
        "-KILL",
        50_000,
        (100_000, 8),
        Duration::from_micros(100),
        None,
    )
    .await;
    let first_set: BTreeSet<u32> = s.first.iter().copied().collect();
    let twice = s.second.iter().filter(|x| first_set.contains(x)).count();
    figure(
        "sigkill_under_load_redelivers_at_most_the_last_commit_interval",
        format_args!(
            "SIGKILL after {} of 100,000 handled at {:.0}/s: {twice} handled again",
            s.first.len(),
            s.rate()
        ),
    );
    assert!(
        twice <= s.last_two_seconds,
        "{twice} redelivered, more than the {} handled in the last 2 s",
        s.last_two_seconds
    );
}

/// Each key's records in the order a member handled them are in produced
/// order (seqs of one key grow).
fn assert_key_order(handled: &[u32], what: &str) {
    let mut last: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
    for &seq in handled {
        let key = seq % 50;
        if let Some(&before) = last.get(&key) {
            assert!(before < seq, "{what}: key {key} went {before} then {seq}");
        }
        last.insert(key, seq);
    }
}

/// Issue 15: a member running 16 handlers at once (each waits 2 ms),
/// killed with SIGKILL mid-stream: nothing is lost (the next member resumes
/// at each partition's first unfinished record), the killed member handled
/// each key in order and nothing twice, and what comes again is at most
/// what it handled in its last two seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_member_with_a_worker_pool_loses_nothing() {
    // About 7,000 records a second: killed some seconds in.
    let s = stop_child_after(
        "-KILL",
        24_000,
        (40_000, 4),
        Duration::from_millis(2),
        Some(16),
    )
    .await;
    let first_set: BTreeSet<u32> = s.first.iter().copied().collect();
    assert_eq!(
        first_set.len(),
        s.first.len(),
        "the member handled nothing twice"
    );
    assert_key_order(&s.first, "killed member");
    let twice = s.second.iter().filter(|x| first_set.contains(x)).count();
    figure(
        "sigkill_of_a_member_with_a_worker_pool_loses_nothing",
        format_args!(
            "pool of 16, SIGKILL after {} handled at {:.0}/s: {twice} handled again",
            s.first.len(),
            s.rate()
        ),
    );
    assert!(
        twice <= s.last_two_seconds,
        "{twice} redelivered, more than the {} handled in the last 2 s",
        s.last_two_seconds
    );
}

/// The same stopped by SIGTERM: the pool drains, commits, and the next
/// member handles nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_a_member_with_a_worker_pool_hands_over_without_duplicates() {
    let s = stop_child_after(
        "-TERM",
        3_000,
        (20_000, 4),
        Duration::from_millis(2),
        Some(16),
    )
    .await;
    let first_set: BTreeSet<u32> = s.first.iter().copied().collect();
    assert_eq!(
        first_set.len(),
        s.first.len(),
        "the member handled nothing twice"
    );
    assert_key_order(&s.first, "stopped member");
    let twice = s.second.iter().filter(|x| first_set.contains(x)).count();
    assert_eq!(twice, 0, "records handled again after a graceful stop");
    assert!(s.first.len() < 20_000, "stopped mid-stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_commits_so_the_next_member_handles_nothing_twice() {
    let (first, second) = stop_child_with("-TERM", 300).await;
    let first_set: BTreeSet<u32> = first.iter().copied().collect();
    let twice: Vec<&u32> = second.iter().filter(|s| first_set.contains(s)).collect();
    assert_eq!(
        first_set.len(),
        first.len(),
        "the child handled nothing twice"
    );
    assert!(
        twice.is_empty(),
        "{} records handled again after a graceful stop: {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    assert!(first.len() < RECORDS as usize, "stopped mid-stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_and_redelivers_only_the_uncommitted_window() {
    let s = stop_child_after("-KILL", 1_200, (RECORDS, 2), Duration::from_millis(2), None).await;
    let (first, second) = (&s.first, &s.second);
    let first_set: BTreeSet<u32> = first.iter().copied().collect();
    let twice = second.iter().filter(|s| first_set.contains(s)).count();
    figure(
        "sigkill_loses_nothing_and_redelivers_only_the_uncommitted_window",
        format_args!(
            "SIGKILL after {} handled at {:.0}/s: {twice} handled again by the next member",
            first.len(),
            s.rate()
        ),
    );
    // What was handled since the last commit comes again: the child
    // handles at most 500 records a second (2 ms each, one at a time per
    // lane) and commits stored offsets every second, so about 500 plus a
    // commit's round trip (measured: 519-522); the bound allows a commit up
    // to a second late on a loaded machine.
    assert!(twice <= 1_000, "{twice} redelivered");
}

/// Issue 13: a rolling restart of three members under load, each in its
/// own process: two stopped by SIGTERM and started again in turn, then one
/// killed with SIGKILL and started again. Nothing is lost; a record comes
/// twice only if the killed member handled it (its uncommitted window), and
/// graceful handovers duplicate nothing; each member handles a partition's
/// records in offset order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_three_members_loses_nothing_and_duplicates_only_the_killed_window() {
    init_tracing();
    let broker = broker();
    let (topic, group) = (unique_name("shipments"), unique_name("g"));
    let partitions = 6;
    let total = 9_000u32;
    let producer = Kontext::builder(model(&topic, partitions))
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let all: Vec<Shipment> = (0..total)
        .map(|seq| Shipment { key: seq % 60, seq })
        .collect();
    producer
        .producer()
        .unwrap()
        .produce_batch(&all)
        .await
        .unwrap();

    // 10 ms a record, one lane per member: about 300 records a second for
    // the three, so the restarts happen while most records still wait.
    let delay = Duration::from_millis(10);
    let mut logs = Vec::new();
    let start = |logs: &mut Vec<std::path::PathBuf>| {
        let log = std::env::temp_dir().join(unique_name("kontext-member"));
        let child = spawn_child(&broker, (&topic, partitions), &group, &log, delay);
        logs.push(log);
        (child, logs.len() - 1)
    };
    let mut members: Vec<(std::process::Child, usize)> = (0..3).map(|_| start(&mut logs)).collect();
    for m in &mut members {
        let log = logs[m.1].clone();
        wait_logged(&log, 20, &mut m.0).await;
    }
    let mut killed = None;
    for (step, signal) in ["-TERM", "-TERM", "-KILL"].into_iter().enumerate() {
        let (child, index) = members.remove(0);
        stop(child, signal).await;
        if signal == "-KILL" {
            killed = Some(index);
        }
        let handled_so_far: usize = logs.iter().map(|l| handled(l).len()).sum();
        eprintln!("step {step}: {signal} after {handled_so_far} of {total} handled");
        let (mut child, index) = start(&mut logs);
        let log = logs[index].clone();
        // Until it took part, or nothing is left to take part in: on a
        // loaded machine the group may finish the records before it gets a
        // partition.
        let deadline = Instant::now() + READ_TIMEOUT;
        loop {
            let all_done = logs
                .iter()
                .flat_map(|l| logged(l))
                .collect::<BTreeSet<u32>>()
                .len()
                == total as usize;
            if handled(&log).len() >= 20 || all_done {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "the restarted member handled {} records",
                    handled(&log).len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        members.push((child, index));
    }

    let deadline = Instant::now() + READ_TIMEOUT * 2;
    loop {
        let seen: BTreeSet<u32> = logs.iter().flat_map(|l| logged(l)).collect();
        if seen.len() == total as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {total} handled",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (child, _) in members {
        stop(child, "-TERM").await;
    }

    let per_member: Vec<Vec<Handled>> = logs.iter().map(|l| handled(l)).collect();
    for log in &logs {
        let _ = std::fs::remove_file(log);
    }
    // Within each member, a partition's records in offset order.
    for (i, log) in per_member.iter().enumerate() {
        let mut last: std::collections::HashMap<i32, i64> = Default::default();
        for h in log {
            if let Some(prev) = last.insert(h.partition, h.offset) {
                assert!(
                    h.offset > prev,
                    "member {i}: partition {} went from offset {prev} to {}",
                    h.partition,
                    h.offset
                );
            }
        }
    }
    // Who handled each record.
    let mut by_record: std::collections::HashMap<(i32, i64), Vec<usize>> = Default::default();
    for (i, log) in per_member.iter().enumerate() {
        for h in log {
            by_record
                .entry((h.partition, h.offset))
                .or_default()
                .push(i);
        }
    }
    assert_eq!(by_record.len(), total as usize, "every record handled");
    let killed = killed.unwrap();
    // A graceful handover commits before the partition moves. Apache Kafka
    // takes that commit; the embedded broker refuses commits while a
    // rebalance is in progress, which under load a handover can fall into,
    // and then the next owner starts from the last background commit. So
    // only on Kafka is every duplicate the killed member's.
    let strict = external();
    let mut twice = 0;
    for (record, members) in &by_record {
        if members.len() > 1 {
            twice += 1;
            assert!(
                members.len() == 2 && (members.contains(&killed) || !strict),
                "record {record:?} handled by members {members:?}; only the killed member {killed} may have handled a record that comes again"
            );
        }
    }
    // What came again is, per partition, the tail of what the killed
    // member handled there: everything after its last commit.
    for (i, h) in per_member[killed].iter().enumerate().filter(|_| strict) {
        let again = by_record[&(h.partition, h.offset)].len() > 1;
        if again {
            let later_of_partition = per_member[killed][i..]
                .iter()
                .filter(|l| l.partition == h.partition);
            for l in later_of_partition {
                assert_eq!(
                    by_record[&(l.partition, l.offset)].len(),
                    2,
                    "partition {}: offset {} came again but {} did not",
                    h.partition,
                    h.offset,
                    l.offset
                );
            }
        }
    }
    figure(
        "a_rolling_restart_of_three_members_loses_nothing_and_duplicates_only_the_killed_window",
        format_args!("{twice} records handled twice (strict: {strict})"),
    );
    // The killed member handled about 100 records a second and committed
    // every second, except while a rebalance was in progress: the embedded
    // broker refuses commits then, and with members coming and going its
    // rebalances last up to the session timeout (6 s here) per round
    // (measured: 564-917 records; commits stalled for up to 9 s). Kafka
    // accepts commits until the group's next generation.
    assert!(twice <= 2_000, "{twice} records handled twice");
}

/// README's recipe in a process of its own: a consumer that runs until
/// SIGTERM or ctrl-c, logging each record it handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of the tests above"]
async fn consumer_child_process() {
    let topic = std::env::var(CHILD_TOPIC).expect("started by its parent test");
    let partitions: i32 = std::env::var(CHILD_PARTITIONS).unwrap().parse().unwrap();
    let delay = Duration::from_micros(std::env::var(CHILD_DELAY_US).unwrap().parse().unwrap());
    // Below a millisecond (the timer's grain), one 1 ms pause every so many
    // records gives the same rate.
    let pause_every = if delay.is_zero() || delay >= Duration::from_millis(1) {
        1
    } else {
        (1_000 / delay.as_micros().max(1)) as u32
    };
    let group = std::env::var(CHILD_GROUP).unwrap();
    let log = std::env::var(CHILD_LOG).unwrap();
    let file = std::sync::Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap(),
    ));
    let workers = std::env::var(CHILD_WORKERS)
        .ok()
        .map(|n| n.parse().unwrap());
    let kontext = Kontext::builder(model_with(&topic, partitions, workers))
        .settings(settings(&group))
        .broker(Broker::external(std::env::var(CHILD_BOOTSTRAP).unwrap()))
        .consumers(move |c| {
            c.handler(move |e: Shipment, ctx: MessageContext| {
                let file = file.clone();
                async move {
                    if !delay.is_zero() && e.seq % pause_every == 0 {
                        tokio::time::sleep(delay.max(Duration::from_millis(1))).await;
                    }
                    let line = format!("{} {} {}\n", e.seq, ctx.partition(), ctx.offset());
                    // One write per line, so a kill cuts at most the last.
                    file.lock().unwrap().write_all(line.as_bytes()).unwrap();
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    kontext
        .run_until(kontext::shutdown_signal(), Duration::from_secs(30))
        .await
        .unwrap();
}
