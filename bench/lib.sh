# Shared helpers for the bench scripts: fresh databases, servers on loopback ports, cleanup.
# Sourced, not run. Every process started and database created here is removed by `cleanup`.

PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
BENCH_PIDS=()
# Databases to drop, one name a line. A file, not an array: callers run `$(fresh_database ...)`,
# a subshell whose variables never reach the shell that cleans up.
BENCH_DATABASES=$(mktemp)

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# The URL of PG_ADMIN_URL's server with another database name.
database_url() {
  local name=$1
  printf '%s/%s' "${PG_ADMIN_URL%/*}" "$name"
}

# Creates an empty database and remembers it for cleanup; prints its URL.
fresh_database() {
  local name="nen_bench_$1_$$_${RANDOM}"
  psql -X -q "$PG_ADMIN_URL" -c "create database \"$name\"" >/dev/null
  printf '%s\n' "$name" >>"$BENCH_DATABASES"
  database_url "$name"
}

# A TCP port nobody listens on right now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until URL answers 200 (at most 30 s).
wait_for() {
  local url=$1
  for _ in $(seq 1 300); do
    if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "no answer from $url"
  return 1
}

# Starts a command in the background, logging to FILE; prints nothing, sets LAST_PID.
start_background() {
  local logfile=$1; shift
  "$@" >"$logfile" 2>&1 &
  LAST_PID=$!
  BENCH_PIDS+=("$LAST_PID")
}

stop_process() {
  local pid=$1
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || return 0
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

cleanup() {
  local pid name
  for pid in "${BENCH_PIDS[@]}"; do stop_process "$pid"; done
  while read -r name; do
    psql -X -q "$PG_ADMIN_URL" -c "drop database if exists \"$name\" with (force)" >/dev/null 2>&1 \
      || log "could not drop database $name"
  done <"$BENCH_DATABASES"
  rm -f "$BENCH_DATABASES"
}

# Peak resident memory of a live process, in KiB.
peak_rss_kib() {
  awk '/^VmHWM:/ {print $2}' "/proc/$1/status"
}
