#!/usr/bin/env bash
# Reads stay flat: loads 10k and then 1M runs into a fresh PostgreSQL database, measures p50/p99
# of the query API at each size, and shows each query's plan (every one walks an index).
#
#   bench/reads.sh                  (about 2 minutes; READ_SIZES="10000 1000000" to change)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
trap cleanup EXIT

BIN=target/release/nen-relay
[[ -x $BIN ]] || BIN=target/debug/nen-relay
[[ -x $BIN ]] || { echo "build nen-relay first" >&2; exit 2; }
SIZES=${READ_SIZES:-"10000 1000000"}
workdir=$(mktemp -d)
export NEN_WEBHOOK_SECRETS="whsec-reads-$RANDOM" NEN_RELAY_API_TOKENS="token-reads-$RANDOM$RANDOM"
export DATABASE_URL
DATABASE_URL=$(fresh_database reads)
RUST_LOG=warn "$BIN" migrate

port=$(free_port)
NEN_RELAY_BIND=127.0.0.1:$port RUST_LOG=warn start_background "$workdir/relay.log" "$BIN" serve
wait_for "http://127.0.0.1:$port/readyz"

loaded=0
for size in $SIZES; do
  log "loading runs $((loaded + 1)) .. $size"
  # Runs as callbacks leave them: mostly success, some failed or still processing, 100 workflows.
  psql -X -q "$DATABASE_URL" <<SQL
insert into runs (message_id, workflow_id, status, status_rank, created_at, updated_at, completed_at, result)
select 'run-' || g, 'wf-' || (g % 100),
       case when g % 10 = 0 then 'failed' when g % 7 = 0 then 'processing' else 'success' end,
       case when g % 7 = 0 and g % 10 <> 0 then 1 else 2 end,
       now() - make_interval(secs => $size - g), now() - make_interval(secs => $size - g),
       case when g % 7 = 0 and g % 10 <> 0 then null else now() - make_interval(secs => $size - g) end,
       case when g % 10 = 0 or g % 7 = 0 then null else '{"approved": true, "total": 1234.56}'::jsonb end
from generate_series($((loaded + 1)), $size) as g;
vacuum analyze runs;
SQL
  loaded=$size
  python3 bench/reads.py "http://127.0.0.1:$port" "$NEN_RELAY_API_TOKENS" "$size"

  log "plans at $size runs (the statements nen-relay sends)"
  # As src/store/postgres.rs writes them (a first page binds the cursor past every run),
  # conflict flags derived from the events.
  columns="message_id, workflow_id, status, created_at, updated_at, completed_at, expires_at, result::text, assets_url, error, triggered_here, (runs.status_rank = 2 and exists (select 1 from events c where c.message_id = runs.message_id and c.status <> runs.status and c.status not in ('submitted', 'processing'))), workflow_params::text, seq"
  event_conflict="(events.status not in ('submitted', 'processing') and exists (select 1 from runs r where r.message_id = events.message_id and r.status_rank = 2 and r.status <> events.status))"
  deep=$(( size / 100 > 60 ? size / 100 : 60 ))
  psql -X -q "$DATABASE_URL" <<SQL | grep -E '^(--|  *(->|Limit|Index|Bitmap|Seq|Sort|Filter|Rows Removed|Execution))' || true
\echo '-- get run'
explain (analyze, costs off, timing off, summary on) select $columns from runs where message_id = 'run-$((size / 2))';
\echo '-- first page'
explain (analyze, costs off, timing off, summary on) select $columns from runs where seq < 9223372036854775807 order by seq desc limit 51;
\echo '-- deep page'
explain (analyze, costs off, timing off, summary on) select $columns from runs where seq < $deep order by seq desc limit 51;
\echo '-- status filter, deep page'
explain (analyze, costs off, timing off, summary on) select $columns from runs where status = 'failed' and seq < $deep order by seq desc limit 51;
\echo '-- workflow filter, deep page'
explain (analyze, costs off, timing off, summary on) select $columns from runs where workflow_id = 'wf-7' and seq < $deep order by seq desc limit 51;
\echo '-- events of a run'
explain (analyze, costs off, timing off, summary on) select status, received_at, duplicates, differing_duplicates, $event_conflict, key_id, last_received_at, payload from events where message_id = 'run-1' order by received_at, id;
SQL
done
rm -rf "$workdir"
