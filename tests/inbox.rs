//! Inbox de-duplication and the consumer unit of work, on SQLite (default)
//! or PostgreSQL (`DATABASE_URL`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use kontext::outbox::OutboxSettings;
use kontext::prelude::*;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ShipmentCreated {
    shipment_id: String,
    user: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UserActivityRecorded {
    user: u32,
    shipment_id: String,
}

/// Unique names of the shipment topic, the follow-up topic and the group.
fn names() -> (String, String, String) {
    (
        unique_name("shipping.shipment.created"),
        unique_name("identity.activity"),
        unique_name("identity-api"),
    )
}

/// A producer-only instance of `model`.
async fn producer(model: &Model, broker: &Broker) -> Kontext {
    Kontext::builder(model.clone())
        .broker(broker.clone())
        .producer()
        .start()
        .await
        .unwrap()
}

fn model(topic: &str, followups: &str, by_field: bool) -> Model {
    Model::builder()
        .topic::<ShipmentCreated>(|t| {
            t.name(topic)
                .key(|e| e.shipment_id.clone())
                .consumer(move |c| {
                    c.retry(RetryPolicy {
                        max_attempts: 3,
                        initial_backoff: Duration::from_millis(10),
                        max_backoff: Duration::from_millis(20),
                    })
                    .inbox(move |i| {
                        if by_field {
                            i.key_by(|e: &ShipmentCreated| e.shipment_id.clone())
                        } else {
                            i
                        }
                    })
                })
        })
        .topic::<UserActivityRecorded>(|t| t.name(followups).key(|e| e.user))
        .build()
        .unwrap()
}

async fn activity_table(db: &DatabaseConnection) {
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS user_activity (shipment_id TEXT NOT NULL, user_id INTEGER NOT NULL)",
    )
    .await
    .unwrap();
}

async fn activity_rows(db: &DatabaseConnection) -> i64 {
    let row = db
        .query_one(Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM user_activity",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

/// Starts a consumer whose handler records activity and publishes a
/// follow-up through the outbox, failing its first `fail_first` attempts
/// after it wrote.
async fn consumer(
    model: &Model,
    broker: &Broker,
    db: &DatabaseConnection,
    group: &str,
    calls: Arc<AtomicU32>,
    fail_first: u32,
) -> Kontext {
    Kontext::builder(model.clone())
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(group.to_owned())))
        .broker(broker.clone())
        .database(db.clone())
        .outbox_settings(OutboxSettings {
            poll_interval: Duration::from_millis(100),
            ..OutboxSettings::default()
        })
        .consumers(move |c| {
            c.transactional(
                move |e: ShipmentCreated, ctx: MessageContext, uow: UnitOfWork| {
                    let calls = Arc::clone(&calls);
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let backend = uow.get_database_backend();
                        uow.execute(Statement::from_sql_and_values(
                            backend,
                            if backend == sea_orm::DbBackend::Postgres {
                                "INSERT INTO user_activity (shipment_id, user_id) VALUES ($1, $2)"
                            } else {
                                "INSERT INTO user_activity (shipment_id, user_id) VALUES (?, ?)"
                            },
                            [e.shipment_id.clone().into(), (e.user as i32).into()],
                        ))
                        .await?;
                        uow.publish(&UserActivityRecorded {
                            user: e.user,
                            shipment_id: e.shipment_id.clone(),
                        })
                        .await
                        .map_err(HandlerError::retry)?;
                        if ctx.attempt() <= fail_first {
                            return Err(HandlerError::retry("failing after the writes"));
                        }
                        Ok(())
                    }
                },
            );
        })
        .start()
        .await
        .unwrap()
}

/// Publishes one `ShipmentCreated` through `producer`.
async fn publish_one(producer: &Kontext, shipment_id: &str, user: u32) {
    producer
        .producer()
        .unwrap()
        .produce(&ShipmentCreated {
            shipment_id: shipment_id.into(),
            user,
        })
        .await
        .unwrap();
}

/// Waits until `kontext` has handled `n` shipments.
async fn wait_handled(kontext: &Kontext, n: u64) {
    wait_for(&format!("{n} handled"), async || {
        kontext
            .registry()
            .type_status::<ShipmentCreated>()
            .unwrap()
            .handled
            == n
    })
    .await;
}

/// [`common::wait_until`] for a plain condition.
async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    common::wait_until(what, async || ready(f().await, String::new)).await;
}

/// Sends a copy of `record` (same key, payload and headers, so the same
/// message id): what a redelivery looks like to the consumer.
async fn redeliver(broker: &Broker, record: &RecordedMessage) {
    use rdkafka::message::{Header, OwnedHeaders};
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    let mut headers = OwnedHeaders::new();
    for (k, v) in &record.headers {
        headers = headers.insert(Header {
            key: k,
            value: v.as_deref(),
        });
    }
    let mut out: rdkafka::producer::FutureRecord<'_, [u8], [u8]> =
        rdkafka::producer::FutureRecord::to(&record.topic).headers(headers);
    if let Some(k) = &record.key {
        out = out.key(k.as_slice());
    }
    if let Some(p) = &record.payload {
        out = out.payload(p.as_slice());
    }
    producer.send(out, Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_has_no_second_effect() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let (topic, followups, group) = names();
    let model = model(&topic, &followups, false);
    let calls = Arc::new(AtomicU32::new(0));
    let kontext = consumer(&model, &broker, &db, &group, Arc::clone(&calls), 0).await;
    activity_table(&db).await;

    let producer = producer(&model, &broker).await;
    publish_one(&producer, "s-1", 7).await;
    wait_for("the first handling", async || {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;

    let original = read_topic(&broker, &topic, 1, READ_TIMEOUT).await.unwrap();
    redeliver(&broker, &original[0]).await;
    wait_for("the duplicate to be acknowledged", async || {
        kontext
            .registry()
            .type_status::<ShipmentCreated>()
            .unwrap()
            .duplicates
            == 1
    })
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the handler did not run again"
    );
    assert_eq!(activity_rows(&db).await, 1);
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
    let followed = read_topic(&broker, &followups, 2, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(followed.len(), 1, "one follow-up event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unit_of_work_rolls_back_business_rows_and_messages() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let (topic, followups, group) = names();
    let model = model(&topic, &followups, false);
    let calls = Arc::new(AtomicU32::new(0));
    // Fails twice after writing, succeeds on the third attempt.
    let kontext = consumer(&model, &broker, &db, &group, Arc::clone(&calls), 2).await;
    activity_table(&db).await;
    let producer = producer(&model, &broker).await;
    for i in 0..5 {
        producer
            .producer()
            .unwrap()
            .produce(&ShipmentCreated {
                shipment_id: format!("s-{i}"),
                user: i,
            })
            .await
            .unwrap();
    }
    wait_handled(&kontext, 5).await;
    assert_eq!(calls.load(Ordering::SeqCst), 15, "three attempts each");
    assert_eq!(
        activity_rows(&db).await,
        5,
        "only the committed attempts' rows"
    );
    let followed = read_topic(&broker, &followups, 6, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(followed.len(), 5, "only the committed attempts' messages");
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_of_work_that_never_succeeds_leaves_nothing_behind() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let (topic, followups, group) = names();
    let model = model(&topic, &followups, false);
    let calls = Arc::new(AtomicU32::new(0));
    let kontext = consumer(&model, &broker, &db, &group, Arc::clone(&calls), u32::MAX).await;
    activity_table(&db).await;
    let producer = producer(&model, &broker).await;
    publish_one(&producer, "s-9", 9).await;
    let dlq = read_topic(&broker, &format!("{topic}.dlq"), 1, READ_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        dlq[0].header(kontext::consumer::dlq_headers::REASON),
        Some("retries-exhausted")
    );
    assert_eq!(activity_rows(&db).await, 0);
    assert_eq!(kontext.outbox().unwrap().pending().await.unwrap(), 0);
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
    assert!(
        read_topic(&broker, &followups, 1, Duration::from_secs(2))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chosen_fields_deduplicate_different_message_ids() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let (topic, followups, group) = names();
    let model = model(&topic, &followups, true);
    let calls = Arc::new(AtomicU32::new(0));
    let kontext = consumer(&model, &broker, &db, &group, Arc::clone(&calls), 0).await;
    activity_table(&db).await;
    let producer = producer(&model, &broker).await;
    let p = producer.producer().unwrap();
    // The same shipment published twice (two message ids), then another one.
    p.produce(&ShipmentCreated {
        shipment_id: "s-1".into(),
        user: 1,
    })
    .await
    .unwrap();
    p.produce(&ShipmentCreated {
        shipment_id: "s-1".into(),
        user: 1,
    })
    .await
    .unwrap();
    p.produce(&ShipmentCreated {
        shipment_id: "s-2".into(),
        user: 2,
    })
    .await
    .unwrap();
    wait_for("all three", async || {
        let st = kontext.registry().type_status::<ShipmentCreated>().unwrap();
        st.handled + st.duplicates == 3
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(activity_rows(&db).await, 2);
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_needs_a_unit_of_work() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let model = model(&unique_name("t"), &unique_name("f"), false);
    let err = Kontext::builder(model)
        .broker(broker)
        .database(db)
        .consumers(|c| {
            c.handler(|_: ShipmentCreated, _: MessageContext| async { Ok(()) });
        })
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("c.transactional"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_inbox_rows_are_cleaned_up() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let (topic, group) = (unique_name("t"), unique_name("g"));
    let model = Model::builder()
        .topic::<ShipmentCreated>(|t| {
            t.name(&topic).consumer(|c| {
                c.inbox(|i| {
                    i.retention(Duration::from_millis(1))
                        .cleanup_interval(Duration::from_millis(50))
                })
            })
        })
        .build()
        .unwrap();
    let kontext = Kontext::builder(model.clone())
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(group.clone())))
        .broker(broker.clone())
        .database(db.clone())
        .consumers(|c| {
            c.transactional(
                |_: ShipmentCreated, _: MessageContext, _: UnitOfWork| async { Ok(()) },
            );
        })
        .start()
        .await
        .unwrap();
    let producer = Kontext::builder(model)
        .broker(broker)
        .producer()
        .start()
        .await
        .unwrap();
    publish_one(&producer, "s", 1).await;
    wait_handled(&kontext, 1).await;
    let count_inbox = async || {
        let row = db
            .query_one(Statement::from_string(
                db.get_database_backend(),
                "SELECT COUNT(*) AS n FROM kontext_inbox",
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get::<i64>("", "n").unwrap()
    };
    wait_for("the expired row to go", async || count_inbox().await == 0).await;
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Where the swallowing handler runs its failing statement.
#[derive(Clone, Copy)]
enum Through {
    /// The unit of work's own `ConnectionTrait`: kontext sees the failure.
    UnitOfWork,
    /// The sea-orm transaction behind it (`&*uow`): kontext does not.
    RawTransaction,
}

/// A handler that records its activity row, then, on the attempts
/// `swallow` selects, inserts a row that exists and ignores the error
/// ("insert, ignore the duplicate").
async fn swallowing_consumer(
    model: &Model,
    broker: &Broker,
    db: &DatabaseConnection,
    group: &str,
    calls: Arc<AtomicU32>,
    (swallow, through): (fn(u32) -> bool, Through),
) -> Kontext {
    Kontext::builder(model.clone())
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(group.to_owned())))
        .broker(broker.clone())
        .database(db.clone())
        .consumers(move |c| {
            c.transactional(
                move |e: ShipmentCreated, ctx: MessageContext, uow: UnitOfWork| {
                    let calls = Arc::clone(&calls);
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        uow.execute_unprepared(&format!(
                            "INSERT INTO user_activity (shipment_id, user_id) VALUES ('{}', {})",
                            e.shipment_id, e.user
                        ))
                        .await?;
                        if swallow(ctx.attempt()) {
                            // Fails with a unique violation; the error is dropped.
                            let taken = "INSERT INTO taken (id) VALUES (1)";
                            let _ = match through {
                                Through::UnitOfWork => uow.execute_unprepared(taken).await,
                                Through::RawTransaction => {
                                    let raw: &sea_orm::DatabaseTransaction = &uow;
                                    raw.execute_unprepared(taken).await
                                }
                            };
                        }
                        Ok(())
                    }
                },
            );
        })
        .start()
        .await
        .unwrap()
}

/// PostgreSQL aborts a transaction whose statement failed and answers its
/// COMMIT with a rollback and no error; SQLite has no such state.
async fn postgres_with_taken_row(db: &DatabaseConnection) -> bool {
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        eprintln!(
            "skipped: aborted transactions are PostgreSQL's (DATABASE_URL is not PostgreSQL)"
        );
        return false;
    }
    db.execute_unprepared("CREATE TABLE taken (id INTEGER PRIMARY KEY)")
        .await
        .unwrap();
    db.execute_unprepared("INSERT INTO taken (id) VALUES (1)")
        .await
        .unwrap();
    activity_table(db).await;
    true
}

/// What the swallowing tests look at.
struct Swallowing {
    broker: Broker,
    db: DatabaseConnection,
    topic: String,
    kontext: Kontext,
    calls: Arc<AtomicU32>,
}

/// On PostgreSQL (`None` elsewhere): a swallowing consumer (see
/// `swallowing_consumer`) and one shipment published to it.
async fn swallowing(swallow: fn(u32) -> bool, through: Through) -> Option<Swallowing> {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    if !postgres_with_taken_row(&db).await {
        return None;
    }
    let (topic, followups, group) = names();
    let model = model(&topic, &followups, false);
    let calls = Arc::new(AtomicU32::new(0));
    let kontext = swallowing_consumer(
        &model,
        &broker,
        &db,
        &group,
        Arc::clone(&calls),
        (swallow, through),
    )
    .await;
    let producer = producer(&model, &broker).await;
    publish_one(&producer, "s-1", 1).await;
    Some(Swallowing {
        broker,
        db,
        topic,
        kontext,
        calls,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_swallows_a_failed_statement_is_retried_not_acknowledged() {
    swallowed_once_then_clean(Through::UnitOfWork).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_statement_swallowed_on_the_raw_transaction_is_caught_too() {
    swallowed_once_then_clean(Through::RawTransaction).await;
}

/// The first attempt swallows the failure; the second one is clean.
async fn swallowed_once_then_clean(through: Through) {
    let Some(Swallowing {
        broker,
        db,
        topic,
        kontext,
        calls,
    }) = swallowing(|a| a == 1, through).await
    else {
        return;
    };
    wait_handled(&kontext, 1).await;
    let st = kontext.registry().type_status::<ShipmentCreated>().unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "called again after the abort"
    );
    assert_eq!(st.retried, 1, "the aborted attempt counts as a failure");
    assert_eq!(activity_rows(&db).await, 1, "the clean attempt's row, once");

    // The inbox row was committed with it: a redelivery has no effect.
    let original = read_topic(&broker, &topic, 1, READ_TIMEOUT).await.unwrap();
    redeliver(&broker, &original[0]).await;
    wait_for("the duplicate", async || {
        kontext
            .registry()
            .type_status::<ShipmentCreated>()
            .unwrap()
            .duplicates
            == 1
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(activity_rows(&db).await, 1);
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_always_swallows_a_failed_statement_is_dead_lettered_naming_the_abort() {
    let Some(Swallowing {
        broker,
        db,
        topic,
        kontext,
        calls,
    }) = swallowing(|_| true, Through::UnitOfWork).await
    else {
        return;
    };
    let dlq = read_topic(&broker, &format!("{topic}.dlq"), 1, READ_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1);
    let error = dlq[0]
        .header(kontext::consumer::dlq_headers::ERROR)
        .unwrap();
    assert!(error.contains("transaction was aborted"), "{error}");
    assert!(error.contains("current transaction is aborted"), "{error}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the model's three attempts"
    );
    assert_eq!(activity_rows(&db).await, 0, "nothing committed");
    let st = kontext.registry().type_status::<ShipmentCreated>().unwrap();
    assert_eq!((st.handled, st.dead_lettered), (0, 1));
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A consumer of shipments running `workers` units of work at once, with
/// the inbox, and `n` shipments published to it.
struct PoolOfUnitsOfWork {
    kontext: Kontext,
    calls: Arc<AtomicU32>,
    topic: String,
    followups: String,
    /// The publishing side, kept for as long as the test runs.
    _producer: Kontext,
}

async fn pool_of_units_of_work(
    broker: &Broker,
    db: &DatabaseConnection,
    workers: usize,
    n: u32,
) -> PoolOfUnitsOfWork {
    let (topic, followups, group) = names();
    let model = Model::builder()
        .topic::<ShipmentCreated>(|t| {
            t.name(&topic)
                .partitions(4)
                .key(|e| e.shipment_id.clone())
                .consumer(|c| c.workers(workers).inbox(|i| i))
        })
        .topic::<UserActivityRecorded>(|t| t.name(&followups).key(|e| e.user))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    activity_table(db).await;
    let kontext = consumer(&model, broker, db, &group, Arc::clone(&calls), 0).await;
    let batch: Vec<ShipmentCreated> = (0..n)
        .map(|i| ShipmentCreated {
            shipment_id: format!("s-{i}"),
            user: i % 100,
        })
        .collect();
    let producer = producer(&model, broker).await;
    producer
        .producer()
        .unwrap()
        .produce_batch(&batch)
        .await
        .unwrap();
    PoolOfUnitsOfWork {
        kontext,
        calls,
        topic,
        followups,
        _producer: producer,
    }
}

/// The database ends every session of the consumer's pool three times
/// while eight units of work run at once (a server restart, a failover, a
/// proxy dropping connections): the attempts that lose their connection
/// fail and are retried, and every message still has its effect once,
/// none dead-lettered, none lost. PostgreSQL only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_of_work_outlive_the_database_ending_their_sessions() {
    init_tracing();
    let url = kontext::testing::fresh_database_url().await.unwrap();
    if !url.starts_with("postgres") {
        eprintln!("skipped: needs PostgreSQL (DATABASE_URL)");
        return;
    }
    let (broker, db) = (broker(), kontext::db::connect(&url).await.unwrap());
    let n = 4_000u32;
    let PoolOfUnitsOfWork {
        kontext,
        calls,
        _producer,
        ..
    } = pool_of_units_of_work(&broker, &db, 8, n).await;
    let status = || kontext.registry().type_status::<ShipmentCreated>().unwrap();
    let mut ended = 0;
    for quarter in 1..=3u64 {
        wait_for(&format!("{} handled", quarter * 1_000), async || {
            status().handled >= quarter * 1_000
        })
        .await;
        ended += end_sessions(&url).await;
    }
    wait_handled(&kontext, u64::from(n)).await;
    let st = status();
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
    eprintln!(
        "{ended} sessions ended; {} attempts failed and were retried; handler called {} times for {n} messages",
        st.retried,
        calls.load(Ordering::SeqCst)
    );
    assert!(ended >= 3, "each round ended at least one session");
    assert_eq!((st.handled, st.dead_lettered), (u64::from(n), 0));
    // The handler ran again only for attempts that failed: the bound on
    // repeated handling (each repeat rolled back, see the rows below).
    let extra = u64::from(calls.load(Ordering::SeqCst)) - u64::from(n);
    assert!(
        extra <= st.retried,
        "{extra} repeated calls for {} failed attempts",
        st.retried
    );
    let distinct = db
        .query_one(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT COUNT(*) AS n, COUNT(DISTINCT shipment_id) AS d FROM user_activity",
        ))
        .await
        .unwrap()
        .unwrap();
    let (rows, ids): (i64, i64) = (
        distinct.try_get("", "n").unwrap(),
        distinct.try_get("", "d").unwrap(),
    );
    assert_eq!(
        (rows, ids),
        (i64::from(n), i64::from(n)),
        "each effect once"
    );
}

/// Ends every session on `url`'s database but the caller's own, as a
/// server restart would; how many it ended.
async fn end_sessions(url: &str) -> u32 {
    let admin = kontext::db::connect(url).await.unwrap();
    let ended = admin
        .query_all(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_terminate_backend(pid) AS ended FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        ))
        .await
        .unwrap()
        .len();
    admin.close().await.unwrap();
    u32::try_from(ended).unwrap()
}

/// Sixteen units of work at once (a worker pool): every message has its
/// effect once, and redelivered copies have none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_pool_of_units_of_work_has_each_effect_once() {
    init_tracing();
    let (broker, db) = (broker(), kontext::testing::database().await.unwrap());
    let n = 1_000u32;
    let PoolOfUnitsOfWork {
        kontext,
        calls,
        topic,
        followups,
        _producer,
    } = pool_of_units_of_work(&broker, &db, 16, n).await;
    wait_handled(&kontext, u64::from(n)).await;
    assert_eq!(activity_rows(&db).await, i64::from(n));

    // Copies of 50 of them: acknowledged by the inbox, no second effect.
    let originals = read_topic(&broker, &topic, n as usize, READ_TIMEOUT)
        .await
        .unwrap();
    for record in originals.iter().take(50) {
        redeliver(&broker, record).await;
    }
    wait_for("50 duplicates acknowledged", async || {
        kontext
            .registry()
            .type_status::<ShipmentCreated>()
            .unwrap()
            .duplicates
            == 50
    })
    .await;
    let status = kontext.registry().type_status::<ShipmentCreated>().unwrap();
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
    assert_eq!(activity_rows(&db).await, i64::from(n), "no second effect");
    assert_eq!(calls.load(Ordering::SeqCst), n, "the handler ran once each");
    assert_eq!((status.handled, status.dead_lettered), (u64::from(n), 0));
    let followed = read_topic(&broker, &followups, n as usize, READ_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(followed.len(), n as usize, "one follow-up each");
}

/// Sends a record without kontext's headers (no `ce_id`) at `timestamp`.
async fn send_headerless(broker: &Broker, topic: &str, e: &ShipmentCreated, timestamp: i64) {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    let payload = serde_json::to_vec(e).unwrap();
    let record: rdkafka::producer::FutureRecord<'_, [u8], [u8]> =
        rdkafka::producer::FutureRecord::to(topic)
            .key(e.shipment_id.as_bytes())
            .payload(payload.as_slice())
            .timestamp(timestamp);
    producer
        .send(record, Duration::from_secs(10))
        .await
        .unwrap();
}

/// Records without a `ce_id` are de-duplicated by their position; a
/// broker that comes back empty (a dev broker restarted, a topic created
/// again) reuses positions while the inbox keeps its rows. The new record
/// at the old offset is handled, not taken for the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_record_at_a_reused_offset_is_not_taken_for_a_duplicate() {
    init_tracing();
    let (topic, followups, group) = names();
    let model = model(&topic, &followups, false);
    let db = kontext::testing::database().await.unwrap();
    activity_table(&db).await;
    let calls = Arc::new(AtomicU32::new(0));

    for (round, shipment) in ["before-restart", "after-restart"].into_iter().enumerate() {
        // A broker of its own each round: the second starts empty.
        let broker = Broker::embedded().unwrap();
        let kontext = consumer(&model, &broker, &db, &group, Arc::clone(&calls), 0).await;
        let e = ShipmentCreated {
            shipment_id: shipment.into(),
            user: 1,
        };
        send_headerless(&broker, &topic, &e, 1_700_000_000_000 + round as i64).await;
        wait_handled(&kontext, 1).await;
        kontext.shutdown(Duration::from_secs(10)).await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "each record handled");
    assert_eq!(activity_rows(&db).await, 2, "each record's effect stored");
}
