//! Status codes, the mapping from [`crate::Error`], and the thread-local last error.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};

use crate::Error;

/// What a keypool call (or a request) ended in. `KEYPOOL_OK` is 0; every other value
/// is fixed and never reused for another meaning. `keypool_status_str()` names them.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Success.
    KEYPOOL_OK = 0,
    /// A NULL pointer, a string that is not UTF-8, a ticket whose result was already
    /// taken, or another misuse of the API.
    KEYPOOL_INVALID_ARGUMENT = 1,
    /// The configuration JSON was rejected (the message names the field).
    KEYPOOL_CONFIG = 2,
    /// The server answered with an HTTP error (or an error inside a 200 body, or a 200
    /// whose body is not a valid response: error code "invalid_response"); the result
    /// keeps the status and body.
    KEYPOOL_HTTP = 3,
    /// No HTTP response: connection refused/reset, DNS, TLS, a cut-short body.
    KEYPOOL_TRANSPORT = 4,
    /// A timeout: of an attempt, the request deadline, or the wait/shutdown call itself.
    KEYPOOL_TIMEOUT = 5,
    /// `keypool_try_submit` found the queue full.
    KEYPOOL_BUSY = 6,
    /// The pool is shut down and takes no more requests.
    KEYPOOL_CLOSED = 7,
    /// The request was cancelled (`keypool_ticket_cancel`, `keypool_stream_cancel`, a
    /// stream freed before its end), or was still queued when the pool shut down and
    /// was never sent.
    KEYPOOL_CANCELLED = 8,
    /// keypool panicked; the panic was caught at the API boundary (a bug in keypool).
    KEYPOOL_PANIC = 9,
    /// Every key is disabled (revoked, out of credits), so nothing can be sent.
    KEYPOOL_NO_USABLE_KEY = 10,
    /// The request could not be built: the body is not valid JSON, or a bad path.
    KEYPOOL_INVALID_REQUEST = 11,
    /// A call that would wait for a pool was made from a keypool thread (inside a
    /// completion callback), where waiting can deadlock the pool, so it returned at once
    /// without doing anything: `keypool_submit`/`keypool_submit_path`/
    /// `keypool_submit_callback` on a full queue, `keypool_batch`, `keypool_ticket_wait`
    /// with a non-zero timeout on a result not ready yet. `keypool_pool_shutdown` from a
    /// callback returns it too, after starting the shutdown (it cannot wait there).
    KEYPOOL_WOULD_DEADLOCK = 12,
    /// The pool could not start one of its threads (the system's thread limit, or no
    /// memory for a thread's stack): `keypool_pool_new` failed cleanly, having stopped
    /// the threads it had started.
    KEYPOOL_SPAWN = 13,
    /// A streamed response (`keypool_submit_stream`) failed after its headers: cut short
    /// (no `[DONE]`), a malformed event, an error event, idle past
    /// `stream_idle_timeout_ms`, a stream timeout, an oversized event. The result's
    /// message says how many chunks and bytes of text were delivered first.
    KEYPOOL_STREAM = 14,
    /// The limits shared with other processes (config `shared`) could not be reached
    /// (Redis down or slow) and `shared.on_unavailable` is `"fail"`: the request was not
    /// sent.
    KEYPOOL_SHARED_UNAVAILABLE = 15,
    /// The server refused the request's content (a moderation flag or guardrail block,
    /// e.g. OpenRouter's 403 with `metadata.reasons`): the request is at fault, it was
    /// not retried on other keys and no key was taken out. The result keeps the status
    /// and body (`keypool_result_http_status`, `keypool_result_body`).
    KEYPOOL_FLAGGED = 16,
    /// The pool's spend cap (config `max_cost`) is reached: the request was not sent
    /// (refused at submit, or answered while it waited). Requests already in flight
    /// finished.
    KEYPOOL_BUDGET_EXHAUSTED = 17,
}

/// Every status, in numeric order (for tests and exhaustive tables).
#[cfg(test)]
pub(crate) const ALL_STATUSES: [Status; 18] = [
    Status::KEYPOOL_OK,
    Status::KEYPOOL_INVALID_ARGUMENT,
    Status::KEYPOOL_CONFIG,
    Status::KEYPOOL_HTTP,
    Status::KEYPOOL_TRANSPORT,
    Status::KEYPOOL_TIMEOUT,
    Status::KEYPOOL_BUSY,
    Status::KEYPOOL_CLOSED,
    Status::KEYPOOL_CANCELLED,
    Status::KEYPOOL_PANIC,
    Status::KEYPOOL_NO_USABLE_KEY,
    Status::KEYPOOL_INVALID_REQUEST,
    Status::KEYPOOL_WOULD_DEADLOCK,
    Status::KEYPOOL_SPAWN,
    Status::KEYPOOL_STREAM,
    Status::KEYPOOL_SHARED_UNAVAILABLE,
    Status::KEYPOOL_FLAGGED,
    Status::KEYPOOL_BUDGET_EXHAUSTED,
];

/// A status as C passes it in: any integer, so an unknown value is not an invalid
/// Rust enum. C sees this type as `keypool_status`.
pub type RawStatus = u32;

impl Status {
    /// The status for an engine error.
    pub(crate) fn of(e: &Error) -> Status {
        #[allow(unreachable_patterns)]
        match e {
            Error::Config { .. } => Status::KEYPOOL_CONFIG,
            Error::InvalidRequest(_) => Status::KEYPOOL_INVALID_REQUEST,
            Error::ModelNotServed { .. } => Status::KEYPOOL_INVALID_REQUEST,
            Error::Http { .. } => Status::KEYPOOL_HTTP,
            // A 2xx whose body is not a success: an HTTP-level failure; the result's
            // error code ("invalid_response") tells it apart.
            Error::InvalidResponse { .. } => Status::KEYPOOL_HTTP,
            Error::Transport { .. } => Status::KEYPOOL_TRANSPORT,
            Error::Timeout { .. } => Status::KEYPOOL_TIMEOUT,
            Error::Busy => Status::KEYPOOL_BUSY,
            Error::Closed => Status::KEYPOOL_CLOSED,
            Error::Cancelled => Status::KEYPOOL_CANCELLED,
            Error::NoUsableKey { .. } => Status::KEYPOOL_NO_USABLE_KEY,
            Error::Panic(_) => Status::KEYPOOL_PANIC,
            Error::ResultTaken => Status::KEYPOOL_INVALID_ARGUMENT,
            Error::WouldDeadlock(_) => Status::KEYPOOL_WOULD_DEADLOCK,
            Error::Spawn { .. } => Status::KEYPOOL_SPAWN,
            Error::Stream { .. } => Status::KEYPOOL_STREAM,
            Error::SharedUnavailable { .. } => Status::KEYPOOL_SHARED_UNAVAILABLE,
            Error::Flagged { .. } => Status::KEYPOOL_FLAGGED,
            Error::BudgetExhausted { .. } => Status::KEYPOOL_BUDGET_EXHAUSTED,
            // `Error` is #[non_exhaustive]: a variant added later without a status of its
            // own is reported as an internal failure rather than mislabelled as success.
            _ => Status::KEYPOOL_PANIC,
        }
    }

    /// The short stable code a failed result carries (`keypool_result_error_code`), a
    /// function of the status alone, so a result's status and code always agree. The
    /// same strings as `Error::code` for the errors with a status of their own.
    pub(crate) fn code(self) -> &'static str {
        match self {
            Status::KEYPOOL_OK => "ok",
            Status::KEYPOOL_INVALID_ARGUMENT => "invalid_argument",
            Status::KEYPOOL_CONFIG => "config",
            Status::KEYPOOL_HTTP => "http",
            Status::KEYPOOL_TRANSPORT => "transport",
            Status::KEYPOOL_TIMEOUT => "timeout",
            Status::KEYPOOL_BUSY => "busy",
            Status::KEYPOOL_CLOSED => "closed",
            Status::KEYPOOL_CANCELLED => "cancelled",
            Status::KEYPOOL_PANIC => "panic",
            Status::KEYPOOL_NO_USABLE_KEY => "no_usable_key",
            Status::KEYPOOL_INVALID_REQUEST => "invalid_request",
            Status::KEYPOOL_WOULD_DEADLOCK => "would_deadlock",
            Status::KEYPOOL_SPAWN => "spawn",
            Status::KEYPOOL_STREAM => "stream",
            Status::KEYPOOL_SHARED_UNAVAILABLE => "shared_unavailable",
            Status::KEYPOOL_FLAGGED => "flagged",
            Status::KEYPOOL_BUDGET_EXHAUSTED => "budget_exhausted",
        }
    }

    /// The code of a failed result from the engine error `e` (whose status is `self`):
    /// the status's code, except "invalid_response", a refinement of `KEYPOOL_HTTP`.
    pub(crate) fn code_of(self, e: &Error) -> &'static str {
        match e {
            Error::InvalidResponse { .. } => "invalid_response",
            _ => self.code(),
        }
    }

    /// The static description `keypool_status_str` returns.
    pub(crate) fn describe(raw: RawStatus) -> &'static CStr {
        match raw {
            0 => c"ok",
            1 => c"invalid argument",
            2 => c"invalid configuration",
            3 => c"HTTP error response",
            4 => c"transport error (no HTTP response)",
            5 => c"timed out",
            6 => c"busy: the queue is full",
            7 => c"pool is closed",
            8 => c"cancelled: by its caller, or the pool shut down before the request was sent",
            9 => c"keypool panicked (internal error)",
            10 => c"no usable key",
            11 => c"invalid request",
            12 => c"would deadlock: a blocking call from a keypool thread (inside a callback)",
            13 => c"could not start a thread",
            14 => c"streamed response failed",
            15 => c"shared limits unavailable (Redis unreachable)",
            16 => c"request flagged by the server (moderation or guardrail)",
            17 => c"budget exhausted: the pool's spend cap (max_cost) is reached",
            _ => c"unknown status",
        }
    }
}

thread_local! {
    /// This thread's last error message; empty after a successful status-returning call.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Turns any text into a C string, replacing interior NULs (a server message may hold
/// `\u0000`).
pub(crate) fn to_cstring(s: &str) -> CString {
    // One allocation when there is no NUL to replace (labels, codes, most messages).
    CString::new(s)
        .unwrap_or_else(|_| CString::new(s.replace('\0', "\u{FFFD}")).unwrap_or_default())
}

/// Records `msg` as this thread's last error.
pub(crate) fn set_last_error(msg: &str) {
    let msg = if msg.is_empty() { "unknown error" } else { msg };
    let c = to_cstring(msg);
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

/// Clears this thread's last error (a status-returning call succeeded).
pub(crate) fn clear_last_error() {
    let _ = LAST_ERROR.try_with(|e| {
        let mut e = e.borrow_mut();
        if !e.as_bytes().is_empty() {
            *e = CString::default();
        }
    });
}

/// A pointer to this thread's last error message (never NULL).
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// A failure a C entry point reports: a status and its message.
pub(crate) struct Failure {
    pub(crate) status: Status,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure {
            status: Status::KEYPOOL_INVALID_ARGUMENT,
            message: message.into(),
        }
    }

    /// `KEYPOOL_TIMEOUT` with `message` (what was waited for, and what is still valid).
    pub(crate) fn timeout(message: impl Into<String>) -> Failure {
        Failure {
            status: Status::KEYPOOL_TIMEOUT,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure {
            status: Status::of(&e),
            message: e.to_string(),
        }
    }
}

/// Finishes a status-returning call: clears the last error on success, records it on
/// failure.
pub(crate) fn finish(r: Result<(), Failure>) -> Status {
    match r {
        Ok(()) => {
            clear_last_error();
            Status::KEYPOOL_OK
        }
        Err(f) => {
            set_last_error(&f.message);
            f.status
        }
    }
}
