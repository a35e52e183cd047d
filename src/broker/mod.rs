//! Which Kafka cluster kontext talks to: the embedded mock cluster (zero
//! set-up, for demos and tests) or an external one.

mod dev;
mod embedded;
mod provision;

use std::sync::Arc;

pub use dev::DevBroker;
pub use embedded::EmbeddedBroker;
pub use provision::{ConfigMismatch, ProvisionReport, TopicToCreate, provision, provision_topics};

use crate::config::KafkaSettings;
use crate::error::{Error, Result};

/// A Kafka cluster. Cloning shares the same cluster; an embedded cluster
/// stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub enum Broker {
    /// librdkafka's in-process mock cluster.
    Embedded(Arc<EmbeddedBroker>),
    /// A cluster reached through `bootstrap.servers`.
    External {
        /// `host:port,host:port`.
        bootstrap_servers: String,
    },
}

impl Broker {
    /// Starts a one-broker embedded cluster.
    pub fn embedded() -> Result<Broker> {
        Ok(Broker::Embedded(Arc::new(EmbeddedBroker::start(1)?)))
    }

    /// An external cluster.
    pub fn external(bootstrap_servers: impl Into<String>) -> Broker {
        Broker::External {
            bootstrap_servers: bootstrap_servers.into(),
        }
    }

    /// The cluster the settings name, or a new embedded one when they name
    /// none (refused when `embedded_broker = false`). An embedded broker
    /// started this way is [implicit](EmbeddedBroker::is_implicit): it is
    /// announced with a warning, shown in health, and refused beside a
    /// PostgreSQL database unless `embedded_broker = true` (see
    /// `KontextBuilder::start`).
    pub fn from_settings(settings: &KafkaSettings) -> Result<Broker> {
        match &settings.bootstrap_servers {
            Some(servers) => Ok(Broker::external(servers.clone())),
            None if settings.embedded_broker == Some(false) => Err(Error::config(format!(
                "no bootstrap_servers configured, and `embedded_broker = false` forbids the in-process broker{}",
                crate::config::near_misses_hint()
            ))),
            None => {
                let broker =
                    EmbeddedBroker::start(1)?.implicit(settings.embedded_broker == Some(true));
                tracing::warn!(
                    bootstrap_servers = broker.bootstrap_servers(),
                    near_misses = %crate::config::near_misses_hint(),
                    "no bootstrap_servers configured: kontext runs an embedded in-memory Kafka broker inside this process; \
                     nothing produced to it survives the process and no other process can read it. \
                     Set bootstrap_servers (KONTEXT_BOOTSTRAP_SERVERS) for a real cluster"
                );
                Ok(Broker::Embedded(Arc::new(broker)))
            }
        }
    }

    /// `bootstrap.servers` for clients.
    pub fn bootstrap_servers(&self) -> &str {
        match self {
            Broker::Embedded(b) => b.bootstrap_servers(),
            Broker::External { bootstrap_servers } => bootstrap_servers,
        }
    }

    /// The embedded cluster, if this is one.
    pub fn as_embedded(&self) -> Option<&EmbeddedBroker> {
        match self {
            Broker::Embedded(b) => Some(b),
            Broker::External { .. } => None,
        }
    }

    /// Consumer properties a mock cluster (embedded, or a dev broker)
    /// needs under the user's settings: short session timeouts make group
    /// joins and rebalances take about a second instead of tens of seconds,
    /// and a short fetch wait keeps latency low: the mock answers a waiting
    /// fetch only when its wait expires, not when data arrives, so every
    /// record would otherwise wait up to 500 ms (and every pause/resume
    /// cycle as long).
    pub(crate) const MOCK_CONSUMER_DEFAULTS: &'static [(&'static str, &'static str)] = &[
        ("session.timeout.ms", "2000"),
        ("heartbeat.interval.ms", "500"),
        ("fetch.wait.max.ms", "10"),
    ];
}
