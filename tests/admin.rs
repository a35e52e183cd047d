//! Operator controls: dead letters replayed to their original topic, on
//! the broker the environment names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kontext::admin::{REPLAYED_FROM, ReplayFilter};
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
