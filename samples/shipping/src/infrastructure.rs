//! The application's ports implemented with kontext, and everything a
//! binary needs to start a service: the model, the tables, the
//! configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use kontext::config::{DatabaseSettings, ServiceConfig};
use kontext::outbox::OutboxTransaction;
use kontext::prelude::*;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, Value};
use serde::{Deserialize, Serialize};

use crate::application::{Event, EventPublisher, PortError, ShipmentWork, Shipments};
use crate::domain::{Shipment, ShipmentCreatedEvent, UserActivityRecorded};

/// The shipping service, as its configuration section and client id.
pub const SHIPPING_API: &str = "shipping-api";
/// The identity service, as its configuration section and client id.
pub const IDENTITY_WORKER: &str = "identity-worker";

/// Both services' topics. Each process registers only its own roles.
pub fn model() -> kontext::Result<Model> {
    let mut m = ModelBuilder::new();
    m.topic::<ShipmentCreatedEvent>(|t| {
        t.name("shipping.shipment.created")
            .partitions(3)
            .key_ref(|e| &e.shipment_id)
            // Who the customer is stays off the status page's messages.
            .sensitive(["user_id"])
            .consumer(|c| {
                c.group(IDENTITY_WORKER)
                    // A shipment announced twice (a retried publish gets a
                    // new message id) takes effect once.
                    .inbox(|i| i.key_by(|e: &ShipmentCreatedEvent| e.shipment_id.clone()))
                    // Each unit of work waits on the database: up to 8 at
                    // once, a shipment's events in order (by key).
                    .workers(8)
            })
    });
    m.topic::<UserActivityRecorded>(|t| {
        t.name("identity.user-activity.recorded")
            .partitions(3)
            .key(|e| e.user_id)
            // Keyed by the customer: neither key nor field on the page.
            .sensitive_key()
            .sensitive(["user_id"])
    });
    Ok(m.build()?)
}

// --- configuration ----------------------------------------------------------

/// A service's own settings, beside kontext's, from `[<service>]`; each
/// key can be overridden with `KONTEXT_<SERVICE>_<KEY>` (for example
/// `KONTEXT_SHIPPING_API_LISTEN=127.0.0.1:0`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppSettings {
    /// Where the HTTP server listens (the API only).
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes (the API only).
    pub max_body_bytes: usize,
    /// How long a graceful stop may take, in seconds.
    pub shutdown_timeout_secs: u64,
    /// Where a worker serves kontext's status page and operator endpoints
    /// (under `/kontext`); none when unset. The API serves them next to
    /// its routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_listen: Option<SocketAddr>,
}

impl Default for AppSettings {
    fn default() -> Self {
        AppSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 16 * 1024,
            shutdown_timeout_secs: 10,
            status_listen: None,
        }
    }
}

impl AppSettings {
    /// [`shutdown_timeout_secs`](Self::shutdown_timeout_secs) as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

/// One service's whole configuration.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// `[kafka]` and `[<service>.database]`.
    pub kontext: ServiceConfig,
    /// `[<service>]`.
    pub app: AppSettings,
}

/// The configuration file: `--config <path>` on the command line, else
/// `KONTEXT_CONFIG`, else the sample's `config.toml`.
pub fn config_path() -> PathBuf {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--config" {
            if let Some(path) = args.next() {
                return PathBuf::from(path);
            }
        }
    }
    match std::env::var("KONTEXT_CONFIG") {
        Ok(path) if !path.is_empty() => PathBuf::from(path),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"),
    }
}

/// A directory only this user can read, for the sample's SQLite files:
/// `kontext-sample-<uid>` in the temp directory, created with mode 0700,
/// and refused if it exists with another owner or wider permissions (the
/// temp directory is shared: another user could otherwise read the
/// databases, or plant one). Linux only; elsewhere `kontext-sample` in the
/// temp directory, unchecked.
#[cfg(target_os = "linux")]
pub fn private_dir() -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    // The uid of this process, as the file system records it.
    let uid = std::fs::metadata("/proc/self")?.uid();
    let dir = std::env::temp_dir().join(format!("kontext-sample-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.into()),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "`{}` is not a private directory of this user (owner {}, mode {:o}); remove it or set a database URL",
            dir.display(),
            meta.uid(),
            meta.permissions().mode() & 0o777
        )
        .into());
    }
    Ok(dir)
}

/// See the Linux version.
#[cfg(not(target_os = "linux"))]
pub fn private_dir() -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join("kontext-sample");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Reads `service`'s configuration from `path`. Without a database URL
/// the service gets a SQLite file of its own in a private directory (see
/// [`private_dir`]), kept across restarts.
pub fn load(path: &Path, service: &str) -> Result<Loaded, Box<dyn std::error::Error>> {
    let mut kontext = ServiceConfig::from_file_for(path, service)?;
    kontext.kafka = kontext.kafka.client_id(service);
    if kontext.database.is_none() {
        let file = private_dir()?.join(format!("{service}.db"));
        kontext.database = Some(DatabaseSettings {
            url: format!("sqlite://{}?mode=rwc", file.display()).into(),
            migrate: true,
        });
    }
    let env = format!(
        "KONTEXT_{}_",
        service.to_ascii_uppercase().replace('-', "_")
    );
    let app: AppSettings = Figment::from(Serialized::defaults(AppSettings::default()))
        .merge(Figment::from(Toml::file(path)).focus(service))
        .merge(Env::prefixed(&env).only(&["listen", "max_body_bytes", "shutdown_timeout_secs"]))
        .extract()
        .map_err(|e| format!("`[{service}]` in `{}`: {e}", path.display()))?;
    Ok(Loaded { kontext, app })
}

// --- tables -----------------------------------------------------------------

/// The shipping service's table.
pub async fn create_shipping_tables(db: &DatabaseConnection) -> Result<(), sea_orm::DbErr> {
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS shipment (
            id TEXT PRIMARY KEY,
            user_id BIGINT NOT NULL,
            warehouse TEXT NOT NULL,
            destination TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL
        )",
    )
    .await
    .map(drop)
}

/// The identity service's table. No unique key on the shipment: that a
/// redelivered event adds no second row is the inbox's work, and a test
/// counts the rows to prove it.
pub async fn create_identity_tables(db: &DatabaseConnection) -> Result<(), sea_orm::DbErr> {
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS user_activity (
            shipment_id TEXT NOT NULL,
            user_id BIGINT NOT NULL,
            activity TEXT NOT NULL
        )",
    )
    .await
    .map(drop)
}

/// `sql` with `?` placeholders, as `backend` writes them.
fn statement(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    let sql = if backend == DbBackend::Postgres {
        let mut n = 0;
        sql.split('?')
            .enumerate()
            .map(|(i, part)| {
                if i == 0 {
                    part.to_owned()
                } else {
                    n += 1;
                    format!("${n}{part}")
                }
            })
            .collect()
    } else {
        sql.to_owned()
    };
    Statement::from_sql_and_values(backend, sql, values)
}

// --- the shipping service's ports --------------------------------------------

/// Shipments in the service's database; events through kontext's outbox,
/// in the same transaction as the rows.
#[derive(Debug, Clone)]
pub struct KontextShipments {
    outbox: kontext::outbox::Outbox,
}

impl KontextShipments {
    /// Over the outbox of a started [`Kontext`] (its database too).
    pub fn new(kontext: &Kontext) -> kontext::Result<Self> {
        Ok(KontextShipments {
            outbox: kontext.outbox()?.clone(),
        })
    }
}

fn port<E: std::error::Error + Send + Sync + 'static>(e: E) -> PortError {
    PortError(Box::new(e))
}

/// One transaction: shipment rows and outbox rows commit together.
#[derive(Debug)]
pub struct KontextWork(OutboxTransaction);

impl EventPublisher for KontextWork {
    async fn publish<E: Event>(&mut self, event: &E) -> Result<(), PortError> {
        self.0.publish(event).await.map(drop).map_err(port)
    }
}

impl ShipmentWork for KontextWork {
    async fn insert(&mut self, s: &Shipment) -> Result<(), PortError> {
        let backend = self.0.get_database_backend();
        self.0
            .execute(statement(
                backend,
                "INSERT INTO shipment (id, user_id, warehouse, destination, created_at_ms) \
                 VALUES (?, ?, ?, ?, ?)",
                vec![
                    s.id.clone().into(),
                    s.user_id.into(),
                    s.warehouse.clone().into(),
                    s.destination.clone().into(),
                    s.created_at_ms.into(),
                ],
            ))
            .await
            .map(drop)
            .map_err(port)
    }

    async fn commit(self) -> Result<(), PortError> {
        self.0.commit().await.map(drop).map_err(port)
    }
}

impl Shipments for KontextShipments {
    type Work = KontextWork;

    async fn begin(&self) -> Result<KontextWork, PortError> {
        self.outbox.begin().await.map(KontextWork).map_err(port)
    }

    async fn find(&self, id: &str) -> Result<Option<Shipment>, PortError> {
        let db = self.outbox.database();
        let row = db
            .query_one(statement(
                db.get_database_backend(),
                "SELECT id, user_id, warehouse, destination, created_at_ms FROM shipment WHERE id = ?",
                vec![id.into()],
            ))
            .await
            .map_err(port)?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(Shipment {
            id: row.try_get("", "id").map_err(port)?,
            user_id: row.try_get("", "user_id").map_err(port)?,
            warehouse: row.try_get("", "warehouse").map_err(port)?,
            destination: row.try_get("", "destination").map_err(port)?,
            created_at_ms: row.try_get("", "created_at_ms").map_err(port)?,
        }))
    }
}

// --- starting the services ----------------------------------------------------

/// The shipping API's kontext: the outbox, its relay and the producer it
/// uses; no consumers. `broker` shares an embedded one between services
/// of one process.
pub async fn start_shipping(
    config: ServiceConfig,
    broker: Option<Broker>,
) -> kontext::Result<Kontext> {
    let mut builder = Kontext::builder(model()?).config(config);
    if let Some(broker) = broker {
        builder = builder.broker(broker);
    }
    let kontext = builder.start().await?;
    create_shipping_tables(kontext.database()?)
        .await
        .map_err(|source| kontext::Error::Database {
            operation: "create the shipment table",
            source,
        })?;
    Ok(kontext)
}

/// The identity worker's kontext: the consumer of shipment events, with
/// the inbox and a unit of work per event, and the outbox its follow-up
/// events go through. Its table exists before the first event arrives.
pub async fn start_identity(
    config: ServiceConfig,
    broker: Option<Broker>,
) -> kontext::Result<Kontext> {
    let ServiceConfig { kafka, database } = config;
    let database = database.ok_or_else(|| kontext::Error::Config {
        message: "the identity worker needs a database".into(),
        source: None,
    })?;
    let db = kontext::db::connect(database.url.expose()).await?;
    create_identity_tables(&db)
        .await
        .map_err(|source| kontext::Error::Database {
            operation: "create the user_activity table",
            source,
        })?;
    let mut builder = Kontext::builder(model()?)
        .settings(kafka)
        .database(db)
        .migrate(database.migrate)
        .consumers(|c| {
            c.transactional(record_activity);
        });
    if let Some(broker) = broker {
        builder = builder.broker(broker);
    }
    builder.start().await
}

/// The identity service's handler: the activity row and the follow-up
/// event in the unit of work; kontext records the inbox row in it and
/// stores the offset only after it committed.
pub async fn record_activity(
    event: ShipmentCreatedEvent,
    _ctx: MessageContext,
    uow: UnitOfWork,
) -> Result<(), HandlerError> {
    let activity = UserActivityRecorded::for_shipment(&event);
    uow.execute(statement(
        uow.get_database_backend(),
        "INSERT INTO user_activity (shipment_id, user_id, activity) VALUES (?, ?, ?)",
        vec![
            activity.shipment_id.clone().into(),
            activity.user_id.into(),
            activity.activity.clone().into(),
        ],
    ))
    .await?;
    uow.publish(&activity).await.map_err(HandlerError::retry)?;
    Ok(())
}

/// Logs to stderr, `RUST_LOG` or `info` for the sample and `warn` for the rest.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kontext_shipping=info,shipping_api=info,identity_worker=info,shipping=info,dev_broker=info".into()),
        )
        .init();
}
