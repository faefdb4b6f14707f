#!/usr/bin/env bash
# Reads stay flat on SQLite too: bench/reads.sh for the embedded store. Loads 10k and then 1M
# runs into a fresh SQLite file (with the sqlite3 shell, while nen-relay is idle: WAL lets a
# second writer in between its batches), measures p50/p99 of the query API at each size with
# bench/reads.py, and shows each query's plan (every one walks an index).
#
#   bench/reads-sqlite.sh           (about 2 minutes; READ_SIZES="10000 1000000" to change)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
trap cleanup EXIT

BIN=target/release/nen-relay
[[ -x $BIN ]] || BIN=target/debug/nen-relay
[[ -x $BIN ]] || { echo "build nen-relay first" >&2; exit 2; }
command -v sqlite3 >/dev/null || { echo "reads-sqlite.sh needs the sqlite3 shell" >&2; exit 2; }
SIZES=${READ_SIZES:-"10000 1000000"}
workdir=$(mktemp -d)
database="$workdir/reads.db"
export NEN_WEBHOOK_SECRETS="whsec-reads-$RANDOM" NEN_RELAY_API_TOKENS="token-reads-$RANDOM$RANDOM"
export DATABASE_URL="sqlite://$database"
RUST_LOG=warn "$BIN" migrate

port=$(free_port)
NEN_RELAY_BIND=127.0.0.1:$port RUST_LOG=warn start_background "$workdir/relay.log" "$BIN" serve
wait_for "http://127.0.0.1:$port/readyz"

# The store's one fixed-width UTC form of a time N seconds ago (migrations/sqlite/0001).
ago() { printf "strftime('%%Y-%%m-%%dT%%H:%%M:%%S', 'now', '-' || (%s) || ' seconds') || '.000000000Z'" "$1"; }

loaded=0
for size in $SIZES; do
  log "loading runs $((loaded + 1)) .. $size"
  # The same runs as bench/reads.sh: mostly success, some failed or still processing, 100
  # workflows; seq follows insertion order, as it does for runs that callbacks create.
  sqlite3 -bail "$database" <<SQL
.timeout 30000
with recursive g(n) as (select $((loaded + 1)) union all select n + 1 from g where n < $size)
insert into runs (message_id, workflow_id, status, status_rank, created_at, updated_at, completed_at, result)
select 'run-' || n, 'wf-' || (n % 100),
       case when n % 10 = 0 then 'failed' when n % 7 = 0 then 'processing' else 'success' end,
       case when n % 7 = 0 and n % 10 <> 0 then 1 else 2 end,
       $(ago "$size - n"), $(ago "$size - n"),
       case when n % 7 = 0 and n % 10 <> 0 then null else $(ago "$size - n") end,
       case when n % 10 = 0 or n % 7 = 0 then null else '{"approved": true, "total": 1234.56}' end
from g;
analyze;
SQL
  loaded=$size
  python3 bench/reads.py "http://127.0.0.1:$port" "$NEN_RELAY_API_TOKENS" "$size"

  log "plans at $size runs (the statements nen-relay sends, as src/store/sqlite.rs writes them)"
  columns="message_id, workflow_id, status, created_at, updated_at, completed_at, expires_at, result, assets_url, error, triggered_here, (status_rank = 2 and exists (select 1 from events where events.message_id = runs.message_id and events.status <> runs.status and events.status not in ('submitted', 'processing'))), workflow_params, seq"
  deep=$(( size / 100 > 60 ? size / 100 : 60 ))
  sqlite3 "$database" <<SQL
.print '-- get run'
explain query plan select $columns from runs where message_id = 'run-$((size / 2))';
.print '-- first page'
explain query plan select $columns from runs where seq < 9223372036854775807 order by seq desc limit 51;
.print '-- deep page'
explain query plan select $columns from runs where seq < $deep order by seq desc limit 51;
.print '-- status filter, deep page'
explain query plan select $columns from runs where status = 'failed' and seq < $deep order by seq desc limit 51;
.print '-- workflow filter, deep page'
explain query plan select $columns from runs where workflow_id = 'wf-7' and seq < $deep order by seq desc limit 51;
SQL
done
rm -rf "$workdir"
