//! Metrics and key events: `keypool_pool_stats_prometheus`, `keypool_pool_set_event_callback`.

use std::ffi::{CString, c_char, c_void};
use std::ptr;

use super::arg_ref;
use super::error::{Status, clear_last_error, finish, set_last_error, to_cstring};
use super::panic::ffi_panic_boundary;
use super::pool::{FfiPool, UserData};
use crate::{KeyEvent, KeyEventKind};

/// Event kind: a cooldown started (a 429); `duration_ms` is its length.
pub const KEYPOOL_EVENT_COOLED: u32 = 1;
/// Event kind: after a cooldown, a trial request was answered without a 429: the key
/// takes requests on all its workers again.
pub const KEYPOOL_EVENT_REOPENED: u32 = 2;
/// Event kind: the key is out for good (HTTP 401, a 403 proven to be the key's);
/// `reason` says why.
pub const KEYPOOL_EVENT_DISABLED: u32 = 3;
/// Event kind: the key is out for its credit (at its floor, a 402); back when a credit
/// check finds credit.
pub const KEYPOOL_EVENT_PARKED: u32 = 4;
/// Event kind: the key is out until its quota resets; `duration_ms` until then.
pub const KEYPOOL_EVENT_EXHAUSTED: u32 = 5;
/// Event kind: the key is back in rotation after being parked or exhausted.
pub const KEYPOOL_EVENT_REJOINED: u32 = 6;

/// One change of a key's state, for `keypool_event_callback`. Every pointer is owned
/// by the library and valid only during the callback (copy what you keep).
#[repr(C)]
pub struct FfiKeyEvent {
    /// `KEYPOOL_EVENT_COOLED` … `KEYPOOL_EVENT_REJOINED` (new kinds may be added: ignore
    /// unknown ones).
    pub kind: u32,
    /// The key's position in the config.
    pub key_index: usize,
    /// The key's label (never the key). Never NULL.
    pub label: *const c_char,
    /// The event's name: "cooled", "reopened", "disabled", "parked", "exhausted",
    /// "rejoined". Never NULL.
    pub kind_name: *const c_char,
    /// Why (disabled, parked, exhausted, and cooled when known), else NULL. Never
    /// contains a key.
    pub reason: *const c_char,
    /// Cooled: the cooldown's length; exhausted: time until the reset; else 0.
    pub duration_ms: u64,
    /// When it happened, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// A function receiving a pool's key events, for `keypool_pool_set_event_callback`.
///
/// Thread-safety: it runs on the pool's own event thread (`keypool-events`), never
/// on the thread that set it, one event at a time and in the order the keys changed
/// (never two calls at once for one pool). It must not call `keypool_pool_free` or
/// `keypool_pool_shutdown` on its pool; it may call `keypool_pool_stats_json`,
/// `keypool_pool_stats_prometheus`, `keypool_try_submit` and
/// `keypool_pool_set_event_callback` (from inside the callback, the change applies once
/// it returns). A slow callback delays only later events (at most 4,096 wait; more are
/// dropped and counted in `keypool_events_dropped_total`). `event` and its strings are
/// valid only during the call.
pub type EventCallback =
    Option<unsafe extern "C" fn(event: *const FfiKeyEvent, user_data: *mut c_void)>;

/// The callback and its user data, carried to the event thread.
struct Sink {
    cb: unsafe extern "C" fn(*const FfiKeyEvent, *mut c_void),
    user_data: UserData,
}

// SAFETY: keypool never dereferences `user_data`; the header says the callback runs on
// the pool's event thread with it.
unsafe impl Sync for Sink {}

impl Sink {
    fn call(&self, e: &KeyEvent) {
        let label = to_cstring(&e.label);
        let kind_name = to_cstring(e.kind.as_str());
        let reason: Option<CString> = e.reason.as_deref().map(to_cstring);
        let ev = FfiKeyEvent {
            kind: kind_code(e.kind),
            key_index: e.index,
            label: label.as_ptr(),
            kind_name: kind_name.as_ptr(),
            reason: reason.as_ref().map_or(ptr::null(), |r| r.as_ptr()),
            duration_ms: e.duration_ms.unwrap_or(0),
            at_unix_ms: e.at_unix_ms,
        };
        // SAFETY: the caller's function with the documented signature; every pointer
        // in `ev` lives through the call. A C function cannot unwind into us.
        unsafe { (self.cb)(&ev, self.user_data.ptr()) };
    }
}

/// The C number of an event kind (0 for a kind this ABI does not know yet).
fn kind_code(k: KeyEventKind) -> u32 {
    match k {
        KeyEventKind::Cooled => KEYPOOL_EVENT_COOLED,
        KeyEventKind::Reopened => KEYPOOL_EVENT_REOPENED,
        KeyEventKind::Disabled => KEYPOOL_EVENT_DISABLED,
        KeyEventKind::Parked => KEYPOOL_EVENT_PARKED,
        KeyEventKind::Exhausted => KEYPOOL_EVENT_EXHAUSTED,
        KeyEventKind::Rejoined => KEYPOOL_EVENT_REJOINED,
        _ => 0,
    }
}

/// Sets the function called with every key event of `pool` (a key cooled, reopened,
/// disabled, parked, exhausted or rejoined), replacing any earlier one; NULL `cb`
/// removes it. See `keypool_event_callback` for the thread it runs on. Once this
/// returns, the previous callback is not running and is never called again (so its
/// `user_data` may be freed) — unless called from inside the callback, where the
/// change applies when the callback returns. The first callback set also receives the
/// events from before it was set (the last 256), e.g. keys parked by the credit check
/// in `keypool_pool_new`. Events are also logged (`keypool_set_log_callback`).
///
/// Returns `KEYPOOL_OK`; `KEYPOOL_INVALID_ARGUMENT` if `pool` is NULL. Thread-safe;
/// waits only for a callback in progress.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_pool_set_event_callback(
    pool: *const FfiPool,
    cb: EventCallback,
    user_data: *mut c_void,
) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            let pool = arg_ref(pool, "pool")?;
            match cb {
                Some(cb) => {
                    let sink = Sink {
                        cb,
                        user_data: UserData(user_data),
                    };
                    pool.pool.set_event_handler(move |e| sink.call(e));
                }
                None => pool.pool.clear_event_handler(),
            }
            Ok(())
        })())
    })
}

/// The pool's counters in the Prometheus text exposition format (version 0.0.4), for a
/// `/metrics` endpoint: requests by key and outcome, in flight, queue depth, request
/// and queue duration histograms, tokens, cost, key state (see docs/metrics.md). Series
/// carry the key's label (`key="acct-a"`), never the key. Works on a shut-down pool too.
///
/// Ownership: the caller frees the string with `keypool_string_free`. `pool` NULL:
/// returns NULL and sets `keypool_last_error()`. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_pool_stats_prometheus(pool: *const FfiPool) -> *mut c_char {
    ffi_panic_boundary!(ptr::null_mut(), {
        match arg_ref(pool, "pool") {
            Ok(pool) => {
                clear_last_error();
                to_cstring(&pool.pool.stats().to_prometheus()).into_raw()
            }
            Err(f) => {
                set_last_error(&f.message);
                ptr::null_mut()
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_match_the_rust_codes() {
        let pairs = [
            (KeyEventKind::Cooled, KEYPOOL_EVENT_COOLED),
            (KeyEventKind::Reopened, KEYPOOL_EVENT_REOPENED),
            (KeyEventKind::Disabled, KEYPOOL_EVENT_DISABLED),
            (KeyEventKind::Parked, KEYPOOL_EVENT_PARKED),
            (KeyEventKind::Exhausted, KEYPOOL_EVENT_EXHAUSTED),
            (KeyEventKind::Rejoined, KEYPOOL_EVENT_REJOINED),
        ];
        for (k, c) in pairs {
            assert_eq!((kind_code(k), k.code()), (c, c));
        }
    }
}
