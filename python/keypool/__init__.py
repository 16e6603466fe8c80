"""keypool: spread OpenAI-compatible LLM requests across many API keys.

A Rust engine (worker threads per key, a non-polling dispatcher) behind a small
Python API. Every blocking call releases the GIL and wakes for Ctrl-C; the asyncio
methods are woken through ``loop.call_soon_threadsafe``, never by polling.

>>> with keypool.Pool({"base_url": url, "keys": [{"key": "sk-a", "max_concurrent": 4}]}) as pool:
...     print(pool.submit({"model": "m", "messages": [...]}).result().content)
"""

from __future__ import annotations

import asyncio
import atexit
import json
import weakref
from typing import (
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    Union,
    cast,
)

from . import _keypool
from . import _errors
from ._errors import (
    BudgetExhausted,
    Busy,
    Cancelled,
    Closed,
    ConfigError,
    Flagged,
    HTTPError,
    InvalidRequest,
    InvalidResponse,
    KeypoolError,
    ModelNotServed,
    NoUsableKey,
    RateLimited,
    ResultTaken,
    SharedUnavailable,
    StreamError,
    Timeout,
    TransportError,
    WouldDeadlock,
)
from ._keypool import Chunk, Response, Stream, Ticket

__version__: str = _keypool.__version__

__all__ = [
    "Pool",
    "AsyncStream",
    "Ticket",
    "Stream",
    "Chunk",
    "Response",
    "Body",
    *_errors.__all__,
]

#: A request body: a JSON object as a dict, or its JSON text (str or bytes).
Body = Union[Mapping[str, Any], str, bytes]
#: One result of a batch: the response, or the exception that ended the request.
Result = Union[Response, KeypoolError]


def _text(body: Body) -> str:
    if isinstance(body, str):
        return body
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body).decode("utf-8")
    return json.dumps(body, separators=(",", ":"))


_live: "weakref.WeakSet[Pool]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Workers call back into Python for the asyncio methods: stop them before the
    # interpreter goes away.
    for pool in list(_live):
        pool.close()


class Pool:
    """A pool of API keys.

    ``config`` is the engine's configuration (docs/configuration.md) as a dict or as
    JSON text: ``base_url``, ``keys`` (each with ``key``, ``label``,
    ``max_concurrent``…), ``strategy``, ``queue_capacity``, ``retry``…
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, config: Union[Mapping[str, Any], str]) -> None:
        text = config if isinstance(config, str) else json.dumps(config)
        self._native = _keypool.Pool(text)
        _live.add(self)

    # -- blocking API ---------------------------------------------------------------

    def submit(self, body: Body, *, path: Optional[str] = None) -> Ticket:
        """Submits one request (blocking while the queue is full); ``ticket.result()``
        waits for it."""
        return self._native.submit(_text(body), path)

    def batch(self, bodies: Iterable[Body], *, path: Optional[str] = None) -> List[Result]:
        """Sends every body and returns one result each, in input order: a
        :class:`Response`, or the :class:`KeypoolError` instance that ended it (not
        raised). Any number of bodies: at most the pool's capacity plus its queue are
        in flight at once."""
        return self._native.batch([_text(b) for b in bodies], path)

    def imap(
        self,
        bodies: Iterable[Body],
        *,
        window: Optional[int] = None,
        path: Optional[str] = None,
    ) -> Iterator[Tuple[int, Result]]:
        """Yields ``(index, result)`` as each request finishes (completion order),
        reading ``bodies`` lazily: at most ``window`` requests (default: the pool's
        capacity plus its queue) are submitted and not yet yielded."""
        return self._native.imap((_text(b) for b in bodies), window, path)

    def stream(self, body: Body, *, path: Optional[str] = None) -> Stream:
        """Submits a streamed request (``"stream": true`` is set) and returns an
        iterator over its :class:`Chunk` s; afterwards ``.response`` holds the assembled
        response. A failure raises when iteration reaches it."""
        return self._native.submit_stream(_text(body), path)

    def stats(self) -> Dict[str, Any]:
        """Per-key and pool-wide counters (the engine's ``Stats`` as a dict)."""
        stats: Dict[str, Any] = json.loads(self._native.stats_json())
        return stats

    def close(self) -> None:
        """Stops accepting requests, answers queued ones :class:`Cancelled`, waits for
        those in flight. Idempotent."""
        self._native.close()

    @property
    def closed(self) -> bool:
        return self._native.closed

    @property
    def capacity(self) -> int:
        """Total workers (the sum of every key's ``max_concurrent``)."""
        return self._native.capacity

    @property
    def labels(self) -> List[str]:
        return self._native.labels

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<keypool.Pool {state} keys={len(self.labels)} capacity={self.capacity}>"

    # -- asyncio --------------------------------------------------------------------

    async def asubmit(self, body: Body, *, path: Optional[str] = None) -> Response:
        """Sends one request and returns its response (raises its error). The result
        comes from a keypool worker through ``loop.call_soon_threadsafe``: no thread
        waits and nothing polls, unless the queue is full, when the submit itself runs
        in the loop's default executor."""
        loop = asyncio.get_running_loop()
        fut: "asyncio.Future[Response]" = loop.create_future()

        def done(ok: bool, value: Any) -> None:  # on a keypool thread
            try:
                loop.call_soon_threadsafe(_settle, fut, ok, value)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass

        text = _text(body)
        handle = self._native.submit_with(text, done, False, path)
        if handle is None:  # the queue is full: wait for room off the event loop
            handle = await loop.run_in_executor(
                None, self._native.submit_with, text, done, True, path
            )
        try:
            return await fut
        except asyncio.CancelledError:
            if handle is not None:
                handle.cancel()  # not sent yet: never will be
            raise

    def astream(self, body: Body, *, path: Optional[str] = None) -> "AsyncStream":
        """``async for chunk in pool.astream(body)``: chunks as they arrive; then
        ``.response`` holds the assembled response."""
        return AsyncStream(self, _text(body), path)


def _settle(fut: "asyncio.Future[Any]", ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class AsyncStream:
    """The async iterator :meth:`Pool.astream` returns."""

    _CHUNK, _OK, _ERR = 0, 1, 2

    def __init__(self, pool: Pool, body: str, path: Optional[str]) -> None:
        self._pool = pool
        self._body = body
        self._path = path
        self._queue: Optional["asyncio.Queue[Tuple[int, Any]]"] = None
        self._handle: Optional[_keypool.Cancel] = None
        self._open = True
        self._finished = False
        #: The assembled response, once the stream has ended.
        self.response: Optional[Response] = None

    def __aiter__(self) -> "AsyncStream":
        return self

    async def _start(self) -> "asyncio.Queue[Tuple[int, Any]]":
        loop = asyncio.get_running_loop()
        queue: "asyncio.Queue[Tuple[int, Any]]" = asyncio.Queue()

        def put(item: Tuple[int, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                self._open = False

        def on_chunk(chunk: Chunk) -> bool:  # on a keypool thread
            if self._open:
                put((self._CHUNK, chunk))
            return self._open

        def on_done(ok: bool, value: Any) -> None:  # on a keypool thread
            put((self._OK if ok else self._ERR, value))

        self._queue = queue
        # submit_stream_with blocks while the queue is full: keep it off the loop.
        self._handle = await loop.run_in_executor(
            None, self._pool._native.submit_stream_with, self._body, on_chunk, on_done, self._path
        )
        return queue

    async def __anext__(self) -> Chunk:
        if self._finished:
            raise StopAsyncIteration
        queue = self._queue if self._queue is not None else await self._start()
        try:
            kind, value = await queue.get()
        except BaseException:
            self.close()
            raise
        if kind == self._CHUNK:
            return cast(Chunk, value)
        self._finished = True
        self._open = False
        if kind == self._OK:
            self.response = value
            raise StopAsyncIteration
        raise value

    def close(self) -> None:
        """Stops the stream: the worker abandons it at its next chunk (or never sends
        it, if it is still queued)."""
        self._open = False
        self._finished = True
        if self._handle is not None:
            self._handle.cancel()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
