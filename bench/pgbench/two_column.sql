-- two_column: an insert into a two-column table with no index (bench_pair).
-- Variables: run.sh passes -D n=0 and the strings (-D topic=... type=...
-- headers=... payload=...) and empties the tables before each script. n
-- counts this client's transactions, so ids grow like the kontext bench's
-- and like UUIDv7 message ids (a second run on the same rows would collide);
-- the key (one of 5,000, as the bench's order ids) and the amount are random.
\set n :n + 1
\set id :n * 64 + :client_id
\set k random(0, 4999)
\set amount random(1000, 90999)
BEGIN;
INSERT INTO bench_order (id, amount) VALUES (:id, :amount);
INSERT INTO bench_pair (a, b) VALUES (:id, :amount);
COMMIT;
