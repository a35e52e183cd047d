//! The shipping API alone: `POST /api/shipments` writes the shipment and
//! its event in one transaction (outbox); the relay sends it. Registers
//! the outbox, its relay and the producer only.
//!
//! `cargo run -p kontext-shipping --bin shipping-api [-- --config path]`
//! with `[kafka] bootstrap_servers` (or `KONTEXT_BOOTSTRAP_SERVERS`) naming
//! the dev broker or Kafka: on the embedded default the worker, in another
//! process, could not reach its broker (use the `shipping` binary then).

use std::process::ExitCode;

use kontext_shipping::infrastructure::{
    SHIPPING_API, config_path, init_tracing, load, start_shipping,
};
use kontext_shipping::run::{bind, exit_code, serve_api};

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    exit_code("shipping-api", run().await)
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let path = config_path();
    let config = load(&path, SHIPPING_API).map_err(|e| e.to_string())?;
    if config.kontext.kafka.bootstrap_servers.is_none() {
        tracing::warn!(
            "no bootstrap_servers configured: the embedded broker lives in this process, so no worker elsewhere can read its events; run the `shipping` binary for both roles in one process, or `dev-broker`"
        );
    }
    let listener = bind(&config.app).await?;
    let kontext = start_shipping(config.kontext, None).await?;
    serve_api(kontext, listener, &config.app, kontext::shutdown_signal()).await
}
