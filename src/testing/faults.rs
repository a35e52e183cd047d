//! Fault injection for tests: a type's handler, the embedded broker, and
//! the database, each by a small named API over what kontext and
//! librdkafka already have.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::broker::EmbeddedBroker;
use crate::consumer::fault::{Fault, FaultCell};
use crate::error::{DbContext as _, Error, Result};
use crate::model::Message;
use crate::runtime::Kontext;

/// Faults for one type's handler in one `Kontext`: its next attempts fail,
/// panic or hang, in the worker's real code path (retry policy, dead
/// letters, `handler_timeout`, health). Planned faults are met in order,
/// by whichever worker takes the type's next attempt.
///
/// ```no_run
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { id: u64 }
/// # async fn run(kontext: &kontext::Kontext) -> kontext::Result<()> {
/// use kontext::testing::HandlerFault;
/// // The next three attempts of `OrderPlaced`'s handler fail as a
/// // retriable error would; the fourth runs the handler.
/// HandlerFault::of::<OrderPlaced>(kontext)?.fail_next(3);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct HandlerFault {
    cell: Arc<FaultCell>,
}

impl HandlerFault {
    /// The faults of `T`'s handler in `kontext`, which consumes `T`.
    pub fn of<T: Message>(kontext: &Kontext) -> Result<HandlerFault> {
        let faults = kontext
            .handler_faults()
            .ok_or(Error::RoleNotRegistered { role: "consumers" })?;
        kontext.registry().type_status::<T>()?;
        Ok(HandlerFault {
            cell: faults.cell(std::any::TypeId::of::<T>()),
        })
    }

    /// The next `n` attempts fail with a retriable error
    /// (`HandlerError::retry("injected handler fault")`).
    pub fn fail_next(&self, n: usize) -> &Self {
        self.cell.plan(Fault::Fail, n);
        self
    }

    /// The next `n` attempts panic (`"injected handler panic"`).
    pub fn panic_next(&self, n: usize) -> &Self {
        self.cell.plan(Fault::Panic, n);
        self
    }

    /// The next `n` attempts wait, without running the handler, until
    /// [`release`](Self::release); then they run it. Past the type's
    /// `handler_timeout`, if it has one, the attempt times out instead.
    pub fn hang_next(&self, n: usize) -> &Self {
        self.cell.plan(Fault::Hang, n);
        self
    }

    /// Forgets the faults not met yet and lets hanging attempts go on.
    pub fn release(&self) {
        self.cell.release();
    }

    /// How many attempts met a fault so far.
    pub fn met(&self) -> usize {
        self.cell.met().len()
    }
}

/// Faults of the embedded broker (librdkafka's mock cluster), for the
/// clients of every `Kontext` on it. Apache Kafka has no such hooks: stop
/// its process instead (`scripts/kafka`).
///
/// ```no_run
/// # async fn run(kontext: &kontext::Kontext) -> kontext::Result<()> {
/// use kontext::testing::BrokerFault;
/// use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
/// let broker = BrokerFault::of(kontext)?;
/// // The next produce request is refused for good.
/// broker.fail_next(RDKafkaApiKey::Produce, RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, 1)?;
/// broker.down()?; // connections refused until up()
/// broker.up()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct BrokerFault<'a> {
    broker: &'a EmbeddedBroker,
}

impl<'a> BrokerFault<'a> {
    /// The faults of `kontext`'s broker, which must be the embedded one.
    pub fn of(kontext: &'a Kontext) -> Result<BrokerFault<'a>> {
        let broker = kontext.broker().as_embedded().ok_or_else(|| {
            Error::config(
                "broker faults need the embedded broker; this test runs on an external cluster (KONTEXT_TEST_BOOTSTRAP): stop a broker's process to take it down",
            )
        })?;
        Ok(BrokerFault { broker })
    }

    /// Takes every broker down: connections are refused until [`up`](Self::up).
    pub fn down(&self) -> Result<()> {
        for id in 1..=self.broker.brokers() {
            self.broker.set_broker_up(id, false)?;
        }
        Ok(())
    }

    /// Brings every broker back.
    pub fn up(&self) -> Result<()> {
        for id in 1..=self.broker.brokers() {
            self.broker.set_broker_up(id, true)?;
        }
        Ok(())
    }

    /// Answers the next `n` requests of kind `api` (of any client) with
    /// `error`: for example `RDKafkaApiKey::Produce` with
    /// `RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS` (retried by the producer),
    /// or `RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED` (a permanent
    /// refusal).
    pub fn fail_next(&self, api: RDKafkaApiKey, error: RDKafkaRespErr, n: usize) -> Result<()> {
        self.broker.fail_requests(api, &vec![error; n])
    }

    /// Delays every broker's responses by `latency` (zero takes it away).
    pub fn latency(&self, latency: Duration) -> Result<()> {
        for id in 1..=self.broker.brokers() {
            self.broker.set_round_trip_time(id, latency)?;
        }
        Ok(())
    }
}

/// A database that becomes unreachable for a while, at the connection
/// level, as a server restart or a network cut makes it: on PostgreSQL the
/// test database refuses new connections (`ALTER DATABASE .. WITH
/// ALLOW_CONNECTIONS false`) and its open ones are terminated; kontext's
/// units of work and relays see the errors an outage causes.
///
/// Needs a role that may alter the database and signal its backends (its
/// owner or a superuser), and a test database of its own
/// ([`fresh_database_url`](super::fresh_database_url)). SQLite has no
/// connections to cut: its database is a file the process opens itself;
/// test a database failure there with a [`HandlerFault`] instead. A test
/// that ends without [`restore`](Self::restore) leaves only its own
/// database refusing connections.
///
/// ```no_run
/// # async fn run() -> kontext::Result<()> {
/// use kontext::testing::{DatabaseFault, fresh_database_url};
/// let url = fresh_database_url().await?; // the database the service under test uses
/// let fault = DatabaseFault::postgres(&url).await?;
/// fault.cut().await?;
/// // ... the service's units of work retry without spending attempts ...
/// fault.restore().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DatabaseFault {
    admin: sea_orm::DatabaseConnection,
    database: String,
}

impl DatabaseFault {
    /// The fault of the PostgreSQL database at `url` (reached through the
    /// server's `postgres` database meanwhile).
    pub async fn postgres(url: &str) -> Result<DatabaseFault> {
        if !url.starts_with("postgres") {
            return Err(Error::config(
                "database faults need PostgreSQL: a SQLite database is a file this process opens itself, with no connection to cut",
            ));
        }
        let database = database_name(url)
            .ok_or_else(|| Error::config("the database URL names no database"))?
            .to_owned();
        let admin = crate::db::connect(&super::with_database(url, "postgres")).await?;
        Ok(DatabaseFault { admin, database })
    }

    /// Cuts the database off: new connections are refused, open ones end.
    pub async fn cut(&self) -> Result<()> {
        use sea_orm::ConnectionTrait;
        let name = quoted(&self.database);
        self.admin
            .execute_unprepared(&format!(
                "ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"
            ))
            .await
            .db("refuse connections to the test database")?;
        self.admin
            .execute(sea_orm::Statement::from_sql_and_values(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                [self.database.clone().into()],
            ))
            .await
            .db("end the test database's connections")?;
        Ok(())
    }

    /// Lets connections in again.
    pub async fn restore(&self) -> Result<()> {
        use sea_orm::ConnectionTrait;
        self.admin
            .execute_unprepared(&format!(
                "ALTER DATABASE {} WITH ALLOW_CONNECTIONS true",
                quoted(&self.database)
            ))
            .await
            .db("accept connections to the test database again")?;
        Ok(())
    }
}

/// The database a PostgreSQL URL names.
fn database_name(url: &str) -> Option<&str> {
    let base = url.split_once('?').map_or(url, |(b, _)| b);
    let (server, name) = base.rsplit_once('/')?;
    (!name.is_empty() && !server.ends_with('/')).then_some(name)
}

/// An SQL identifier, quoted.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_read_from_the_url() {
        assert_eq!(
            database_name("postgres://u:p@h:5432/kontext_t?sslmode=disable"),
            Some("kontext_t")
        );
        assert_eq!(database_name("postgres://u:p@h:5432/"), None);
        assert_eq!(database_name("postgres://h"), None);
        assert_eq!(quoted("a\"b"), "\"a\"\"b\"");
    }
}
