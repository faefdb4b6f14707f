#!/usr/bin/env bash
# Does a retention sweep slow callbacks down? Fills a fresh PostgreSQL database with ROWS old
# terminal runs (one event each, terminal 200 days ago, written with generate_series), then
# measures callbacks with nen-relay-bench against the release binary three times:
#   1. no sweep (every retention period off);
#   2. while the payload sweep prunes the old events (NEN_RELAY_RETENTION__PAYLOADS=90d);
#   3. while the runs sweep deletes the old runs (NEN_RELAY_RETENTION__RUNS=90d).
# A measurement starts once the sweep has swept its first rows, and the script reports how many
# rows it swept during the measurement and whether it was still going at the end. Everything
# listens on 127.0.0.1 and is removed at the end.
#
#   bench/retention-sweep.sh            (ROWS=1000000, BENCH_SECONDS=15, BENCH_CONNECTIONS=16)
# Environment: ROWS, BENCH_SECONDS, BENCH_CONNECTIONS, PG_ADMIN_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
trap cleanup EXIT

ROWS=${ROWS:-1000000}
SECONDS_EACH=${BENCH_SECONDS:-15}
CONNECTIONS=${BENCH_CONNECTIONS:-16}
BIN=target/release/nen-relay
BENCH=target/release/nen-relay-bench
for tool in psql curl python3; do
  command -v "$tool" >/dev/null || { echo "retention-sweep.sh needs $tool" >&2; exit 2; }
done
stale() { [[ ! -x $1 || -n $(find src migrations tools Cargo.toml Cargo.lock -newer "$1" -print -quit) ]]; }
if stale "$BIN" || stale "$BENCH"; then
  log "building the release binaries"
  cargo build --release --locked --quiet -p nen-relay -p nen-relay-bench
fi

workdir=$(mktemp -d)
secret="whsec-bench-$RANDOM$RANDOM"
token="token-bench-$RANDOM$RANDOM"
export NEN_WEBHOOK_SECRETS=$secret NEN_RELAY_API_TOKENS=$token
DATABASE_URL=$(fresh_database retention)
export DATABASE_URL
RUST_LOG=warn "$BIN" migrate

log "filling the database with $ROWS old terminal runs and their events"
started=$(date +%s)
psql -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" <<SQL
insert into runs (message_id, workflow_id, status, status_rank, created_at, updated_at,
                  completed_at, result)
select 'old-' || n, '12345678-1234-1234-1234-123456789abc', 'success', 2, t, t, t,
       '{"pages": 3}'::jsonb
from generate_series(1, $ROWS) as n,
     lateral (select now() - interval '200 days' + n * interval '1 millisecond' as t) as times;
insert into events (message_id, status, received_at, last_received_at, payload, body_sha256,
                    key_id)
select message_id, 'success', completed_at, completed_at, body, sha256(convert_to(body, 'UTF8')),
       'k0'
from runs,
     lateral (select json_build_object(
                  'workflow_id', workflow_id, 'message_id', message_id, 'status', 'success',
                  'success', true, 'result', json_build_object('pages', 3, 'text', repeat('x', 300))
              )::text as body) as bodies
where message_id like 'old-%';
vacuum analyze;
SQL
log "filled in $(( $(date +%s) - started )) s"

swept() {
  local port=$1 kind=$2
  curl -fsS "http://127.0.0.1:$port/metrics" |
    awk -v series="nen_relay_retention_swept_total{kind=\"$kind\"}" '$1 == series {print $2; found=1} END {if (!found) print 0}'
}

# nen-relay-bench prints a JSON line last; keep it.
bench_json() {
  local output
  output=$("$BENCH" --json --duration "$SECONDS_EACH" --connections "$CONNECTIONS" "$@" \
    2>"$workdir/bench.err") || {
    cat "$workdir/bench.err" >&2
    printf '%s\n' "$output" >&2
    log "bench failed: $*; server logs in $workdir"
    exit 1
  }
  printf '%s\n' "$output" | sed '$!d'
}
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# measure NAME KIND VARIABLE=VALUE...: serves with the variables; when KIND is not "none", waits
# until that sweep has swept rows, then measures and reports what it swept meanwhile.
measure() {
  local name=$1 kind=$2; shift 2
  local port pid before after total j
  port=$(free_port)
  start_background "$workdir/$name.log" \
    env "$@" NEN_RELAY_BIND=127.0.0.1:$port NEN_RELAY_LOG_FORMAT=json RUST_LOG=info "$BIN" serve
  pid=$LAST_PID
  wait_for "http://127.0.0.1:$port/readyz"
  before=0
  if [[ $kind != none ]]; then
    for _ in $(seq 1 600); do
      before=$(swept "$port" "$kind")
      [[ ${before%.*} -gt 0 ]] && break
      sleep 0.1
    done
    [[ ${before%.*} -gt 0 ]] || { log "the $kind sweep never started"; exit 1; }
  fi
  j=$(bench_json --url "http://127.0.0.1:$port")
  after=0
  [[ $kind != none ]] && after=$(swept "$port" "$kind")
  stop_process "$pid"
  total=$(python3 -c "print(int(float('$after')) - int(float('$before')))")
  printf '%-34s callbacks/s %8.0f   p50 %7.2f ms   p99 %7.2f ms   non-2xx %s   swept during: %s %s%s\n' \
    "$name" "$(field "$j" rate)" "$(field "$j" p50_ms)" "$(field "$j" p99_ms)" \
    "$(field "$j" non_2xx)" "$total" "$kind" \
    "$([[ $kind != none && ${after%.*} -lt $ROWS ]] && echo ' (still sweeping at the end)' || true)"
}

off=(NEN_RELAY_RETENTION__PAYLOADS=off NEN_RELAY_RETENTION__RUNS=off NEN_RELAY_RETENTION__REJECTED=off)
log "measuring: $CONNECTIONS connections, $SECONDS_EACH s each, $ROWS old runs"
measure "no sweep" none "${off[@]}"
measure "payload sweep in progress" payloads "${off[@]}" \
  NEN_RELAY_RETENTION__PAYLOADS=90d NEN_RELAY_RETENTION__SWEEP_INTERVAL=1s
measure "runs sweep in progress" runs "${off[@]}" \
  NEN_RELAY_RETENTION__RUNS=90d NEN_RELAY_RETENTION__SWEEP_INTERVAL=1s
measure "no sweep (again, for the noise)" none "${off[@]}"
rm -rf "$workdir"  # kept when a run fails: the server logs are in it
