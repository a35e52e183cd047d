//! `kontext_outbox`: messages written in the caller's transaction, waiting
//! for the relay. Sent rows are deleted (see `outbox` for why).

use sea_orm::entity::prelude::*;

#[allow(missing_docs)]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "kontext_outbox")]
pub struct Model {
    /// Insertion order; the relay publishes each key's rows in this order.
    #[sea_orm(primary_key)]
    pub seq: i64,
    #[sea_orm(unique)]
    pub message_id: String,
    pub topic: String,
    /// Relay shard: a hash of the key, so one key is always relayed by the
    /// relay holding its shard's lease.
    pub shard: i32,
    pub key: Option<Vec<u8>>,
    /// JSON array of `[name, value]` pairs.
    pub headers: String,
    pub payload: Option<Vec<u8>>,
    pub message_type: String,
    pub created_at: i64,
    pub attempts: i32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    /// 0 pending, 1 failed (bounded attempts used up; retry with `Outbox::retry_failed`).
    pub state: i16,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// `state` of a row waiting to be sent.
pub const PENDING: i16 = 0;
/// `state` of a row that used up its attempts.
pub const FAILED: i16 = 1;
