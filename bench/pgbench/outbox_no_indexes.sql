-- outbox_no_indexes: the statement of outbox.sql; run.sh drops the unique index and the relay index (kontext_outbox_relay) first and puts the relay index back after.
-- Variables: run.sh passes -D n=0 and the strings (-D topic=... type=...
-- headers=... payload=...) and empties the tables before each script. n
-- counts this client's transactions, so ids grow like the kontext bench's
-- and like UUIDv7 message ids (a second run on the same rows would collide);
-- the key (one of 5,000, as the bench's order ids) and the amount are random.
\set n :n + 1
\set id :n * 64 + :client_id
\set k random(0, 4999)
\set amount random(1000, 90999)
\set mid 1000000000000000000 + :id
\set created 1796600000000 + :n
BEGIN;
INSERT INTO bench_order (id, amount) VALUES (:id, :amount);
WITH layout AS (SELECT kontext_outbox_shards() AS n), key_lock AS (SELECT pg_advisory_xact_lock(:k) FROM layout) INSERT INTO kontext_outbox (message_id, topic, shard, key, headers, payload, message_type, created_at, attempts, next_attempt_at, last_error, state) SELECT :mid, :topic, CAST(CAST(:k AS BIGINT) % layout.n AS INTEGER), :k, :headers, :payload, :type, :created, 0, 0, NULL, 0 FROM layout, key_lock RETURNING seq, shard;
COMMIT;
