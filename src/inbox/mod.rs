//! The inbox: a consumer records each message it processed in
//! `kontext_inbox`, in the same transaction as the handler's writes. A
//! redelivered message then hits the unique key `(consumer, dedup_key)`:
//! it is acknowledged without running the handler again, so its effects
//! are never applied twice.
//!
//! Declared per consumed type in the model, used by transactional handlers
//! ([`Consumers::transactional`](crate::consumer::Consumers::transactional)):
//!
//! ```
//! # use kontext::ModelBuilder;
//! # use std::time::Duration;
//! # #[derive(serde::Serialize, serde::Deserialize)] struct ShipmentCreated { shipment_id: String }
//! let mut m = ModelBuilder::new();
//! m.topic::<ShipmentCreated>(|t| {
//!     t.consumer(|c| {
//!         c.group("identity-api-shipmentcreated-consumer").inbox(|i| {
//!             i.key_by(|e: &ShipmentCreated| e.shipment_id.clone())
//!                 .retention(Duration::from_secs(14 * 24 * 3600))
//!         })
//!     })
//! });
//! # m.build().unwrap();
//! ```

use std::any::{Any, TypeId};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, Set};
use tokio_util::sync::CancellationToken;

use crate::consumer::MessageContext;
use crate::db::{inbox_entity as row, is_unique_violation, now_ms};
use crate::error::{Error, Result};

type KeyFn = Arc<dyn Fn(&(dyn Any + Sync)) -> Option<String> + Send + Sync>;

/// Declares de-duplication for a consumer; obtained in
/// [`ConsumerBuilder::inbox`](crate::consumer::ConsumerBuilder::inbox).
#[derive(Clone, Default)]
pub struct InboxBuilder {
    spec: InboxSpec,
}

/// The frozen inbox declaration.
#[derive(Clone)]
pub struct InboxSpec {
    pub(crate) consumer_name: Option<String>,
    pub(crate) retention: Duration,
    pub(crate) cleanup_interval: Duration,
    pub(crate) key: Option<(TypeId, &'static str, KeyFn)>,
}

impl Default for InboxSpec {
    fn default() -> Self {
        InboxSpec {
            consumer_name: None,
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(3600),
            key: None,
        }
    }
}

impl InboxBuilder {
    /// The name the inbox rows are recorded under. Defaults to
    /// `<group>/<type discriminator>`.
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.spec.consumer_name = Some(name.into());
        self
    }

    /// De-duplicate by fields of the message instead of its message id
    /// (`ce_id`); for example a business key, when the same fact can be
    /// published twice with different ids.
    pub fn key_by<T: Send + Sync + 'static>(
        mut self,
        f: impl Fn(&T) -> String + Send + Sync + 'static,
    ) -> Self {
        let erased: KeyFn =
            Arc::new(move |any: &(dyn Any + Sync)| (any as &dyn Any).downcast_ref::<T>().map(&f));
        self.spec.key = Some((TypeId::of::<T>(), std::any::type_name::<T>(), erased));
        self
    }

    /// How long a processed message is remembered. Defaults to 7 days; it
    /// should exceed how late a redelivery can come (topic retention, or how
    /// far back offsets may be reset).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.spec.retention = retention;
        self
    }

    /// How often expired rows are deleted. Defaults to 1 hour.
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.spec.cleanup_interval = interval;
        self
    }

    pub(crate) fn build(self) -> InboxSpec {
        self.spec
    }
}

impl fmt::Debug for InboxBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.spec.fmt(f)
    }
}

impl fmt::Debug for InboxSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxSpec")
            .field("consumer_name", &self.consumer_name)
            .field("retention", &self.retention)
            .field("key_by", &self.key.as_ref().map(|(_, t, _)| t))
            .finish()
    }
}

/// The inbox of one consumed type, ready to use.
#[derive(Clone)]
pub(crate) struct Inbox {
    pub(crate) consumer: String,
    spec: InboxSpec,
}

/// What recording a message in the inbox found.
pub(crate) enum Recorded {
    /// First time: go on and handle it.
    New,
    /// Already processed (and committed) before.
    Duplicate,
}

impl Inbox {
    pub(crate) fn new(consumer: String, spec: InboxSpec) -> Self {
        Inbox { consumer, spec }
    }

    /// Checks that a `key_by` function takes the consumed type.
    pub(crate) fn check_type(&self, id: TypeId, rust_type: &'static str) -> Result<()> {
        match &self.spec.key {
            Some((key_type, key_type_name, _)) if *key_type != id => Err(Error::config(format!(
                "the inbox of `{rust_type}` de-duplicates with `key_by` over `{key_type_name}`; it must take `&{rust_type}`"
            ))),
            _ => Ok(()),
        }
    }

    fn dedup_key(&self, message: &(dyn Any + Sync), ctx: &MessageContext) -> String {
        if let Some(key) = self.spec.key.as_ref().and_then(|(_, _, f)| f(message)) {
            return key;
        }
        match ctx.message_id() {
            Some(id) => id.to_string(),
            // Producers without kontext's headers: the record's position is
            // its identity.
            None => format!("{}/{}/{}", ctx.topic(), ctx.partition(), ctx.offset()),
        }
    }

    /// Inserts the inbox row through `conn` (the handler's transaction).
    pub(crate) async fn record<C: ConnectionTrait>(
        &self,
        conn: &C,
        message: &(dyn Any + Sync),
        ctx: &MessageContext,
    ) -> Result<Recorded> {
        let now = now_ms();
        let retention = i64::try_from(self.spec.retention.as_millis()).unwrap_or(i64::MAX);
        let result = row::Entity::insert(row::ActiveModel {
            consumer: Set(self.consumer.clone()),
            dedup_key: Set(self.dedup_key(message, ctx)),
            message_id: Set(ctx.message_id().map(|id| id.to_string())),
            processed_at: Set(now),
            expires_at: Set(now.saturating_add(retention)),
        })
        .exec_without_returning(conn)
        .await;
        match result {
            Ok(_) => Ok(Recorded::New),
            Err(e) if is_unique_violation(&e) => Ok(Recorded::Duplicate),
            Err(source) => Err(Error::Database {
                operation: "record a message in the inbox",
                source,
            }),
        }
    }

    pub(crate) fn cleanup_interval(&self) -> Duration {
        self.spec.cleanup_interval
    }
}

/// Deletes expired inbox rows every `interval` until cancelled.
pub(crate) async fn cleanup(db: DatabaseConnection, interval: Duration, cancel: CancellationToken) {
    loop {
        match row::Entity::delete_many()
            .filter(row::Column::ExpiresAt.lt(now_ms()))
            .exec(&db)
            .await
        {
            Ok(r) if r.rows_affected > 0 => {
                tracing::debug!(deleted = r.rows_affected, "expired inbox rows deleted")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "inbox cleanup failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = cancel.cancelled() => break,
        }
    }
}
