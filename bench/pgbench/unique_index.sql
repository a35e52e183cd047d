-- Optional: the unique index on kontext_outbox.message_id, as the table had
-- it on PostgreSQL before 88c7126 (the constraint CreateTables made;
-- MessageIdNotUnique drops it). The pgbench table in BENCHMARKS.md was
-- measured with it. run.sh loads this when KONTEXT_PGBENCH_UNIQUE=1.
ALTER TABLE kontext_outbox ADD CONSTRAINT kontext_outbox_message_id_key UNIQUE (message_id);
