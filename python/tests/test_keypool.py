import asyncio
import json
import signal
import threading
import time

import pytest

import keypool
from conftest import body, config


@pytest.fixture
def pool(mock_url):
    with keypool.Pool(config(mock_url)) as p:
        yield p


def test_submit_result(pool):
    ticket = pool.submit(body(1))
    r = ticket.result(timeout=10)
    assert isinstance(r, keypool.Response)
    assert r.status == 200
    assert r.content
    assert r.key_label in ("acct-0", "acct-1")
    assert r.json()["choices"][0]["message"]["content"] == r.content
    assert ticket.result() is r or ticket.result().status == 200  # same answer again
    assert ticket.done()


def test_fallback_model(mock_url):
    cfg = config(mock_url, keys=1, fallback_models={"acme/x": ["acme/y"]})
    cfg["keys"][0]["models"] = ["acme/y"]
    with keypool.Pool(cfg) as p:
        fell_back = p.submit(dict(body(), model="acme/x")).result(timeout=10)
        assert fell_back.fallback_model == "acme/y"
        assert fell_back.json()["model"] == "acme/y"
        direct = p.submit(dict(body(), model="acme/y")).result(timeout=10)
        assert direct.fallback_model is None


def test_config_as_json_text_and_bytes_body(mock_url):
    with keypool.Pool(json.dumps(config(mock_url, keys=1))) as p:
        assert p.labels == ["acct-0"]
        assert p.capacity == 4
        assert p.submit(json.dumps(body()).encode()).result().status == 200
    assert p.closed


def test_config_error():
    with pytest.raises(keypool.ConfigError) as e:
        keypool.Pool({"base_url": "http://127.0.0.1:1/v1", "keys": []})
    assert isinstance(e.value, ValueError)
    assert e.value.code == "config"


def test_invalid_body(pool):
    with pytest.raises(keypool.InvalidRequest):
        pool.submit("{not json")


def test_batch_order_with_an_error(pool):
    bodies = [body(i) for i in range(20)]
    bodies[7] = body(7, status=500)
    results = pool.batch(bodies)
    assert len(results) == 20
    for i, r in enumerate(results):
        if i == 7:
            assert isinstance(r, keypool.HTTPError), r
            assert r.status == 500
            assert b"error" in r.body
        else:
            assert isinstance(r, keypool.Response), r
            assert f"hello {i}" in r.text or r.status == 200


def test_batch_larger_than_the_queue(mock_url):
    # 1 key x 2 workers, queue of 4: 200 requests go through in bounded memory.
    with keypool.Pool(config(mock_url, keys=1, per_key=2, queue_capacity=4)) as p:
        results = p.batch(body(i) for i in range(200))
        assert len(results) == 200
        assert all(isinstance(r, keypool.Response) for r in results)
        assert p.stats()["completed"] >= 200


def test_imap(pool):
    seen = {}
    consumed = []

    def gen():
        for i in range(50):
            consumed.append(i)
            yield body(i)

    it = pool.imap(gen(), window=5)
    first = next(it)
    assert len(consumed) <= 6  # lazily read: window plus one at most
    seen[first[0]] = first[1]
    for i, r in it:
        seen[i] = r
    assert sorted(seen) == list(range(50))
    assert all(isinstance(r, keypool.Response) for r in seen.values())


def test_stream(pool):
    s = pool.stream(body(3))
    chunks = list(s)
    assert len(chunks) >= 2
    assert all(isinstance(c, keypool.Chunk) for c in chunks)
    text = "".join(c.delta for c in chunks)
    assert text
    assert s.response is not None
    assert s.response.content == text
    assert [c.seq for c in chunks] == sorted(c.seq for c in chunks)


def test_stream_error(pool):
    with pytest.raises(keypool.HTTPError) as e:
        list(pool.stream(body(status=400)))
    assert e.value.status == 400


def test_rate_limited(mock_url):
    cfg = config(mock_url, keys=1, retry={"max_attempts": 1})
    with keypool.Pool(cfg) as p:
        with pytest.raises(keypool.RateLimited) as e:
            p.submit(body(status=429, retry_after_ms=10)).result(timeout=10)
    assert isinstance(e.value, keypool.HTTPError)
    assert e.value.status == 429


def test_no_usable_key(mock_url):
    with keypool.Pool(config(mock_url, keys=1)) as p:
        with pytest.raises((keypool.NoUsableKey, keypool.HTTPError)) as e:
            p.submit(body(status=401)).result(timeout=10)
        # The key is disabled after its 401: the next request has no usable key.
        with pytest.raises(keypool.NoUsableKey):
            p.submit(body()).result(timeout=10)
    assert e.value.code in ("no_usable_key", "http")


def test_result_timeout_keeps_the_ticket(pool):
    t = pool.submit(body(delay_ms=400))
    with pytest.raises(keypool.Timeout) as e:
        t.result(timeout=0.05)
    assert e.value.phase == "wait"
    assert isinstance(e.value, TimeoutError)
    assert t.result(timeout=10).status == 200


def test_stats(pool):
    pool.batch([body(i) for i in range(4)])
    stats = pool.stats()
    assert isinstance(stats, dict)
    text = json.dumps(stats)
    assert "acct-0" in text and "sk-test" not in text


def test_closed_pool(mock_url):
    p = keypool.Pool(config(mock_url))
    p.close()
    with pytest.raises(keypool.Closed):
        p.submit(body())


def _interrupt_after(seconds):
    timer = threading.Timer(seconds, signal.raise_signal, (signal.SIGINT,))
    timer.start()
    return timer


def test_ctrl_c_stops_result(pool):
    t = pool.submit(body(delay_ms=5000))
    start = time.monotonic()
    _interrupt_after(0.2)
    with pytest.raises(KeyboardInterrupt):
        t.result()
    assert time.monotonic() - start < 2


def test_ctrl_c_stops_batch_and_what_was_not_sent(mock_url):
    with keypool.Pool(config(mock_url, keys=1, per_key=2, queue_capacity=2)) as p:
        consumed = []

        def gen():
            for i in range(100):
                consumed.append(i)
                yield body(i, delay_ms=300)

        start = time.monotonic()
        _interrupt_after(0.2)
        with pytest.raises(KeyboardInterrupt):
            list(p.imap(gen()))
        assert time.monotonic() - start < 2
        assert len(consumed) < 10  # the rest was never read, let alone sent
        p.close()  # waits for the two requests on the wire
        # The window was 4 (2 workers + a queue of 2): the 2 queued were never sent.
        assert p.stats()["keys"][0]["sent"] <= 2


def test_ctrl_c_cancels_a_queued_request(mock_url):
    with keypool.Pool(config(mock_url, keys=1, per_key=1)) as p:
        first = p.submit(body(delay_ms=600))
        queued = p.submit(body(1))
        _interrupt_after(0.2)
        with pytest.raises(KeyboardInterrupt):
            queued.result()
        with pytest.raises(keypool.Cancelled):
            queued.result(timeout=5)
        assert first.result(timeout=5).status == 200
        assert p.stats()["keys"][0]["sent"] == 1


def test_ticket_cancel(mock_url):
    with keypool.Pool(config(mock_url, keys=1, per_key=1)) as p:
        first = p.submit(body(delay_ms=300))
        queued = p.submit(body(1))
        queued.cancel()
        with pytest.raises(keypool.Cancelled):
            queued.result(timeout=5)
        assert first.result(timeout=5).status == 200


def test_ctrl_c_stops_a_stream(pool):
    s = pool.stream(body(first_chunk_delay_ms=3000, chunk_delay_ms=3000))
    start = time.monotonic()
    _interrupt_after(0.2)
    with pytest.raises(KeyboardInterrupt):
        for _ in s:
            pass
    assert time.monotonic() - start < 2
    s.close()


def test_gil_released_while_waiting(pool):
    # Another Python thread runs while result() waits.
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    th = threading.Thread(target=spin)
    th.start()
    pool.submit(body(delay_ms=300)).result()
    stop.set()
    th.join()
    assert len(ticks) > 50


def test_asubmit(pool):
    async def main():
        rs = await asyncio.gather(*(pool.asubmit(body(i)) for i in range(30)))
        assert all(r.status == 200 for r in rs)
        with pytest.raises(keypool.HTTPError) as e:
            await pool.asubmit(body(status=500))
        assert e.value.status == 500

    asyncio.run(main())


def test_asubmit_with_a_full_queue(mock_url):
    with keypool.Pool(config(mock_url, keys=1, per_key=1, queue_capacity=1)) as p:

        async def main():
            return await asyncio.gather(*(p.asubmit(body(i, delay_ms=5)) for i in range(10)))

        assert all(r.status == 200 for r in asyncio.run(main()))


def test_asubmit_cancelled_task_is_not_sent(mock_url):
    with keypool.Pool(config(mock_url, keys=1, per_key=1)) as p:

        async def main():
            first = asyncio.ensure_future(p.asubmit(body(delay_ms=300)))
            queued = asyncio.ensure_future(p.asubmit(body(1)))
            await asyncio.sleep(0.05)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            return await first

        assert asyncio.run(main()).status == 200
        p.close()
        assert p.stats()["keys"][0]["sent"] == 1


def test_astream(pool):
    async def main():
        s = pool.astream(body(5))
        chunks = [c async for c in s]
        assert len(chunks) >= 2
        assert s.response is not None
        assert s.response.content == "".join(c.delta for c in chunks)

    asyncio.run(main())


def test_types_are_exported():
    assert issubclass(keypool.RateLimited, keypool.HTTPError)
    assert issubclass(keypool.HTTPError, keypool.KeypoolError)
    assert issubclass(keypool.Timeout, TimeoutError)
    assert keypool.__version__
