//! Starting and stopping kontext: one [`Kontext`] per service process holds
//! the broker connection, the roles the process registered and everything
//! they spawned.

pub(crate) mod client_context;
pub(crate) mod clients;

use std::sync::Arc;
use std::time::Duration;

pub use clients::{ClientCounts, ClientTracker};

use crate::broker::{Broker, ProvisionReport, provision_topics};
use crate::config::KafkaSettings;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::producer::Producer;

/// Configures which roles a process runs, then starts them.
///
/// The same settings serve every deployment: an API registers only the
/// producer (and then holds no consumer connection), a worker only its
/// consumers.
#[derive(Debug)]
#[must_use = "call `start()` to run kontext"]
pub struct KontextBuilder {
    model: Model,
    settings: KafkaSettings,
    broker: Option<Broker>,
    producer: bool,
}

impl KontextBuilder {
    /// Uses these settings (defaults: embedded broker, client id `kontext`).
    pub fn settings(mut self, settings: KafkaSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Uses this cluster instead of the one the settings name; share one
    /// embedded broker between several `Kontext` instances this way.
    pub fn broker(mut self, broker: Broker) -> Self {
        self.broker = Some(broker);
        self
    }

    /// Registers the producer role.
    pub fn producer(mut self) -> Self {
        self.producer = true;
        self
    }

    /// Validates the settings against the model, connects, provisions the
    /// topics (unless disabled) and starts the registered roles.
    pub async fn start(self) -> Result<Kontext> {
        let settings = self.settings;
        settings.validate()?;
        let model = Arc::new(self.model.with_topic_settings(&settings.topics)?);
        let broker = match self.broker {
            Some(b) => b,
            None => Broker::from_settings(&settings)?,
        };
        let provisioned = if settings.provisioning_enabled() {
            Some(provision_topics(&broker, &settings, &model).await?)
        } else {
            None
        };
        let clients = ClientTracker::default();
        let producer = if self.producer {
            Some(Producer::new(
                &settings,
                broker.bootstrap_servers(),
                Arc::clone(&model),
                &clients,
            )?)
        } else {
            None
        };
        tracing::info!(
            bootstrap_servers = broker.bootstrap_servers(),
            embedded = broker.as_embedded().is_some(),
            client_id = settings.effective_client_id(),
            topics = model.topics().len(),
            producer = producer.is_some(),
            "kontext started"
        );
        Ok(Kontext {
            model,
            settings: Arc::new(settings),
            broker,
            producer,
            clients,
            provisioned,
        })
    }
}

/// A running kontext: the model, the broker and the registered roles.
#[derive(Debug)]
pub struct Kontext {
    // Fields drop in order: clients first, the (possibly embedded) broker
    // last, so no client outlives the cluster it talks to.
    producer: Option<Producer>,
    clients: ClientTracker,
    model: Arc<Model>,
    settings: Arc<KafkaSettings>,
    provisioned: Option<ProvisionReport>,
    broker: Broker,
}

impl Kontext {
    /// Starts configuring kontext for `model`.
    pub fn builder(model: Model) -> KontextBuilder {
        KontextBuilder {
            model,
            settings: KafkaSettings::default(),
            broker: None,
            producer: false,
        }
    }

    /// The producer, or [`Error::RoleNotRegistered`] if this process did not
    /// register it.
    pub fn producer(&self) -> Result<&Producer> {
        self.producer
            .as_ref()
            .ok_or(Error::RoleNotRegistered { role: "producer" })
    }

    /// The model with the deployment's topic settings applied.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The settings in effect.
    pub fn settings(&self) -> &KafkaSettings {
        &self.settings
    }

    /// The cluster in use.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Live Kafka clients of this instance.
    pub fn clients(&self) -> ClientCounts {
        self.clients.counts()
    }

    /// What provisioning did at start-up; `None` if it was disabled.
    pub fn provisioned(&self) -> Option<&ProvisionReport> {
        self.provisioned.as_ref()
    }

    /// Stops the registered roles: waits up to `timeout` for queued messages
    /// to be delivered, then closes the clients.
    pub async fn shutdown(self, timeout: Duration) -> Result<()> {
        if let Some(p) = &self.producer {
            p.flush(timeout).await?;
        }
        tracing::info!("kontext stopped");
        Ok(())
    }
}
