//! The helpers kontext gives its users' tests (feature `testing`): tracked
//! sessions and fault injection, on the broker and database the
//! environment names (embedded broker and SQLite by default).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kontext::prelude::*;
use kontext::testing::{BrokerFault, DatabaseFault, HandlerFault, track, unique_name};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde::{Deserialize, Serialize};

/// An order comes in (handled by producing `Reserve`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order: u32,
}

/// Stock to reserve (handled in a unit of work that writes `Reserved`
/// through the outbox).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reserve {
    order: u32,
}

/// Stock was reserved (handled by recording it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reserved {
    order: u32,
}

struct Chain {
    /// Produces the first message; its producer also serves the first
    /// handler.
    front: Kontext,
    /// Consumes all three types, with a database for the unit of work.
    back: Kontext,
    /// What the last handler saw.
    seen: Arc<Mutex<Vec<u32>>>,
}

fn chain_model(prefix: &str) -> Model {
    let (a, b, c) = (
        unique_name(&format!("{prefix}-placed")),
        unique_name(&format!("{prefix}-reserve")),
        unique_name(&format!("{prefix}-reserved")),
    );
    Model::builder()
        .topic::<OrderPlaced>(|t| t.name(a).key(|e| e.order))
        .topic::<Reserve>(|t| t.name(b).key(|e| e.order))
        .topic::<Reserved>(|t| t.name(c).key(|e| e.order))
        .build()
        .unwrap()
}

/// A chain of three handlers: `OrderPlaced` produces `Reserve`, whose unit
/// of work publishes `Reserved` through the outbox, which is recorded.
async fn chain(prefix: &str, db: DatabaseConnection) -> Chain {
    let model = chain_model(prefix);
    let broker = broker();
    let front = Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap();
    let producer = front.producer().unwrap().clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    let back = Kontext::builder(model)
        .broker(broker)
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(unique_name("chain"))))
        .database(db)
        .consumers(move |c| {
            c.handler(move |e: OrderPlaced, _: MessageContext| {
                let producer = producer.clone();
                async move {
                    producer
                        .produce(&Reserve { order: e.order })
                        .await
                        .map_err(HandlerError::retry)?;
                    Ok(())
                }
            })
            .transactional(
                |e: Reserve, _: MessageContext, uow: UnitOfWork| async move {
                    uow.publish(&Reserved { order: e.order })
                        .await
                        .map_err(HandlerError::retry)?;
                    Ok(())
                },
            )
            .handler(move |e: Reserved, _: MessageContext| {
                let recorded = Arc::clone(&recorded);
                async move {
                    recorded.lock().unwrap().push(e.order);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    Chain { front, back, seen }
}

#[tokio::test]
async fn a_tracked_session_returns_once_the_whole_chain_was_handled() {
    let started = Instant::now();
    let c = chain("tracked", kontext::testing::database().await.unwrap()).await;
    let tracked = track([&c.front, &c.back])
        .timeout(Duration::from_secs(30))
        .run(|| async {
            c.front
                .producer()
                .unwrap()
                .produce(&OrderPlaced { order: 7 })
                .await
                .unwrap()
        })
        .await
        .unwrap();
    // Returned only after the third handler ran.
    assert_eq!(*c.seen.lock().unwrap(), vec![7]);
    assert_eq!(tracked.value.offset, 0);
    let of = |f: fn(&kontext::testing::Activity, &Kontext) -> _| f(&tracked.activity, &c.back);
    let placed = of(|a, k| a.of::<OrderPlaced>(k).unwrap());
    let reserve = of(|a, k| a.of::<Reserve>(k).unwrap());
    let reserved = of(|a, k| a.of::<Reserved>(k).unwrap());
    assert_eq!(
        (placed.produced, placed.handled, placed.attempts),
        (1, 1, 1)
    );
    assert_eq!(
        (reserve.produced, reserve.handled, reserve.outbox_sent),
        (1, 1, 0)
    );
    assert_eq!(
        (reserved.produced, reserved.outbox_sent, reserved.handled),
        (1, 1, 1)
    );
    assert_eq!(reserved.dead_lettered + reserved.failed, 0);
    figure(
        "a_tracked_session_returns_once_the_whole_chain_was_handled",
        format_args!("wall time {:?}", started.elapsed()),
    );
    c.back.shutdown(Duration::from_secs(10)).await.unwrap();
    c.front.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn a_tracked_session_times_out_naming_the_blocked_type() {
    let started = Instant::now();
    let c = chain("blocked", kontext::testing::database().await.unwrap()).await;
    let blocked = HandlerFault::of::<Reserved>(&c.back).unwrap();
    blocked.hang_next(1);
    let result = track([&c.front, &c.back])
        .timeout(Duration::from_millis(300))
        .run(|| async {
            c.front
                .producer()
                .unwrap()
                .produce(&OrderPlaced { order: 8 })
                .await
                .unwrap();
            // The timeout counts from the end of the action: end it once
            // the last handler hangs, so what is pending is known.
            wait_until("the last handler to hang", async || {
                ready(blocked.met() == 1, || {
                    format!("{} faults met", blocked.met())
                })
            })
            .await;
        })
        .await;
    let Err(Error::Pending { pending, .. }) = result else {
        panic!("expected the session to time out, got {result:?}");
    };
    assert!(
        pending.contains("Reserved") && pending.contains("holds 1"),
        "the timeout names the blocked type: {pending}"
    );
    assert!(c.seen.lock().unwrap().is_empty());
    assert_eq!(blocked.met(), 1);
    // Released, the held record is handled: a new session waits for it.
    blocked.release();
    track([&c.front, &c.back])
        .timeout(Duration::from_secs(30))
        .run(|| async {})
        .await
        .unwrap();
    assert_eq!(*c.seen.lock().unwrap(), vec![8]);
    figure(
        "a_tracked_session_times_out_naming_the_blocked_type",
        format_args!(
            "wall time {:?} (0.3 s of it the timeout)",
            started.elapsed()
        ),
    );
    c.back.shutdown(Duration::from_secs(10)).await.unwrap();
    c.front.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A job whose handler succeeds unless a fault is injected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Job {
    id: u32,
}

async fn job_service(max_attempts: u32) -> (Kontext, Arc<Mutex<Vec<u32>>>) {
    let topic = unique_name("jobs");
    let model = Model::builder()
        .topic::<Job>(|t| {
            t.name(topic).key(|j| j.id).consumer(move |c| {
                c.retry(RetryPolicy {
                    max_attempts,
                    initial_backoff: Duration::from_millis(10),
                    max_backoff: Duration::from_millis(10),
                })
            })
        })
        .build()
        .unwrap();
    let done = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&done);
    let kontext = Kontext::builder(model)
        .broker(broker())
        .settings(
            KafkaSettings::new()
                .consumer(|c| c.group_id = Some(unique_name("jobs")))
                // Back soon after a broker fault ends (librdkafka's default
                // backs off up to 10 s).
                .set("reconnect.backoff.max.ms", "200"),
        )
        .producer()
        .consumers(move |c| {
            c.handler(move |j: Job, _: MessageContext| {
                let recorded = Arc::clone(&recorded);
                async move {
                    recorded.lock().unwrap().push(j.id);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    (kontext, done)
}

#[tokio::test]
async fn an_injected_handler_fault_retries_then_dead_letters() {
    let started = Instant::now();
    let (k, done) = job_service(3).await;
    let fault = HandlerFault::of::<Job>(&k).unwrap();
    fault.fail_next(3);
    let tracked = track([&k])
        .run(|| async { k.producer().unwrap().produce(&Job { id: 1 }).await.unwrap() })
        .await
        .unwrap();
    let job = tracked.activity.of::<Job>(&k).unwrap();
    // Three attempts, all met by the fault: the handler never ran.
    assert!(done.lock().unwrap().is_empty());
    assert_eq!(fault.met(), 3);
    assert_eq!((job.attempts, job.failed, job.retried), (3, 3, 2));
    assert_eq!(job.dead_lettered, 1);
    assert_eq!(
        job.dead_letter_reasons.get("retries-exhausted"),
        Some(&1),
        "{job:?}"
    );
    let dead_letter_topic = k.registry().type_status::<Job>().unwrap().dead_letter_topic;
    let dead =
        kontext::testing::read_topic(k.broker(), &dead_letter_topic, 1, Duration::from_secs(10))
            .await
            .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("dlq-reason"), Some("retries-exhausted"));

    // A panic is retried like an error: one panic, then the handler runs.
    fault.panic_next(1);
    let tracked = track([&k])
        .run(|| async { k.producer().unwrap().produce(&Job { id: 2 }).await.unwrap() })
        .await
        .unwrap();
    let job = tracked.activity.of::<Job>(&k).unwrap();
    assert_eq!((job.failed, job.handled), (1, 1), "{job:?}");
    assert_eq!(*done.lock().unwrap(), vec![2]);

    // Panics on every attempt: dead-lettered as a panic; the job after it,
    // with no fault left, is handled.
    fault.panic_next(3);
    let tracked = track([&k])
        .run(|| async {
            let p = k.producer().unwrap();
            p.produce(&Job { id: 3 }).await.unwrap();
            p.produce(&Job { id: 4 }).await.unwrap();
        })
        .await
        .unwrap();
    let job = tracked.activity.of::<Job>(&k).unwrap();
    assert_eq!(
        (job.failed, job.handled, job.dead_lettered),
        (3, 1, 1),
        "{job:?}"
    );
    assert_eq!(job.dead_letter_reasons.get("panic"), Some(&1), "{job:?}");
    assert_eq!(*done.lock().unwrap(), vec![2, 4]);
    assert_eq!(fault.met(), 7);
    figure(
        "an_injected_handler_fault_retries_then_dead_letters",
        format_args!("wall time {:?}", started.elapsed()),
    );
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn an_injected_request_error_fails_a_produce_and_latency_slows_it() {
    let started = Instant::now();
    let (k, _) = job_service(1).await;
    let Ok(faults) = BrokerFault::of(&k) else {
        assert!(external(), "the embedded broker takes faults");
        return;
    };
    let producer = k.producer().unwrap();
    // The broker refuses the next produce request as too large: a
    // permanent error, not retried.
    faults
        .fail_next(
            rdkafka::types::RDKafkaApiKey::Produce,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            1,
        )
        .unwrap();
    let refused = producer.produce(&Job { id: 1 }).await;
    let Err(Error::Produce { .. }) = &refused else {
        panic!("expected the injected refusal, got {refused:?}");
    };
    assert!(
        refused.unwrap_err().to_string().contains("too large"),
        "the error names the refusal"
    );
    // The fault was one request: the next produce goes through.
    producer.produce(&Job { id: 2 }).await.unwrap();

    // 300 ms more per response: a produce takes at least that.
    faults.latency(Duration::from_millis(300)).unwrap();
    let sent = Instant::now();
    producer.produce(&Job { id: 3 }).await.unwrap();
    assert!(sent.elapsed() >= Duration::from_millis(300));
    faults.latency(Duration::ZERO).unwrap();

    // Down: no produce is acknowledged; up: it goes through.
    faults.down().unwrap();
    let waiting =
        tokio::time::timeout(Duration::from_millis(500), producer.produce(&Job { id: 4 })).await;
    assert!(
        waiting.is_err(),
        "nothing is acknowledged while the broker is down: {waiting:?}"
    );
    faults.up().unwrap();
    producer.produce(&Job { id: 5 }).await.unwrap();
    figure(
        "an_injected_request_error_fails_a_produce_and_latency_slows_it",
        format_args!("wall time {:?}", started.elapsed()),
    );
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn a_database_cut_off_for_a_while_makes_a_unit_of_work_wait_and_retry() {
    let url = kontext::testing::fresh_database_url().await.unwrap();
    if !url.starts_with("postgres") {
        // SQLite: the database is a file of this process; nothing to cut.
        assert!(DatabaseFault::postgres(&url).await.is_err());
        return;
    }
    let started = Instant::now();
    let db = sea_orm::Database::connect(
        sea_orm::ConnectOptions::new(url.clone())
            .acquire_timeout(Duration::from_secs(1))
            .to_owned(),
    )
    .await
    .unwrap();
    db.execute_unprepared("CREATE TABLE reservations (id INT PRIMARY KEY)")
        .await
        .unwrap();
    let topic = unique_name("reservations");
    let model = Model::builder()
        .topic::<Job>(|t| t.name(topic).key(|j| j.id))
        .build()
        .unwrap();
    let k = Kontext::builder(model)
        .broker(broker())
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(unique_name("db"))))
        .database(db.clone())
        .producer()
        .consumers(|c| {
            c.transactional(|j: Job, _: MessageContext, uow: UnitOfWork| async move {
                uow.execute_unprepared(&format!("INSERT INTO reservations VALUES ({})", j.id))
                    .await
                    .map_err(HandlerError::retry)?;
                Ok(())
            });
        })
        .start()
        .await
        .unwrap();
    let fault = DatabaseFault::postgres(&url).await.unwrap();
    fault.cut().await.unwrap();
    let tracked = track([&k])
        .timeout(Duration::from_secs(60))
        .run(|| async {
            k.producer().unwrap().produce(&Job { id: 1 }).await.unwrap();
            // The handler's attempts meet the cut database...
            wait_until("a retry caused by the cut", async || {
                let status = k.registry().type_status::<Job>().unwrap();
                ready(status.retried >= 1, || format!("{status:?}"))
            })
            .await;
            // ...and succeed once it is back.
            fault.restore().await.unwrap();
        })
        .await
        .unwrap();
    let job = tracked.activity.of::<Job>(&k).unwrap();
    assert_eq!((job.handled, job.dead_lettered), (1, 0), "{job:?}");
    assert!(job.retried >= 1);
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM reservations").await,
        1
    );
    figure(
        "a_database_cut_off_for_a_while_makes_a_unit_of_work_wait_and_retry",
        format_args!("wall time {:?}, {} retries", started.elapsed(), job.retried),
    );
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn a_tracked_session_waits_for_what_an_exactly_once_handler_produced() {
    let model = chain_model("eo");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    let k = Kontext::builder(model)
        .broker(broker())
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(unique_name("eo"))))
        .producer()
        .transactional_producer(unique_name("tracked-tx"))
        .consumers(move |c| {
            c.exactly_once(
                |e: OrderPlaced,
                 _: MessageContext,
                 tx: Transaction|
                 -> futures::future::BoxFuture<'static, Result<(), HandlerError>> {
                    Box::pin(async move {
                        tx.send(&Reserve { order: e.order }).await?;
                        Ok(())
                    })
                },
            )
            .handler(move |e: Reserve, _: MessageContext| {
                let recorded = Arc::clone(&recorded);
                async move {
                    recorded.lock().unwrap().push(e.order);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    let tracked = track([&k])
        .timeout(Duration::from_secs(30))
        .run(|| async {
            let p = k.producer().unwrap();
            for order in 1..=3 {
                p.produce(&OrderPlaced { order }).await.unwrap();
            }
        })
        .await
        .unwrap();
    // The transaction's output counts once it committed, and the session
    // waited until it was handled.
    let mut handled = seen.lock().unwrap().clone();
    handled.sort_unstable();
    assert_eq!(handled, vec![1, 2, 3]);
    let reserve = tracked.activity.of::<Reserve>(&k).unwrap();
    assert_eq!((reserve.produced, reserve.handled), (3, 3), "{reserve:?}");
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}
