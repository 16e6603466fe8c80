"""Throughput and CPU per request: keypool against the seed's two asyncio balancers
(the `openai` client; round-robin, and a semaphore per key polled every 10 ms) and
LiteLLM's Router, all at the same keypool-mock (16 keys x 16 concurrent, 20 ms).

    pip install target/wheels/keypool-*.whl openai litellm   # a release wheel
    python python/benches/bench.py [--requests N] [--keys 16] [--per-key 16] [--latency-ms 20]

The mock runs in its own process (KEYPOOL_MOCK_BIN, default target/release/keypool-mock,
else target/debug/keypool-mock); CPU is this process's user+system time (every thread)
divided by the requests. A balancer whose package is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def start_mock(latency_ms: int, threads: int):
    binary = os.environ.get("KEYPOOL_MOCK_BIN")
    if not binary:
        for profile in ("release", "debug"):
            p = ROOT / "target" / profile / "keypool-mock"
            if p.exists():
                binary = str(p)
                break
    if not binary:
        sys.exit("no keypool-mock: cargo build --release -p keypool-mock (or set KEYPOOL_MOCK_BIN)")
    proc = subprocess.Popen(
        [binary, "--latency-ms", str(latency_ms), "--threads", str(threads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    url = proc.stdout.readline().strip()
    return proc, url


def body(i: int) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": f"prompt {i}"}], "max_tokens": 16}


def keys(n: int):
    return [f"sk-bench-{i:02d}" for i in range(n)]


# -- the seed's balancers (asyncio + openai) -------------------------------------------


def openai_clients(url: str, n: int, per_key: int):
    import httpx
    from openai import AsyncOpenAI

    return [
        AsyncOpenAI(
            api_key=k,
            base_url=url,
            max_retries=0,
            http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=per_key)),
        )
        for k in keys(n)
    ]


async def seed_round_robin(url: str, n_keys: int, per_key: int, n: int) -> int:
    """Seed balancer 1: each request to the next key in turn, at most keys x per_key
    in flight."""
    clients = openai_clients(url, n_keys, per_key)
    turn = itertools.cycle(range(n_keys))
    gate = asyncio.Semaphore(n_keys * per_key)

    async def one(i: int) -> bool:
        async with gate:
            c = clients[next(turn)]
            r = await c.chat.completions.create(**body(i))
            return bool(r.choices)

    ok = sum(await asyncio.gather(*(one(i) for i in range(n))))
    for c in clients:
        await c.close()
    return ok


async def seed_polled_semaphores(url: str, n_keys: int, per_key: int, n: int) -> int:
    """Seed balancer 2: a semaphore per key; a request takes the first key with room,
    and when none has any, sleeps 10 ms and looks again."""
    clients = openai_clients(url, n_keys, per_key)
    sems = [asyncio.Semaphore(per_key) for _ in range(n_keys)]

    async def one(i: int) -> bool:
        while True:
            for k, s in enumerate(sems):
                if not s.locked():
                    async with s:
                        r = await clients[k].chat.completions.create(**body(i))
                        return bool(r.choices)
            await asyncio.sleep(0.01)

    ok = sum(await asyncio.gather(*(one(i) for i in range(n))))
    for c in clients:
        await c.close()
    return ok


async def litellm_router(url: str, n_keys: int, per_key: int, n: int) -> int:
    """LiteLLM's Router: one deployment per key, least-busy routing, at most
    keys x per_key in flight. (Its per-deployment max_parallel_requests raises
    RateLimitError when a deployment is full instead of waiting: not used.)"""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch
    import litellm
    from litellm import Router

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    router = Router(
        model_list=[
            {
                "model_name": "m",
                "litellm_params": {
                    "model": "openai/m",
                    "api_key": k,
                    "api_base": url,
                },
            }
            for k in keys(n_keys)
        ],
        routing_strategy="least-busy",
        num_retries=0,
    )
    gate = asyncio.Semaphore(n_keys * per_key)

    async def one(i: int) -> bool:
        async with gate:
            try:
                r = await router.acompletion(**body(i))
            except Exception:
                return False
            return bool(r.choices)

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


# -- keypool ----------------------------------------------------------------------------


def keypool_config(url: str, n_keys: int, per_key: int) -> dict:
    return {
        "base_url": url,
        "strategy": "first_available",
        "keys": [{"key": k, "label": f"k{j}", "max_concurrent": per_key} for j, k in enumerate(keys(n_keys))],
    }


def keypool_batch(url: str, n_keys: int, per_key: int, n: int) -> int:
    import keypool

    with keypool.Pool(keypool_config(url, n_keys, per_key)) as pool:
        return sum(isinstance(r, keypool.Response) for r in pool.batch(body(i) for i in range(n)))


async def keypool_asubmit(url: str, n_keys: int, per_key: int, n: int) -> int:
    import keypool

    with keypool.Pool(keypool_config(url, n_keys, per_key)) as pool:
        gate = asyncio.Semaphore(2 * n_keys * per_key)

        async def one(i: int) -> bool:
            async with gate:
                return (await pool.asubmit(body(i))).status == 200

        return sum(await asyncio.gather(*(one(i) for i in range(n))))


def measure(name, fn, *args):
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        ok = asyncio.run(fn(*args)) if asyncio.iscoroutinefunction(fn) else fn(*args)
    except ImportError as e:
        print(f"{name:<38} skipped: {e}")
        return None
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = args[-1]
    row = (name, ok, n, n / wall, 1e6 * cpu / n)
    print(f"{name:<38} {ok:>6}/{n:<6} {n / wall:>9.0f} req/s {1e6 * cpu / n:>9.0f} us CPU/req")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--keys", type=int, default=16)
    ap.add_argument("--per-key", type=int, default=16)
    ap.add_argument("--latency-ms", type=int, default=20)
    ap.add_argument("--mock-threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated subset: rr,polled,litellm,batch,asubmit")
    a = ap.parse_args()
    proc, url = start_mock(a.latency_ms, a.mock_threads)
    print(f"mock {url}: {a.keys} keys x {a.per_key}, {a.latency_ms} ms, {a.requests} requests each")
    print(f"(ceiling: {a.keys * a.per_key} in flight / {a.latency_ms} ms = {a.keys * a.per_key * 1000 // max(a.latency_ms, 1)} req/s)")
    runs = {
        "rr": ("seed: openai + round-robin", seed_round_robin),
        "polled": ("seed: openai + semaphores, 10 ms poll", seed_polled_semaphores),
        "litellm": ("LiteLLM Router (least-busy)", litellm_router),
        "batch": ("keypool Pool.batch", keypool_batch),
        "asubmit": ("keypool asyncio asubmit", keypool_asubmit),
    }
    chosen = [s for s in a.only.split(",") if s] or list(runs)
    rows = {}
    try:
        for key in chosen:
            name, fn = runs[key]
            rows[key] = measure(name, fn, url, a.keys, a.per_key, a.requests)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    seeds = [r for k, r in rows.items() if k in ("rr", "polled") and r]
    if seeds and rows.get("batch"):
        best = max(seeds, key=lambda r: r[3])
        kp = rows["batch"]
        print(
            f"keypool batch vs the faster seed balancer ({best[0]}): "
            f"{kp[3] / best[3]:.1f}x throughput, {best[4] / kp[4]:.1f}x less CPU per request"
        )
    if rows.get("litellm") and rows.get("batch"):
        lt, kp = rows["litellm"], rows["batch"]
        print(f"keypool batch vs LiteLLM Router: {kp[3] / lt[3]:.1f}x throughput, {lt[4] / kp[4]:.1f}x less CPU per request")


if __name__ == "__main__":
    main()
