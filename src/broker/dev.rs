//! The development broker: the embedded cluster served on a fixed loopback
//! address, so an API and a worker running as two processes share one
//! broker with nothing installed.
//!
//! librdkafka's mock cluster binds an ephemeral port and cannot be told
//! another; the dev broker listens on the address asked for, forwards each
//! connection to the mock, and makes the mock's metadata name the listening
//! address, so clients never learn the ephemeral one. The mock has no
//! CreateTopics, so [`DevBroker::create_topics`] creates a model's topics
//! through the mock's own API before clients connect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::broker::{
    Broker, EmbeddedBroker, ProvisionReport, TopicToCreate, provision, provision_topics,
};
use crate::config::KafkaSettings;
use crate::error::{Error, Result};
use crate::model::Model;

/// The mock's only broker (ids start at 1).
const BROKER_ID: i32 = 1;

/// A running development broker. Stops with [`stop`](Self::stop) or when
/// dropped (connections are cut at once then).
#[derive(Debug)]
pub struct DevBroker {
    broker: Broker,
    address: SocketAddr,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl DevBroker {
    /// Starts a one-broker embedded cluster reachable at `listen`
    /// (`127.0.0.1:9092`, or port 0 for any free port). Must be called
    /// within a tokio runtime.
    pub async fn start(listen: SocketAddr) -> Result<DevBroker> {
        let listen_error = |source| Error::Listen {
            address: listen.to_string(),
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(listen_error)?;
        let address = listener.local_addr().map_err(listen_error)?;
        let embedded = EmbeddedBroker::start(1)?;
        embedded.advertise(BROKER_ID, &address.ip().to_string(), address.port())?;
        let target = embedded.bootstrap_servers().to_owned();
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept(listener, target, cancel.clone(), tasks.clone()));
        tracing::info!(%address, "dev broker listening");
        Ok(DevBroker {
            broker: Broker::Embedded(Arc::new(embedded)),
            address,
            cancel,
            tasks,
        })
    }

    /// Where clients connect: their `bootstrap.servers`.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The cluster, to use from this process as well.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Creates `model`'s topics that do not exist yet, with their declared
    /// partition counts (and the `topics` overrides of `settings`), and a
    /// dead-letter topic for each type, named as its consumers would name
    /// it, so consumers in other processes find everything they provision.
    pub async fn create_topics(
        &self,
        model: &Model,
        settings: &KafkaSettings,
    ) -> Result<ProvisionReport> {
        let model = model.with_topic_settings(&settings.topics)?;
        let mut report = provision_topics(&self.broker, settings, &model).await?;
        let mut dead_letters: Vec<TopicToCreate> = Vec::new();
        for info in model.type_infos() {
            let name = info.dead_letter_topic(settings.consumer.dead_letter_topic.as_deref());
            let partitions = model
                .topics()
                .iter()
                .find(|t| t.name() == info.topic)
                .map_or(1, |t| t.partitions());
            match dead_letters.iter_mut().find(|t| t.name == name) {
                Some(t) => t.partitions = t.partitions.max(partitions),
                None => dead_letters.push(TopicToCreate::new(name, partitions)),
            }
        }
        let more = provision(&self.broker, settings, &dead_letters).await?;
        report.created.extend(more.created);
        report.existing.extend(more.existing);
        Ok(report)
    }

    /// Stops accepting, cuts open connections and waits for the forwarding
    /// tasks to end.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for DevBroker {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn accept(
    listener: TcpListener,
    target: String,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let spawn_cancel = cancel.clone();
    serve(
        || listener.accept(),
        |(client, peer)| {
            tasks.spawn(forward(client, peer, target.clone(), spawn_cancel.clone()));
        },
        &cancel,
    )
    .await;
}

/// Pauses after a failed accept: from 10 ms, doubling to 1 s.
const ACCEPT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));

/// Hands every accepted connection to `handle` until cancelled. A failed
/// accept (out of file descriptors and the like) is logged and followed by
/// a pause that grows while accepts keep failing: the listener stays
/// usable and later connections may succeed, but a loop retrying at once
/// would spin a core and flood the log.
async fn serve<A, F, C>(mut next: A, mut handle: impl FnMut(C), cancel: &CancellationToken)
where
    A: FnMut() -> F,
    F: std::future::Future<Output = std::io::Result<C>>,
{
    let mut failures = 0u32;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = next() => accepted,
        };
        match accepted {
            Ok(conn) => {
                failures = 0;
                handle(conn);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let pause = ACCEPT_BACKOFF.delay(failures);
                tracing::warn!(error = %e, ?pause, "dev broker: accept failed");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

async fn forward(
    mut client: TcpStream,
    peer: SocketAddr,
    target: String,
    cancel: CancellationToken,
) {
    let mut upstream = match TcpStream::connect(&target).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, %peer, "dev broker: cannot reach the embedded cluster");
            return;
        }
    };
    // Kafka requests are small and latency-bound; Nagle would add delay.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        _ = cancel.cancelled() => {}
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "dev broker: connection ended");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An accept that keeps failing is retried after a growing pause, not
    /// at once: in 100 ms, a handful of tries instead of many thousands.
    #[tokio::test]
    async fn a_failing_accept_does_not_spin() {
        let tries = std::sync::atomic::AtomicU32::new(0);
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            stop.cancel();
        });
        serve(
            || {
                tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                std::future::ready(Err::<(), _>(std::io::Error::other("too many open files")))
            },
            |()| {},
            &cancel,
        )
        .await;
        stopper.await.unwrap();
        let tries = tries.load(std::sync::atomic::Ordering::Relaxed);
        assert!((1..20).contains(&tries), "{tries} accepts in 100 ms");
    }
}
