#!/usr/bin/env bash
# One side-by-side run, at 16 and 64 connections:
#   - nen-relay (release build, PostgreSQL, fresh database): committed callbacks/s, p50/p99, loss check
#   - the same on SQLite (the embedded default: a fresh file in the work directory)
#   - nen-relay's 401 path (bad signatures): its ceiling without the store
#   - the typical receiver (bench/reference-node: Fastify + pg pool of 8, a transaction per callback)
#   - pgbench: the same one-callback-per-transaction write, prepared statements (PostgreSQL's ceiling)
#   - nen-relay with one forwarding target (a local sink that answers 204 at once): committed
#     callbacks/s while it forwards, then how fast the outbox drains, and the lag from commit to
#     the sink (p50/p99)
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
SINK=target/release/nen-relay-sink
for tool in pgbench psql node curl python3; do
  command -v "$tool" >/dev/null || { echo "compare.sh needs $tool" >&2; exit 2; }
done
stale() { [[ ! -x $1 || -n $(find src migrations tools Cargo.toml Cargo.lock -newer "$1" -print -quit) ]]; }
if stale "$BIN" || stale "$BENCH" || stale "$SINK"; then
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
forward_db=$(fresh_database forward)
node_db=$(fresh_database node)
pgbench_db=$(fresh_database pgbench)
DATABASE_URL=$pgbench_db RUST_LOG=warn "$BIN" migrate

relay_port=$(free_port)
# As deployed: JSON logs at the default level (info).
DATABASE_URL=$relay_db NEN_RELAY_BIND=127.0.0.1:$relay_port NEN_RELAY_LOG_FORMAT=json \
  start_background "$workdir/relay.log" "$BIN" serve
relay_pid=$LAST_PID
wait_for "http://127.0.0.1:$relay_port/readyz"

# The same server on SQLite, the default when DATABASE_URL is unset.
sqlite_port=$(free_port)
DATABASE_URL="sqlite://$workdir/relay.db" NEN_RELAY_BIND=127.0.0.1:$sqlite_port NEN_RELAY_LOG_FORMAT=json \
  start_background "$workdir/sqlite.log" "$BIN" serve
sqlite_pid=$LAST_PID
wait_for "http://127.0.0.1:$sqlite_port/readyz"

# The same server with one forwarding target: a sink on this machine that answers 204 at once.
sink_port=$(free_port)
start_background "$workdir/sink.log" "$SINK" --port "$sink_port"
wait_for "http://127.0.0.1:$sink_port/stats"
forward_port=$(free_port)
forward_secret="whsec_$(head -c 32 /dev/urandom | base64 -w0)"
# A smaller pool, so that pgbench's 64 clients still fit in max_connections (100) beside it.
DATABASE_URL=$forward_db NEN_RELAY_BIND=127.0.0.1:$forward_port NEN_RELAY_LOG_FORMAT=json NEN_RELAY_STORE__MAX_CONNECTIONS=6 \
  NEN_RELAY_FORWARD__SINK__URL="http://127.0.0.1:$sink_port/hooks" \
  NEN_RELAY_FORWARD__SINK__SECRET="$forward_secret" \
  start_background "$workdir/forward.log" "$BIN" serve
forward_pid=$LAST_PID
wait_for "http://127.0.0.1:$forward_port/readyz"

# Messages still pending at the forwarding relay (GET /v1/forwarding).
forward_pending() {
  curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$forward_port/v1/forwarding" |
    python3 -c 'import json,sys; print(sum(t["pending"] for t in json.load(sys.stdin)["targets"]))'
}
sink_messages() { curl -fsS "http://127.0.0.1:$sink_port/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])'; }

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
  result[relay_verified_$c]=$(field "$j" verified_runs); result[relay_p999_$c]=$(field "$j" p999_ms)

  log "nen-relay on SQLite, committed callbacks, $c connections"
  j=$(bench_json --url "http://127.0.0.1:$sqlite_port" --connections "$c")
  result[sqlite_rate_$c]=$(field "$j" rate); result[sqlite_p50_$c]=$(field "$j" p50_ms)
  result[sqlite_p99_$c]=$(field "$j" p99_ms); result[sqlite_p999_$c]=$(field "$j" p999_ms)
  result[sqlite_non2xx_$c]=$(field "$j" non_2xx); result[sqlite_verified_$c]=$(field "$j" verified_runs)

  log "nen-relay with one forwarding target, committed callbacks, $c connections"
  before=$(sink_messages)
  started=$(date +%s.%N)
  j=$(bench_json --url "http://127.0.0.1:$forward_port" --connections "$c")
  result[forward_rate_$c]=$(field "$j" rate); result[forward_p99_$c]=$(field "$j" p99_ms)
  result[forward_non2xx_$c]=$(field "$j" non_2xx)
  # Then until the outbox is empty (at most 120 s): messages delivered over the whole span.
  for _ in $(seq 1 1200); do [[ $(forward_pending) == 0 ]] && break; sleep 0.1; done
  drained=$(date +%s.%N)
  result[forward_left_$c]=$(forward_pending)
  result[forward_delivered_per_s_$c]=$(python3 -c "print(($(sink_messages) - $before) / ($drained - $started))")

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
result[sqlite_peak_rss_kib]=$(peak_rss_kib "$sqlite_pid")
result[forward_peak_rss_kib]=$(peak_rss_kib "$forward_pid")
stats=$(curl -fsS "http://127.0.0.1:$sink_port/stats")
result[forward_lag_p50_ms]=$(field "$stats" lag_p50_ms); result[forward_lag_p99_ms]=$(field "$stats" lag_p99_ms)
result[node_peak_rss_kib]=$(peak_rss_kib "$node_pid")

{
  for key in "${!result[@]}"; do printf '%s=%s\n' "$key" "${result[$key]}"; done
} | python3 bench/report.py "$CONNECTIONS"
rm -rf "$workdir"  # kept when a run fails: the server logs are in it
