//! The status page in a real browser (Debian's `chromium`, headless, driven
//! by `playwright-core` from npm; `.ci/run` installs both): it lists the
//! running service and its partitions, pause shows the type paused and
//! stops its handled counter, resume restarts it, and replay moves a dead
//! letter back, and the topic's recent messages show decoded with the
//! sensitive field redacted. Saves `target/status-page.png`. Skipped, saying so, where
//! the browser or the driver is missing, unless `KONTEXT_REQUIRE_BROWSER`
//! is set (CI sets it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kontext::http::{HttpSettings, router};
use kontext::prelude::*;
use kontext::testing::unique_name;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Parcel {
    id: u32,
    recipient: String,
}

/// Where the driver and the browser are, or why the test cannot run.
fn tools() -> Result<(PathBuf, PathBuf), String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let driver_dir = root.join("target/browser");
    let chromium = std::env::var("KONTEXT_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !PathBuf::from(&chromium).exists() {
        return Err(format!(
            "no browser at {chromium} (apt-get install chromium)"
        ));
    }
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
    Ok((driver_dir, root.join("target/status-page.png")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_pauses_resumes_and_replays_in_a_real_browser() {
    let (driver_dir, screenshot) = match tools() {
        Ok(t) => t,
        Err(why) if std::env::var_os("KONTEXT_REQUIRE_BROWSER").is_none() => {
            eprintln!("SKIPPED the browser test: {why}");
            return;
        }
        Err(why) => panic!("the browser test cannot run: {why}"),
    };
    let topic = unique_name("browser-parcels");
    let model = Model::builder()
        .topic::<Parcel>(|t| {
            t.name(topic.as_str())
                .partitions(2)
                .key(|p| p.id)
                .sensitive(["recipient"])
                .consumer(|c| c.retry(RetryPolicy::none()))
        })
        .build()
        .unwrap();
    // Parcel 3 fails the first time it comes: one dead letter to replay.
    let failed_once: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let second_try = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let replayed = Arc::clone(&second_try);
    let k = Kontext::builder(model)
        .broker(broker())
        .settings(KafkaSettings::new().consumer(|c| c.group_id = Some(unique_name("browser"))))
        .producer()
        .consumers(move |c| {
            c.handler(move |p: Parcel, _ctx: MessageContext| {
                let failed_once = Arc::clone(&failed_once);
                let second_try = Arc::clone(&second_try);
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    if p.id == 3 && failed_once.lock().unwrap().insert(p.id) {
                        return Err(HandlerError::dead_letter("the first try of parcel 3 fails"));
                    }
                    if p.id == 3 {
                        second_try.store(true, std::sync::atomic::Ordering::Release);
                    }
                    Ok(())
                }
            });
        })
        .start()
        .await
        .unwrap();
    let k = Arc::new(k);
    let token = "browser-test-token";
    let app = axum::Router::new().nest(
        "/kontext",
        router(&k, HttpSettings::read_only().admin_token(token)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .unwrap();
        })
    };
    // Parcels keep coming, so a paused counter would move if it could.
    let producing = {
        let (k, stop) = (Arc::clone(&k), stop.clone());
        tokio::spawn(async move {
            let p = k.producer().unwrap();
            let mut id = 1;
            while !stop.is_cancelled() {
                let recipient = "Ada Lovelace".to_owned();
                p.produce(&Parcel { id, recipient }).await.unwrap();
                id += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    wait_until("the dead letter", async || {
        let s = k.registry().type_status::<Parcel>().unwrap();
        ready(s.dead_lettered == 1, || format!("{s:?}"))
    })
    .await;

    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/status_page.mjs"),
        driver_dir.join("status_page.mjs"),
    )
    .unwrap();
    let url = format!("http://{address}/kontext");
    let shot = screenshot.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(driver_dir.join("status_page.mjs"))
            .args([url.as_str(), token, shot.to_str().unwrap(), "Ada Lovelace"])
            .current_dir(&driver_dir)
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
    // The replayed parcel was handled, not dead-lettered again.
    wait_until("the replayed parcel handled", async || {
        let done = replayed.load(std::sync::atomic::Ordering::Acquire);
        ready(done, || "parcel 3 not handled again yet".into())
    })
    .await;
    let s = k.registry().type_status::<Parcel>().unwrap();
    assert_eq!(s.dead_lettered, 1, "{s:?}");
    stop.cancel();
    producing.await.unwrap();
    server.await.unwrap();
    let k = Arc::into_inner(k).expect("the server let go of kontext");
    k.shutdown(Duration::from_secs(10)).await.unwrap();
}
