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
use std::time::Duration;

use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter, Set};
use tokio_util::sync::CancellationToken;

use crate::db::{inbox_entity as row, is_unique_violation, now_ms};
use crate::error::{DbContext as _, Error, Result};
pub use crate::model::{InboxBuilder, InboxSpec};

/// The inbox of one consumed type, ready to use.
#[derive(Clone)]
pub(crate) struct Inbox {
    pub(crate) consumer: String,
    spec: InboxSpec,
}

/// Where a consumed message came from, as the inbox needs it: its id
/// (`ce_id`), else its position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub(crate) message_id: Option<uuid::Uuid>,
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// The record's timestamp (ms), if it has one.
    pub(crate) timestamp: Option<i64>,
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

    fn dedup_key(&self, message: &(dyn Any + Sync), origin: &Origin<'_>) -> String {
        if let Some(key) = self.spec.key.as_ref().and_then(|(_, _, f)| f(message)) {
            return key;
        }
        match origin.message_id {
            Some(id) => id.to_string(),
            // Producers without kontext's headers: the record's position is
            // its identity, with its timestamp, because a position is reused
            // when the topic is deleted and created again (or a dev broker
            // restarts) while the inbox keeps its rows: a new record at an
            // old offset is then not taken for the old one. A record
            // without a timestamp keeps the position alone.
            None => match origin.timestamp {
                Some(ts) => format!(
                    "{}/{}/{}@{ts}",
                    origin.topic, origin.partition, origin.offset
                ),
                None => format!("{}/{}/{}", origin.topic, origin.partition, origin.offset),
            },
        }
    }

    /// Inserts the inbox row through `conn` (the handler's transaction).
    pub(crate) async fn record<C: ConnectionTrait>(
        &self,
        conn: &C,
        message: &(dyn Any + Sync),
        origin: &Origin<'_>,
    ) -> Result<Recorded> {
        let now = now_ms();
        let retention = i64::try_from(self.spec.retention.as_millis()).unwrap_or(i64::MAX);
        let result = row::Entity::insert(row::ActiveModel {
            consumer: Set(self.consumer.clone()),
            dedup_key: Set(self.dedup_key(message, origin)),
            message_id: Set(origin.message_id.map(|id| id.to_string())),
            processed_at: Set(now),
            expires_at: Set(now.saturating_add(retention)),
        })
        .exec_without_returning(conn)
        .await;
        match result {
            Ok(_) => Ok(Recorded::New),
            Err(e) if is_unique_violation(&e) => Ok(Recorded::Duplicate),
            Err(e) => Err(e).db("record a message in the inbox"),
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
