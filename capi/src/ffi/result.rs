//! `keypool_result`: one request's outcome, copied out of the engine's `RequestResult`.

use std::ffi::{CStr, CString, c_char};
use std::ptr;

use super::arg_ref;
use super::error::{Failure, Status, set_last_error, to_cstring};
use super::panic::ffi_panic_boundary;
use crate::{Error, RequestResult};

/// The outcome of one request (C: `keypool_result`). Immutable once built.
pub struct FfiResult {
    status: Status,
    http_status: u16,
    /// The response body followed by one NUL byte that `len` does not count.
    body: Vec<u8>,
    key_label: CString,
    attempts: u32,
    latency_ms: u64,
    queue_ms: u64,
    error_message: Option<CString>,
    error_code: Option<CString>,
    /// Whom a failure was blamed on ("request", "model", "key", "account", "server").
    blame: Option<&'static CStr>,
}

impl FfiResult {
    fn new(status: Status) -> FfiResult {
        FfiResult {
            status,
            http_status: 0,
            body: vec![0],
            key_label: CString::default(),
            attempts: 0,
            latency_ms: 0,
            queue_ms: 0,
            error_message: None,
            error_code: None,
            blame: None,
        }
    }

    fn with_body(mut self, body: &[u8]) -> FfiResult {
        self.body = Vec::with_capacity(body.len() + 1);
        self.body.extend_from_slice(body);
        self.body.push(0);
        self
    }

    /// A failed result that never reached the engine (a bad body in a batch, a refused
    /// batch element, a panic while building a result). Its code is its status's code.
    pub(crate) fn failure(f: Failure) -> FfiResult {
        let mut r = FfiResult::new(f.status);
        r.error_message = Some(to_cstring(&f.message));
        r.error_code = Some(to_cstring(f.status.code()));
        r
    }

    /// Copies an engine result.
    pub(crate) fn from_engine(result: RequestResult) -> FfiResult {
        match result {
            Ok(resp) => {
                let mut r = FfiResult::new(Status::KEYPOOL_OK);
                r.http_status = resp.status();
                r.key_label = to_cstring(resp.key_label());
                r.attempts = resp.attempts();
                r.latency_ms = duration_ms(resp.latency());
                r.queue_ms = duration_ms(resp.queue_time());
                // Handed over, not copied: the HTTP/1.1 client leaves a spare byte for
                // the NUL (any other transport's body may grow once here).
                r.body = resp.into_body();
                r.body.push(0);
                r
            }
            Err(e) => {
                let status = Status::of(&e);
                let mut r = FfiResult::new(status);
                r.attempts = e.attempts();
                r.error_message = Some(to_cstring(&e.to_string()));
                r.error_code = Some(to_cstring(status.code_of(&e)));
                r.blame = e.blame().map(blame_str);
                if let Some(response) = e.response() {
                    r = r.with_body(response.body());
                    r.http_status = response.status();
                    r.key_label = to_cstring(response.key_label());
                    r.latency_ms = duration_ms(response.latency());
                    r.queue_ms = duration_ms(response.queue_time());
                }
                match &e {
                    Error::Transport { key, .. } | Error::Stream { key, .. } => {
                        r.key_label = to_cstring(key)
                    }
                    Error::Timeout { key: Some(k), .. } => r.key_label = to_cstring(k),
                    _ => {}
                }
                r
            }
        }
    }
}

/// The static C string of a blame.
fn blame_str(b: keypool::Blame) -> &'static CStr {
    match b {
        keypool::Blame::Request => c"request",
        keypool::Blame::Model => c"model",
        keypool::Blame::Key => c"key",
        keypool::Blame::Account => c"account",
        keypool::Blame::Server => c"server",
        // `Blame` is #[non_exhaustive]: a party added later reads as unknown.
        _ => c"unknown",
    }
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn get<'a>(r: *const FfiResult) -> Option<&'a FfiResult> {
    match arg_ref(r, "result") {
        Ok(r) => Some(r),
        Err(f) => {
            set_last_error(&f.message);
            None
        }
    }
}

/// How the request ended: `KEYPOOL_OK` for a successful HTTP response, otherwise why it
/// failed (`KEYPOOL_HTTP`, `KEYPOOL_TRANSPORT`, `KEYPOOL_TIMEOUT`, `KEYPOOL_CANCELLED`,
/// `KEYPOOL_INVALID_REQUEST`, …).
///
/// `r` NULL: returns `KEYPOOL_INVALID_ARGUMENT` and sets `keypool_last_error()`.
/// Thread-safe (results are immutable), non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_result_status(r: *const FfiResult) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        get(r).map_or(Status::KEYPOOL_INVALID_ARGUMENT, |r| r.status)
    })
}

/// The HTTP status of the response (also for `KEYPOOL_HTTP` failures); 0 if there was
/// no HTTP response.
///
/// `r` NULL: returns 0 and sets `keypool_last_error()`. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_result_http_status(r: *const FfiResult) -> u16 {
    ffi_panic_boundary!(0, { get(r).map_or(0, |r| r.http_status) })
}

/// The response body (also for `KEYPOOL_HTTP` failures, e.g. a 429's JSON error) and its
/// length in `*len`. Empty (length 0) when there was no response. The bytes are followed
/// by a NUL that `*len` does not count, so a text body may be used as a C string.
///
/// Ownership: owned by the result; valid until `keypool_result_free(r)`.
/// `r` or `len` NULL: returns NULL, leaves `*len` alone, sets `keypool_last_error()`.
/// Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_result_body(r: *const FfiResult, len: *mut usize) -> *const u8 {
    ffi_panic_boundary!(ptr::null(), {
        let Some(r) = get(r) else {
            return ptr::null();
        };
        if len.is_null() {
            set_last_error("len is NULL");
            return ptr::null();
        }
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { len.write(r.body.len() - 1) };
        r.body.as_ptr()
    })
}

/// The label of the key that served (or last tried) the request; "" if none did.
///
/// Ownership: owned by the result; valid until `keypool_result_free(r)`.
/// `r` NULL: returns NULL and sets `keypool_last_error()`. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_result_key_label(r: *const FfiResult) -> *const c_char {
    ffi_panic_boundary!(ptr::null(), {
        get(r).map_or(ptr::null(), |r| r.key_label.as_ptr())
    })
}

/// HTTP attempts made for the request, retries included (0 if none was made).
///
/// `r` NULL: returns 0 and sets `keypool_last_error()`. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_result_attempts(r: *const FfiResult) -> u32 {
    ffi_panic_boundary!(0, { get(r).map_or(0, |r| r.attempts) })
}

/// Milliseconds from the first attempt's start to the final response; 0 if there was
/// no HTTP response.
///
/// `r` NULL: returns 0 and sets `keypool_last_error()`. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_result_latency_ms(r: *const FfiResult) -> u64 {
    ffi_panic_boundary!(0, { get(r).map_or(0, |r| r.latency_ms) })
}

/// Why the request failed, e.g. "HTTP 429 from key acct-a: rate limited (after 3
/// attempt(s))"; NULL if it succeeded. Never contains an API key.
///
/// Ownership: owned by the result; valid until `keypool_result_free(r)`.
/// `r` NULL: returns NULL and sets `keypool_last_error()`. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_result_error_message(r: *const FfiResult) -> *const c_char {
    ffi_panic_boundary!(ptr::null(), {
        get(r)
            .and_then(|r| r.error_message.as_ref())
            .map_or(ptr::null(), |m| m.as_ptr())
    })
}

/// A short stable code for the failure, determined by `keypool_result_status(r)`:
/// "invalid_argument" (`KEYPOOL_INVALID_ARGUMENT`), "config", "http", "transport",
/// "timeout", "busy", "closed", "cancelled", "panic", "no_usable_key",
/// "invalid_request", "would_deadlock" (`KEYPOOL_WOULD_DEADLOCK`), "spawn"
/// (`KEYPOOL_SPAWN`), "stream" (`KEYPOOL_STREAM`), "shared_unavailable"
/// (`KEYPOOL_SHARED_UNAVAILABLE`), "flagged" (`KEYPOOL_FLAGGED`), "budget_exhausted"
/// (`KEYPOOL_BUDGET_EXHAUSTED`) — with one
/// refinement: a `KEYPOOL_HTTP` result whose 2xx body was not a valid response has the
/// code "invalid_response". NULL if the request succeeded.
///
/// Ownership: owned by the result; valid until `keypool_result_free(r)`.
/// `r` NULL: returns NULL and sets `keypool_last_error()`. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_result_error_code(r: *const FfiResult) -> *const c_char {
    ffi_panic_boundary!(ptr::null(), {
        get(r)
            .and_then(|r| r.error_code.as_ref())
            .map_or(ptr::null(), |m| m.as_ptr())
    })
}

/// Milliseconds the request waited before its first attempt started (submit to first
/// send: in the queue, behind a full pool, for a key to admit it); `keypool_result_latency_ms`
/// starts where it ends. 0 when no attempt carried a response (a transport error, a
/// request never sent).
///
/// `r` NULL: returns 0 and sets `keypool_last_error()`. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_result_queue_ms(r: *const FfiResult) -> u64 {
    ffi_panic_boundary!(0, { get(r).map_or(0, |r| r.queue_ms) })
}

/// Whom the failure was blamed on: "request" (a bad or flagged request, one no key's
/// budget covers), "model" (the model on the key that answered: rate-limited upstream,
/// not found at that base URL), "key" (revoked, rate-limited), "account" (credits or
/// quota spent, an in-flight budget) or "server" (5xx, timeouts, transport). NULL if
/// the request succeeded or no party was blamed (`KEYPOOL_BUSY`, `KEYPOOL_CLOSED`, …).
///
/// Ownership: a static string; never free it.
/// `r` NULL: returns NULL and sets `keypool_last_error()`. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_result_blame(r: *const FfiResult) -> *const c_char {
    ffi_panic_boundary!(ptr::null(), {
        get(r)
            .and_then(|r| r.blame)
            .map_or(ptr::null(), CStr::as_ptr)
    })
}

/// Frees a result and everything it owns (body, label, messages).
///
/// NULL is a no-op. Must be called exactly once per result; must not race other calls
/// on the same result. Non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_result_free(r: *mut FfiResult) {
    ffi_panic_boundary!((), {
        if !r.is_null() {
            // SAFETY: `r` came from `Box::into_raw` in this library (the contract).
            drop(unsafe { Box::from_raw(r) });
        }
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_invalid_response_is_keypool_http_with_its_own_code() {
        let response = keypool::__capi::ResponseParts {
            status: 200,
            headers: vec![],
            body: b"<html>".to_vec(),
            key_label: Arc::from("acct-a"),
            key_index: 0,
            attempts: 3,
            latency: Duration::from_millis(5),
            keys_tried: vec![0, 0, 0],
        }
        .build();
        let e = Error::InvalidResponse {
            message: "body is not valid JSON".into(),
            response: Box::new(response),
        };
        let r = FfiResult::from_engine(Err(e));
        assert_eq!(r.status, Status::KEYPOOL_HTTP);
        assert_eq!(r.http_status, 200);
        assert_eq!(r.attempts, 3);
        assert_eq!(&r.body[..r.body.len() - 1], b"<html>");
        let code = r.error_code.as_deref().map(CStr::to_bytes);
        assert_eq!(code, Some(&b"invalid_response"[..]));
        assert_eq!(r.key_label.as_bytes(), b"acct-a");
    }
}
