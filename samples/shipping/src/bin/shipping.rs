//! Both services in one process, on the embedded defaults: the shipping
//! API (axum, outbox) and the identity worker (inbox, unit of work, its own
//! outbox) share one embedded broker, each with its own SQLite database.
//! This is the one command for a first look:
//!
//! ```text
//! cargo run -p kontext-shipping --bin shipping            # serves until ctrl-c
//! cargo run -p kontext-shipping --bin shipping -- --demo 50
//! ```
//!
//! `--demo N` posts N shipments (and one bad request) to its own API over
//! HTTP, waits until the worker recorded each one, prints what each
//! database holds and stops. With `[kafka] bootstrap_servers` set, both
//! roles use that broker instead.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use kontext::Broker;
use kontext_shipping::domain::{Shipment, ShipmentCreatedEvent};
use kontext_shipping::infrastructure::{
    IDENTITY_WORKER, SHIPPING_API, config_path, init_tracing, load, start_identity, start_shipping,
};
use kontext_shipping::run::{announce, bind, exit_code, serve_api};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    exit_code("shipping", run().await)
}

fn demo_count() -> Result<Option<u32>, BoxError> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--demo" {
            let n = args.next().unwrap_or_else(|| "50".into());
            return Ok(Some(n.parse().map_err(|e| format!("--demo {n}: {e}"))?));
        }
    }
    Ok(None)
}

async fn run() -> Result<(), BoxError> {
    let demo = demo_count()?;
    let path = config_path();
    let api = load(&path, SHIPPING_API).map_err(|e| e.to_string())?;
    let worker = load(&path, IDENTITY_WORKER).map_err(|e| e.to_string())?;
    // One broker for both roles: the embedded one lives in this process.
    let broker = Broker::from_settings(&api.kontext.kafka)?;
    let identity = start_identity(worker.kontext, Some(broker.clone())).await?;
    let identity_db = identity.database()?.clone();
    let shipping = start_shipping(api.kontext, Some(broker)).await?;
    let shipping_db = shipping.database()?.clone();
    let mut app = api.app.clone();
    if demo.is_some() {
        // A demo run must not collide with a server already on 8080.
        app.listen.set_port(0);
    }
    let listener = bind(&app).await?;
    let address = listener.local_addr()?;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        tokio::select! {
            _ = kontext::shutdown_signal() => {}
            _ = stop_rx => {}
        }
    };
    let server = tokio::spawn(async move { serve_api(shipping, listener, &app, stop).await });

    let outcome = match demo {
        Some(n) => demo_run(&format!("http://{address}"), n, &shipping_db, &identity_db).await,
        None => {
            announce("serving until SIGTERM or ctrl-c; try:");
            announce(&format!(
                "  curl -s -XPOST http://{address}/api/shipments -H 'content-type: application/json' -d '{{\"user_id\": 7, \"warehouse\": \"ams-1\", \"destination\": \"Utrecht\"}}'"
            ));
            Ok(())
        }
    };
    if demo.is_some() {
        let _ = stop_tx.send(());
    }
    let served = server
        .await
        .map_err(|e| format!("the API task failed: {e}"))?;
    identity.shutdown(worker.app.shutdown_timeout()).await?;
    outcome?;
    served
}

async fn count(db: &DatabaseConnection, sql: &str) -> Result<i64, BoxError> {
    let row = db
        .query_one(Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await?
        .ok_or("a count returned no row")?;
    Ok(row.try_get::<i64>("", "n")?)
}

async fn demo_run(
    base: &str,
    n: u32,
    shipping_db: &DatabaseConnection,
    identity_db: &DatabaseConnection,
) -> Result<(), BoxError> {
    let http = reqwest::Client::new();
    let activities_before = count(identity_db, "SELECT COUNT(*) AS n FROM user_activity").await?;
    let started = Instant::now();
    let mut created: Vec<Shipment> = Vec::new();
    for i in 0..n {
        let response = http
            .post(format!("{base}/api/shipments"))
            .json(&serde_json::json!({
                "user_id": 1 + i64::from(i % 20),
                "warehouse": "ams-1",
                "destination": format!("Utrecht {i}"),
            }))
            .send()
            .await?;
        if response.status() != reqwest::StatusCode::CREATED {
            return Err(format!(
                "POST answered {}: {}",
                response.status(),
                response.text().await?
            )
            .into());
        }
        created.push(response.json().await?);
    }
    let bad = http
        .post(format!("{base}/api/shipments"))
        .header("content-type", "application/json")
        .body(r#"{"user_id": 7, "warehouse": "ams-1"}"#)
        .send()
        .await?;
    println!(
        "a request without `destination`: {} {}",
        bad.status(),
        bad.text().await?
    );
    if let Some(first) = created.first() {
        let read: Shipment = http
            .get(format!("{base}/api/shipments/{}", first.id))
            .send()
            .await?
            .json()
            .await?;
        println!(
            "GET /api/shipments/{} -> {} to {}",
            read.id, read.warehouse, read.destination
        );
    }

    // The worker records each shipment once; wait for it with a deadline.
    let want = activities_before + i64::from(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = count(identity_db, "SELECT COUNT(*) AS n FROM user_activity").await?;
        if have >= want {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the worker recorded {} of {n} shipments within 60 s",
                have - activities_before
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = created.iter().map(ShipmentCreatedEvent::from).count();
    println!(
        "{n} shipments created over HTTP ({events} ShipmentCreatedEvent through the outbox); identity recorded all {n} in {:.2?}",
        started.elapsed()
    );
    println!(
        "shipping database: {} shipments, {} outbox rows pending",
        count(shipping_db, "SELECT COUNT(*) AS n FROM shipment").await?,
        count(shipping_db, "SELECT COUNT(*) AS n FROM kontext_outbox").await?
    );
    println!(
        "identity database: {} user-activity rows, {} inbox rows",
        count(identity_db, "SELECT COUNT(*) AS n FROM user_activity").await?,
        count(identity_db, "SELECT COUNT(*) AS n FROM kontext_inbox").await?
    );
    Ok(())
}
