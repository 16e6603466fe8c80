"""Starts the keypool mock server for the session ($KEYPOOL_MOCK_BIN, default
../target/debug/keypool-mock: `cargo build -p keypool-mock`). It prints its base URL on
stdout and serves until its stdin closes."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def mock_url():
    binary = os.environ.get("KEYPOOL_MOCK_BIN") or str(ROOT / "target" / "debug" / "keypool-mock")
    if not os.path.exists(binary):
        pytest.fail(f"no mock server at {binary}: run `cargo build -p keypool-mock` or set KEYPOOL_MOCK_BIN")
    proc = subprocess.Popen(
        [binary, "--threads", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    url = proc.stdout.readline().strip()
    assert url.startswith("http"), f"the mock printed {url!r}"
    yield url
    proc.stdin.close()
    proc.wait(timeout=10)


def config(url, keys=2, per_key=4, **extra):
    cfg = {
        "base_url": url,
        "keys": [
            {"key": f"sk-test-{i}", "label": f"acct-{i}", "max_concurrent": per_key}
            for i in range(keys)
        ],
    }
    cfg.update(extra)
    return cfg


def body(i=0, **mock):
    b = {"model": "m", "messages": [{"role": "user", "content": f"hello {i}"}]}
    if mock:
        b["mock"] = mock
    return b
