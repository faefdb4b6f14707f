#!/usr/bin/env bash
# What one forwarding target costs, and who pays it: nen-relay on PostgreSQL without a target,
# with one target (a local sink answering 204 at once), and with one whose port refuses
# connections (so the write path pays, the deliveries mostly wait in backoff). Each at 64
# connections for BENCH_SECONDS (10), side by side, with the CPU seconds each process group
# spent meanwhile: nen-relay, the sink, PostgreSQL (every backend, the pool's and the
# exited ones), and the load generator (its signing of the requests, before the load, too);
# and how busy the machine's cores were over the load generator's life (all of them, every
# process). The load runs without its loss check (compare.sh and the fault scripts check loss),
# so that the loss check's reads are not counted as the load's. Also each mode's ingest batches
# over the measurement (from /metrics): their mean size and mean time from the start of the
# write to its commit. At 64 connections and one writer, batches alternate between two halves
# of the connections, so the rate is about the mean size over the mean time.
#
#   bench/forward-cost.sh            MODES="none sink" bench/forward-cost.sh
# Environment: BENCH_SECONDS, MODES, PG_ADMIN_URL, NEN_RELAY_* tuning variables (applied to
# every server, e.g. NEN_RELAY_FORWARD__CONCURRENCY).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
trap cleanup EXIT

SECONDS_EACH=${BENCH_SECONDS:-10}
BIN=target/release/nen-relay
BENCH=target/release/nen-relay-bench
SINK=target/release/nen-relay-sink
for tool in "$BIN" "$BENCH" "$SINK"; do
  [[ -x $tool ]] || { echo "build first: cargo build --release --locked --workspace" >&2; exit 2; }
done
workdir=$(mktemp -d)
export NEN_WEBHOOK_SECRETS="whsec-bench-$RANDOM$RANDOM" NEN_RELAY_API_TOKENS="token-bench-$RANDOM$RANDOM"
forward_secret="whsec_$(head -c 32 /dev/urandom | base64 -w0)"

sink_port=$(free_port)
start_background "$workdir/sink.log" "$SINK" --port "$sink_port"
sink_pid=$LAST_PID
wait_for "http://127.0.0.1:$sink_port/stats"

declare -A port pid
# start NAME [VAR=value...]: a server on a fresh database, as compare.sh starts its forwarding one.
start() {
  local name=$1; shift
  port[$name]=$(free_port)
  DATABASE_URL=$(fresh_database "$name") NEN_RELAY_BIND=127.0.0.1:${port[$name]} \
    NEN_RELAY_LOG_FORMAT=json NEN_RELAY_STORE__MAX_CONNECTIONS=6 \
    start_background "$workdir/$name.log" env "$@" "$BIN" serve
  pid[$name]=$LAST_PID
  wait_for "http://127.0.0.1:${port[$name]}/readyz"
}
start none
start sink NEN_RELAY_FORWARD__SINK__URL="http://127.0.0.1:$sink_port/hooks" \
  NEN_RELAY_FORWARD__SINK__SECRET="$forward_secret"
start refuse NEN_RELAY_FORWARD__SINK__URL="http://127.0.0.1:$(free_port)/hooks" \
  NEN_RELAY_FORWARD__SINK__SECRET="$forward_secret"

# CPU seconds so far: of process $1, of the sink, of PostgreSQL (live processes, and the
# exited backends the postmaster reaped), and of the whole machine.
cpu() {
  python3 - "$1" "$sink_pid" <<'PY'
import os, sys
tick = os.sysconf("SC_CLK_TCK")
def seconds(pid, children=False):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12])
    if children:
        used += int(fields[13]) + int(fields[14])
    return used / tick
postgres = 0.0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if open(f"/proc/{pid}/comm").read().strip() == "postgres":
            postgres += seconds(pid, children=True)
    except OSError:
        pass
# Every core's time outside idle and I/O wait, whoever spent it.
total = [int(field) for field in open("/proc/stat").readline().split()[1:]]
busy = (sum(total) - total[3] - total[4]) / tick
print(seconds(sys.argv[1]), seconds(sys.argv[2]), postgres, busy)
PY
}

# Sum and count of the ingest batches' sizes and times so far, from the server's /metrics.
batches() {
  curl -fsS "http://127.0.0.1:$1/metrics" | python3 -c '
import sys
values = {}
for line in sys.stdin:
    if line.startswith("nen_relay_ingest_") and ("_sum" in line or "_count" in line):
        name, value = line.split()[0].split("{")[0], float(line.split()[-1])
        values[name] = value
print(*(values.get(f"nen_relay_ingest_{name}", 0) for name in
        ("batch_size_sum", "batch_size_count", "commit_duration_seconds_sum")))'
}

printf '%-7s %10s %8s %10s %10s %10s %10s %10s %10s %6s %7s %9s\n' mode "callbacks/s" "p99 ms" \
  forwarded "relay µs" "pg µs" "sink µs" "bench µs" "all µs" busy batch "batch ms"
for mode in ${MODES:-none sink refuse}; do
  read -r relay0 sink0 pg0 busy0 < <(cpu "${pid[$mode]}")
  read -r size0 count0 time0 < <(batches "${port[$mode]}")
  delivered0=$(curl -fsS "http://127.0.0.1:$sink_port/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
  line=$(python3 - "$BENCH" --json --duration "$SECONDS_EACH" --url "http://127.0.0.1:${port[$mode]}" \
    --connections 64 --no-verify 2>"$workdir/bench.err" <<'PY'
import resource, subprocess, sys, time
started = time.monotonic()
out = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True, check=True).stdout
used = resource.getrusage(resource.RUSAGE_CHILDREN)
print(out.strip().splitlines()[-1] + "\t" + str(used.ru_utime + used.ru_stime) + "\t"
      + str(time.monotonic() - started))
PY
  ) || { cat "$workdir/bench.err" >&2; exit 1; }
  read -r relay1 sink1 pg1 busy1 < <(cpu "${pid[$mode]}")
  read -r size1 count1 time1 < <(batches "${port[$mode]}")
  delivered1=$(curl -fsS "http://127.0.0.1:$sink_port/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["messages"])')
  python3 - "$mode" "$line" "$relay0" "$relay1" "$pg0" "$pg1" "$sink0" "$sink1" \
    "$((delivered1 - delivered0))" "$size0" "$size1" "$count0" "$count1" "$time0" "$time1" \
    "$busy0" "$busy1" "$(nproc)" <<'PY'
import json, sys
mode, line = sys.argv[1], sys.argv[2]
result, bench_cpu, wall = line.split("\t")
result = json.loads(result)
relay, pg, sink = (float(sys.argv[i + 1]) - float(sys.argv[i]) for i in (3, 5, 7))
per = lambda seconds: f"{seconds / result['ok'] * 1e6:.0f}"
size, count, seconds = (float(sys.argv[i + 1]) - float(sys.argv[i]) for i in (10, 12, 14))
mean_size = f"{size / count:.1f}" if count else "-"
mean_ms = f"{seconds / count * 1e3:.2f}" if count else "-"
machine = float(sys.argv[17]) - float(sys.argv[16])
busy = f"{machine / float(wall) / int(sys.argv[18]) * 100:.0f}%"
print(f"{mode:<7} {result['rate']:>10.0f} {result['p99_ms']:>8.1f} {sys.argv[9]:>10} "
      f"{per(relay):>10} {per(pg):>10} {per(sink):>10} {per(float(bench_cpu)):>10} "
      f"{per(machine):>10} {busy:>6} {mean_size:>7} {mean_ms:>9}")
PY
done
echo "(µs: CPU per committed callback; all: every process's; busy: of all cores, over the load generator's life;"
echo " forwarded: messages the sink got meanwhile)"
rm -rf "$workdir"
