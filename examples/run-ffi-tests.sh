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

# doc_block FILE LANG PATTERN: the text of the first fenced block of FILE whose info
# string is LANG and whose text contains PATTERN. A fence may be indented (a block in a
# list item); its indent is removed from the block's lines. Fails if there is none.
doc_block() {
    awk -v lang="$2" -v pat="$3" '
        /^ *```/ {
            if (open) {
                open = 0
                if (want && index(buf, pat)) { printf "%s", buf; found = 1; exit }
                next
            }
            open = 1; match($0, /^ */); ind = RLENGTH
            want = (substr($0, ind + 4) == lang); buf = ""
            next
        }
        open && want {
            line = $0
            if (substr(line, 1, ind) ~ /^ *$/) line = substr(line, ind + 1)
            buf = buf line "\n"
        }
        END { exit (found ? 0 : 1) }' "$1"
}
export -f doc_block

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

# --- Install into a throwaway prefix (docs/c.md: "Install the C library") --------------
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
# The install commands of docs/c.md, with examples/c/batch.c for app.c.
check "cc batch.c \$(pkg-config --cflags --libs keypool)" bash -c \
    'cc examples/c/batch.c $(pkg-config --cflags --libs keypool) -o "$0/batch_pc"' "$OUT"
check "cc -static batch.c \$(pkg-config --static --cflags --libs keypool)" bash -c \
    'cc examples/c/batch.c $(pkg-config --static --cflags --libs keypool) -static -o "$0/batch_pc_static" 2>"$0/static.log" || { cat "$0/static.log"; exit 1; }' "$OUT"
check "c++ main.cpp \$(pkg-config --cflags --libs keypool) (installed keypool.hpp)" bash -c \
    'c++ -std=c++17 examples/cpp/main.cpp $(pkg-config --cflags --libs keypool) -o "$0/cpp_main"' "$OUT"

# --- The guides' install commands and programs, exactly as printed ----------------------
# docs/c.md's install block (README.md prints the same one) runs as a user runs it, with
# HOME in a throwaway directory: `scripts/install.sh "$HOME/.local"` (the checkout's
# script; KEYPOOL_PROFILE=debug installs the debug build made above instead of building
# a release), the pkg-config exports, and `cc app.c …` building docs/c.md's program.
# The streaming function and the C++ function of docs/c.md are built with the same
# flags and run below through a small driver each (test harness, not printed).
DOCS="$OUT/docs"
rm -rf "$DOCS"
mkdir -p "$DOCS/home" "$DOCS/scripts"
printf '#!/bin/sh\nexec "%s/scripts/install.sh" "$@"\n' "$ROOT" >"$DOCS/scripts/install.sh"
chmod +x "$DOCS/scripts/install.sh"
check "docs/c.md prints the install block, app.c, print_stream and print_batch" bash -c '
    doc_block docs/c.md sh "scripts/install.sh" >"$0/install-c.sh" &&
    doc_block docs/c.md c "int main(" >"$0/app.c" &&
    doc_block docs/c.md c "print_stream(" >"$0/stream.c" &&
    doc_block docs/c.md cpp "print_batch(" >"$0/print_batch.cpp"' "$DOCS"
check "README.md prints docs/c.md's install block" bash -c \
    'diff <(doc_block README.md sh "scripts/install.sh") "$0/install-c.sh"' "$DOCS"
# cargo and rustup find their homes through HOME unless told.
check "docs/c.md's install block, as printed (HOME=$DOCS/home)" bash -c '
    export CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}" RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
    cd "$0" && HOME="$0/home" KEYPOOL_PROFILE=debug bash -ex install-c.sh 2>install.log ||
        { cat install.log; exit 1; }' "$DOCS"
cat >"$DOCS/stream_main.c" <<'CMAIN'
#include <stdio.h>
#include "keypool.h"
keypool_status print_stream(keypool_pool *pool, const char *body_json);
int main(int argc, char **argv) {
    char config[256];
    snprintf(config, sizeof config, "{\"base_url\": \"%s\", \"keys\": [{\"key\": \"sk-a\"}]}", argv[1]);
    keypool_pool *pool = NULL;
    if (argc < 2 || keypool_pool_new(config, &pool) != KEYPOOL_OK) return 2;
    keypool_status st = print_stream(pool, "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}");
    keypool_pool_free(pool);
    return st == KEYPOOL_OK ? 0 : 1;
}
CMAIN
cat >"$DOCS/print_batch_main.cpp" <<'CPPMAIN'
#include <string>
#include <vector>
void print_batch(const std::string &config_json, const std::vector<std::string> &bodies);
int main(int argc, char **argv) {
    if (argc < 2) return 2;
    print_batch(std::string("{\"base_url\": \"") + argv[1] + "\", \"keys\": [{\"key\": \"sk-a\"}]}",
                {"{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"});
    return 0;
}
CPPMAIN
check "docs/c.md print_stream builds (-Wall -Wextra -Werror, installed keypool.h)" bash -c \
    'cd "$0" && cc -std=c11 -Wall -Wextra -Werror stream.c stream_main.c $(pkg-config --cflags --libs keypool) -o stream' "$DOCS"
check "docs/c.md print_batch builds (C++17, installed keypool.hpp)" bash -c \
    'cd "$0" && c++ -std=c++17 -Wall -Wextra -Werror print_batch.cpp print_batch_main.cpp $(pkg-config --cflags --libs keypool) -o print_batch' "$DOCS"

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
    # A second mock taking one request per key at a time, for the key events (429 →
    # cooled, then reopened) and the Prometheus text (examples/c/callbacks.c).
    CAP_URL=""
    "$KEYPOOL_MOCK_BIN" --key-capacity 1 --latency-ms 100 --ignore-stdin >"$OUT/cap-mock.url" &
    CAP_PID=$!
    for _ in $(seq 100); do
        IFS= read -r CAP_URL <"$OUT/cap-mock.url" 2>/dev/null && break
        sleep 0.1
    done
    check "callbacks (valgrind)" "${VALGRIND[@]}" "$OUT/callbacks" "$URL" "$CAP_URL"
    kill "$CAP_PID" 2>/dev/null
    wait "$CAP_PID" 2>/dev/null
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
    # The guides' programs (docs/c.md), built above as printed.
    DOCLIB="$DOCS/home/.local/lib"
    [ -x "$DOCS/app" ] && check "docs/c.md app (installed libkeypool.so, valgrind + installed keypool.supp)" \
        env LD_LIBRARY_PATH="$DOCLIB" valgrind -q --leak-check=full --error-exitcode=1 \
        --errors-for-leak-kinds=definite,indirect,possible \
        --suppressions="$DOCS/home/.local/share/keypool/keypool.supp" "$DOCS/app" "$URL"
    [ -x "$DOCS/app-static" ] && check "docs/c.md app-static" "$DOCS/app-static" "$URL"
    [ -x "$DOCS/stream" ] && check "docs/c.md print_stream (valgrind)" \
        env LD_LIBRARY_PATH="$DOCLIB" valgrind -q --leak-check=full --error-exitcode=1 \
        --errors-for-leak-kinds=definite,indirect,possible \
        --suppressions="$DOCS/home/.local/share/keypool/keypool.supp" "$DOCS/stream" "$URL"
    [ -x "$DOCS/print_batch" ] && check "docs/c.md print_batch" bash -c \
        'env LD_LIBRARY_PATH="$0" "$1" "$2" | grep -q "^key-0: "' "$DOCLIB" "$DOCS/print_batch" "$URL"
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
        # A Go user's own module: docs/go.md's go.mod (its `replace` path pointed at this
        # checkout), main.go and pool.go, as printed.
        APP="$OUT/goapp"
        rm -rf "$APP"
        mkdir -p "$APP"
        check "docs/go.md prints go.mod, main.go and pool.go" bash -c '
            doc_block docs/go.md text "module example.com/app" |
                sed "s|=> /path/to/keypool/go\$|=> $1/go|" >"$0/go.mod" &&
            grep -qx "replace github.com/keypool/keypool/go => $1/go" "$0/go.mod" &&
            doc_block docs/go.md go "func main()" >"$0/main.go" &&
            doc_block docs/go.md go "func newPool(" >"$0/pool.go"' "$APP" "$ROOT"
        check "README.md prints docs/go.md's go.mod" bash -c \
            'diff <(doc_block README.md text "module example.com/app") <(doc_block docs/go.md text "module example.com/app")'
        check "docs/go.md's program: gofmt, go vet" bash -c 'cd "$0" && test -z "$(gofmt -l .)" && go vet .' "$APP"
        [ -n "$URL" ] && check "docs/go.md's program: go run -race . BASE_URL (require + replace)" \
            bash -c 'cd "$0" && test "$(go run -race . "$1" | grep -c "^HTTP 200 via acct-")" = 2' "$APP" "$URL"
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
        check "docs/go.md's program over https: go run . BASE_URL CA_FILE (tls.ca_file)" \
            bash -c 'cd "$0" && test "$(go run . "$1" "$2" | grep -c "^HTTP 200 via acct-")" = 2' "$APP" "$TLS_URL" "$CA"
    fi
fi
stop_mock
summary
