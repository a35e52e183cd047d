//! Wake-up across processes on PostgreSQL (`LISTEN/NOTIFY`).
//!
//! A process that writes outbox rows without relaying them (a writer-only
//! API, or `run_relay: false`) queues a notification with each row; it is
//! delivered to every listening relay when the transaction commits, so a
//! relay elsewhere sends the row at once instead of at its next poll. A
//! process that relays wakes its own relay in process and sends nothing:
//! notifications serialize the commits that carry them, so they are kept to
//! where they are needed. Polling stays as the fallback for notifications
//! lost while a listener reconnects.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::Inner;

/// The channel relays listen on.
pub(super) const CHANNEL: &str = "kontext_outbox";

/// Wakes `inner`'s relay on every notification until cancelled. Holds one
/// connection of the pool while it runs; reconnects after failures.
pub(super) async fn listen(inner: Arc<Inner>, cancel: CancellationToken) {
    let pool = inner.db.get_postgres_connection_pool().clone();
    let mut failures = 0u32;
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sea_orm::sqlx::Error>(listener)
        };
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            r = connected => r,
        };
        match result {
            Ok(mut listener) => {
                failures = 0;
                // Rows may have been committed while it was not listening.
                inner.wake.notify_one();
                loop {
                    let next = tokio::select! {
                        () = cancel.cancelled() => return,
                        n = listener.try_recv() => n,
                    };
                    match next {
                        Ok(Some(_)) => inner.wake.notify_one(),
                        // Reconnected: whatever was sent meanwhile is lost.
                        Ok(None) => inner.wake.notify_one(),
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox listener failed; relays poll until it reconnects");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbox listener could not connect; relays poll until it does");
            }
        }
        failures = failures.saturating_add(1);
        let pause = Duration::from_millis(200) * failures.min(25);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
