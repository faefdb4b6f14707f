#!/usr/bin/env bash
# Short forms of every fault check, for CI: bash faults/ci.sh
# Builds what it needs, runs each check even when an earlier one failed, and exits non-zero if
# any failed. The database outage runs last: it stops the shared PostgreSQL for a few seconds.
set -uo pipefail
cd "$(dirname "$0")/.."

passed=0
failed=0
check() {
    local name="$1"
    shift
    echo "== faults: $name"
    if "$@"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "== faults: $name FAILED"
    fi
}

cargo build --release --locked || { echo "faults: 0 passed, 1 failed"; exit 1; }

check crash python3 faults/crash.py --kills 3 --time-limit 180
check crash_sqlite python3 faults/crash.py --db sqlite --kills 3 --time-limit 180
check slow_db python3 faults/slow_db.py --lock-seconds 4 --senders 100
# Attacks from anonymous clients, while signed callbacks must keep being served (faults/attack.py).
check method_flood python3 faults/method_flood.py --seconds 15
check unsigned_body_flood python3 faults/unsigned_body_flood.py --seconds 15
check wrong_signature_flood python3 faults/wrong_signature_flood.py --seconds 15
check odd_request_ids python3 faults/odd_request_ids.py --seconds 15
# Short clocks so that the held sockets are closed and reopened several times in 12 s.
check idle_sockets python3 faults/idle_sockets.py --sockets 1000 --seconds 12 --header-read-timeout 3s
check connection_flood python3 faults/connection_flood.py --sockets 1000 --seconds 8
# The hostile-input corpus is part of `cargo test` (tests/integration/hostile.rs).
# The first fuzz build compiles every dependency with sanitizers: FAULTS_SKIP_FUZZ=1 skips it.
if [ "${FAULTS_SKIP_FUZZ:-0}" != 1 ]; then
    check fuzz bash faults/fuzz.sh "${FAULTS_FUZZ_SECONDS:-30}"
fi
check supply_chain bash -c 'command -v cargo-deny >/dev/null || cargo install cargo-deny --locked; cargo deny --offline --log-level error check bans licenses sources'
# Two replicas behind HAProxy, each restarted twice under load (faults/rolling_restart.py).
check rolling_restart bash -c 'command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { apt-get update -qq && apt-get install -y -qq haproxy; }; python3 faults/rolling_restart.py --seconds 25 --rounds 2'
# Forwarding: every change delivered in order per run, signed (checked with the PyPI
# standardwebhooks package), through SIGKILLs, a target outage, 500s, and two replicas.
python3 -c 'import standardwebhooks' 2>/dev/null || pip install -q standardwebhooks
check forward_kills python3 faults/forwarding.py --runs 300 --kills 3 --time-limit 120
check forward_outage python3 faults/forwarding.py --runs 200 --outage 5 --fail-first 2 --time-limit 120
check forward_replicas python3 faults/forwarding.py --runs 300 --replicas 2 --kills 2 --time-limit 120
check db_outage python3 faults/db_outage.py --outage-seconds 3

echo "faults: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
