//! Operator controls: dead letters replayed to their original topic, on
//! the broker the environment names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kontext::admin::{ControlReport, Outcome, REPLAYED_FROM, ReplayFilter, SeekTo, Target};
use kontext::prelude::*;
use kontext::testing::{HandlerFault, track, unique_name};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Job {
    id: u32,
}

/// A job's id and the dead letter it was replayed from, if it was.
type Seen = (u32, Option<String>);

#[tokio::test]
async fn replayed_dead_letters_go_back_to_their_topic_marked_and_are_handled() {
    let topic = unique_name("replay-jobs");
    let model = Model::builder()
        .topic::<Job>(|t| {
            t.name(topic.as_str())
                .partitions(1)
                .key(|j| j.id)
                .consumer(|c| c.retry(RetryPolicy::none()))
        })
        .build()
        .unwrap();
    // What the handler saw: the job and where it was replayed from.
    let handled: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let seen = Arc::clone(&handled);
    let k = Kontext::builder(model)
        .broker(broker())
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(unique_name("replay"))))
        .producer()
        .consumers(move |c| {
            c.handler(move |j: Job, ctx: MessageContext| {
                let seen = Arc::clone(&seen);
                async move {
                    let from = ctx.header_str(REPLAYED_FROM).map(str::to_owned);
                    seen.lock().unwrap().push((j.id, from));
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();

    // Three dead letters: two handler failures, one panic.
    let fault = HandlerFault::of::<Job>(&k).unwrap();
    fault.fail_next(2).panic_next(1);
    let failed = track([&k])
        .timeout(Duration::from_secs(30))
        .run(|| async {
            let p = k.producer().unwrap();
            for id in 1..=3 {
                p.produce(&Job { id }).await.unwrap();
            }
        })
        .await
        .unwrap();
    let jobs = failed.activity.of::<Job>(&k).unwrap();
    assert_eq!(jobs.dead_lettered, 3, "{jobs:?}");
    assert_eq!(jobs.dead_letter_reasons.get("retries-exhausted"), Some(&2));
    assert_eq!(jobs.dead_letter_reasons.get("panic"), Some(&1));
    assert!(handled.lock().unwrap().is_empty());
    let dead_letter_topic = k.registry().type_status::<Job>().unwrap().dead_letter_topic;

    // A dry run counts the two handler failures and sends nothing.
    let only_failures = ReplayFilter::all().reason("retries-exhausted");
    let dry = k
        .replay_dead_letters(&dead_letter_topic, only_failures.clone().dry_run())
        .await
        .unwrap();
    assert_eq!((dry.scanned, dry.matched, dry.replayed), (3, 2, 0));
    assert_eq!(dry.by_topic.get(&topic), Some(&2));
    assert_eq!(records_on(k.broker(), &topic).await, 3);

    // The replay sends those two back; they are handled, marked with the
    // dead letter they came from. The panicked one stays a dead letter.
    let replay = track([&k])
        .timeout(Duration::from_secs(30))
        .run(|| k.replay_dead_letters(&dead_letter_topic, only_failures.per_second(1000)))
        .await
        .unwrap();
    let replayed = replay.value.unwrap();
    assert_eq!((replayed.matched, replayed.replayed), (2, 2));
    assert_eq!(replay.activity.of::<Job>(&k).unwrap().handled, 2);
    let handled = handled.lock().unwrap().clone();
    assert_eq!(
        handled,
        vec![
            (1, Some(format!("{dead_letter_topic}/0/0"))),
            (2, Some(format!("{dead_letter_topic}/0/1"))),
        ]
    );

    // On the topic: the three originals and the two replays, which carry
    // the record's own headers and none of the dead-letter ones.
    let records = read_all(k.broker(), &topic).await;
    assert_eq!(records.len(), 5);
    for r in &records[3..] {
        assert!(r.header(REPLAYED_FROM).is_some());
        assert!(r.header("ce_id").is_some());
        assert!(r.headers.iter().all(|(name, _)| !name.starts_with("dlq-")));
    }
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn a_replay_of_a_topic_that_does_not_exist_is_an_error() {
    let model = Model::builder()
        .topic::<Job>(|t| t.name(unique_name("replay-none")))
        .build()
        .unwrap();
    let k = Kontext::builder(model)
        .broker(broker())
        .producer()
        .start()
        .await
        .unwrap();
    let missing = unique_name("no-such-dead-letters");
    let result = k
        .replay_dead_letters(&missing, ReplayFilter::all().dry_run())
        .await;
    let Err(e) = result else {
        panic!("a replay of a missing topic must fail, got {result:?}");
    };
    assert!(e.to_string().contains(&missing), "{e}");
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Note {
    id: u32,
}

/// Ids handled per type, in the order handled.
#[derive(Default)]
struct Handled {
    jobs: Mutex<Vec<u32>>,
    notes: Mutex<Vec<u32>>,
}

impl Handled {
    fn jobs(&self) -> Vec<u32> {
        self.jobs.lock().unwrap().clone()
    }
    fn notes(&self) -> Vec<u32> {
        self.notes.lock().unwrap().clone()
    }
}

fn jobs_and_notes(jobs: &str, notes: &str) -> Model {
    Model::builder()
        .topic::<Job>(|t| t.name(jobs).partitions(2).key(|j| j.id))
        .topic::<Note>(|t| t.name(notes).partitions(2).key(|n| n.id))
        .build()
        .unwrap()
}

/// A member of `group` on `on` (the embedded broker of the test's first
/// member; `broker()` would start a cluster of its own).
async fn start_recording(
    model: Model,
    on: Broker,
    group: &str,
    handled: &Arc<Handled>,
    jobs: bool,
) -> Kontext {
    let (a, b) = (Arc::clone(handled), Arc::clone(handled));
    let group = group.to_owned();
    Kontext::builder(model)
        .broker(on)
        .settings(KafkaSettings::new().consumer(move |c| c.group_id = Some(group.clone())))
        .producer()
        .consumers(move |c| {
            if jobs {
                c.handler(move |j: Job, _ctx: MessageContext| {
                    let a = Arc::clone(&a);
                    async move {
                        a.jobs.lock().unwrap().push(j.id);
                        Ok(())
                    }
                });
            }
            c.handler(move |n: Note, _ctx: MessageContext| {
                let b = Arc::clone(&b);
                async move {
                    b.notes.lock().unwrap().push(n.id);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap()
}

fn applied(reports: &[ControlReport]) -> bool {
    !reports.is_empty()
        && reports
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Applied { .. }))
}

#[tokio::test]
async fn a_paused_type_stays_paused_through_a_rebalance_while_others_flow_and_resumes_losing_nothing()
 {
    let (jobs, notes) = (unique_name("pause-jobs"), unique_name("pause-notes"));
    let group = unique_name("pause");
    let handled = Arc::new(Handled::default());
    let k = start_recording(
        jobs_and_notes(&jobs, &notes),
        broker(),
        &group,
        &handled,
        true,
    )
    .await;
    let p = k.producer().unwrap();
    for id in 1..=10 {
        p.produce(&Job { id }).await.unwrap();
    }
    wait_until("the first ten jobs", async || {
        let n = handled.jobs().len();
        ready(n == 10, || format!("{n} handled"))
    })
    .await;

    let reports = k.pause(Target::of::<Job>().by("test")).await.unwrap();
    assert!(applied(&reports), "{reports:?}");
    assert_eq!(reports[0].topic, jobs);
    assert_eq!(reports[0].types, vec!["Job".to_owned()]);
    let status = k.registry().type_status::<Job>().unwrap();
    assert!(status.held, "{status:?}");
    let service = k.registry().service_of::<Job>().unwrap();
    assert_eq!(service.held_partitions.len(), 2, "{service:?}");
    assert!(
        k.health().is_healthy(),
        "a pause is not unhealthy: {:?}",
        k.health()
    );

    // Paused: new jobs wait, notes flow.
    for id in 11..=20 {
        p.produce(&Job { id }).await.unwrap();
    }
    for id in 1..=10 {
        p.produce(&Note { id }).await.unwrap();
    }
    wait_until("the notes", async || {
        let n = handled.notes().len();
        ready(n == 10, || format!("{n} handled"))
    })
    .await;
    assert_eq!(handled.jobs().len(), 10, "no job is handled while paused");

    // A second member joins for the notes: the group rebalances, and the
    // jobs' partitions (assigned again here) stay paused.
    let other = Arc::new(Handled::default());
    let notes_only = Model::builder()
        .topic::<Note>(|t| t.name(notes.as_str()).partitions(2).key(|n| n.id))
        .build()
        .unwrap();
    let k2 = start_recording(notes_only, k.broker().clone(), &group, &other, false).await;
    wait_until("the second member's partitions", async || {
        let s = k2.registry().service_of::<Note>().unwrap();
        ready(!s.assigned_partitions.is_empty(), || format!("{s:?}"))
    })
    .await;
    for id in 11..=20 {
        p.produce(&Note { id }).await.unwrap();
    }
    wait_until("the notes after the rebalance", async || {
        let n = handled.notes().len() + other.notes().len();
        ready(n >= 20, || format!("{n} handled"))
    })
    .await;
    assert_eq!(handled.jobs().len(), 10, "still paused after the rebalance");
    let status = k.registry().type_status::<Job>().unwrap();
    assert!(status.held, "{status:?}");
    k2.shutdown(Duration::from_secs(10)).await.unwrap();

    // Resumed: every job arrives once, in order per key's partition.
    let reports = k.resume(Target::of::<Job>().by("test")).await.unwrap();
    assert!(applied(&reports), "{reports:?}");
    wait_until("the held jobs", async || {
        let n = handled.jobs().len();
        ready(n >= 20, || format!("{n} handled"))
    })
    .await;
    let mut seen = handled.jobs();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=20).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
    assert!(!k.registry().type_status::<Job>().unwrap().held);
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn seeks_move_the_group_to_the_beginning_or_a_time_and_commit_it() {
    let topic = unique_name("seek-jobs");
    let group = unique_name("seek");
    let model = Model::builder()
        .topic::<Job>(|t| t.name(topic.as_str()).partitions(1).key(|j| j.id))
        .build()
        .unwrap();
    let handled: Arc<Mutex<Vec<u32>>> = Arc::default();
    let seen = Arc::clone(&handled);
    let g = group.clone();
    let k = Kontext::builder(model)
        .broker(broker())
        .settings(KafkaSettings::new().consumer(move |c| c.group_id = Some(g.clone())))
        .producer()
        .consumers(move |c| {
            c.handler(move |j: Job, _ctx: MessageContext| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.lock().unwrap().push(j.id);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    let p = k.producer().unwrap();
    for id in 1..=5 {
        p.produce(&Job { id }).await.unwrap();
    }
    let count = || handled.lock().unwrap().len();
    wait_until("five jobs", async || {
        ready(count() == 5, || format!("{}", count()))
    })
    .await;

    // To the beginning: all five again.
    let reports = k
        .seek(Target::of::<Job>(), SeekTo::Beginning)
        .await
        .unwrap();
    let Outcome::Applied { positions, .. } = &reports[0].outcome else {
        panic!("{reports:?}");
    };
    assert_eq!(positions, &vec![(0, 0)]);
    wait_until("five jobs again", async || {
        ready(count() == 10, || format!("{}", count()))
    })
    .await;
    assert_eq!(*handled.lock().unwrap(), vec![1, 2, 3, 4, 5, 1, 2, 3, 4, 5]);

    // To a time: the first record at or after it. The embedded broker
    // cannot look offsets up by time, and says so.
    let by_time = Target::topic(topic.as_str()).group(group.as_str());
    let records = read_all(k.broker(), &topic).await;
    let at = records[3].timestamp.unwrap();
    if !external() {
        let refused = k.seek(by_time, SeekTo::Timestamp(at)).await;
        assert!(
            matches!(&refused, Err(e) if e.to_string().contains("by time")),
            "{refused:?}"
        );
    } else {
        let first = records
            .iter()
            .find(|r| r.timestamp.unwrap() >= at)
            .unwrap()
            .offset;
        let reports = k.seek(by_time, SeekTo::Timestamp(at)).await.unwrap();
        let Outcome::Applied { positions, .. } = &reports[0].outcome else {
            panic!("{reports:?}");
        };
        assert_eq!(positions, &vec![(0, first)]);
        let expected = 10 + (5 - usize::try_from(first).unwrap());
        wait_until("the jobs from the time", async || {
            ready(count() == expected, || format!("{}", count()))
        })
        .await;
    }
    wait_until("the offsets committed", async || {
        let c = committed_offsets(k.broker(), &group, &topic).await;
        ready(c.get(&0) == Some(&5), || format!("{c:?}"))
    })
    .await;

    // A partition another member owns (or none does) is reported so.
    let reports = k
        .seek(Target::of::<Job>().partitions([7]), SeekTo::End)
        .await
        .unwrap();
    assert_eq!(
        reports[0].outcome,
        Outcome::NotOwned {
            partitions: vec![7]
        }
    );
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// What one seek racing a rebalance reported, per partition.
#[derive(Debug, Default)]
struct Sought {
    moved: Vec<i32>,
    not_owned: Vec<i32>,
    /// Moved, but the group did not take the commit (reported why).
    uncommitted: bool,
}

fn sought(reports: &[ControlReport], all: &[i32]) -> Sought {
    let mut s = Sought::default();
    for r in reports {
        match &r.outcome {
            Outcome::Applied {
                partitions,
                not_applied,
                uncommitted,
                ..
            } => {
                s.moved.extend(partitions);
                s.not_owned.extend(not_applied);
                if let Some(why) = uncommitted {
                    assert!(why.contains("seek again"), "{why}");
                    s.uncommitted = true;
                }
            }
            Outcome::NotOwned { partitions } => s.not_owned.extend(partitions),
            other => panic!("{other:?}"),
        }
    }
    let mut named: Vec<i32> = s.moved.iter().chain(&s.not_owned).copied().collect();
    named.sort_unstable();
    assert_eq!(
        named, all,
        "every partition asked for is reported, once: {reports:?}"
    );
    s
}

/// A seek issued while a member joins, while two share the partitions, and
/// while one leaves: whatever the order the poll thread meets the seek and
/// the rebalance in, each partition is reported moved or not owned, and
/// what the report says holds: a moved partition's records all come again
/// (the new position survives the hand-over, also when the group refused
/// its first commit), one not owned here does not, and nothing is lost.
#[tokio::test]
async fn a_seek_racing_a_rebalance_is_reported_per_partition_and_never_lost() {
    let (jobs, notes) = (unique_name("race-jobs"), unique_name("race-notes"));
    let group = unique_name("race");
    let model = || {
        Model::builder()
            .topic::<Job>(|t| t.name(jobs.as_str()).partitions(4).key(|j| j.id))
            .topic::<Note>(|t| t.name(notes.as_str()).partitions(1).key(|n| n.id))
            .build()
            .unwrap()
    };
    let handled = Arc::new(Handled::default());
    let k = start_recording(model(), broker(), &group, &handled, true).await;
    let p = k.producer().unwrap();
    for id in 1..=40 {
        p.produce(&Job { id }).await.unwrap();
    }
    let records = read_all(k.broker(), &jobs).await;
    let mut partition_of = std::collections::BTreeMap::new();
    let mut ends = std::collections::BTreeMap::new();
    for r in &records {
        let job: Job = serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap();
        partition_of.insert(job.id, r.partition);
        *ends.entry(r.partition).or_insert(0i64) += 1;
    }
    let all: Vec<i32> = (0..4).collect();
    let settled = async |what: &str| {
        wait_until(what, async || {
            let c = committed_offsets(k.broker(), &group, &jobs).await;
            let caught_up = ends.iter().all(|(p, end)| c.get(p) == Some(end));
            ready(caught_up, || format!("committed {c:?}, ends {ends:?}"))
        })
        .await;
    };
    let counts = || {
        let mut by_id = std::collections::BTreeMap::<u32, usize>::new();
        for id in handled.jobs() {
            *by_id.entry(id).or_default() += 1;
        }
        by_id
    };
    settled("the first pass committed").await;
    assert_eq!(counts().len(), 40);

    let mut k2: Option<Kontext> = None;
    for round in ["a member joins", "both members own some", "a member leaves"] {
        let before = counts();
        let target = Target::of::<Job>().partitions(all.clone()).by("race");
        let reports = match round {
            "a member joins" => {
                let (reports, joined) = tokio::join!(
                    k.seek(target, SeekTo::Beginning),
                    start_recording(model(), k.broker().clone(), &group, &handled, true)
                );
                k2 = Some(joined);
                reports
            }
            "a member leaves" => {
                let leaving = k2.take().unwrap();
                let (reports, stopped) = tokio::join!(
                    k.seek(target, SeekTo::Beginning),
                    leaving.shutdown(Duration::from_secs(10))
                );
                stopped.unwrap();
                reports
            }
            _ => k.seek(target, SeekTo::Beginning).await,
        }
        .unwrap();
        let s = sought(&reports, &all);
        eprintln!("{round}: {s:?}");
        if round == "both members own some" {
            assert!(
                !s.moved.is_empty() && !s.not_owned.is_empty(),
                "a settled group of two: {s:?}"
            );
        }
        // A moved partition's records all come again (wherever it went);
        // then the group commits to the ends. With its commit refused,
        // that holds only if the commit on the revoke is taken: the
        // refusal itself is tested on its own below.
        let must_come_again: Vec<i32> = if s.uncommitted {
            Vec::new()
        } else {
            s.moved.clone()
        };
        wait_until(round, async || {
            let after = counts();
            let missing: Vec<u32> = partition_of
                .iter()
                .filter(|(id, p)| must_come_again.contains(p) && after[*id] == before[*id])
                .map(|(id, _)| *id)
                .collect();
            ready(missing.is_empty(), || {
                format!("{s:?}: jobs {missing:?} of moved partitions not handled again")
            })
        })
        .await;
        settled(round).await;
        let after = counts();
        for (id, p) in &partition_of {
            if s.not_owned.contains(p) {
                assert_eq!(
                    after[id], before[id],
                    "{round}: job {id} of partition {p} (not owned here) handled again: {s:?}"
                );
            }
        }
        if let Some(joined) = &k2 {
            // The next rounds' members split the jobs, each owning some.
            wait_until("the members' job partitions", async || {
                let owned = |k: &Kontext| -> Vec<i32> {
                    let s = k.registry().service_of::<Job>().unwrap();
                    let mut ps: Vec<i32> = s
                        .assigned_partitions
                        .iter()
                        .filter(|(t, _)| *t == jobs)
                        .map(|(_, p)| *p)
                        .collect();
                    ps.sort_unstable();
                    ps
                };
                let (a, b) = (owned(&k), owned(joined));
                let mut both: Vec<i32> = a.iter().chain(&b).copied().collect();
                both.sort_unstable();
                ready(!a.is_empty() && !b.is_empty() && both == all, || {
                    format!("{a:?} and {b:?}")
                })
            })
            .await;
        }
    }
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A seek whose commit the group refuses (the embedded broker answers the
/// commit with REBALANCE_IN_PROGRESS): reported `Applied` with why it is
/// `uncommitted`; the member reads on from the new position (every job
/// once more, none lost) and commits as it goes.
#[tokio::test]
async fn a_seek_whose_commit_is_refused_says_so_and_reads_on_from_its_position() {
    if external() {
        return; // Refusals are injected into the embedded broker.
    }
    let (jobs, notes) = (unique_name("refused-jobs"), unique_name("refused-notes"));
    let group = unique_name("refused");
    let handled = Arc::new(Handled::default());
    let k = start_recording(
        jobs_and_notes(&jobs, &notes),
        broker(),
        &group,
        &handled,
        true,
    )
    .await;
    let p = k.producer().unwrap();
    for id in 1..=10 {
        p.produce(&Job { id }).await.unwrap();
    }
    let ends = |c: &std::collections::BTreeMap<i32, i64>| c.values().sum::<i64>();
    wait_until("ten jobs committed", async || {
        let c = committed_offsets(k.broker(), &group, &jobs).await;
        ready(handled.jobs().len() == 10 && ends(&c) == 10, || {
            format!("{c:?}")
        })
    })
    .await;

    k.broker()
        .as_embedded()
        .unwrap()
        .fail_requests(
            rdkafka::types::RDKafkaApiKey::OffsetCommit,
            &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS],
        )
        .unwrap();
    let reports = k
        .seek(Target::of::<Job>(), SeekTo::Beginning)
        .await
        .unwrap();
    let Outcome::Applied {
        partitions,
        uncommitted: Some(why),
        ..
    } = &reports[0].outcome
    else {
        panic!("{reports:?}");
    };
    assert_eq!(partitions.len(), 2, "{reports:?}");
    assert!(why.contains("stay stored"), "{why}");
    // It reads on from the beginning, and commits the ends again.
    wait_until("the jobs again, committed", async || {
        let c = committed_offsets(k.broker(), &group, &jobs).await;
        let n = handled.jobs().len();
        ready(n == 20 && ends(&c) == 10, || format!("{n} handled, {c:?}"))
    })
    .await;
    let mut seen = handled.jobs();
    seen.sort_unstable();
    let twice: Vec<u32> = (1..=10).flat_map(|id| [id, id]).collect();
    assert_eq!(seen, twice, "each job once more, none lost");
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}
