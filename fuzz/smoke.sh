#!/usr/bin/env bash
# Fuzz smoke run: every cargo-fuzz target in fuzz/ for FUZZ_SECONDS (default 20) each,
# starting from the committed seed corpus (fuzz/corpus/<target>/, read only: new
# inputs go to a temporary directory, so the committed corpus stays small).
#
# Needs the nightly toolchain; without it this prints why and exits 0. Installs
# cargo-fuzz (`cargo install cargo-fuzz --locked`, ~1 min on 2 cores) when missing.
# A crash, a failed property or a build error exits non-zero; the crashing input is
# left in fuzz/artifacts/<target>/.
#
# Usage: bash fuzz/smoke.sh [target ...]        FUZZ_SECONDS=60 bash fuzz/smoke.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
seconds="${FUZZ_SECONDS:-20}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz smoke: skipped (no nightly toolchain: rustup toolchain install nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz smoke: installing cargo-fuzz"
    start=$SECONDS
    if ! cargo install cargo-fuzz --locked; then
        echo "fuzz smoke: skipped (cargo install cargo-fuzz failed; offline?)"
        exit 0
    fi
    echo "fuzz smoke: cargo-fuzz installed in $((SECONDS - start)) s"
fi

targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

# One optimised build of every target, no sanitizer: these targets are safe Rust, and
# AddressSanitizer would double the build time for memory errors safe code cannot make.
# (Debug assertions stay on, so overflows panic.)
flags=(-O --sanitizer none --debug-assertions)
start=$SECONDS
if (($# == 0)); then
    cargo +nightly fuzz build "${flags[@]}"
else
    for t in "${targets[@]}"; do cargo +nightly fuzz build "${flags[@]}" "$t"; done
fi
echo "fuzz smoke: built ${#targets[@]} targets in $((SECONDS - start)) s"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "corpus/$t"
    echo "fuzz smoke: $t for ${seconds} s"
    if ! cargo +nightly fuzz run "${flags[@]}" "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        2>"$work/$t.log"; then
        tail -40 "$work/$t.log"
        failed+=("$t")
    else
        grep -E '^(Done|stat::number_of_executed_units)' "$work/$t.log" || true
    fi
done
if ((${#failed[@]})); then
    echo "fuzz smoke FAILED: ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
echo "fuzz smoke passed: ${#targets[@]} targets, ${seconds} s each"
