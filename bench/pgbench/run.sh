#!/usr/bin/env bash
# What one more statement costs any client (BENCHMARKS.md, "What the outbox
# costs a transaction"): kontext's outbox insert and its neighbours from
# pgbench, PostgreSQL's own C client, no kontext code at all.
#
#   bench/pgbench/run.sh                            # today's schema
#   KONTEXT_PGBENCH_UNIQUE=1 bench/pgbench/run.sh   # with the unique index on
#                                                   # message_id (before 88c7126)
#   T=3 bench/pgbench/run.sh                        # 3 s per script, not 12
#
# Connects with the usual libpq variables (PGHOST, PGPORT, PGUSER,
# PGPASSWORD). Creates a database of its own (KONTEXT_PGBENCH_DB, default
# kontext_pgbench_<pid>), loads setup.sql, and runs each script with
# `pgbench -n -M prepared -c 32 -j 2 -T $T -f <script>` on empty tables,
# printing one "script tps" line per script. Drops the database at the end
# (KEEP_DB=1 keeps it). Exits non-zero if any script fails.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
T=${T:-12}
CLIENTS=${CLIENTS:-32}
JOBS=${JOBS:-2}
# The scripts number their rows n * 64 + client_id.
[ "$CLIENTS" -le 64 ] || { echo "CLIENTS may be at most 64" >&2; exit 2; }
PGBENCH=${PGBENCH:-$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -n 1)}
[ -x "$PGBENCH" ] || { echo "no pgbench found: set PGBENCH" >&2; exit 2; }
db=${KONTEXT_PGBENCH_DB:-kontext_pgbench_$$}
unique=${KONTEXT_PGBENCH_UNIQUE:-0}

# What kontext writes for the bench's OrderPlaced: its JSON payload (about
# 200 bytes) and its CloudEvents headers as JSON text.
topic=bench-outbox
type=OrderPlaced
payload='{"id":12345,"order_id":"ord-00002345","customer_id":"cus-000627","amount_cents":13345,"currency":"EUR","items":["sku-12345","sku-67890","sku-24680"],"channel":"web-checkout-eu-west"}'
headers='[["ce_specversion","1.0"],["ce_id","0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"],["ce_type","OrderPlaced"],["ce_source","kontext-bench"],["ce_time","2026-12-03T18:00:00.000Z"],["content-type","application/json"]]'

q() { PGOPTIONS="${PGOPTIONS:-} -c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 "$@"; }

q -d postgres -c "CREATE DATABASE \"$db\""
cleanup() {
    if [ "${KEEP_DB:-0}" != 1 ]; then
        q -d postgres -c "DROP DATABASE IF EXISTS \"$db\"" || true
    fi
}
trap cleanup EXIT
q -d "$db" -f "$here/setup.sql"

# The schema each row needs: the relay index always, except for
# outbox_no_indexes; the unique index on message_id only with
# KONTEXT_PGBENCH_UNIQUE=1, and never for outbox_no_unique and
# outbox_no_indexes. Tables start empty for every script.
schema_for() {
    local sql="TRUNCATE bench_order, bench_pair, kontext_outbox;"
    sql+="ALTER TABLE kontext_outbox DROP CONSTRAINT IF EXISTS kontext_outbox_message_id_key;"
    case "$1" in
        outbox_no_indexes) sql+="DROP INDEX IF EXISTS kontext_outbox_relay;" ;;
        *) sql+="CREATE INDEX IF NOT EXISTS kontext_outbox_relay ON kontext_outbox (state, shard, seq);" ;;
    esac
    q -d "$db" -c "$sql"
    if [ "$unique" = 1 ] && [ "$1" != outbox_no_unique ] && [ "$1" != outbox_no_indexes ]; then
        q -d "$db" -f "$here/unique_index.sql"
    fi
    q -d "$db" -c "VACUUM ANALYZE"
}

failed=0
echo "# pgbench -n -M prepared -c $CLIENTS -j $JOBS -T $T, unique index on message_id: $([ "$unique" = 1 ] && echo yes || echo no)"
echo "# script tps"
for s in none select1 two_column second_row outbox outbox_no_lock outbox_no_unique outbox_no_indexes outbox_pipeline; do
    schema_for "$s"
    if out=$("$PGBENCH" -n -M prepared -c "$CLIENTS" -j "$JOBS" -T "$T" \
        -D n=0 -D "topic=$topic" -D "type=$type" -D "payload=$payload" -D "headers=$headers" \
        -f "$here/$s.sql" "$db" 2>&1); then
        tps=$(printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -n 1)
        printf '%s %s\n' "$s" "${tps:-?}"
    else
        printf '%s FAILED\n' "$s"
        printf '%s\n' "$out" | tail -n 20 >&2
        failed=1
    fi
done
exit "$failed"
