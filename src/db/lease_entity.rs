//! `kontext_outbox_lease`: which relay owns which shard, until when.

use sea_orm::entity::prelude::*;

#[allow(missing_docs)]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "kontext_outbox_lease")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub shard: i32,
    pub owner: Option<String>,
    /// Database-clock milliseconds.
    pub expires_at: i64,
    /// Grows on every takeover; writes to the shard's rows are conditional
    /// on it (see `outbox::lease`).
    pub generation: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
