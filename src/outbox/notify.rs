//! Wake-up across processes on PostgreSQL (`LISTEN/NOTIFY`).
//!
//! A process that writes outbox rows without relaying them (a writer-only
//! API, or `run_relay: false`) has nobody in process to wake: its wake-ups
//! (every commit through `OutboxTransaction` or a unit of work, and
//! `Outbox::wake`) become a `NOTIFY` that every listening relay receives,
//! so a relay elsewhere sends the rows at once instead of at its next poll.
//! The notification is sent after the commit, from one task that coalesces
//! bursts, not inside the writers' transactions: PostgreSQL serializes the
//! commits of transactions that notify, which would halve a busy writer's
//! commit rate. A process that relays wakes its own relay in process and
//! sends nothing. Polling stays as the fallback for notifications lost
//! while a listener reconnects.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::ConnectionTrait as _;
use sea_orm::sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::backoff::Backoff;

/// Pauses between the listener's attempts to connect.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));

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
        let pause = RECONNECT.delay(failures);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Turns this writer-only process's wake-ups into notifications until
/// cancelled. Wake-ups that arrive while one is being sent coalesce into
/// the next.
pub(super) async fn announce(inner: Arc<Inner>, cancel: CancellationToken) {
    let statement = format!("NOTIFY {CHANNEL}");
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = inner.wake.notified() => {}
        }
        if let Err(e) = inner.db.execute_unprepared(&statement).await {
            tracing::debug!(error = %e, "could not notify the outbox relays; they find the rows at their next poll");
        }
    }
}
