#!/usr/bin/env bash
# A short load run (about 15 s) against nen-relay on a fresh PostgreSQL database, followed by the
# loss check: exits non-zero if any callback answered 200 is missing or stored twice.
#
#   bench/ci-smoke.sh [path/to/nen-relay]     (default: target/release/nen-relay, else target/debug)
# The load generator is nen-relay-bench from the same directory (cargo build --workspace builds
# both), or BENCH_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
trap cleanup EXIT

BIN=${1:-}
if [[ -z $BIN ]]; then
  BIN=target/release/nen-relay
  [[ -x $BIN ]] || BIN=target/debug/nen-relay
fi
[[ -x $BIN ]] || { echo "no nen-relay binary at $BIN; run cargo build first" >&2; exit 2; }
BENCH=${BENCH_BIN:-$(dirname "$BIN")/nen-relay-bench}
[[ -x $BENCH ]] || { echo "no nen-relay-bench at $BENCH; run cargo build --workspace first" >&2; exit 2; }

port=$(free_port)
secret="whsec-smoke-$RANDOM$RANDOM"
token="token-smoke-$RANDOM$RANDOM"
workdir=$(mktemp -d)
export DATABASE_URL NEN_WEBHOOK_SECRETS=$secret NEN_RELAY_API_TOKENS=$token
DATABASE_URL=$(fresh_database smoke)
log "nen-relay ($BIN) on 127.0.0.1:$port"
NEN_RELAY_BIND=127.0.0.1:$port RUST_LOG=warn start_background "$workdir/server.log" "$BIN" serve
server=$LAST_PID
wait_for "http://127.0.0.1:$port/readyz" || { cat "$workdir/server.log" >&2; exit 1; }

status=0
"$BENCH" --url "http://127.0.0.1:$port" --connections 16 --duration 8 --requests 40000 || status=$?
if ! kill -0 "$server" 2>/dev/null; then
  echo "nen-relay died during the smoke run:" >&2
  cat "$workdir/server.log" >&2
  status=1
fi
rm -rf "$workdir"
if [[ $status -ne 0 ]]; then echo "ci-smoke: FAILED" >&2; else echo "ci-smoke: OK"; fi
exit $status
