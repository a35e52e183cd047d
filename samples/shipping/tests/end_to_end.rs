//! The shipping API and the identity worker as processes, against the dev
//! broker (its own process) or the Kafka `KONTEXT_TEST_BOOTSTRAP` names,
//! on SQLite files or the PostgreSQL server of `DATABASE_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Process, until, write_config};

use kontext::Broker;
use kontext::testing::{fresh_database_url, read_topic, unique_name};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

/// Offsets the group committed, and the end of each partition.
fn committed_and_end(bootstrap: &str, group: &str, topic: &str) -> (Vec<i64>, Vec<i64>) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(30))
        .unwrap();
    let mut got = Vec::new();
    let mut ends = Vec::new();
    for p in 0..partitions {
        let offset = committed.find_partition(topic, p).unwrap().offset();
        got.push(match offset {
            Offset::Offset(o) => o,
            _ => -1,
        });
        ends.push(
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(30))
                .unwrap()
                .1,
        );
    }
    (got, ends)
}

/// 200 shipments over HTTP; the worker is killed with SIGKILL halfway and
/// restarted: it records each shipment exactly once (the inbox), loses
/// none, and its follow-up event exists for each. Bad requests write
/// nothing. SIGTERM stops each service with exit code 0, everything sent
/// and committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipments_posted_over_http_are_recorded_once_across_a_worker_crash() {
    let dir = tempfile::tempdir().unwrap();
    let created = unique_name("e2e.shipment.created");
    let recorded = unique_name("e2e.user-activity.recorded");
    let group = unique_name("e2e-identity");
    let config = write_config(dir.path(), &created, &recorded, &group, false);

    // The broker: Kafka when the environment names one, else the dev broker.
    let (_dev, bootstrap) = match std::env::var("KONTEXT_TEST_BOOTSTRAP") {
        Ok(b) if !b.is_empty() => (None, b),
        _ => {
            let dev = Process::start(
                "dev-broker",
                &["--listen", "127.0.0.1:0", "--config", &config],
                &[],
            );
            let address = dev.line("dev broker listening on ");
            (Some(dev), address)
        }
    };
    let api_db_url = fresh_database_url().await.unwrap();
    let worker_db_url = fresh_database_url().await.unwrap();
    let env = vec![
        ("KONTEXT_BOOTSTRAP_SERVERS", bootstrap.clone()),
        ("KONTEXT_SHIPPING_API_DATABASE_URL", api_db_url.clone()),
        (
            "KONTEXT_IDENTITY_WORKER_DATABASE_URL",
            worker_db_url.clone(),
        ),
    ];
    let args = ["--config", config.as_str()];
    let mut worker = Process::start("identity-worker", &args, &env);
    worker.line("identity-worker consuming from ");
    let mut api = Process::start("shipping-api", &args, &env);
    let base = api.line("shipping-api listening on ");
    let http = reqwest::Client::new();
    let worker_db = kontext::db::connect(&worker_db_url).await.unwrap();
    let api_db = kontext::db::connect(&api_db_url).await.unwrap();

    until("the API is ready", Duration::from_secs(60), || async {
        let r = http.get(format!("{base}/health/ready")).send().await.ok()?;
        (r.status() == reqwest::StatusCode::OK).then_some(())
    })
    .await;

    // kontext's status page and document are mounted next to the API;
    // its admin commands are off without a token.
    let page = http.get(format!("{base}/kontext")).send().await.unwrap();
    assert_eq!(page.status(), reqwest::StatusCode::OK);
    let status: serde_json::Value = http
        .get(format!("{base}/kontext/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["admin"], serde_json::json!(false), "{status}");
    assert!(status["outbox"]["pending"].is_u64(), "{status}");
    let pause = http
        .post(format!("{base}/kontext/admin/pause"))
        .header("content-type", "application/json")
        .body(r#"{"topic": "shipments"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(pause.status(), reqwest::StatusCode::NOT_FOUND);

    // Bad requests: a JSON error each, nothing written.
    let post = |body: String| {
        http.post(format!("{base}/api/shipments"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, status) in [
        (r#"{"user_id": 1, "warehouse": "#.to_owned(), 400),
        (r#"{"user_id": 1, "warehouse": "ams-1"}"#.to_owned(), 400),
        (
            r#"{"user_id": 1, "warehouse": "ams-1", "destination": ""}"#.to_owned(),
            400,
        ),
        // NUL and other control characters: refused here, not by
        // PostgreSQL later with a 503.
        (
            r#"{"user_id": 1, "warehouse": "ams\u00001", "destination": "Utrecht"}"#.to_owned(),
            400,
        ),
        (
            r#"{"user_id": 1, "warehouse": "ams-1", "destination": "Utrecht\u0007"}"#.to_owned(),
            400,
        ),
        (
            format!(
                r#"{{"user_id": 1, "warehouse": "ams-1", "destination": "{}"}}"#,
                "x".repeat(8192)
            ),
            413,
        ),
    ] {
        let response = post(body.clone()).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{body:.60}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{error}"
        );
    }
    assert_eq!(
        count(&api_db, "SELECT COUNT(*) AS n FROM shipment").await,
        0
    );
    assert_eq!(
        count(&api_db, "SELECT COUNT(*) AS n FROM kontext_outbox").await,
        0
    );

    let mut posted = BTreeSet::new();
    let mut create = async |i: i64| {
        let response = post(format!(
            r#"{{"user_id": {}, "warehouse": "ams-1", "destination": "Utrecht {i}"}}"#,
            1 + i % 20
        ))
        .await
        .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::CREATED);
        let shipment: serde_json::Value = response.json().await.unwrap();
        posted.insert(shipment["id"].as_str().unwrap().to_owned());
    };
    for i in 0..100 {
        create(i).await;
    }
    // Halfway through the worker's share: kill it where it stands.
    until(
        "the worker handled some shipments",
        Duration::from_secs(120),
        || async {
            (count(&worker_db, "SELECT COUNT(*) AS n FROM user_activity").await >= 20).then_some(())
        },
    )
    .await;
    worker.child.kill().unwrap();
    worker.child.wait().unwrap();
    for i in 100..200 {
        create(i).await;
    }
    assert_eq!(posted.len(), 200);
    let mut worker = Process::start("identity-worker", &args, &env);
    worker.line("identity-worker consuming from ");

    until(
        "the worker recorded 200 shipments",
        Duration::from_secs(180),
        || async {
            (count(&worker_db, "SELECT COUNT(*) AS n FROM user_activity").await >= 200)
                .then_some(())
        },
    )
    .await;
    until(
        "the worker's outbox is empty",
        Duration::from_secs(60),
        || async {
            (count(&worker_db, "SELECT COUNT(*) AS n FROM kontext_outbox").await == 0).then_some(())
        },
    )
    .await;

    // SIGTERM: each exits 0 within its shutdown timeout, everything done.
    api.signal("-TERM");
    let status = api.exit(Duration::from_secs(30));
    assert!(status.success(), "shipping-api exited with {status}");
    worker.signal("-TERM");
    let status = worker.exit(Duration::from_secs(30));
    assert!(status.success(), "identity-worker exited with {status}");

    // Exactly once in the worker's database, each shipment posted.
    assert_eq!(
        count(&worker_db, "SELECT COUNT(*) AS n FROM user_activity").await,
        200
    );
    let recorded_ids: BTreeSet<String> = worker_db
        .query_all(Statement::from_string(
            worker_db.get_database_backend(),
            "SELECT shipment_id FROM user_activity".to_owned(),
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "shipment_id").unwrap())
        .collect();
    assert_eq!(recorded_ids, posted, "every posted shipment recorded, once");
    assert_eq!(
        count(&api_db, "SELECT COUNT(*) AS n FROM shipment").await,
        200
    );
    assert_eq!(
        count(&api_db, "SELECT COUNT(*) AS n FROM kontext_outbox").await,
        0
    );

    // The follow-up topic: an event for each shipment. A second copy of
    // one is possible only for rows the killed worker's relay had sent but
    // not yet deleted (the outbox is at-least-once); the inbox kept the
    // redelivered shipment events from writing new rows.
    let broker = Broker::external(bootstrap.clone());
    let (_, ends) = committed_and_end(&bootstrap, &unique_name("e2e-reader"), &recorded);
    let total: i64 = ends.iter().sum();
    let records = read_topic(&broker, &recorded, total as usize, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(records.len() as i64, total);
    let announced: BTreeSet<String> = records
        .iter()
        .map(|r| {
            let v: serde_json::Value =
                serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
            v["shipment_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(announced, posted, "a follow-up event for every shipment");
    eprintln!(
        "follow-up events: {total} records for 200 shipments ({} resent by the killed worker's relay)",
        total - 200
    );

    // The worker committed everything it handled before it exited.
    let (committed, ends) = committed_and_end(&bootstrap, &group, &created);
    assert_eq!(
        committed, ends,
        "committed offsets at the end of every partition"
    );
}
