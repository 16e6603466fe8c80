#!/usr/bin/env bash
# Builds and runs the C ABI's C, C++ and Go programs against the mock server.
#
#   examples/run-ffi-tests.sh
#
# Environment:
#   KEYPOOL_MOCK_BIN  mock server to launch (default: target/debug/keypool-mock, built
#                     with `cargo build -p keypool-mock`). It must print its base URL
#                     (http://127.0.0.1:PORT/v1) as its first stdout line and run until
#                     its stdin hits EOF.
#   SKIP_GO=1         skip the Go package.
#
# Exits non-zero if any check fails; the last line is "N passed, M failed".
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/target/ffi-tests"
mkdir -p "$OUT"
LIB="$ROOT/target/debug/libkeypool.a"
CFLAGS=(-Wall -Wextra -Werror -g -I"$ROOT/include")
LDLIBS=(-lpthread -ldl -lm)
VALGRIND=(valgrind -q --leak-check=full --show-leak-kinds=definite,indirect
          --errors-for-leak-kinds=definite,indirect --error-exitcode=1)
export KEYPOOL_MOCK_BIN="${KEYPOOL_MOCK_BIN:-$ROOT/target/debug/keypool-mock}"

passed=0
failed=0
failures=()

# check NAME COMMAND...: runs COMMAND, counts it as passed or failed.
check() {
    local name="$1"
    shift
    echo "=== $name"
    if "$@"; then
        echo "--- ok: $name"
        passed=$((passed + 1))
    else
        echo "--- FAILED: $name"
        failed=$((failed + 1))
        failures+=("$name")
    fi
}

summary() {
    for f in "${failures[@]+"${failures[@]}"}"; do echo "failed: $f"; done
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

MOCK_PID=""
stop_mock() {
    if [ -n "$MOCK_PID" ]; then
        local fd="${MOCK[1]:-}"
        [ -n "$fd" ] && eval "exec $fd>&-"   # EOF on the mock's stdin: it exits
        wait "$MOCK_PID" 2>/dev/null
        MOCK_PID=""
    fi
}
trap stop_mock EXIT

# --- Rust library and the generated header -------------------------------------------
check "cargo build --locked" cargo build --locked
check "header up to date (cargo run -p xtask -- header --check)" \
    cargo run --locked -q -p xtask -- header --check
if [ "$KEYPOOL_MOCK_BIN" = "$ROOT/target/debug/keypool-mock" ]; then
    check "cargo build -p keypool-mock" cargo build --locked -p keypool-mock
fi
if [ ! -f "$LIB" ]; then
    echo "no $LIB; cannot continue"
    summary
    exit 1
fi

# --- C and C++ builds ------------------------------------------------------------------
check "gcc batch.c (static)" \
    gcc -std=c11 "${CFLAGS[@]}" examples/c/batch.c "$LIB" "${LDLIBS[@]}" -o "$OUT/batch"
check "gcc bad_input.c (static)" \
    gcc -std=c11 "${CFLAGS[@]}" examples/c/bad_input.c "$LIB" "${LDLIBS[@]}" -o "$OUT/bad_input"
check "gcc callbacks.c (static)" \
    gcc -std=c11 "${CFLAGS[@]}" examples/c/callbacks.c "$LIB" "${LDLIBS[@]}" -o "$OUT/callbacks"
# The stress test runs under AddressSanitizer + UBSan (which cannot be combined with
# valgrind). They instrument the C side and the interface; the Rust library is not.
check "gcc stress.c (static, -fsanitize=address,undefined)" \
    gcc -std=c11 "${CFLAGS[@]}" -O1 -fsanitize=address,undefined -fno-sanitize-recover=undefined \
        -fno-omit-frame-pointer examples/c/stress.c "$LIB" "${LDLIBS[@]}" -o "$OUT/stress"
check "gcc batch.c (shared libkeypool.so)" \
    gcc -std=c11 "${CFLAGS[@]}" examples/c/batch.c -L"$ROOT/target/debug" -lkeypool \
        -Wl,-rpath,"$ROOT/target/debug" -o "$OUT/batch_shared"
printf '#include "keypool.h"\nint main() { return keypool_version() ? 0 : 1; }\n' >"$OUT/header_cpp.cpp"
check "g++ keypool.h compiles as C++ (-std=c++17 -pedantic)" \
    g++ -std=c++17 "${CFLAGS[@]}" -pedantic "$OUT/header_cpp.cpp" "$LIB" "${LDLIBS[@]}" -o "$OUT/header_cpp"
check "gcc keypool.h compiles as C99 (-pedantic)" \
    gcc -std=c99 "${CFLAGS[@]}" -pedantic -fsyntax-only -x c "$ROOT/include/keypool.h"
check "g++ main.cpp (C++17 wrapper)" \
    g++ -std=c++17 "${CFLAGS[@]}" -I"$ROOT/examples/cpp" examples/cpp/main.cpp "$LIB" \
        "${LDLIBS[@]}" -o "$OUT/cpp_main"

# --- The mock server -------------------------------------------------------------------
URL=""
if [ -x "$KEYPOOL_MOCK_BIN" ]; then
    coproc MOCK { exec "$KEYPOOL_MOCK_BIN"; }
    IFS= read -r -t 30 URL <&"${MOCK[0]}" || URL=""
fi
check "mock server started ($KEYPOOL_MOCK_BIN)" bash -c "[[ '$URL' == http://127.0.0.1:*/v1 ]]"
echo "mock: ${URL:-none}"

if [ -n "$URL" ]; then
    check "batch (valgrind)" "${VALGRIND[@]}" "$OUT/batch" "$URL"
    check "bad_input (valgrind)" "${VALGRIND[@]}" "$OUT/bad_input" "$URL"
    check "callbacks (valgrind)" "${VALGRIND[@]}" "$OUT/callbacks" "$URL"
    [ -x "$OUT/stress" ] && check "stress (ASan + UBSan, 8 threads, shutdown under load)" \
        env ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=86 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        timeout 120 "$OUT/stress" "$URL" 4
    [ -x "$OUT/batch_shared" ] && check "batch (shared library)" "$OUT/batch_shared" "$URL"
    [ -x "$OUT/cpp_main" ] && check "cpp_main" "$OUT/cpp_main" "$URL"
fi

# --- Go --------------------------------------------------------------------------------
if [ "${SKIP_GO:-0}" != 1 ]; then
    if ! command -v go >/dev/null 2>&1; then
        echo "go not found; installing golang-go with apt"
        check "apt-get install golang-go" \
            bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go'
    fi
    if command -v go >/dev/null 2>&1; then
        export GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod CGO_ENABLED=1
        go version
        check "gofmt" bash -c 'cd examples/go && test -z "$(gofmt -l .)"'
        check "go vet" bash -c 'cd examples/go && go vet ./...'
        check "go test" bash -c 'cd examples/go && go test -count=1 -v ./...'
        check "go test -race" bash -c 'cd examples/go && go test -race -count=1 ./...'
    fi
fi

stop_mock
summary
