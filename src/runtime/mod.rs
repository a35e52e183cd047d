//! Starting and stopping kontext: one [`Kontext`] per service process holds
//! the broker connection, the roles the process registered and everything
//! they spawned.

mod admin;
mod fleet;
mod signal;

use std::sync::Arc;
use std::time::Duration;

pub use crate::client::{ClientCounts, ClientTracker};
pub use signal::shutdown_signal;

use crate::broker::{Broker, ProvisionReport, provision_topics};
use crate::config::{KafkaSettings, Secret, ServiceConfig};
use crate::consumer::{ConsumerRuntime, Consumers, MessageStream};
use crate::error::{Error, Result};
use crate::model::{Message, Model};
use crate::outbox::{Outbox, OutboxSettings, RelayHealth, Sender};
use crate::producer::{Producer, TransactionalProducer};
use crate::registry::Registry;
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    /// The transactional producer's `transactional.id`, when registered.
    transactional_id: Option<String>,
    consumers: Consumers,
    database: Option<DatabaseConnection>,
    /// Connected at `start()` when no connection was given.
    database_url: Option<Secret>,
    /// The database is used to write outbox rows only (no relay here).
    writer_only: bool,
    outbox: OutboxSettings,
    migrate: bool,
    /// Fleet-wide commands over a control topic (`runtime/fleet.rs`).
    fleet: Option<crate::admin::FleetSettings>,
}

impl KontextBuilder {
    /// Joins a fleet: this instance reads the control topic, applies the
    /// pauses standing there before its consumers first poll, and then
    /// every command sent with [`Kontext::fleet_pause`],
    /// [`fleet_resume`](Kontext::fleet_resume) or
    /// [`fleet_seek`](Kontext::fleet_seek) by any instance.
    pub fn fleet(mut self, settings: crate::admin::FleetSettings) -> Self {
        self.fleet = Some(settings);
        self
    }

    /// Uses this database for the outbox, the inbox and consumer units of
    /// work. Registers the outbox (and with it the producer role, which its
    /// relay uses). kontext's tables are migrated at start unless
    /// [`migrate(false)`](Self::migrate) (see [`crate::db`] to compose
    /// them with the application's migrator instead).
    pub fn database(mut self, db: DatabaseConnection) -> Self {
        self.database = Some(db);
        self.producer = true;
        self.writer_only = false;
        self
    }

    /// Like [`database`](Self::database), connecting to `url` at
    /// [`start`](Self::start) (`sqlite://...`, `postgres://...`).
    pub fn database_url(mut self, url: impl Into<Secret>) -> Self {
        self.database_url = Some(url.into());
        self.producer = true;
        self.writer_only = false;
        self
    }

    /// Uses the settings and the database of one configuration: the
    /// shortest correct set-up of a service is
    ///
    /// ```no_run
    /// # use kontext::prelude::*;
    /// # async fn run(model: Model) -> kontext::Result<()> {
    /// let config = kontext::config::ServiceConfig::from_file("config.toml")?;
    /// let kontext = Kontext::builder(model).config(config).start().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// With a `[database]` URL this registers the outbox, its relay and
    /// the producer (as [`database_url`](Self::database_url)); without
    /// one, nothing but the settings: register roles as usual.
    pub fn config(mut self, config: ServiceConfig) -> Self {
        self.settings = config.kafka;
        if let Some(db) = config.database {
            self.migrate = db.migrate;
            self = self.database_url(db.url);
        }
        self
    }

    /// Uses this database to **write** outbox rows (and for consumer units
    /// of work and the inbox) without relaying them: this process runs no
    /// relay and opens no Kafka connection for the outbox; the relays of
    /// other instances send the rows. On PostgreSQL each commit wakes
    /// them at once (`LISTEN/NOTIFY`); otherwise they find the rows within
    /// their polling interval.
    pub fn outbox_writer(mut self, db: DatabaseConnection) -> Self {
        self.database = Some(db);
        self.writer_only = true;
        self
    }

    /// Outbox and relay settings (defaults: [`OutboxSettings::default`]).
    pub fn outbox_settings(mut self, settings: OutboxSettings) -> Self {
        self.outbox = settings;
        self
    }

    /// Whether to create kontext's tables at start. Defaults to `true`.
    pub fn migrate(mut self, yes: bool) -> Self {
        self.migrate = yes;
        self
    }

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

    /// Registers a [`TransactionalProducer`]: messages produced all or
    /// nothing in Kafka transactions (see
    /// [`TransactionalProducer::transaction`]). It has a client of its own,
    /// beside the producer role's.
    ///
    /// Choosing `transactional_id`: the same for the same instance across
    /// restarts, and different between instances running at once. At
    /// start the producer registers the id with the cluster, which aborts
    /// what an earlier producer with that id left open and fences it: a
    /// zombie of this instance (still running after it was replaced) can
    /// no longer commit. Two live instances sharing an id fence each other
    /// in turn, so derive it from something unique and stable per
    /// instance: a StatefulSet pod's name, a host name with a slot number;
    /// not a random value (a restart could not fence its predecessor) and
    /// not the service's name alone (every replica would share it).
    pub fn transactional_producer(mut self, transactional_id: impl Into<String>) -> Self {
        self.transactional_id = Some(transactional_id.into());
        self
    }

    /// Registers the consumer role: a handler or a stream for each type this
    /// process consumes. Types without a registration are not consumed here,
    /// even if the model declares a consumer for them.
    ///
    /// ```no_run
    /// # use kontext::prelude::*;
    /// # use kontext::consumer::{MessageContext, HandlerError};
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderCreated { order_id: u64 }
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderShipped { order_id: u64 }
    /// # async fn run(model: Model) -> kontext::Result<()> {
    /// async fn on_created(e: OrderCreated, ctx: MessageContext) -> Result<(), HandlerError> {
    ///     println!("order {} at offset {}", e.order_id, ctx.offset());
    ///     Ok(())
    /// }
    /// let kontext = Kontext::builder(model)
    ///     .consumers(|c| {
    ///         c.handler(on_created).stream::<OrderShipped>();
    ///     })
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn consumers(mut self, f: impl FnOnce(&mut Consumers)) -> Self {
        f(&mut self.consumers);
        self
    }

    /// Validates the settings against the model, connects, provisions the
    /// topics (unless disabled) and starts the registered roles.
    pub async fn start(mut self) -> Result<Kontext> {
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
        let transactional = match self.transactional_id {
            Some(id) => {
                if broker.as_embedded().is_some() {
                    tracing::warn!(
                        transactional_id = %id,
                        "the embedded broker accepts Kafka transactions but does not enforce them: read_committed \
                         consumers also see aborted messages, and offsets sent with a transaction are not stored; \
                         test what transactions guarantee on Apache Kafka"
                    );
                }
                Some(
                    TransactionalProducer::start(
                        &settings,
                        broker.bootstrap_servers(),
                        Arc::clone(&model),
                        &clients,
                        id,
                    )
                    .await?,
                )
            }
            None => None,
        };
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let database = match (self.database, &self.database_url) {
            (Some(db), _) => Some(db),
            (None, Some(url)) => Some(crate::db::connect(url.expose()).await?),
            (None, None) => None,
        };
        if let Some(embedded) = broker.as_embedded().filter(|e| e.is_implicit()) {
            let postgres = database.as_ref().is_some_and(|d| {
                sea_orm::ConnectionTrait::get_database_backend(d) == sea_orm::DbBackend::Postgres
            });
            // Only roles that send or read through it: a writer-only process
            // with no producer or consumer never talks to a broker.
            let relays = !self.writer_only && self.outbox.run_relay;
            let uses_broker = self.producer || !self.consumers.is_empty() || relays;
            // Meant when the settings the broker was made from, or these,
            // say `embedded_broker = true`.
            let meant = embedded.is_meant() || settings.embedded_broker == Some(true);
            if postgres && uses_broker && !meant {
                return Err(Error::config(format!(
                    "no bootstrap_servers configured, beside a PostgreSQL database: kontext would start an \
                     in-memory broker inside this process, and an outbox would relay its rows there and delete them. \
                     Set bootstrap_servers (KONTEXT_BOOTSTRAP_SERVERS), or `embedded_broker = true` if this is meant{}",
                    crate::config::near_misses_hint()
                )));
            }
            tracing::debug!(
                bootstrap_servers = embedded.bootstrap_servers(),
                "running on the embedded broker"
            );
        }
        let outbox = match &database {
            Some(db) => {
                self.outbox.validate()?;
                if self.migrate {
                    crate::db::migrate(db).await?;
                }
                let sender = if self.writer_only {
                    None
                } else {
                    // The relay's own client: its message timeout must stay
                    // below the lease (see `outbox::lease`), whatever the
                    // application's producer allows.
                    let (relay_settings, send_timeout) =
                        settings.with_message_timeout_cap(self.outbox.send_timeout_cap());
                    Some(Sender {
                        producer: Producer::new(
                            &relay_settings,
                            broker.bootstrap_servers(),
                            Arc::clone(&model),
                            &clients,
                        )?,
                        send_timeout,
                    })
                };
                let outbox = Outbox::new(
                    Arc::clone(&model),
                    db.clone(),
                    settings.effective_client_id().to_owned(),
                    sender,
                    self.outbox.clone(),
                    tasks.clone(),
                );
                outbox.prepare().await?;
                Some(outbox)
            }
            None => None,
        };
        let registry = Registry::default();
        let mut joining = None;
        if let Some(fleet) = self.fleet {
            let (joined, standing) = fleet::Fleet::join(fleet, &settings, &broker).await?;
            self.consumers.standing = standing;
            joining = Some(joined);
        }
        let consumers = if self.consumers.is_empty() {
            None
        } else {
            Some(
                ConsumerRuntime::start(
                    &model,
                    &settings,
                    &broker,
                    self.consumers,
                    &clients,
                    &registry,
                    outbox.as_ref(),
                    // Known when provisioning asked the cluster; a dev
                    // broker with provisioning off gets librdkafka's defaults.
                    broker.as_embedded().is_some()
                        || provisioned.as_ref().is_some_and(|r| r.mock_cluster),
                    transactional
                        .as_ref()
                        .map(TransactionalProducer::transactional_id),
                )
                .await?,
            )
        };
        // Last: a relay started before the consumers would keep sending
        // after a consumer failed to start and `start()` returned `Err`.
        // (Dropping `consumers` on that error stops them.)
        if let Some(o) = &outbox {
            o.start_relay(cancel.clone()).await?;
        }
        let fleet = joining.map(|j| {
            let controller = consumers
                .as_ref()
                .map(ConsumerRuntime::controller)
                .unwrap_or_default();
            j.run(controller, &tasks, cancel.clone())
        });
        tracing::info!(
            bootstrap_servers = broker.bootstrap_servers(),
            embedded = broker.as_embedded().is_some(),
            client_id = settings.effective_client_id(),
            topics = model.topics().len(),
            producer = producer.is_some(),
            poll_services = registry.services().len(),
            "kontext started"
        );
        Ok(Kontext {
            fleet,
            consumers,
            outbox,
            database,
            tasks,
            cancel,
            registry,
            model,
            settings: Arc::new(settings),
            broker,
            producer,
            transactional,
            clients,
            provisioned,
        })
    }
}

impl Drop for Kontext {
    /// Without `shutdown`, background tasks stop at once (like a crash):
    /// the relay hands nothing more over, settles what is in flight and
    /// stops; unsent rows stay for the next start.
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(o) = &self.outbox {
            o.halt();
        }
    }
}

/// How far past its timeout `shutdown` may run when something overruns.
const MAX_OVERRUN: Duration = Duration::from_secs(2);

/// The least time the relay and the flush each get, even past the timeout
/// (within `MAX_OVERRUN`).
const MIN_SHARE: Duration = Duration::from_millis(500);

/// How long shutdown waits, past the relay's share, for a halted relay to
/// settle its deliveries in flight before it aborts it.
const RELAY_SETTLE_GRACE: Duration = Duration::from_secs(1);

/// Kept for the flush when the relay overruns.
const FLUSH_RESERVE: Duration = Duration::from_millis(250);

/// A running kontext: the model, the broker and the registered roles.
#[derive(Debug)]
pub struct Kontext {
    // Fields drop in order: clients first, the (possibly embedded) broker
    // last, so no client outlives the cluster it talks to.
    fleet: Option<Arc<fleet::Fleet>>,
    consumers: Option<ConsumerRuntime>,
    outbox: Option<Outbox>,
    database: Option<DatabaseConnection>,
    /// Background tasks of the outbox (relay, notifications, immediate
    /// sends that outlive their commit). The inbox's cleanup runs with the
    /// consumers, on the consumer runtime's tracker.
    tasks: TaskTracker,
    cancel: CancellationToken,
    registry: Registry,
    producer: Option<Producer>,
    transactional: Option<TransactionalProducer>,
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
            transactional_id: None,
            consumers: Consumers::default(),
            database: None,
            database_url: None,
            writer_only: false,
            fleet: None,
            outbox: OutboxSettings::default(),
            migrate: true,
        }
    }

    /// The outbox, or [`Error::RoleNotRegistered`] without a database
    /// ([`KontextBuilder::database`]).
    pub fn outbox(&self) -> Result<&Outbox> {
        self.outbox
            .as_ref()
            .ok_or(Error::RoleNotRegistered { role: "database" })
    }

    /// The database connection kontext uses (the application's own
    /// queries share its pool), or [`Error::RoleNotRegistered`] without one.
    pub fn database(&self) -> Result<&DatabaseConnection> {
        self.database
            .as_ref()
            .ok_or(Error::RoleNotRegistered { role: "database" })
    }

    /// The producer, or [`Error::RoleNotRegistered`] if this process did not
    /// register it.
    pub fn producer(&self) -> Result<&Producer> {
        self.producer
            .as_ref()
            .ok_or(Error::RoleNotRegistered { role: "producer" })
    }

    /// The transactional producer, or [`Error::RoleNotRegistered`] if this
    /// process did not register one
    /// ([`KontextBuilder::transactional_producer`]).
    pub fn transactional_producer(&self) -> Result<&TransactionalProducer> {
        self.transactional.as_ref().ok_or(Error::RoleNotRegistered {
            role: "transactional_producer",
        })
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

    /// The faults tests plan for this instance's handlers.
    #[cfg(feature = "testing")]
    pub(crate) fn handler_faults(&self) -> Option<&crate::consumer::fault::Faults> {
        self.consumers.as_ref().map(|c| c.faults())
    }

    /// The keyed registry: which poll service serves each consumed type,
    /// buffer fill, counters, service states.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Liveness and readiness, with reasons: serve `live` on a liveness
    /// probe and `is_healthy()` on a readiness probe.
    ///
    /// Consumers: see [`Health`](crate::registry::Health). The producer is
    /// not ready while it has reached no broker for longer than a message
    /// may take (`message.timeout.ms`, at most 45 s). The outbox relay is
    /// not live once its task has ended before shutdown, and not ready
    /// while its passes have failed (the database) for longer than a lease
    /// (`OutboxSettings::lease_ttl`: other instances then take its shards)
    /// or its producer reaches no broker, by the producer's rule.
    pub fn health(&self) -> crate::registry::Health {
        let mut health = self.registry.health();
        if let Some(e) = self.broker.as_embedded() {
            health.notes.push(format!(
                "broker: embedded, in this process ({}); nothing it holds survives the process",
                if e.is_implicit() {
                    "no bootstrap_servers configured"
                } else {
                    "asked for"
                }
            ));
        }
        if let Some(p) = &self.producer {
            producer_reach("producer", p, &mut health);
        }
        if let Some(why) = self.transactional.as_ref().and_then(|t| t.fenced()) {
            health.not_ready_because("transactional producer fenced".into(), &why);
        }
        if let Some(o) = &self.outbox {
            let limit = o.relay_failure_limit();
            match o.relay_health(self.cancel.is_cancelled()) {
                RelayHealth::NotHere | RelayHealth::Well => {}
                RelayHealth::Stopped => {
                    health.not_live("outbox relay: its task ended before shutdown".into())
                }
                RelayHealth::Failing(d, error) if d > limit => health.not_ready_because(
                    format!("outbox relay: passes failing for {d:?} (limit {limit:?})"),
                    &error,
                ),
                RelayHealth::Failing(..) => {}
            }
            if let Some(p) = o.relay_producer() {
                producer_reach("outbox relay's producer", p, &mut health);
            }
        }
        health
    }

    /// Takes the [`MessageStream`] of `T`, registered with
    /// `consumers(|c| c.stream::<T>())`. Only once.
    pub fn stream<T: Message>(&self) -> Result<MessageStream<T>> {
        self.consumers
            .as_ref()
            .ok_or(Error::RoleNotRegistered { role: "consumers" })?
            .take_stream::<T>()
    }

    /// Starts the dedicated poll service of `T` if it was declared with
    /// `start_immediately(false)`; does nothing if it already runs.
    pub fn start_service<T: Message>(&self) -> Result<()> {
        let shared = self
            .registry
            .shared_of(std::any::TypeId::of::<T>(), std::any::type_name::<T>())?;
        shared.start();
        Ok(())
    }

    /// Runs until `signal` completes (usually [`crate::shutdown_signal`]:
    /// SIGTERM or ctrl-c), then shuts down gracefully within `timeout`.
    pub async fn run_until<F>(self, signal: F, timeout: Duration) -> Result<()>
    where
        F: std::future::Future,
    {
        signal.await;
        tracing::info!("shutdown requested");
        self.shutdown(timeout).await
    }

    /// Stops the registered roles gracefully: consumers stop fetching, drain
    /// their buffers through the handlers, commit and close; the outbox
    /// relay sends what is pending; queued produced messages are flushed.
    /// All of it within `timeout`, plus at most 2 s when something overruns:
    /// handlers still running at `timeout` are dropped (their messages are
    /// delivered again later, see [`MessageContext::cancelled`](crate::consumer::MessageContext::cancelled)),
    /// and the relay and the flush get what is left of `timeout`, at least
    /// half a second each while the 2 s last (less when the consumers took
    /// most of them). At its deadline the relay hands no more rows over,
    /// settles those in flight (1 s at most) and releases its leases; when
    /// `shutdown` returns, it has stopped (or was aborted, see below).
    ///
    /// Returns [`Error::ShutdownIncomplete`] when something was left
    /// undone, saying what and what that leaves behind: a consumer's final
    /// commit that failed or found no group coordinator in time (the
    /// partitions and offsets left uncommitted: the next member handles
    /// those records again), a consumer still closing at the deadline, a
    /// relay still waiting on the broker that had to be aborted.
    pub async fn shutdown(mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut undone = match self.consumers.take() {
            Some(c) => c.shutdown(timeout).await,
            None => Vec::new(),
        };
        // The relay keeps sending (what handlers just wrote included, once
        // woken) until the deadline, then hands nothing more over, settles
        // what is in flight and releases its leases.
        if let Some(o) = &self.outbox {
            o.wake();
        }
        self.cancel.cancel();
        self.tasks.close();
        // Everything below ends by `hard`: the 2 s overrun `shutdown`
        // promises, whatever the consumers took of it.
        let hard = deadline + MAX_OVERRUN;
        let now = tokio::time::Instant::now;
        let mut incomplete = None;
        let graceful_end = deadline.max(now() + MIN_SHARE).min(hard);
        if tokio::time::timeout_at(graceful_end, self.tasks.wait())
            .await
            .is_err()
        {
            if let Some(o) = &self.outbox {
                o.halt();
            }
            // On a healthy broker in-flight deliveries settle in
            // milliseconds; a relay still waiting on them after this is
            // aborted, and the result says what that leaves behind.
            let settle_end = (now() + RELAY_SETTLE_GRACE).min(hard - FLUSH_RESERVE);
            if tokio::time::timeout_at(settle_end, self.tasks.wait())
                .await
                .is_err()
            {
                incomplete = self.outbox.as_ref().and_then(Outbox::abort);
            }
        }
        let flushed = match &self.producer {
            Some(p) => {
                let flush_end = deadline.max(now() + MIN_SHARE).min(hard);
                p.flush(flush_end.saturating_duration_since(now())).await
            }
            None => Ok(()),
        };
        undone.extend(incomplete);
        if !undone.is_empty() {
            let what = undone.join("; ");
            tracing::warn!(%what, "kontext stopped, incompletely");
            return Err(Error::ShutdownIncomplete { what });
        }
        flushed?;
        tracing::info!("kontext stopped");
        Ok(())
    }
}

/// Adds a failed readiness check when `producer` has reached no broker for
/// longer than a message may take (at most 45 s).
fn producer_reach(what: &str, producer: &Producer, health: &mut crate::registry::Health) {
    let limit = producer.reach_limit();
    if let Some(d) = producer.brokers_down_for().filter(|d| *d > limit) {
        health.not_ready(format!(
            "{what}: no broker reachable for {d:?} (limit {limit:?})"
        ));
    }
}
