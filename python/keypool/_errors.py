"""The exceptions keypool raises, one class per engine error code (``Error::code()``).

Every class derives from :class:`KeypoolError`, which carries the engine's fields.
HTTP answers that ended a request are :class:`HTTPError` (429: :class:`RateLimited`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Type

if TYPE_CHECKING:  # pragma: no cover
    from ._keypool import Response

__all__ = [
    "KeypoolError",
    "ConfigError",
    "InvalidRequest",
    "HTTPError",
    "RateLimited",
    "InvalidResponse",
    "TransportError",
    "Timeout",
    "Busy",
    "Closed",
    "Cancelled",
    "NoUsableKey",
    "ModelNotServed",
    "StreamError",
    "SharedUnavailable",
    "Flagged",
    "BudgetExhausted",
    "WouldDeadlock",
    "ResultTaken",
]


class KeypoolError(Exception):
    """A request (or the pool) failed. ``code`` is the engine's stable error code."""

    code: str = "error"

    def __init__(
        self,
        message: str,
        *,
        code: Optional[str] = None,
        status: Optional[int] = None,
        response: Optional["Response"] = None,
        retry_after: Optional[float] = None,
        blame: Optional[str] = None,
        attempts: int = 0,
        phase: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        #: HTTP status of the answer that ended the request, if any.
        self.status = status
        #: That answer (headers, body, key label), if any.
        self.response = response
        #: The server's Retry-After hint in seconds, if any.
        self.retry_after = retry_after
        #: Whose fault: "caller", "key", "endpoint" or "pool", if known.
        self.blame = blame
        #: HTTP attempts made.
        self.attempts = attempts
        #: For timeouts: "connect", "attempt", "deadline", "submit", "wait", ...
        self.phase = phase

    @property
    def body(self) -> Optional[bytes]:
        """The body of the answer that ended the request, if any."""
        return None if self.response is None else self.response.body


class ConfigError(KeypoolError, ValueError):
    code = "config"


class InvalidRequest(KeypoolError, ValueError):
    code = "invalid_request"


class HTTPError(KeypoolError):
    """The endpoint answered with an error status (``status``, ``body``, ``response``)."""

    code = "http"


class RateLimited(HTTPError):
    """429 Too Many Requests on every attempt; ``retry_after`` holds the hint."""


class InvalidResponse(KeypoolError):
    code = "invalid_response"


class TransportError(KeypoolError, ConnectionError):
    code = "transport"


class Timeout(KeypoolError, TimeoutError):
    """A timeout; ``phase`` says which (``"wait"``: ``result(timeout=...)`` expired)."""

    code = "timeout"


class Busy(KeypoolError):
    code = "busy"


class Closed(KeypoolError):
    code = "closed"


class Cancelled(KeypoolError):
    """The pool closed before the request was sent."""

    code = "cancelled"


class NoUsableKey(KeypoolError):
    """Every key that could serve the request is disabled (401/402/403) or exhausted."""

    code = "no_usable_key"


class ModelNotServed(KeypoolError):
    code = "model_not_served"


class StreamError(KeypoolError):
    code = "stream"


class SharedUnavailable(KeypoolError):
    code = "shared_unavailable"


class Flagged(KeypoolError):
    code = "flagged"


class BudgetExhausted(KeypoolError):
    """The pool's spend cap (``max_cost``) is reached: the request was not sent."""

    code = "budget_exhausted"


class WouldDeadlock(KeypoolError, RuntimeError):
    code = "would_deadlock"


class ResultTaken(KeypoolError, RuntimeError):
    code = "result_taken"


_BY_CODE: Dict[str, Type[KeypoolError]] = {
    cls.code: cls
    for cls in (
        ConfigError,
        InvalidRequest,
        HTTPError,
        InvalidResponse,
        TransportError,
        Timeout,
        Busy,
        Closed,
        Cancelled,
        NoUsableKey,
        ModelNotServed,
        StreamError,
        SharedUnavailable,
        Flagged,
        BudgetExhausted,
        WouldDeadlock,
        ResultTaken,
    )
}


def _make(
    code: str,
    message: str,
    status: Optional[int],
    response: Optional["Response"],
    retry_after: Optional[float],
    blame: Optional[str],
    attempts: int,
    phase: Optional[str],
) -> KeypoolError:
    """Called by the extension to build the exception for an engine error."""
    cls = _BY_CODE.get(code, KeypoolError)
    if cls is HTTPError and status == 429:
        cls = RateLimited
    return cls(
        message,
        code=code,
        status=status,
        response=response,
        retry_after=retry_after,
        blame=blame,
        attempts=attempts,
        phase=phase,
    )
