//! Serving the API and running the worker until asked to stop, for the
//! binaries: both stop gracefully (the API finishes its requests, then
//! kontext drains, commits and flushes) and say where they listen on
//! stdout, one line each, for scripts and tests.

use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Weak};

use kontext::Kontext;
use tokio_util::sync::CancellationToken;

use crate::api::{AppState, router};
use crate::application::ShipmentService;
use crate::infrastructure::{AppSettings, KontextShipments};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A binary's exit: its error on stderr, prefixed with its name, and a
/// failure code; success otherwise.
pub fn exit_code<E: std::fmt::Display>(
    binary: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints one line on stdout and flushes it (stdout may be a pipe).
pub fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A bound HTTP listener, so the address is known before serving.
pub async fn bind(app: &AppSettings) -> Result<tokio::net::TcpListener, BoxError> {
    tokio::net::TcpListener::bind(app.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", app.listen).into())
}

/// What kontext's router allows: admin commands only with a token
/// (`KONTEXT_ADMIN_TOKEN`); its long requests (a replay) end when
/// `stopping` is cancelled, so a graceful stop does not wait for them.
fn operations(stopping: &CancellationToken) -> kontext::http::HttpSettings {
    let settings = kontext::http::HttpSettings::read_only().stop_on(stopping.clone());
    match std::env::var("KONTEXT_ADMIN_TOKEN") {
        Ok(token) => settings.admin_token(token),
        Err(_) => settings,
    }
}

/// `stop`, cancelling `stopping` when it completes.
async fn and_cancel(stop: impl Future<Output = ()>, stopping: CancellationToken) {
    stop.await;
    stopping.cancel();
}

/// Runs a worker until `stop` completes, serving kontext's status page and
/// operator endpoints on `listener` under `/kontext` meanwhile; then stops
/// kontext within `timeout`.
pub async fn serve_status(
    kontext: Kontext,
    listener: tokio::net::TcpListener,
    timeout: std::time::Duration,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let kontext = Arc::new(kontext);
    let address = listener.local_addr()?;
    let stopping = CancellationToken::new();
    let routes = axum::Router::new().nest(
        "/kontext",
        kontext::http::router(&kontext, operations(&stopping)),
    );
    announce(&format!("worker status page on http://{address}/kontext"));
    axum::serve(listener, routes)
        .with_graceful_shutdown(and_cancel(stop, stopping))
        .await?;
    let kontext = Arc::try_unwrap(kontext)
        .map_err(|_| "the status server still holds kontext after it stopped")?;
    kontext.shutdown(timeout).await?;
    Ok(())
}

/// Serves the shipping API on `listener` until `stop` completes, then stops
/// kontext within the configured shutdown timeout.
pub async fn serve_api(
    kontext: Kontext,
    listener: tokio::net::TcpListener,
    app: &AppSettings,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let kontext = Arc::new(kontext);
    // The router holds a weak reference, so the last strong one is ours
    // and kontext can be shut down by value once serving ended.
    let weak: Weak<Kontext> = Arc::downgrade(&kontext);
    let state = AppState {
        service: ShipmentService::new(KontextShipments::new(&kontext)?),
        health: Box::new(move || weak.upgrade().map(|k| k.health())),
    };
    let address = listener.local_addr()?;
    announce(&format!("shipping-api listening on http://{address}"));
    // kontext's own page, status and operator commands next to the API.
    let stopping = CancellationToken::new();
    let routes = router(state, app.max_body_bytes).nest(
        "/kontext",
        kontext::http::router(&kontext, operations(&stopping)),
    );
    announce(&format!("kontext status page on http://{address}/kontext"));
    axum::serve(listener, routes)
        .with_graceful_shutdown(and_cancel(stop, stopping))
        .await?;
    tracing::info!("HTTP server stopped; stopping kontext");
    let kontext = Arc::try_unwrap(kontext)
        .map_err(|_| "the HTTP server still holds kontext after it stopped")?;
    kontext.shutdown(app.shutdown_timeout()).await?;
    Ok(())
}
