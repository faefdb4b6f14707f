#!/usr/bin/env bash
# One side-by-side run, at 16 and 64 connections:
#   - nen-relay (release build, PostgreSQL, fresh database): committed callbacks/s, p50/p99, loss check
#   - nen-relay's 401 path (bad signatures): its ceiling without the store
#   - the typical receiver (bench/reference-node: Fastify + pg pool of 8, a transaction per callback)
#   - pgbench: the same one-callback-per-transaction write, prepared statements (PostgreSQL's ceiling)
# and nen-relay's peak RSS. Everything listens on 127.0.0.1 and is removed at the end.
#
#   bench/compare.sh                      (about 3 minutes; BENCH_SECONDS=15 per measurement)
#   bench/compare.sh | tee run1.txt; ...; python3 bench/report.py --median run1.txt run2.txt run3.txt
# Environment: BENCH_SECONDS, BENCH_CONNECTIONS ("16 64"), PG_ADMIN_URL, NEN_RELAY_* tuning variables.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
trap cleanup EXIT

SECONDS_EACH=${BENCH_SECONDS:-15}
CONNECTIONS=${BENCH_CONNECTIONS:-"16 64"}
BIN=target/release/nen-relay
BENCH=target/release/nen-relay-bench
for tool in pgbench psql node curl python3; do
  command -v "$tool" >/dev/null || { echo "compare.sh needs $tool" >&2; exit 2; }
done
stale() { [[ ! -x $1 || -n $(find src migrations tools Cargo.toml Cargo.lock -newer "$1" -print -quit) ]]; }
if stale "$BIN" || stale "$BENCH"; then
  log "building the release binaries"
  cargo build --release --locked --quiet -p nen-relay -p nen-relay-bench
fi
if [[ ! -d bench/reference-node/node_modules ]]; then
  log "installing the reference receiver's dependencies"
  (cd bench/reference-node && npm ci --no-audit --no-fund --silent)
fi

workdir=$(mktemp -d)
secret="whsec-bench-$RANDOM$RANDOM"
token="token-bench-$RANDOM$RANDOM"
export NEN_WEBHOOK_SECRETS=$secret NEN_RELAY_API_TOKENS=$token

relay_db=$(fresh_database relay)
node_db=$(fresh_database node)
pgbench_db=$(fresh_database pgbench)
DATABASE_URL=$pgbench_db RUST_LOG=warn "$BIN" migrate

relay_port=$(free_port)
# As deployed: JSON logs at the default level (info).
DATABASE_URL=$relay_db NEN_RELAY_BIND=127.0.0.1:$relay_port NEN_RELAY_LOG_FORMAT=json \
  start_background "$workdir/relay.log" "$BIN" serve
relay_pid=$LAST_PID
wait_for "http://127.0.0.1:$relay_port/readyz"

node_port=$(free_port)
DATABASE_URL=$node_db PORT=$node_port start_background "$workdir/node.log" node bench/reference-node/server.js
node_pid=$LAST_PID
wait_for "http://127.0.0.1:$node_port/healthz"

# nen-relay-bench prints a JSON line last; keep it.
bench_json() {
  local output
  output=$("$BENCH" --json --duration "$SECONDS_EACH" "$@" 2>"$workdir/bench.err") || {
    cat "$workdir/bench.err" >&2
    printf '%s\n' "$output" >&2
    log "bench failed: $*; server logs in $workdir"
    exit 1
  }
  printf '%s\n' "$output" | sed '$!d'
}
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

declare -A result
for c in $CONNECTIONS; do
  log "nen-relay, committed callbacks, $c connections"
  j=$(bench_json --url "http://127.0.0.1:$relay_port" --connections "$c")
  result[relay_rate_$c]=$(field "$j" rate); result[relay_p50_$c]=$(field "$j" p50_ms)
  result[relay_p99_$c]=$(field "$j" p99_ms); result[relay_non2xx_$c]=$(field "$j" non_2xx)
  result[relay_verified_$c]=$(field "$j" verified_runs)

  log "nen-relay, 401 path, $c connections"
  j=$(bench_json --url "http://127.0.0.1:$relay_port" --connections "$c" --bad-signatures)
  result[reject_rate_$c]=$(field "$j" rate); result[reject_p99_$c]=$(field "$j" p99_ms)

  log "reference receiver (Node + Fastify + pg), $c connections"
  j=$(bench_json --url "http://127.0.0.1:$node_port" --connections "$c" --no-verify)
  result[node_rate_$c]=$(field "$j" rate); result[node_p50_$c]=$(field "$j" p50_ms)
  result[node_p99_$c]=$(field "$j" p99_ms); result[node_non2xx_$c]=$(field "$j" non_2xx)

  log "pgbench, one callback per transaction, $c clients"
  pgbench -n -M prepared -c "$c" -j 2 -T "$SECONDS_EACH" -f bench/pgbench/callback.sql "$pgbench_db" \
    >"$workdir/pgbench.out" 2>&1 || { cat "$workdir/pgbench.out" >&2; exit 1; }
  result[pgbench_tps_$c]=$(awk '/^tps = / {print $3; exit}' "$workdir/pgbench.out")
  result[pgbench_lat_$c]=$(awk '/^latency average = / {print $4; exit}' "$workdir/pgbench.out")
done
result[relay_peak_rss_kib]=$(peak_rss_kib "$relay_pid")
result[node_peak_rss_kib]=$(peak_rss_kib "$node_pid")

{
  for key in "${!result[@]}"; do printf '%s=%s\n' "$key" "${result[$key]}"; done
} | python3 bench/report.py "$CONNECTIONS"
rm -rf "$workdir"  # kept when a run fails: the server logs are in it
