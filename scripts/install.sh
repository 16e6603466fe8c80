#!/usr/bin/env bash
# Builds and installs the keypool C library into PREFIX.
#
#   scripts/install.sh [--no-build] PREFIX        (e.g. /usr/local or $HOME/.local)
#
# Installs:
#   PREFIX/lib/libkeypool.a
#   PREFIX/lib/libkeypool.so.X.Y.Z  (SONAME libkeypool.so.X) + libkeypool.so.X, libkeypool.so links
#   PREFIX/lib/pkgconfig/keypool.pc
#   PREFIX/include/keypool.h, PREFIX/include/keypool.hpp (C++17 RAII wrapper)
#   PREFIX/share/keypool/keypool.supp (valgrind suppressions, see docs/c.md)
#
# Builds `cargo build --release --locked -p keypool-capi` first unless --no-build is
# given (then the release artifacts must already exist). Finds artifacts through
# `cargo metadata`, so CARGO_TARGET_DIR and .cargo/config.toml are honoured.
# Environment: DESTDIR (staged installs, as with make install); KEYPOOL_PROFILE=debug
# installs the debug build instead (the tests do, to skip a second, release, build).
set -euo pipefail

build=1
if [ "${1:-}" = "--no-build" ]; then
    build=0
    shift
fi
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 [--no-build] PREFIX" >&2
    exit 2
fi
prefix="$1"
case "$prefix" in
/*) ;;
*) prefix="$(pwd)/$prefix" ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

profile="${KEYPOOL_PROFILE:-release}"
case "$profile" in
release) profile_flag=(--release) ;;
debug) profile_flag=() ;;
*) echo "KEYPOOL_PROFILE must be release or debug, got $profile" >&2; exit 2 ;;
esac
if [ "$build" = 1 ]; then
    cargo build "${profile_flag[@]}" --locked -p keypool-capi
fi

target_dir="$(cargo metadata --format-version 1 --no-deps --offline |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
version="$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)"
major="${version%%.*}"
rel="$target_dir/$profile"
for f in "$rel/libkeypool.a" "$rel/libkeypool.so"; do
    [ -f "$f" ] || { echo "missing $f (run without --no-build)" >&2; exit 1; }
done

dest="${DESTDIR:-}$prefix"
install -d "$dest/lib/pkgconfig" "$dest/include" "$dest/share/keypool"
install -m 644 "$rel/libkeypool.a" "$dest/lib/libkeypool.a"
install -m 755 "$rel/libkeypool.so" "$dest/lib/libkeypool.so.$version"
ln -sf "libkeypool.so.$version" "$dest/lib/libkeypool.so.$major"
ln -sf "libkeypool.so.$major" "$dest/lib/libkeypool.so"
install -m 644 include/keypool.h include/keypool.hpp "$dest/include/"
install -m 644 capi/keypool.supp "$dest/share/keypool/keypool.supp"

# Libs.private: the system libraries libkeypool.a needs
# (`cargo rustc -p keypool-capi --crate-type staticlib -- --print native-static-libs`,
# minus -lgcc_s and -lc, which the C compiler driver adds itself).
cat >"$dest/lib/pkgconfig/keypool.pc" <<PC
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: keypool
Description: Spread OpenAI-compatible LLM API requests across many API keys (C ABI)
URL: https://github.com/keypool/keypool
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lkeypool
Libs.private: -lutil -lrt -lpthread -lm -ldl
PC

echo "installed keypool $version into $dest"
