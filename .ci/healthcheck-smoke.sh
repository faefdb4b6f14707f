#!/usr/bin/env bash
# The container's health check is `nen-relay healthcheck`: prove it fails with no server, and
# passes against a production-mode server started the way the image starts it.
set -euo pipefail
bin="$(realpath "$1")"
work="$(mktemp -d)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export NEN_RELAY_ENV=production NEN_RELAY_BIND="127.0.0.1:${port}"
export NEN_WEBHOOK_SECRETS="ci-secret-$RANDOM$RANDOM-long" NEN_RELAY_API_TOKENS="ci-token-$RANDOM$RANDOM-long"
export DATABASE_URL="sqlite://${work}/relay.db"

if "$bin" healthcheck --timeout 1 2>/dev/null; then
  echo "healthcheck passed with no server running"; exit 1
fi
(cd "$work" && exec "$bin" serve >"$work/log" 2>&1) &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  "$bin" healthcheck --timeout 1 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/log"; exit 1; }
  sleep 0.1
done
"$bin" healthcheck --timeout 2
echo "healthcheck: ok"
# A production start without its secrets must refuse, naming the variable.
if out=$(env -u NEN_WEBHOOK_SECRETS "$bin" serve 2>&1); then
  echo "production started without NEN_WEBHOOK_SECRETS"; exit 1
fi
grep -q NEN_WEBHOOK_SECRETS <<<"$out"
echo "production refuses to start without secrets: ok"
