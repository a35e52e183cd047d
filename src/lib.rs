//! kontext: declare Kafka topics next to your database model, then produce
//! and consume typed messages with the guarantees teams otherwise hand-roll.
//!
//! ```no_run
//! use kontext::prelude::*;
//! # #[derive(serde::Serialize, serde::Deserialize)] struct OrderCreated { order_id: u64 }
//!
//! # async fn run() -> kontext::Result<()> {
//! let model = Model::builder()
//!     .topic::<OrderCreated>(|t| t.name("orders").partitions(6).key(|e| e.order_id))
//!     .build()?;
//! // No bootstrap servers configured: kontext starts its embedded broker.
//! let kontext = Kontext::builder(model).producer().start().await?;
//! let delivery = kontext.producer()?.produce(&OrderCreated { order_id: 7 }).await?;
//! println!("stored at {}[{}]@{}", delivery.topic, delivery.partition, delivery.offset);
//! # Ok(()) }
//! ```
//!
//! Map of the crate, one module per concept:
//! - [`model`]: `ModelBuilder`, topics, keys, headers, validation.
//! - [`codec`]: how messages become bytes (`Json` by default).
//! - [`config`]: Kafka settings from code, files and the environment.
//! - [`broker`]: the embedded mock cluster or an external one; topic provisioning.
//! - `client` (internal): what every Kafka client shares: logs routed to
//!   `tracing`, live-client counts, broker reachability for health.
//! - [`producer`]: typed, acknowledged produce and batch produce.
//! - [`consumer`]: poll services (shared and dedicated), handlers, streams,
//!   buffers and backpressure, offsets, retries, dead letters.
//! - [`registry`]: which poll service serves which type, and how it is doing.
//! - [`outbox`]: messages written in the caller's database transaction and
//!   relayed after commit.
//! - [`inbox`]: de-duplication of consumed messages in the handler's transaction.
//! - [`db`]: kontext's tables as sea-orm entities and migrations.
//! - [`headers`]: the standard headers on every message.
//! - [`runtime`]: `Kontext`, which starts and stops the roles a process registers.
//! - [`admin`]: operator controls on a running `Kontext`: pause, resume,
//!   seek, dead-letter replay.
//! - `http` (feature `http`): an axum `Router` with health probes, status,
//!   operator commands and a status page, for the application to mount.
//! - [`error`]: the one `Error` type.

pub mod admin;
mod backoff;
pub mod broker;
mod client;
pub mod codec;
pub mod config;
pub mod consumer;
pub mod db;
pub mod error;
pub mod headers;
#[cfg(feature = "http")]
pub mod http;
pub mod inbox;
pub mod model;
pub mod outbox;
pub mod producer;
pub mod registry;
pub mod runtime;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use broker::Broker;
pub use codec::{Codec, Json};
pub use config::KafkaSettings;
pub use consumer::{
    Backpressure, Distribution, ExactlyOnceHandler, Handler, HandlerError, MessageContext,
    MessageStream, RetryPolicy, TransactionalHandler, UnitOfWork,
};
pub use error::{Error, Result, TransactionFailure};
pub use headers::HeaderProfile;
/// `#[derive(Topic)]`: see the [`Topic`](trait@Topic) trait.
pub use kontext_macros::Topic;
pub use model::{Message, Model, ModelBuilder, Topic, TopicBuilder};
pub use producer::{Delivery, Producer, Sending, Transaction, TransactionalProducer};
pub use runtime::{Kontext, KontextBuilder, shutdown_signal};

/// What generated code needs, so users need not depend on it themselves.
#[doc(hidden)]
pub mod __private {
    pub use inventory;
}

/// The names most services need: `use kontext::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Backpressure, Broker, Delivery, Distribution, Error, ExactlyOnceHandler, Handler,
        HandlerError, KafkaSettings, Kontext, Message, MessageContext, MessageStream, Model,
        ModelBuilder, Producer, Result, RetryPolicy, Topic, Transaction, TransactionalHandler,
        UnitOfWork,
    };
}

/// Compiles the examples of `DEDICATED_CONNECTIONS.md` as doctests.
#[cfg(doctest)]
#[doc = include_str!("../DEDICATED_CONNECTIONS.md")]
pub struct DedicatedConnectionsDoc;
