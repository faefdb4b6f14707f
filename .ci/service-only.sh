#!/usr/bin/env bash
# The production binary holds only the service: the load generator (nen-relay-bench) and the Nen
# stand-in (fake-nen) are workspace members beside it, never linked into it.
#   bash .ci/service-only.sh [path/to/nen-relay]     (default: target/release/nen-relay)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/nen-relay}"
fail() { echo "service-only: $*" >&2; exit 1; }

# 1. The dependency graph, as the Dockerfile builds it (`-p nen-relay`, no dev-dependencies).
graph=$(cargo tree --locked -p nen-relay -e normal,build --target all --prefix none)
if grep -Eq '^(fake-nen|nen-relay-bench) ' <<<"$graph"; then
    fail "nen-relay depends on a tool crate"
fi
# What only the tools use must not come back as a direct dependency of the service. (hyper and
# tokio-util are the service's own now: its HTTP/1.1 server and its shutdown token; so is rand,
# for the jitter of forwarding's backoff, with only the features its other users enable.)
tools_only='^(futures) v'
direct=$(cargo tree --locked -p nen-relay -e normal --depth 1 --prefix none)
if grep -Eq "$tools_only" <<<"$direct"; then
    fail "nen-relay depends directly on a crate only the tools need: $(grep -E "$tools_only" <<<"$direct" | tr '\n' ' ')"
fi

# 2. The binary: no tool subcommand, and none of the tools' own messages.
[[ -x $bin ]] || fail "no binary at $bin"
help=$("$bin" --help)
if grep -Eq '^ +(bench|fake-nen) ' <<<"$help"; then
    fail "$bin --help lists a tool subcommand"
fi
for marker in 'fake Nen listening' 'LOSS CHECK FAILED'; do
    if grep -qaF "$marker" "$bin"; then
        fail "$bin contains tool code (\"$marker\")"
    fi
done
echo "service-only: $bin holds only the service"
