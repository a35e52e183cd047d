//! A Kafka broker for development, with nothing installed: kontext's
//! embedded cluster in its own process on a loopback port, with the
//! shipping model's topics created. Run the API and the worker against it
//! as two processes:
//!
//! ```text
//! cargo run -p kontext-shipping --bin dev-broker                 # 127.0.0.1:9092
//! KONTEXT_BOOTSTRAP_SERVERS=127.0.0.1:9092 cargo run -p kontext-shipping --bin identity-worker
//! KONTEXT_BOOTSTRAP_SERVERS=127.0.0.1:9092 cargo run -p kontext-shipping --bin shipping-api
//! ```
//!
//! `--listen host:port` picks another address (port 0: any free one). The
//! first line on stdout is `dev broker listening on <address>`. It keeps
//! everything in memory: stopping it (SIGTERM, ctrl-c) loses the topics.

use std::net::SocketAddr;
use std::process::ExitCode;

use kontext::broker::DevBroker;
use kontext_shipping::infrastructure::{SHIPPING_API, config_path, init_tracing, load, model};
use kontext_shipping::run::{announce, exit_code};

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing();
    exit_code("dev-broker", run().await)
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 9092));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--listen" {
            let value = args.next().ok_or("--listen needs host:port")?;
            listen = value
                .parse()
                .map_err(|e| format!("--listen {value}: {e}"))?;
        }
    }
    // The topics as the services will name them: the file's `[kafka.topics]`
    // overrides apply.
    let config = load(&config_path(), SHIPPING_API).map_err(|e| e.to_string())?;
    let dev = DevBroker::start(listen).await?;
    let report = dev.create_topics(&model()?, &config.kontext.kafka).await?;
    tracing::info!(topics = ?report.created, "topics created");
    announce(&format!("dev broker listening on {}", dev.address()));
    announce(&format!(
        "export KONTEXT_BOOTSTRAP_SERVERS={}",
        dev.address()
    ));
    kontext::shutdown_signal().await;
    dev.stop().await;
    Ok(())
}
