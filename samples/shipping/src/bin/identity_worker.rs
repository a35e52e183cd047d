//! The identity worker alone: consumes `ShipmentCreatedEvent` with the
//! inbox in a unit of work, writes a user-activity row and publishes
//! `UserActivityRecorded` through its own outbox. Registers consumers only
//! (and the outbox for its follow-up events).
//!
//! With `[identity-worker] status_listen` set it serves kontext's status
//! page and operator endpoints there, under `/kontext`.
//!
//! `cargo run -p kontext-shipping --bin identity-worker [-- --config path]`

use std::process::ExitCode;

use kontext_shipping::infrastructure::{
    IDENTITY_WORKER, config_path, init_tracing, load, start_identity,
};
use kontext_shipping::run::{announce, exit_code, serve_status};

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    exit_code("identity-worker", run().await)
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let path = config_path();
    let config = load(&path, IDENTITY_WORKER).map_err(|e| e.to_string())?;
    let timeout = config.app.shutdown_timeout();
    let kontext = start_identity(config.kontext, None).await?;
    announce(&format!(
        "identity-worker consuming from {}",
        kontext.broker().bootstrap_servers()
    ));
    // Drains what it holds, commits its offsets, lets the relay finish.
    match config.app.status_listen {
        Some(at) => {
            let listener = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| format!("cannot listen on {at}: {e}"))?;
            serve_status(kontext, listener, timeout, kontext::shutdown_signal()).await
        }
        None => Ok(kontext
            .run_until(kontext::shutdown_signal(), timeout)
            .await?),
    }
}
