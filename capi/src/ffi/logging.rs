//! `keypool_set_log_callback`: keypool's log messages (and caught panics) handed to the
//! host program, and the panic hook that keeps keypool's panics off the host's stderr.

use std::cell::Cell;
use std::ffi::{c_char, c_void};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;

use super::error::{Failure, Status, finish, to_cstring};
use super::panic::{ffi_panic_boundary, in_ffi_boundary};
use crate::thread_role::on_pool_thread;

/// Log level of an error: a caught panic, a failure keypool cannot report otherwise.
pub const KEYPOOL_LOG_ERROR: u32 = 1;
/// Log level of a warning, e.g. a key disabled after HTTP 401/402/403.
pub const KEYPOOL_LOG_WARN: u32 = 2;
/// Log level of an informational message.
pub const KEYPOOL_LOG_INFO: u32 = 3;

/// A function receiving keypool's log messages, for `keypool_set_log_callback`.
///
/// `level` is `KEYPOOL_LOG_ERROR`, `KEYPOOL_LOG_WARN` or `KEYPOOL_LOG_INFO`; `message`
/// is a NUL-terminated UTF-8 line without a trailing newline, owned by the library and
/// valid only during the call (copy it to keep it); it never contains an API key.
/// `user_data` is the pointer given to `keypool_set_log_callback`. It may be called on
/// any thread, several at once, including keypool threads: it must be thread-safe and
/// quick, and must not call `keypool_set_log_callback`.
pub type LogCallback =
    Option<unsafe extern "C" fn(level: u32, message: *const c_char, user_data: *mut c_void)>;

#[derive(Clone, Copy)]
struct Sink {
    cb: unsafe extern "C" fn(u32, *const c_char, *mut c_void),
    user_data: *mut c_void,
}

// SAFETY: keypool never dereferences `user_data`; the header tells the caller the
// callback runs on any thread with it.
unsafe impl Send for Sink {}
// SAFETY: as above; the pair is only copied and passed back to the caller's function.
unsafe impl Sync for Sink {}

static SINK: RwLock<Option<Sink>> = RwLock::new(None);
/// Whether `log` records go to `FfiLogger` (false if the host installed its own logger).
static OUR_LOGGER: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Set while this thread runs the C log callback.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Hands one message to the C callback, if one is set. The read lock is held during the
/// call, so once `keypool_set_log_callback` returns the old callback is never called
/// again. A message logged from inside the callback itself is dropped.
fn emit(level: u32, msg: &str) {
    if IN_CALLBACK.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    let sink = SINK.read_recursive();
    let Some(sink) = *sink else {
        return;
    };
    let c = to_cstring(msg);
    let _ = IN_CALLBACK.try_with(|f| f.set(true));
    // SAFETY: the caller's function with the documented signature; `c` lives through
    // the call. A C function cannot unwind into us.
    unsafe { (sink.cb)(level, c.as_ptr(), sink.user_data) };
    let _ = IN_CALLBACK.try_with(|f| f.set(false));
}

/// Forwards `log` records (error, warn, info) from keypool to the C callback.
struct FfiLogger;

impl log::Log for FfiLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info && SINK.read_recursive().is_some()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => KEYPOOL_LOG_ERROR,
            log::Level::Warn => KEYPOOL_LOG_WARN,
            _ => KEYPOOL_LOG_INFO,
        };
        emit(level, &record.args().to_string());
    }

    fn flush(&self) {}
}

static LOGGER: FfiLogger = FfiLogger;

/// Installs, once per process, the panic hook of the C ABI: a panic on a keypool thread
/// or inside a C entry point (both are caught and reported as `KEYPOOL_PANIC`) is logged
/// with `log::error!` and handed to the C log callback, never printed to the host's
/// stderr. Panics of other threads go to the previous hook unchanged.
pub(crate) fn install_panic_hook() {
    static HOOK: Once = Once::new();
    if HOOK.is_completed() || std::thread::panicking() {
        return; // set_hook panics on a panicking thread: a later entry point installs it
    }
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !(on_pool_thread() || in_ffi_boundary()) {
                previous(info);
                return;
            }
            let payload = info.payload();
            let detail = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)");
            let thread = std::thread::current();
            let location = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = format!(
                "keypool: caught a panic on thread '{}'{location}: {detail}",
                thread.name().unwrap_or("<unnamed>")
            );
            log::error!("{msg}");
            if !OUR_LOGGER.load(Ordering::Relaxed) {
                emit(KEYPOOL_LOG_ERROR, &msg);
            }
        }));
    });
}

/// Sets the function that receives keypool's log messages: warnings (e.g. a key
/// disabled after HTTP 401) and errors, including every panic keypool caught (reported
/// as `KEYPOOL_PANIC`). keypool never writes to the host program's stdout or stderr;
/// without a log callback these messages are dropped. NULL `cb` removes the callback.
///
/// Process-wide: one callback for every pool. Once this returns, the previous callback
/// is no longer running and is never called again (so its `user_data` may be freed).
/// If the process already has a Rust `log` logger (a Rust host), keypool's `log`
/// records go to that logger instead and only caught panics reach `cb`.
///
/// Returns `KEYPOOL_OK`; `KEYPOOL_WOULD_DEADLOCK` (nothing changed) if called from
/// inside the log callback. Thread-safe; waits only for log calls in progress.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_set_log_callback(cb: LogCallback, user_data: *mut c_void) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            if IN_CALLBACK.try_with(Cell::get).unwrap_or(false) {
                return Err(Failure {
                    status: Status::KEYPOOL_WOULD_DEADLOCK,
                    message: "keypool_set_log_callback called from inside the log callback"
                        .to_owned(),
                });
            }
            if cb.is_some() && log::set_logger(&LOGGER).is_ok() {
                log::set_max_level(log::LevelFilter::Info);
                OUR_LOGGER.store(true, Ordering::Relaxed);
            }
            *SINK.write() = cb.map(|cb| Sink { cb, user_data });
            Ok(())
        })())
    })
}
