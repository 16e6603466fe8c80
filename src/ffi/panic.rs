//! The panic boundary every exported function runs inside: a Rust panic must never
//! unwind into C. It becomes `KEYPOOL_PANIC` (or the function's "bad input" value, such
//! as NULL) with the panic message in `keypool_last_error()`.

use std::any::Any;

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
    ($fallback:expr, $body:block) => {
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body)) {
            Ok(value) => value,
            Err(payload) => {
                $crate::ffi::error::set_last_error(&$crate::ffi::panic::panic_message(&*payload));
                $fallback
            }
        }
    };
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
