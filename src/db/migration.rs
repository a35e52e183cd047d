//! The migrations of kontext's tables.

use sea_orm_migration::prelude::*;

/// kontext's migrations, in order, to append to an application's migrator.
pub fn migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(CreateTables),
        Box::new(LeaseGeneration),
        Box::new(MessageIdNotUnique),
        Box::new(OutboxLayout),
    ]
}

#[derive(Iden)]
enum Outbox {
    #[iden = "kontext_outbox"]
    Table,
    Seq,
    MessageId,
    Topic,
    Shard,
    Key,
    Headers,
    Payload,
    MessageType,
    CreatedAt,
    Attempts,
    NextAttemptAt,
    LastError,
    State,
}

#[derive(Iden)]
enum Lease {
    #[iden = "kontext_outbox_lease"]
    Table,
    Shard,
    Owner,
    ExpiresAt,
    Generation,
}

#[derive(Iden)]
enum Layout {
    #[iden = "kontext_outbox_layout"]
    Table,
    Id,
    Shards,
    PausedUntil,
    PausedBy,
}

#[derive(Iden)]
enum Inbox {
    #[iden = "kontext_inbox"]
    Table,
    Consumer,
    DedupKey,
    MessageId,
    ProcessedAt,
    ExpiresAt,
}

struct CreateTables;

impl MigrationName for CreateTables {
    fn name(&self) -> &str {
        "m20261123_000001_kontext_create_tables"
    }
}

// The trait's signature elides `SchemaManager`'s lifetime; match it.
#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for CreateTables {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Outbox::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(Outbox::Seq)
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(
                    ColumnDef::new(Outbox::MessageId)
                        .string_len(36)
                        .not_null()
                        .unique_key(),
                )
                .col(ColumnDef::new(Outbox::Topic).string_len(249).not_null())
                .col(ColumnDef::new(Outbox::Shard).integer().not_null())
                .col(ColumnDef::new(Outbox::Key).binary().null())
                .col(ColumnDef::new(Outbox::Headers).text().not_null())
                .col(ColumnDef::new(Outbox::Payload).binary().null())
                .col(ColumnDef::new(Outbox::MessageType).string().not_null())
                .col(ColumnDef::new(Outbox::CreatedAt).big_integer().not_null())
                .col(
                    ColumnDef::new(Outbox::Attempts)
                        .integer()
                        .not_null()
                        .default(0),
                )
                .col(
                    ColumnDef::new(Outbox::NextAttemptAt)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .col(ColumnDef::new(Outbox::LastError).text().null())
                .col(
                    ColumnDef::new(Outbox::State)
                        .small_integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("kontext_outbox_relay")
                .table(Outbox::Table)
                .col(Outbox::State)
                .col(Outbox::Shard)
                .col(Outbox::Seq)
                .if_not_exists()
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(Lease::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(Lease::Shard)
                        .integer()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(Lease::Owner).string().null())
                .col(
                    ColumnDef::new(Lease::ExpiresAt)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(Inbox::Table)
                .if_not_exists()
                .col(ColumnDef::new(Inbox::Consumer).string().not_null())
                .col(ColumnDef::new(Inbox::DedupKey).string().not_null())
                .col(ColumnDef::new(Inbox::MessageId).string_len(36).null())
                .col(ColumnDef::new(Inbox::ProcessedAt).big_integer().not_null())
                .col(ColumnDef::new(Inbox::ExpiresAt).big_integer().not_null())
                .primary_key(Index::create().col(Inbox::Consumer).col(Inbox::DedupKey))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("kontext_inbox_expiry")
                .table(Inbox::Table)
                .col(Inbox::ExpiresAt)
                .if_not_exists()
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            Table::drop().table(Inbox::Table).if_exists().to_owned(),
            Table::drop().table(Lease::Table).if_exists().to_owned(),
            Table::drop().table(Outbox::Table).if_exists().to_owned(),
        ] {
            m.drop_table(t).await?;
        }
        Ok(())
    }
}

/// Fenced leases: a generation that grows on every takeover.
struct LeaseGeneration;

impl MigrationName for LeaseGeneration {
    fn name(&self) -> &str {
        "m20261202_000001_kontext_lease_generation"
    }
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for LeaseGeneration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // SQLite has no `ADD COLUMN IF NOT EXISTS`; migrations run under a
        // lock (`db::migrate`), so checking first is safe.
        if m.has_column("kontext_outbox_lease", "generation").await? {
            return Ok(());
        }
        m.alter_table(
            Table::alter()
                .table(Lease::Table)
                .add_column(
                    ColumnDef::new(Lease::Generation)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Lease::Table)
                .drop_column(Lease::Generation)
                .to_owned(),
        )
        .await
    }
}

/// `kontext_outbox.message_id` loses its unique constraint on PostgreSQL.
/// kontext makes every id itself (UUIDv7) and never looks a row up by it,
/// and keeping the constraint's index cost writers 4-5% of their commit
/// rate (BENCHMARKS.md, "What the outbox costs a transaction"). SQLite keeps
/// it: its index came with the table and goes only by rebuilding the table.
struct MessageIdNotUnique;

impl MigrationName for MessageIdNotUnique {
    fn name(&self) -> &str {
        "m20261203_000001_kontext_outbox_message_id_not_unique"
    }
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for MessageIdNotUnique {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() != sea_orm::DbBackend::Postgres {
            return Ok(());
        }
        m.get_connection()
            .execute_unprepared(
                "ALTER TABLE kontext_outbox DROP CONSTRAINT IF EXISTS kontext_outbox_message_id_key",
            )
            .await
            .map(|_| ())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() != sea_orm::DbBackend::Postgres {
            return Ok(());
        }
        m.get_connection()
            .execute_unprepared(
                "ALTER TABLE kontext_outbox ADD CONSTRAINT kontext_outbox_message_id_key UNIQUE (message_id)",
            )
            .await
            .map(|_| ())
    }
}

/// The PostgreSQL advisory lock (one 64-bit key: "kontxlay") every outbox
/// insert takes shared and a reshard exclusively (`outbox::layout`).
pub(crate) const OUTBOX_LAYOUT_LOCK: i64 = 0x6b6f_6e74_786c_6179;

/// The outbox table's shard count, stored once for every writer and relay
/// (see `outbox::layout`). Its one row is written at the first start.
struct OutboxLayout;

impl MigrationName for OutboxLayout {
    fn name(&self) -> &str {
        "m20261207_000001_kontext_outbox_layout"
    }
}

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for OutboxLayout {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Layout::Table)
                .if_not_exists()
                .col(
                    ColumnDef::new(Layout::Id)
                        .integer()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(Layout::Shards).integer().not_null())
                .col(
                    ColumnDef::new(Layout::PausedUntil)
                        .big_integer()
                        .not_null()
                        .default(0),
                )
                .col(ColumnDef::new(Layout::PausedBy).string().null())
                .to_owned(),
        )
        .await?;
        if m.get_database_backend() == sea_orm::DbBackend::Postgres {
            // Takes the layout lock shared (a reshard takes it exclusively,
            // `OUTBOX_LAYOUT_LOCK`), then reads the count: each
            // statement of a VOLATILE function has a snapshot of its own, so
            // the count read is the one committed when the lock was granted.
            m.get_connection()
                .execute_unprepared(&format!(
                    "CREATE OR REPLACE FUNCTION kontext_outbox_shards() RETURNS integer \
                     LANGUAGE sql VOLATILE AS $$ \
                     SELECT pg_advisory_xact_lock_shared({OUTBOX_LAYOUT_LOCK}); \
                     SELECT shards FROM kontext_outbox_layout WHERE id = 1; $$"
                ))
                .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() == sea_orm::DbBackend::Postgres {
            m.get_connection()
                .execute_unprepared("DROP FUNCTION IF EXISTS kontext_outbox_shards()")
                .await?;
        }
        m.drop_table(Table::drop().table(Layout::Table).if_exists().to_owned())
            .await
    }
}
