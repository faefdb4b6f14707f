#!/usr/bin/env bash
# A short libFuzzer campaign over each target in fuzz/, on the stable toolchain.
#   bash faults/fuzz.sh [seconds per target, default 30]
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address); RUSTC_BOOTSTRAP=1 lets the stable
# compiler accept them. A crash or failed assertion fails the run; the input that caused it is
# kept in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in signature_header callback_payload; do
    mkdir -p "fuzz/corpus/$target"
    log="fuzz/target/fuzz-$target.log"
    mkdir -p fuzz/target
    echo "== fuzz $target for ${seconds}s"
    if ! (cd fuzz && cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
            -max_total_time="$seconds" -max_len=65536 -print_final_stats=1) >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz $target: FAILED (log: $log)"
        exit 1
    fi
    grep -E "^(Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb|stat::new_units_added)" "$log" || true
done
