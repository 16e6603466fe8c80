#!/usr/bin/env bash
# Builds and runs the C ABI's C, C++ and Go programs against the mock server: first
# against the debug build in the target directory (valgrind, ASan), then as a user
# would, against a throwaway install (scripts/install.sh, debug profile) found through
# pkg-config: C shared and static, C++, the Go module and a Go user's own module.
#
#   examples/run-ffi-tests.sh
#
# The target directory comes from `cargo metadata` (CARGO_TARGET_DIR is honoured).
# Environment:
#   KEYPOOL_MOCK_BIN  mock server to launch (default: <target>/debug/keypool-mock, built
#                     with `cargo build -p keypool-mock`). It must print its base URL
#                     (http://127.0.0.1:PORT/v1) as its first stdout line and run until
#                     its stdin hits EOF.
#   SKIP_GO=1         skip the Go package.
#
# Exits non-zero if any check fails; the last line is "N passed, M failed".
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="$(cargo metadata --format-version 1 --no-deps --offline 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
TARGET="${TARGET:-${CARGO_TARGET_DIR:-$ROOT/target}}"
OUT="$TARGET/ffi-tests"
mkdir -p "$OUT"
DEBUG="$TARGET/debug"
LIB="$DEBUG/libkeypool.a"
CFLAGS=(-Wall -Wextra -Werror -g -I"$ROOT/include")
LDLIBS=(-lpthread -ldl -lm)
# Plain --leak-check=full (every leak kind is an error) with the suppression file the
# install ships (capi/keypool.supp: std's per-thread handle of the main thread).
VALGRIND=(valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect,possible
          --suppressions="$ROOT/capi/keypool.supp" --error-exitcode=1)
export KEYPOOL_MOCK_BIN="${KEYPOOL_MOCK_BIN:-$DEBUG/keypool-mock}"

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
if [ "$KEYPOOL_MOCK_BIN" = "$DEBUG/keypool-mock" ]; then
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
    gcc -std=c11 "${CFLAGS[@]}" -I"$ROOT/capi" examples/c/bad_input.c "$LIB" "${LDLIBS[@]}" -o "$OUT/bad_input"
check "gcc cancel.c (static)" \
    gcc -std=c11 "${CFLAGS[@]}" examples/c/cancel.c "$LIB" "${LDLIBS[@]}" -o "$OUT/cancel"
check "gcc callbacks.c (static)" \
    gcc -std=c11 "${CFLAGS[@]}" examples/c/callbacks.c "$LIB" "${LDLIBS[@]}" -o "$OUT/callbacks"
# benches/cpu.rs builds this one itself (-O2, release library); here it is only kept
# compiling and working.
check "gcc bench_batch.c (static)" \
    gcc -std=c11 "${CFLAGS[@]}" examples/c/bench_batch.c "$LIB" "${LDLIBS[@]}" -o "$OUT/bench_batch"
# The stress test runs under AddressSanitizer + UBSan (which cannot be combined with
# valgrind). They instrument the C side and the interface; the Rust library is not.
check "gcc stress.c (static, -fsanitize=address,undefined)" \
    gcc -std=c11 "${CFLAGS[@]}" -O1 -fsanitize=address,undefined -fno-sanitize-recover=undefined \
        -fno-omit-frame-pointer examples/c/stress.c "$LIB" "${LDLIBS[@]}" -o "$OUT/stress"
# The program records the SONAME (libkeypool.so.0); the target dir has only
# libkeypool.so, so the run-time path gets a libkeypool.so.0 link to it.
mkdir -p "$OUT/debug-lib"
ln -sf "$DEBUG/libkeypool.so" "$OUT/debug-lib/libkeypool.so.0"
check "gcc batch.c (shared libkeypool.so)" \
    gcc -std=c11 "${CFLAGS[@]}" examples/c/batch.c -L"$DEBUG" -lkeypool \
        -Wl,-rpath,"$OUT/debug-lib" -o "$OUT/batch_shared"
printf '#include "keypool.h"\nint main() { return keypool_version() ? 0 : 1; }\n' >"$OUT/header_cpp.cpp"
check "g++ keypool.h compiles as C++ (-std=c++17 -pedantic)" \
    g++ -std=c++17 "${CFLAGS[@]}" -pedantic "$OUT/header_cpp.cpp" "$LIB" "${LDLIBS[@]}" -o "$OUT/header_cpp"
check "gcc keypool.h compiles as C99 (-pedantic)" \
    gcc -std=c99 "${CFLAGS[@]}" -pedantic -fsyntax-only -x c "$ROOT/include/keypool.h"

# --- Install into a throwaway prefix (README: "Install the C library") ----------------
PREFIX="$OUT/prefix"
rm -rf "$PREFIX"
# The debug build already made above (the steps are the user's; the release profile
# only changes optimisation and debug info): no second, release, build here.
check "scripts/install.sh $PREFIX" env KEYPOOL_PROFILE=debug scripts/install.sh --no-build "$PREFIX"
export PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig"
check "installed files, SONAME libkeypool.so.0" bash -c "
    for f in lib/libkeypool.a lib/libkeypool.so lib/libkeypool.so.0 lib/pkgconfig/keypool.pc \
             include/keypool.h include/keypool.hpp share/keypool/keypool.supp; do
        test -e '$PREFIX/'\$f || { echo missing \$f; exit 1; }
    done
    readelf -d '$PREFIX/lib/libkeypool.so' | grep -q 'SONAME.*\\[libkeypool.so.0\\]'"
# The README's commands, verbatim apart from paths.
check "cc batch.c \$(pkg-config --cflags --libs keypool)" bash -c \
    'cc examples/c/batch.c $(pkg-config --cflags --libs keypool) -o "$0/batch_pc"' "$OUT"
check "cc -static batch.c \$(pkg-config --static --cflags --libs keypool)" bash -c \
    'cc examples/c/batch.c $(pkg-config --static --cflags --libs keypool) -static -o "$0/batch_pc_static" 2>"$0/static.log" || { cat "$0/static.log"; exit 1; }' "$OUT"
check "c++ main.cpp \$(pkg-config --cflags --libs keypool) (installed keypool.hpp)" bash -c \
    'c++ -std=c++17 examples/cpp/main.cpp $(pkg-config --cflags --libs keypool) -o "$0/cpp_main"' "$OUT"

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
    check "cancel (valgrind)" "${VALGRIND[@]}" "$OUT/cancel" "$URL"
    [ -x "$OUT/bench_batch" ] && check "bench_batch 200 requests (valgrind)" \
        "${VALGRIND[@]}" "$OUT/bench_batch" "$URL" 200
    # Installed library, as a user runs it (shared: LD_LIBRARY_PATH; suppressions from
    # the prefix).
    [ -x "$OUT/batch_pc" ] && check "batch (installed libkeypool.so, valgrind + installed keypool.supp)" \
        env LD_LIBRARY_PATH="$PREFIX/lib" valgrind -q --leak-check=full --error-exitcode=1 \
        --errors-for-leak-kinds=definite,indirect,possible \
        --suppressions="$PREFIX/share/keypool/keypool.supp" "$OUT/batch_pc" "$URL"
    [ -x "$OUT/batch_pc_static" ] && check "batch (static, pkg-config --static)" "$OUT/batch_pc_static" "$URL"
    [ -x "$OUT/stress" ] && check "stress (ASan + UBSan, 8 threads, shutdown under load)" \
        env ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=86 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        timeout 120 "$OUT/stress" "$URL" 4
    [ -x "$OUT/batch_shared" ] && check "batch (shared library)" "$OUT/batch_shared" "$URL"
    [ -x "$OUT/cpp_main" ] && check "cpp_main (installed)" env LD_LIBRARY_PATH="$PREFIX/lib" "$OUT/cpp_main" "$URL"
fi

# --- Go (against the installed prefix) --------------------------------------------------------------------------------
if [ "${SKIP_GO:-0}" != 1 ]; then
    if ! command -v go >/dev/null 2>&1; then
        echo "go not found; installing golang-go with apt"
        check "apt-get install golang-go" \
            bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go'
    fi
    if command -v go >/dev/null 2>&1; then
        # The module links the installed library through `#cgo pkg-config: keypool`.
        export GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod CGO_ENABLED=1
        export LD_LIBRARY_PATH="$PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        go version
        check "gofmt" bash -c 'cd go && test -z "$(gofmt -l .)"'
        check "go vet" bash -c 'cd go && go vet ./...'
        check "go test" bash -c 'cd go && go test -count=1 -v ./...'
        check "go test -race" bash -c 'cd go && go test -race -count=1 ./...'
        # A Go user's own module (README: require + replace, import, run).
        APP="$OUT/goapp"
        rm -rf "$APP"
        mkdir -p "$APP"
        cat >"$APP/go.mod" <<GOMOD
module example.com/app

go 1.19

require github.com/keypool/keypool/go v0.0.0

replace github.com/keypool/keypool/go => $ROOT/go
GOMOD
        cat >"$APP/main.go" <<'GOMAIN'
package main

import (
	"fmt"
	"os"

	keypool "github.com/keypool/keypool/go"
)

func main() {
	// An optional second argument: a CA file to trust (tls.ca_file), for https.
	tls := ""
	if len(os.Args) > 2 {
		tls = `"tls": {"ca_file": "` + os.Args[2] + `"},`
	}
	pool, err := keypool.New(`{"base_url": "` + os.Args[1] + `", ` + tls + `
		"keys": [{"key": "sk-test-a", "label": "acct-a", "max_concurrent": 2}]}`)
	if err != nil {
		panic(err)
	}
	defer pool.Close()
	results, err := pool.Batch([]string{`{"model": "m", "messages": [{"role": "user", "content": "hi"}]}`})
	if err != nil {
		panic(err)
	}
	for _, r := range results {
		if err := r.Err(); err != nil {
			panic(err)
		}
		fmt.Println("HTTP", r.HTTPStatus)
	}
}
GOMAIN
        [ -n "$URL" ] && check "Go user's module: go run -race (require + replace)" \
            bash -c 'cd "$0" && go run -race . "$1" | grep -qx "HTTP 200"' "$APP" "$URL"
    fi
fi
stop_mock

# --- Once over https: the mock with a generated CA (keypool-mock --tls) ---------------
# C trusts it through SSL_CERT_FILE, the Go user's module through tls.ca_file.
CA="$OUT/mock-ca.pem"
rm -f "$CA"
TLS_URL=""
if [ -x "$KEYPOOL_MOCK_BIN" ]; then
    coproc MOCK { exec "$KEYPOOL_MOCK_BIN" --tls --ca-out "$CA" 2>/dev/null; }
    IFS= read -r -t 30 TLS_URL <&"${MOCK[0]}" || TLS_URL=""
fi
check "TLS mock server started" bash -c "[[ '$TLS_URL' == https://127.0.0.1:*/v1 && -s '$CA' ]]"
if [ -n "$TLS_URL" ]; then
    check "batch over https (SSL_CERT_FILE)" env SSL_CERT_FILE="$CA" "$OUT/batch" "$TLS_URL"
    check "batch over https without the CA fails" bash -c '! env -u SSL_CERT_FILE -u SSL_CERT_DIR "$0" "$1" >/dev/null 2>&1' "$OUT/batch" "$TLS_URL"
    if [ "${SKIP_GO:-0}" != 1 ] && command -v go >/dev/null 2>&1 && [ -d "${APP:-}" ]; then
        check "Go user's module over https (tls.ca_file)" \
            bash -c 'cd "$0" && go run . "$1" "$2" | grep -qx "HTTP 200"' "$APP" "$TLS_URL" "$CA"
    fi
fi
stop_mock
summary
