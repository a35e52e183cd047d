-- outbox_no_lock: the same row without the key's advisory lock (kontext's keyless statement, PG_INSERT; the layout lock in kontext_outbox_shards() stays).
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
WITH layout AS (SELECT kontext_outbox_shards() AS n) INSERT INTO kontext_outbox (message_id, topic, shard, key, headers, payload, message_type, created_at, attempts, next_attempt_at, last_error, state) SELECT :mid, :topic, CAST(CAST(:k AS BIGINT) % layout.n AS INTEGER), :k, :headers, :payload, :type, :created, 0, 0, NULL, 0 FROM layout RETURNING seq, shard;
COMMIT;
