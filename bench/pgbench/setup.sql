-- The schema bench/pgbench/*.sql run against (bench/pgbench/run.sh loads it
-- into a database of its own).
--
-- kontext_outbox, kontext_outbox_layout and kontext_outbox_shards() are
-- what kontext's migrations leave on PostgreSQL at today's tree
-- (src/db/migration.rs: CreateTables, MessageIdNotUnique, OutboxLayout;
-- checked against pg_dump of a database kontext migrated). The unique index
-- on message_id is not here: MessageIdNotUnique (88c7126) drops it.
-- unique_index.sql puts it back, for the schema before 88c7126.
-- The lease and inbox tables are left out: no script touches them.

-- The kontext bench's business table (bench/outbox.rs).
CREATE TABLE bench_order (id BIGINT PRIMARY KEY, amount BIGINT NOT NULL);

-- The "two-column table": the cheapest insert there is, no index at all.
CREATE TABLE bench_pair (a BIGINT NOT NULL, b BIGINT NOT NULL);

CREATE TABLE kontext_outbox (
    seq bigserial PRIMARY KEY,
    message_id varchar(36) NOT NULL,
    topic varchar(249) NOT NULL,
    shard integer NOT NULL,
    key bytea,
    headers text NOT NULL,
    payload bytea,
    message_type varchar NOT NULL,
    created_at bigint NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at bigint NOT NULL DEFAULT 0,
    last_error text,
    state smallint NOT NULL DEFAULT 0
);
CREATE INDEX kontext_outbox_relay ON kontext_outbox (state, shard, seq);

CREATE TABLE kontext_outbox_layout (
    id integer PRIMARY KEY,
    shards integer NOT NULL,
    paused_until bigint NOT NULL DEFAULT 0,
    paused_by varchar
);
-- The first start's seed: 16 shards.
INSERT INTO kontext_outbox_layout (id, shards) VALUES (1, 16);

-- Every insert takes the layout lock shared, then reads the count
-- (7741527730988802425 = 0x6b6f6e74786c6179, db::migration::OUTBOX_LAYOUT_LOCK).
CREATE FUNCTION kontext_outbox_shards() RETURNS integer
    LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock_shared(7741527730988802425);
    SELECT shards FROM kontext_outbox_layout WHERE id = 1; $$;
