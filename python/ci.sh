#!/usr/bin/env bash
# The Python package's CI (called by .ci/run): builds the abi3 wheel with maturin,
# installs it into a clean venv and runs the pytest suite against the mock server.
# Tools (maturin, pytest) come from PyPI; nothing else is downloaded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "installing: python3-venv"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
"$PY" --version

# The build tools live in a venv of their own, reused across runs.
tools="$PWD/target/python/tools"
[ -x "$tools/bin/maturin" ] || { "$PY" -m venv "$tools" && "$tools/bin/pip" install -q --disable-pip-version-check maturin; }

# A debug wheel (the suite checks behaviour, not speed; a release build of the
# engine would add minutes on two cores). `maturin build --release` for real use.
rm -rf target/python/wheels
"$tools/bin/maturin" build -q --locked -m python/Cargo.toml -o target/python/wheels
wheel=$(ls target/python/wheels/keypool-*-cp39-abi3-*.whl)
echo "wheel: $wheel"
cargo build -q --locked -p keypool-mock

# A clean venv with nothing but the wheel and pytest.
venv="$PWD/target/python/venv"
rm -rf "$venv"
"$PY" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "$wheel" pytest
# Run from outside python/ so `import keypool` finds the installed wheel, not the source.
(cd target/python && "$venv/bin/python" -c 'import keypool, sys; print("keypool", keypool.__version__, "from", keypool.__file__)' \
    && KEYPOOL_MOCK_BIN="$PWD/../debug/keypool-mock" "$venv/bin/pytest" -p no:cacheprovider -q "../../python/tests")
