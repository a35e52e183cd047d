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

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                tasks.spawn(forward(client, peer, target.clone(), cancel.clone()));
            }
            // Out of file descriptors and the like: the listener stays
            // usable, later connections may succeed.
            Err(e) => tracing::warn!(error = %e, "dev broker: accept failed"),
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
