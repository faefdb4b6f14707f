#!/usr/bin/env bash
# Checks the live service against its own OpenAPI document (GET /openapi.json) with Schemathesis,
# on PostgreSQL and on SQLite: no 5xx that the document does not allow, and no answer (status,
# headers, content type, body) that breaks the document.
#
#   bash .ci/schemathesis.sh target/release/nen-relay
#
# Nen is a closed local port: a valid POST /v1/runs then gets its documented 502
# `nen_unavailable`, and nothing is ever sent to the callback URLs Schemathesis makes up. That one
# operation runs without the not_a_server_error check (its 502 is the answer expected here); every
# conformance check still applies to it. Callbacks are signed by .ci/schemathesis_hooks.py, so
# that POST /webhooks/nen is tested past its signature check. Bounded: --max-examples and
# --max-time per run.
set -euo pipefail
bin="$(realpath "$1")"
hooks="$(realpath "$(dirname "$0")")"

# 4.x: the CLI below (run <schema-url>, -H, --checks, --max-time) is that major version's.
python3 -m pip install --quiet --disable-pip-version-check 'schemathesis>=4,<5'
schemathesis --version

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
token="ci-token-$RANDOM$RANDOM-long"
secret="ci-secret-$RANDOM$RANDOM-long"
work="$(mktemp -d)"
server=""
database=""
cleanup() {
  if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  if [ -n "$database" ]; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists \"$database\" with (force)" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# A few signed callbacks, so that the read endpoints answer with runs and events, not only 404s.
seed() {
  python3 - "$1" "$secret" <<'EOF'
import hashlib, hmac, json, sys, urllib.request
base, secret = sys.argv[1], sys.argv[2]
for n in range(3):
    for status, extra in (("processing", {}), ("success", {"result": {"n": n, "list": [1, "two", None]}})):
        body = json.dumps({"message_id": f"seed-{n}", "workflow_id": "0b5c4f7e-8f7e-4f0e-9d3c-1a2b3c4d5e6f",
                           "status": status, **extra}).encode()
        signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        request = urllib.request.Request(f"{base}/webhooks/nen", data=body, method="POST",
                                         headers={"X-Hmac-Signature": signature, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 200, answer.status
EOF
}

check_store() {
  local store="$1" database_url="$2"
  local port nen_port base
  port=$(free_port)
  nen_port=$(free_port) # nothing listens there
  base="http://127.0.0.1:${port}"
  NEN_RELAY_ENV=local NEN_RELAY_BIND="127.0.0.1:${port}" DATABASE_URL="$database_url" \
    NEN_WEBHOOK_SECRETS="$secret" NEN_RELAY_API_TOKENS="$token" \
    NEN_API_BASE_URL="http://127.0.0.1:${nen_port}" NEN_API_KEY="ci-nen-key-$RANDOM$RANDOM" NEN_RELAY_PUBLIC_URL="$base" \
    NO_COLOR=1 RUST_LOG=warn "$bin" serve >"$work/$store.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do
    curl -fsS "$base/readyz" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$work/$store.log"; exit 1; }
    sleep 0.1
  done
  curl -fsS "$base/readyz" >/dev/null
  seed "$base"

  # One worker: Hypothesis's schema walking in several threads trips a CPython 3.11 ast.parse
  # bug ("AST constructor recursion depth mismatch"), reported as a run error.
  local common=(
    "$base/openapi.json" -H "Authorization: Bearer $token"
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance
    --max-examples 60 --seed 1 --workers 1 --request-timeout 10 --suppress-health-check all
  )
  # Run from the temporary folder: Schemathesis keeps its cache in the current one.
  cd "$work"
  echo "== schemathesis ($store): every operation but POST /v1/runs (callbacks signed)"
  NEN_RELAY_CI_WEBHOOK_SECRET="$secret" PYTHONPATH="$hooks" SCHEMATHESIS_HOOKS=schemathesis_hooks \
    schemathesis run "${common[@]}" --max-time 60 --exclude-operation-id-regex '^start_run$'
  echo "== schemathesis ($store): POST /v1/runs (Nen unreachable: 502 is expected)"
  schemathesis run "${common[@]}" --max-time 30 --include-operation-id start_run \
    --exclude-checks not_a_server_error
  # Beyond the answers, the log: any error but the expected nen_unavailable is a finding.
  if grep ERROR "$work/$store.log" | grep -v nen_unavailable | grep -q .; then
    echo "the service logged errors during the run ($store):"
    grep ERROR "$work/$store.log" | grep -v nen_unavailable | head -20
    exit 1
  fi
  kill "$server"; wait "$server" 2>/dev/null || true; server=""
  cd - >/dev/null
}

database="nen_relay_schemathesis_$RANDOM$RANDOM"
psql -h 127.0.0.1 -U postgres -d postgres -qc "create database \"$database\""
check_store postgres "postgres://postgres@127.0.0.1:5432/${database}"
check_store sqlite "sqlite://${work}/relay.db"
echo "schemathesis: no server error, every answer matches docs/openapi.json"
