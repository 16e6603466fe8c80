//! The C ABI (`include/keypool.h`, generated from this module by cbindgen in build.rs).
//!
//! This is the only module with `unsafe` code. Conventions, stated once here and in the
//! header banner:
//!
//! - Every exported function runs inside [`panic::ffi_panic_boundary`]: a Rust panic
//!   never unwinds into C; it becomes `KEYPOOL_PANIC` (or the function's NULL/0 value).
//! - Every pointer argument is NULL-checked; strings are NUL-terminated UTF-8 and copied
//!   on entry; out-parameters are written only on success.
//! - Memory the library returns is freed only by the matching `keypool_*_free`, and
//!   every `_free(NULL)` is a no-op.
//! - `keypool_last_error()` holds the calling thread's message for its last failed
//!   call; results carry their own message (`keypool_result_error_message`).

use std::ffi::{CStr, CString, c_char};

mod error;
mod events;
mod logging;
mod panic;
mod pool;
mod result;
mod stream;
mod ticket;

use error::{Failure, RawStatus, Status};
use panic::ffi_panic_boundary;

const VERSION_C: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => panic!("CARGO_PKG_VERSION contains a NUL byte"),
    };

/// A shared reference from a C pointer, or `KEYPOOL_INVALID_ARGUMENT` naming `what`.
///
/// The caller promises a non-NULL `p` points to a live `T` (the C contract).
fn arg_ref<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: non-NULL pointers handed to us by C point to live objects we created
    // (the documented contract of every function taking a handle).
    unsafe { p.as_ref() }.ok_or_else(|| Failure::invalid(format!("{what} is NULL")))
}

/// A string argument: NULL-checked and UTF-8-checked. The message never quotes the
/// contents (a config holds API keys).
/// `what` names the argument in the failure's message (formatted only on failure).
fn arg_str<'a>(p: *const c_char, what: impl std::fmt::Display) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and the caller promises a NUL-terminated string.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    std::str::from_utf8(bytes).map_err(|e| {
        Failure::invalid(format!(
            "{what} is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })
}

/// Checks an out-parameter before any work is done.
fn arg_out<T>(out: *mut *mut T, what: &str) -> Result<(), Failure> {
    if out.is_null() {
        Err(Failure::invalid(format!("{what} is NULL")))
    } else {
        Ok(())
    }
}

/// Writes a new handle to a checked out-parameter.
fn write_out<T>(out: *mut *mut T, value: T) {
    // SAFETY: `out` was checked non-NULL by `arg_out`; the caller promises it is
    // writable.
    unsafe { out.write(Box::into_raw(Box::new(value))) }
}

/// The library version, e.g. `"0.1.0"`: the same string as the `KEYPOOL_VERSION`
/// macro of the header it was built with.
///
/// Ownership: a static string; never free it. Never NULL. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_version() -> *const c_char {
    VERSION_C.as_ptr()
}

/// The library version as one number, `MAJOR * 10000 + MINOR * 100 + PATCH` — the
/// run-time counterpart of `KEYPOOL_VERSION_NUMBER`, for a program that checks at
/// startup that the library it loaded is at least the one it was built against.
///
/// Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_version_number() -> u32 {
    let part = |s: &str| s.parse::<u32>().unwrap_or(0);
    part(env!("CARGO_PKG_VERSION_MAJOR")) * 10_000
        + part(env!("CARGO_PKG_VERSION_MINOR")) * 100
        + part(env!("CARGO_PKG_VERSION_PATCH"))
}

/// A short English description of a status code, e.g. "pool is closed". An unknown
/// code gives "unknown status".
///
/// Ownership: a static string; never free it. Never NULL. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_status_str(s: RawStatus) -> *const c_char {
    Status::describe(s).as_ptr()
}

/// The detail message of this thread's last failed keypool call, e.g.
/// "invalid config: keys[0].max_concurrent: must be between 1 and 1024, got 0".
///
/// Set by every call that fails (returns a status other than `KEYPOOL_OK`, or NULL/0
/// for bad input); reset to "" by every call returning `keypool_status` that succeeds.
/// "" if no call has failed. Never contains an API key.
///
/// Ownership: owned by the library; valid until the next keypool call on the same
/// thread; never free it. Never NULL. Thread-local, so thread-safe. Non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_last_error() -> *const c_char {
    error::last_error_ptr()
}

/// Frees a string the library returned (from `keypool_pool_stats_json`).
///
/// `s` must come from keypool and not be freed twice; NULL is a no-op. Thread-safe,
/// non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_string_free(s: *mut c_char) {
    ffi_panic_boundary!((), {
        if !s.is_null() {
            // SAFETY: `s` came from `CString::into_raw` in this library (the contract).
            drop(unsafe { CString::from_raw(s) });
        }
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;
    use std::ptr;

    use super::error::{Status, finish, last_error_ptr, set_last_error};
    use super::panic::ffi_panic_boundary;
    use super::pool::{FfiPool, keypool_pool_free, keypool_pool_new, keypool_submit};
    use super::*;
    use crate::Error;

    fn last_error() -> String {
        // SAFETY: last_error_ptr never returns NULL and points to a NUL-terminated string.
        unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn panic_becomes_keypool_panic() {
        fn boom() -> Status {
            panic!("boom")
        }
        let s: Status = ffi_panic_boundary!(Status::KEYPOOL_PANIC, { boom() });
        assert_eq!(s, Status::KEYPOOL_PANIC);
        assert!(last_error().contains("boom"), "{}", last_error());
        let p: *const u8 = ffi_panic_boundary!(ptr::null(), {
            std::panic::panic_any(42_u32);
        });
        assert!(p.is_null());
        assert!(last_error().contains("(no message)"));
    }

    #[test]
    fn last_error_set_and_cleared() {
        set_last_error("x\0y");
        assert_eq!(last_error(), "x\u{FFFD}y");
        assert_eq!(finish(Ok(())), Status::KEYPOOL_OK);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn status_strings() {
        // SAFETY: keypool_status_str returns a static NUL-terminated string.
        let s = |n| {
            unsafe { CStr::from_ptr(keypool_status_str(n)) }
                .to_str()
                .unwrap()
        };
        assert_eq!(s(Status::KEYPOOL_CLOSED as u32), "pool is closed");
        assert_eq!(s(18), "unknown status");
        assert_eq!(s(u32::MAX), "unknown status");
        for n in 0..=17 {
            assert_ne!(s(n), "unknown status");
        }
        // SAFETY: as above.
        let v = unsafe { CStr::from_ptr(keypool_version()) };
        assert_eq!(v.to_str().unwrap(), crate::VERSION);
        let n: Vec<u32> = crate::VERSION
            .split('.')
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(keypool_version_number(), n[0] * 10_000 + n[1] * 100 + n[2]);
    }

    #[test]
    fn error_mapping() {
        assert_eq!(
            Status::of(&keypool::__capi::config_error("keys", "x")),
            Status::KEYPOOL_CONFIG
        );
        assert_eq!(Status::of(&Error::Busy), Status::KEYPOOL_BUSY);
        assert_eq!(Status::of(&Error::Closed), Status::KEYPOOL_CLOSED);
        assert_eq!(Status::of(&Error::Cancelled), Status::KEYPOOL_CANCELLED);
        assert_eq!(
            Status::of(&Error::ResultTaken),
            Status::KEYPOOL_INVALID_ARGUMENT
        );
        assert_eq!(
            Status::of(&Error::InvalidRequest("x".into())),
            Status::KEYPOOL_INVALID_REQUEST
        );
        assert_eq!(
            Status::of(&Error::WouldDeadlock("batch")),
            Status::KEYPOOL_WOULD_DEADLOCK
        );
    }

    /// Every status has a number equal to its place, a name and a unique code; a failed
    /// result built from a status (bad batch element, refused element, panic) carries
    /// that status's code; an engine error's result carries `Status::of`, that status's
    /// code (the engine's own code wherever the error has a status of its own) and the
    /// error's message.
    #[test]
    fn every_status_and_code_agree() {
        use std::collections::HashSet;
        use std::time::Duration;

        use super::error::{ALL_STATUSES, Failure};
        use super::result::{
            FfiResult, keypool_result_blame, keypool_result_error_code,
            keypool_result_error_message, keypool_result_free, keypool_result_http_status,
            keypool_result_status,
        };
        use crate::TimeoutPhase;

        let text = |p: *const std::ffi::c_char| {
            assert!(!p.is_null());
            // SAFETY: non-NULL, NUL-terminated, owned by a live result.
            unsafe { CStr::from_ptr(p) }.to_str().unwrap().to_owned()
        };
        let mut codes = HashSet::new();
        for (n, &st) in ALL_STATUSES.iter().enumerate() {
            assert_eq!(st as usize, n, "{st:?} is out of order");
            // SAFETY: static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(keypool_status_str(n as u32)) };
            assert_ne!(name.to_str().unwrap(), "unknown status", "{st:?}");
            assert!(
                codes.insert(st.code()),
                "{st:?}: duplicate code {}",
                st.code()
            );
            if st == Status::KEYPOOL_OK {
                continue;
            }
            let r = Box::into_raw(Box::new(FfiResult::failure(Failure {
                status: st,
                message: "why".into(),
            })));
            assert_eq!(keypool_result_status(r), st);
            assert_eq!(text(keypool_result_error_code(r)), st.code(), "{st:?}");
            assert_eq!(text(keypool_result_error_message(r)), "why");
            keypool_result_free(r);
        }
        // SAFETY: static NUL-terminated string.
        let past = unsafe { CStr::from_ptr(keypool_status_str(ALL_STATUSES.len() as u32)) };
        assert_eq!(past.to_str().unwrap(), "unknown status");

        let response = keypool::__capi::ResponseParts {
            status: 429,
            headers: Vec::new(),
            body: b"{}".to_vec(),
            key_label: "acct-a".into(),
            key_index: 0,
            attempts: 2,
            latency: Duration::from_millis(5),
            keys_tried: vec![0],
        }
        .build();
        let flagged_response = keypool::__capi::ResponseParts {
            status: 403,
            headers: Vec::new(),
            body: br#"{"error":{"code":403,"message":"flagged"}}"#.to_vec(),
            key_label: "acct-a".into(),
            key_index: 0,
            attempts: 1,
            latency: Duration::from_millis(5),
            keys_tried: vec![0],
        }
        .build();
        let errors = vec![
            (
                keypool::__capi::config_error("keys", "x"),
                Status::KEYPOOL_CONFIG,
            ),
            (
                Error::InvalidRequest("x".into()),
                Status::KEYPOOL_INVALID_REQUEST,
            ),
            (
                Error::Http {
                    status: 429,
                    message: "slow down".into(),
                    response: Box::new(response),
                },
                Status::KEYPOOL_HTTP,
            ),
            (
                Error::Transport {
                    key: "acct-a".into(),
                    message: "reset".into(),
                    attempts: 1,
                },
                Status::KEYPOOL_TRANSPORT,
            ),
            (
                Error::Timeout {
                    phase: TimeoutPhase::Attempt,
                    key: None,
                    attempts: 1,
                },
                Status::KEYPOOL_TIMEOUT,
            ),
            (Error::Busy, Status::KEYPOOL_BUSY),
            (Error::Closed, Status::KEYPOOL_CLOSED),
            (Error::Cancelled, Status::KEYPOOL_CANCELLED),
            (
                Error::NoUsableKey {
                    detail: "x".into(),
                    attempts: 0,
                    key: None,
                },
                Status::KEYPOOL_NO_USABLE_KEY,
            ),
            (Error::Panic("x".into()), Status::KEYPOOL_PANIC),
            (Error::ResultTaken, Status::KEYPOOL_INVALID_ARGUMENT),
            (
                Error::WouldDeadlock("batch"),
                Status::KEYPOOL_WOULD_DEADLOCK,
            ),
            (
                Error::Spawn {
                    thread: "keypool-a-0".into(),
                    message: "Resource temporarily unavailable".into(),
                },
                Status::KEYPOOL_SPAWN,
            ),
            (
                Error::Stream {
                    kind: crate::StreamFailure::Incomplete,
                    message: "x".into(),
                    key: "acct-a".into(),
                    status: None,
                    attempts: 1,
                    chunks_delivered: 2,
                    text_bytes_delivered: 5,
                },
                Status::KEYPOOL_STREAM,
            ),
            (
                Error::SharedUnavailable {
                    message: "Redis unreachable".into(),
                },
                Status::KEYPOOL_SHARED_UNAVAILABLE,
            ),
            (
                Error::Flagged {
                    message: "your input was flagged".into(),
                    response: Box::new(flagged_response),
                },
                Status::KEYPOOL_FLAGGED,
            ),
            (
                Error::BudgetExhausted {
                    spent: 0.05,
                    max_cost: 0.05,
                },
                Status::KEYPOOL_BUDGET_EXHAUSTED,
            ),
        ];
        let mut covered = HashSet::new();
        for (e, want) in errors {
            let st = Status::of(&e);
            assert_eq!(st, want, "{e:?}");
            covered.insert(st as u32);
            // ResultTaken shares INVALID_ARGUMENT with other misuse; every other error's
            // engine code is its status's code.
            if !matches!(e, Error::ResultTaken) {
                assert_eq!(e.code(), st.code_of(&e), "{e:?}");
            }
            let msg = e.to_string();
            let code = st.code_of(&e);
            let blame = e.blame().map(keypool::Blame::as_str);
            let has_response = e.response().is_some();
            let r = Box::into_raw(Box::new(FfiResult::from_engine(Err(e))));
            assert_eq!(keypool_result_status(r), st);
            assert_eq!(text(keypool_result_error_code(r)), code);
            assert_eq!(text(keypool_result_error_message(r)), msg);
            let b = keypool_result_blame(r);
            assert_eq!((!b.is_null()).then(|| text(b)), blame.map(str::to_owned));
            if has_response {
                // The response behind the error (a flagged request's too) is kept.
                assert_ne!(keypool_result_http_status(r), 0);
            }
            keypool_result_free(r);
        }
        // Every failure status is reachable from an engine error.
        assert_eq!(covered.len(), ALL_STATUSES.len() - 1);
    }

    #[test]
    fn config_errors_never_show_the_key() {
        let mut pool: *mut FfiPool = ptr::null_mut();
        let cfg = cr#"{"keys": [{"key": "sk-test-hidden", "label": "sk-test-hidden"}]}"#;
        assert_eq!(
            keypool_pool_new(cfg.as_ptr(), &mut pool),
            Status::KEYPOOL_CONFIG
        );
        assert!(pool.is_null());
        assert!(!last_error().contains("sk-test-hidden"), "{}", last_error());
        let cfg = cr#"{"keys": "sk-test-hidden"}"#;
        assert_eq!(
            keypool_pool_new(cfg.as_ptr(), &mut pool),
            Status::KEYPOOL_CONFIG
        );
        assert!(!last_error().contains("sk-test-hidden"), "{}", last_error());
    }

    #[test]
    fn submit_rejects_bad_arguments_before_sending() {
        let mut pool: *mut FfiPool = ptr::null_mut();
        let cfg = cr#"{"base_url": "http://127.0.0.1:9/v1", "keys": [{"key": "sk-test-a"}]}"#;
        assert_eq!(
            keypool_pool_new(cfg.as_ptr(), &mut pool),
            Status::KEYPOOL_OK
        );
        let mut t = ptr::null_mut();
        let bad_utf8 = [b'"', 0xff, b'"', 0];
        assert_eq!(
            keypool_submit(pool, bad_utf8.as_ptr().cast(), &mut t),
            Status::KEYPOOL_INVALID_ARGUMENT
        );
        assert!(last_error().contains("not valid UTF-8"));
        assert_eq!(
            keypool_submit(pool, c"{".as_ptr(), &mut t),
            Status::KEYPOOL_INVALID_REQUEST
        );
        assert!(t.is_null());
        keypool_pool_free(pool);
    }
}
