//! The signals a service is asked to stop with.

/// Completes when the process is asked to stop: SIGTERM (what systemd,
/// Kubernetes and container runtimes send) or SIGINT (ctrl-c) on Unix,
/// ctrl-c elsewhere. For [`Kontext::run_until`](crate::Kontext::run_until):
///
/// ```no_run
/// # async fn run(kontext: kontext::Kontext) -> kontext::Result<()> {
/// kontext
///     .run_until(kontext::shutdown_signal(), std::time::Duration::from_secs(30))
///     .await
/// # }
/// ```
///
/// If a handler cannot be installed (no signal support in this
/// environment), the error is logged and this waits for ctrl-c alone.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    r = tokio::signal::ctrl_c() => log_ctrl_c(r),
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only ctrl-c stops this service")
            }
        }
    }
    log_ctrl_c(tokio::signal::ctrl_c().await);
}

fn log_ctrl_c(result: std::io::Result<()>) {
    match result {
        Ok(()) => tracing::info!("SIGINT received"),
        // Without a handler the future never completes meaningfully; stop
        // rather than run unstoppable.
        Err(e) => tracing::warn!(error = %e, "cannot listen for ctrl-c; stopping"),
    }
}
