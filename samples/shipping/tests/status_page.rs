//! The running sample's status page in a real browser (Debian's `chromium`,
//! headless, driven by `playwright-core` from npm; `.ci/run` installs
//! both): the shipping API and the identity worker as processes, shipments
//! posted while the page lists the worker's service and partitions, pauses
//! the consumed type (its handled counter stops while shipments keep
//! coming), resumes it, replays a poison record's dead letter with the
//! button, and shows the topic's recent messages with the customer
//! redacted. Skipped, saying so, where the browser or the driver is
//! missing, unless `KONTEXT_REQUIRE_BROWSER` is set (CI sets it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Process, until, write_config};
use kontext::testing::{fresh_database_url, unique_name};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value;

/// A customer id that appears nowhere but in the events' payloads.
const CUSTOMER: i64 = 987_654_321;

/// Where the driver is, or why the test cannot run.
fn driver() -> Result<PathBuf, String> {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let chromium = std::env::var("KONTEXT_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !PathBuf::from(&chromium).exists() {
        return Err(format!(
            "no browser at {chromium} (apt-get install chromium)"
        ));
    }
    let driver_dir = root.join("target/browser");
    if !driver_dir.join("node_modules/playwright-core").exists() {
        return Err(format!(
            "no playwright-core in {} (npm install --prefix target/browser playwright-core@1.65.2)",
            driver_dir.display()
        ));
    }
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("no node on PATH".into());
    }
    Ok(driver_dir)
}

/// The worker's consumed type, as `/kontext/status` shows it.
async fn shipments(http: &reqwest::Client, status: &str) -> Option<Value> {
    let s: Value = http.get(status).send().await.ok()?.json().await.ok()?;
    s["types"]
        .as_array()?
        .iter()
        .find(|t| t["type"] == "ShipmentCreatedEvent")
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_samples_status_page_pauses_resumes_replays_and_redacts() {
    let driver_dir = match driver() {
        Ok(d) => d,
        Err(why) if std::env::var_os("KONTEXT_REQUIRE_BROWSER").is_none() => {
            eprintln!("SKIPPED the sample's browser test: {why}");
            return;
        }
        Err(why) => panic!("the sample's browser test cannot run: {why}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let created = unique_name("page.shipment.created");
    let recorded = unique_name("page.user-activity.recorded");
    let group = unique_name("page-identity");
    let config = write_config(dir.path(), &created, &recorded, &group, true);
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
    let token = "sample-page-token";
    let env = vec![
        ("KONTEXT_BOOTSTRAP_SERVERS", bootstrap.clone()),
        (
            "KONTEXT_SHIPPING_API_DATABASE_URL",
            fresh_database_url().await.unwrap(),
        ),
        (
            "KONTEXT_IDENTITY_WORKER_DATABASE_URL",
            fresh_database_url().await.unwrap(),
        ),
        ("KONTEXT_ADMIN_TOKEN", token.to_owned()),
    ];
    let args = ["--config", config.as_str()];
    let mut worker = Process::start("identity-worker", &args, &env);
    let page = worker.line("worker status page on ");
    let mut api = Process::start("shipping-api", &args, &env);
    let base = api.line("shipping-api listening on ");
    let http = reqwest::Client::new();
    let status = format!("{page}/status");

    // Shipments keep coming, so a paused counter would move if it could.
    let stop = Arc::new(AtomicBool::new(false));
    let posting = {
        let (http, stop) = (http.clone(), Arc::clone(&stop));
        let url = format!("{base}/api/shipments");
        tokio::spawn(async move {
            let body = format!(
                r#"{{"user_id": {CUSTOMER}, "warehouse": "ams-1", "destination": "Utrecht"}}"#
            );
            while !stop.load(Ordering::Acquire) {
                // The API may still be starting: a refused post is retried.
                let _ = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // A poison record: its type's name, bytes no codec takes. It becomes
    // the dead letter the page replays.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    until(
        "the worker's consumed type",
        Duration::from_secs(60),
        || shipments(&http, &status),
    )
    .await;
    producer
        .send(
            BaseRecord::to(&created)
                .key("poison")
                .payload("not a shipment")
                .headers(OwnedHeaders::new().insert(Header {
                    key: "ce_type",
                    value: Some("ShipmentCreatedEvent"),
                })),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
    until("the dead letter", Duration::from_secs(60), || async {
        let t = shipments(&http, &status).await?;
        (t["dead_lettered"] == 1 && t["handled"].as_u64()? > 0).then_some(())
    })
    .await;

    let script = driver_dir.join("status_page.mjs");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/browser/status_page.mjs"
        ),
        &script,
    )
    .unwrap();
    let screenshot = driver_dir.join("../status-page-sample.png");
    let shot = screenshot.clone();
    let out = tokio::task::spawn_blocking(move || {
        let customer = CUSTOMER.to_string();
        std::process::Command::new("node")
            .arg(&script)
            .args([
                page.as_str(),
                token,
                shot.to_str().unwrap(),
                customer.as_str(),
                "ShipmentCreatedEvent",
            ])
            .current_dir(script.parent().unwrap())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("browser test: ok"), "{said}");
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000);
    // The replayed poison came back to its topic, was read again and
    // refused again: a second dead letter, nothing else lost.
    until(
        "the replayed record read again",
        Duration::from_secs(60),
        || async {
            let t = shipments(&http, &status).await?;
            (t["dead_lettered"] == 2).then_some(())
        },
    )
    .await;

    stop.store(true, Ordering::Release);
    posting.await.unwrap();
    api.signal("-TERM");
    worker.signal("-TERM");
    assert!(api.exit(Duration::from_secs(60)).success());
    assert!(worker.exit(Duration::from_secs(60)).success());
}
