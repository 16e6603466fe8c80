//! The panic boundary every exported function runs inside: a Rust panic must never
//! unwind into C. It becomes `KEYPOOL_PANIC` (or the function's "bad input" value, such
//! as NULL) with the panic message in `keypool_last_error()`. The panic hook of
//! `logging.rs` (installed by the first entry point called) keeps the panic message off
//! the host's stderr: it goes to `log::error!` and the C log callback.

use std::any::Any;
use std::cell::Cell;

use super::error::{Failure, Status, finish};

thread_local! {
    /// How many C entry points this thread is inside (callbacks can nest them).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Marks the calling thread as inside a C entry point while it lives.
pub(crate) struct BoundaryGuard(());

impl BoundaryGuard {
    /// Entering a C entry point: installs the panic hook (once) and counts the depth.
    pub(crate) fn enter() -> BoundaryGuard {
        super::logging::install_panic_hook();
        let _ = DEPTH.try_with(|d| d.set(d.get().saturating_add(1)));
        BoundaryGuard(())
    }
}

impl Drop for BoundaryGuard {
    fn drop(&mut self) {
        let _ = DEPTH.try_with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Whether the calling thread is inside a C entry point (so a panic here is caught and
/// reported as `KEYPOOL_PANIC`, and must not reach the host's stderr).
pub(crate) fn in_ffi_boundary() -> bool {
    DEPTH.try_with(|d| d.get() > 0).unwrap_or(false)
}

/// Runs the body under `catch_unwind`; on a panic records the message as this thread's
/// last error and evaluates to `$fallback`.
///
/// ```ignore
/// pub extern "C" fn keypool_x(..) -> Status {
///     ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
///         ...
///     })
/// }
/// ```
macro_rules! ffi_panic_boundary {
    ($fallback:expr, $body:block) => {{
        let _boundary = $crate::ffi::panic::BoundaryGuard::enter();
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body)) {
            Ok(value) => value,
            Err(payload) => {
                $crate::ffi::error::set_last_error(&$crate::ffi::panic::panic_message(&*payload));
                $fallback
            }
        }
    }};
}

pub(crate) use ffi_panic_boundary;

/// A description of a caught panic, from its payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    let detail = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("keypool panicked (this is a bug in keypool): {detail}")
}

/// For tests of a host program's panic handling: makes keypool panic on purpose, where
/// a real bug would, and returns once the panic has been caught. `site` 0: inside this
/// call on the calling thread (returns `KEYPOOL_PANIC`, message in
/// `keypool_last_error()`). `site` 1: on one of `pool`'s worker threads, in the
/// completion of a request POSTed to the pool's base URL (returns `KEYPOOL_OK` once the
/// worker caught it and carries on; `KEYPOOL_TIMEOUT` if that took over 30 s). Either
/// way the panic message goes to the log callback (`keypool_set_log_callback`), never
/// to stderr. Other `site` values: `KEYPOOL_INVALID_ARGUMENT`.
///
/// `pool` may be NULL for `site` 0. Not for production use; thread-safe.
///
/// Declared in `capi/keypool_testing.h`, not in the release header (cbindgen.toml
/// excludes it): keep the two in step.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_test_panic(pool: *const super::pool::FfiPool, site: u32) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| match site {
            0 => panic!("keypool_test_panic: a deliberate panic on the calling thread"),
            1 => {
                let pool = super::arg_ref(pool, "pool")?;
                pool.panic_on_worker()
            }
            _ => Err(Failure::invalid(format!("site must be 0 or 1, got {site}"))),
        })())
    })
}
