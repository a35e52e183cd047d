//! Kafka transactions through `TransactionalProducer`: all or nothing on
//! Apache Kafka (`KONTEXT_TEST_BOOTSTRAP`), fencing of a producer whose
//! transactional id another one took, and error classification on the
//! embedded broker's injected errors. The embedded broker accepts
//! transactions but does not hide aborted records, so visibility is
//! asserted on Apache Kafka only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kontext::config::IsolationLevel;
use kontext::prelude::*;
use kontext::{TransactionFailure, TransactionalProducer};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    n: u32,
}

fn model(topic: &str) -> Model {
    Model::builder()
        .topic::<Entry>(|t| t.name(topic).partitions(2).key(|e| e.n))
        .build()
        .unwrap()
}

async fn transactional(model: &Model, broker: &Broker, id: &str) -> Kontext {
    Kontext::builder(model.clone())
        .broker(broker.clone())
        .transactional_producer(id)
        .start()
        .await
        .unwrap()
}

/// What an application's own error type looks like around kontext's.
#[derive(Debug)]
enum AppError {
    #[allow(dead_code)]
    Kontext(kontext::Error),
    ChangedMyMind,
}

impl From<kontext::Error> for AppError {
    fn from(e: kontext::Error) -> Self {
        AppError::Kontext(e)
    }
}

/// Every record of `topic` a consumer with `isolation.level` reads from
/// the beginning, once `expected` arrived (or the deadline passed).
fn read_raw(broker: &Broker, topic: &str, isolation: &str, expected: usize) -> Vec<u32> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("group.id", unique_name("raw-reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Past `expected`, a little longer: what else arrives is the point.
    let mut quiet_until: Option<Instant> = None;
    while Instant::now() < deadline && quiet_until.is_none_or(|q| Instant::now() < q) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let e: Entry = serde_json::from_slice(m.payload().unwrap()).unwrap();
            seen.push(e.n);
        }
        if seen.len() >= expected && quiet_until.is_none() {
            quiet_until = Some(Instant::now() + Duration::from_secs(2));
        }
    }
    seen.sort_unstable();
    seen
}

/// A transaction whose work fails is aborted: none of its messages is
/// visible to a read-committed consumer (a kontext handler, kontext's
/// default), while a read-uncommitted one sees them; the next transaction
/// commits both of its messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_is_invisible_to_read_committed_consumers() {
    init_tracing();
    let broker = broker();
    let topic = unique_name("ledger");
    let model = model(&topic);
    let kontext = transactional(&model, &broker, &unique_name("ledger-tx")).await;
    let tp: &TransactionalProducer = kontext.transactional_producer().unwrap();

    let aborted = tp
        .transaction(async |t| {
            t.produce(&Entry { n: 1 }).await?;
            t.produce(&Entry { n: 2 }).await?;
            Err::<(), _>(AppError::ChangedMyMind)
        })
        .await;
    assert!(
        matches!(aborted, Err(AppError::ChangedMyMind)),
        "{aborted:?}"
    );
    let committed = tp
        .transaction(async |t| {
            let d3 = t.produce(&Entry { n: 3 }).await?;
            let d4 = t.produce(&Entry { n: 4 }).await?;
            Ok::<_, AppError>((d3, d4))
        })
        .await
        .unwrap();
    assert_eq!(&*committed.0.topic, topic.as_str());

    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&handled);
    let consumer = Kontext::builder(model.clone())
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(unique_name("g"))))
        .broker(broker.clone())
        .consumers(move |c| {
            c.handler(move |e: Entry, _: MessageContext| {
                let h = Arc::clone(&h);
                async move {
                    h.lock().unwrap().push(e.n);
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    wait_until("the committed transaction handled", async || {
        let seen: BTreeSet<u32> = handled.lock().unwrap().iter().copied().collect();
        ready(seen.contains(&3) && seen.contains(&4), || {
            format!("{seen:?}")
        })
    })
    .await;
    if external() {
        // Both partitions are past the aborted records by now (the
        // committed ones came after them), so nothing more will come.
        let mut seen = handled.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(
            seen,
            vec![3, 4],
            "read committed: the aborted pair is not seen"
        );
        assert_eq!(
            read_raw(&broker, &topic, "read_committed", 2),
            vec![3, 4],
            "a raw read-committed consumer agrees"
        );
        assert_eq!(
            read_raw(&broker, &topic, "read_uncommitted", 4),
            vec![1, 2, 3, 4],
            "read uncommitted: the aborted records are in the log"
        );
        // A kontext consumer configured to read uncommitted sees them too.
        let all = Arc::new(Mutex::new(Vec::new()));
        let a = Arc::clone(&all);
        let uncommitted = Kontext::builder(model.clone())
            .settings(KafkaSettings::new().consumer(|c| {
                c.group_id = Some(unique_name("g"));
                c.isolation_level = Some(IsolationLevel::ReadUncommitted);
            }))
            .broker(broker.clone())
            .consumers(move |c| {
                c.handler(move |e: Entry, _: MessageContext| {
                    let a = Arc::clone(&a);
                    async move {
                        a.lock().unwrap().push(e.n);
                        Ok(())
                    }
                });
            })
            .start()
            .await
            .unwrap();
        wait_until("every record handled, aborted ones too", async || {
            let mut seen = all.lock().unwrap().clone();
            seen.sort_unstable();
            ready(seen == [1, 2, 3, 4], || format!("{seen:?}"))
        })
        .await;
        uncommitted.shutdown(Duration::from_secs(10)).await.unwrap();
    } else {
        eprintln!("visibility not asserted: the embedded broker does not hide aborted records");
    }
    consumer.shutdown(Duration::from_secs(10)).await.unwrap();
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Two producers with one transactional id: the second's start fences the
/// first (a zombie of the same instance). The first's next transaction
/// fails as fenced, every one after it is refused, its process is not
/// ready saying why, and nothing it produced is visible; the second
/// commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_whose_transactional_id_was_taken_over_is_fenced_for_good() {
    init_tracing();
    if !external() {
        // Its InitProducerId gives each producer a new producer id rather
        // than bumping the epoch of the id's, so nothing is fenced.
        eprintln!(
            "skipped: the embedded broker does not fence producers (set KONTEXT_TEST_BOOTSTRAP)"
        );
        return;
    }
    let broker = broker();
    let topic = unique_name("ledger");
    let model = model(&topic);
    let id = unique_name("ledger-tx");
    let zombie = transactional(&model, &broker, &id).await;
    zombie
        .transactional_producer()
        .unwrap()
        .transaction(async |t| {
            t.produce(&Entry { n: 1 }).await?;
            Ok::<_, kontext::Error>(())
        })
        .await
        .unwrap();
    let successor = transactional(&model, &broker, &id).await;

    let z = zombie.transactional_producer().unwrap();
    let fenced = z
        .transaction(async |t| {
            t.produce(&Entry { n: 2 }).await?;
            Ok::<_, kontext::Error>(())
        })
        .await;
    assert!(fenced.is_err(), "a zombie's transaction must not commit");
    assert!(z.fenced().is_some(), "the zombie knows it is fenced: {z:?}");
    let refused = z
        .transaction(async |t| {
            t.produce(&Entry { n: 3 }).await?;
            Ok::<_, kontext::Error>(())
        })
        .await;
    match refused {
        Err(kontext::Error::KafkaTransaction { failure, .. }) => {
            assert_eq!(failure, TransactionFailure::Fenced);
        }
        other => panic!("a fenced producer must refuse: {other:?}"),
    }
    let health = zombie.health();
    assert!(
        !health.ready
            && health
                .reasons
                .iter()
                .any(|r| r.contains("transactional producer fenced")),
        "{health:?}"
    );

    successor
        .transactional_producer()
        .unwrap()
        .transaction(async |t| {
            t.produce(&Entry { n: 4 }).await?;
            Ok::<_, kontext::Error>(())
        })
        .await
        .unwrap();
    assert!(successor.health().is_healthy(), "{:?}", successor.health());
    assert_eq!(
        read_raw(&broker, &topic, "read_committed", 2),
        vec![1, 4],
        "only committed transactions are visible; the zombie's later work is not"
    );
    successor.shutdown(Duration::from_secs(10)).await.unwrap();
    drop(zombie);
}

/// librdkafka's error classes, on the embedded broker's injected errors:
/// a retriable refusal is retried and the transaction commits; an abortable
/// one aborts the transaction (nothing of it is committed) and the next
/// transaction runs on the same producer; a fatal refusal at start fails
/// `start()` naming the call and the class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_errors_are_retried_aborted_or_reported_by_their_class() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    init_tracing();
    let broker = Broker::embedded().unwrap();
    let embedded = broker.as_embedded().unwrap();
    let topic = unique_name("ledger");
    let model = model(&topic);

    // Fatal at init: the transactional id is not authorized.
    embedded
        .fail_requests(
            RDKafkaApiKey::InitProducerId,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED],
        )
        .unwrap();
    let refused = Kontext::builder(model.clone())
        .broker(broker.clone())
        .transactional_producer(unique_name("ledger-tx"))
        .start()
        .await;
    match refused {
        Err(kontext::Error::KafkaTransaction {
            operation, failure, ..
        }) => {
            assert_eq!((operation, failure), ("init", TransactionFailure::Fatal));
        }
        other => panic!("start must fail naming the refused init: {other:?}"),
    }

    let kontext = transactional(&model, &broker, &unique_name("ledger-tx")).await;
    let tp = kontext.transactional_producer().unwrap();
    // Retriable: the coordinator is busy twice, then accepts.
    embedded
        .fail_requests(
            RDKafkaApiKey::AddPartitionsToTxn,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
            ],
        )
        .unwrap();
    tp.transaction(async |t| {
        t.produce(&Entry { n: 1 }).await?;
        Ok::<_, kontext::Error>(())
    })
    .await
    .unwrap();

    // Abortable: the topic is not authorized for this transaction.
    embedded
        .fail_requests(
            RDKafkaApiKey::AddPartitionsToTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        )
        .unwrap();
    let aborted = tp
        .transaction(async |t| {
            t.produce(&Entry { n: 2 }).await?;
            Ok::<_, kontext::Error>(())
        })
        .await;
    // The abortable error fails the produce (librdkafka purges the
    // transaction's queue): the work returns that error, and the
    // transaction is aborted, not the client replaced.
    assert!(
        matches!(aborted, Err(kontext::Error::Produce { .. })),
        "{aborted:?}"
    );
    assert!(tp.fenced().is_none());
    // The same producer goes on.
    tp.transaction(async |t| {
        t.produce(&Entry { n: 3 }).await?;
        Ok::<_, kontext::Error>(())
    })
    .await
    .unwrap();
    assert!(kontext.health().is_healthy(), "{:?}", kontext.health());
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A transaction its caller gave up on (the future dropped mid-work) is
/// left open on the client; the next transaction aborts it first and
/// commits. On Apache Kafka, nothing of the abandoned one is visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_caller_went_away_is_aborted_by_the_next() {
    init_tracing();
    let broker = broker();
    let topic = unique_name("ledger");
    let model = model(&topic);
    let kontext = transactional(&model, &broker, &unique_name("ledger-tx")).await;
    let tp = kontext.transactional_producer().unwrap();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(500),
        tp.transaction(async |t| {
            t.produce(&Entry { n: 1 }).await?;
            std::future::pending::<()>().await;
            Ok::<_, kontext::Error>(())
        }),
    )
    .await;
    assert!(abandoned.is_err(), "the caller went away");
    tp.transaction(async |t| {
        t.produce(&Entry { n: 2 }).await?;
        Ok::<_, kontext::Error>(())
    })
    .await
    .unwrap();
    assert!(tp.fenced().is_none());
    assert!(kontext.health().is_healthy(), "{:?}", kontext.health());
    if external() {
        assert_eq!(
            read_raw(&broker, &topic, "read_committed", 1),
            vec![2],
            "the abandoned transaction was aborted"
        );
    }
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Work that overruns the transaction's time (`transaction.timeout.ms`,
/// here from the shared raw section) is cut off and the transaction
/// aborted before the broker's own timeout would abort it and bump the
/// epoch; the producer is not taken for fenced and commits the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_past_the_transaction_timeout_is_aborted_not_fenced() {
    init_tracing();
    let broker = broker();
    let topic = unique_name("ledger");
    let model = model(&topic);
    let kontext = Kontext::builder(model.clone())
        .settings(KafkaSettings::new().set("transaction.timeout.ms", "2000"))
        .broker(broker.clone())
        .transactional_producer(unique_name("ledger-tx"))
        .start()
        .await
        .unwrap();
    let tp = kontext.transactional_producer().unwrap();
    let overran = tp
        .transaction(async |t| {
            t.produce(&Entry { n: 1 }).await?;
            std::future::pending::<()>().await;
            Ok::<_, kontext::Error>(())
        })
        .await;
    match overran {
        Err(kontext::Error::KafkaTransaction {
            operation, failure, ..
        }) => assert_eq!((operation, failure), ("work", TransactionFailure::Aborted)),
        other => panic!("work past the timeout must be aborted: {other:?}"),
    }
    tp.transaction(async |t| {
        t.produce(&Entry { n: 2 }).await?;
        Ok::<_, kontext::Error>(())
    })
    .await
    .unwrap();
    assert!(tp.fenced().is_none(), "{tp:?}");
    if external() {
        assert_eq!(read_raw(&broker, &topic, "read_committed", 1), vec![2]);
    }
    kontext.shutdown(Duration::from_secs(10)).await.unwrap();
}
