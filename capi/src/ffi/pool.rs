//! `keypool_pool`: creating, using and shutting down a pool.

use std::ffi::{c_char, c_void};
use std::ptr;
use std::time::{Duration, Instant};

use super::error::{Failure, Status, clear_last_error, finish, set_last_error, to_cstring};
use super::panic::ffi_panic_boundary;
use super::result::FfiResult;
use super::ticket::FfiTicket;
use super::{arg_out, arg_ref, arg_str, write_out};
use crate::thread_role::on_pool_thread;
use crate::{Config, DEFAULT_PATH, Error, Pool, Request, TimeoutPhase};

/// A pool of API keys (C: `keypool_pool`).
pub struct FfiPool {
    pub(super) pool: Pool,
}

/// A function the pool calls with a request's result, for `keypool_submit_callback`.
///
/// It receives ownership of `result` (free it with `keypool_result_free`) and the
/// `user_data` given at submit time. It runs on a keypool thread: the worker that
/// finished the request, or the pool's dispatcher thread (for a request it answers
/// without sending: cancelled at shutdown, deadline passed, no usable key) — never on
/// the thread that submitted it or that shuts the pool down. So it must be thread-safe and short (the worker serves no
/// other request meanwhile).
///
/// What a callback may call: it must never wait for a pool (once every worker waits in
/// a callback, nothing serves the queue), so on a keypool thread the calls that would
/// wait return `KEYPOOL_WOULD_DEADLOCK` at once instead: `keypool_submit`,
/// `keypool_submit_path` and `keypool_submit_callback` when the queue is full (with room
/// they succeed), `keypool_batch` (always), `keypool_ticket_wait` with a non-zero
/// timeout on a result not ready yet. Always allowed: `keypool_try_submit`,
/// `keypool_ticket_wait` with timeout 0 or on a ticket already answered,
/// `keypool_pool_stats_json`, the `keypool_result_*` accessors and frees, and
/// `keypool_pool_shutdown`, which from a callback starts the shutdown and returns
/// `KEYPOOL_WOULD_DEADLOCK` without waiting. It must not call `keypool_pool_free`.
pub type Callback = Option<unsafe extern "C" fn(result: *mut FfiResult, user_data: *mut c_void)>;

impl FfiPool {
    /// `keypool_test_panic(pool, 1)`: a request whose completion panics on a worker;
    /// returns once the worker has caught the panic (a guard dropped while unwinding).
    pub(crate) fn panic_on_worker(&self) -> Result<(), Failure> {
        struct Unwound(crossbeam_channel::Sender<()>);
        impl Drop for Unwound {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let req = Request::from_json(DEFAULT_PATH, r#"{"model": "keypool-test-panic"}"#)?;
        let guard = Unwound(tx);
        self.pool.submit_with(req, move |_| {
            let _guard = guard;
            panic!("keypool_test_panic: a deliberate panic on a worker thread");
        })?;
        rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
            Failure::timeout("keypool_test_panic: the worker did not panic within 30 s".to_owned())
        })
    }
}

/// The caller's `user_data`, carried to whichever thread runs the callback.
pub(super) struct UserData(pub(super) *mut c_void);

// SAFETY: keypool never dereferences the pointer; the header tells the caller it is
// handed to the callback on another thread.
unsafe impl Send for UserData {}

impl UserData {
    /// A method, so closures capture the whole `Send` wrapper (edition 2024 closures
    /// would otherwise capture the bare pointer field).
    pub(super) fn get(self) -> *mut c_void {
        self.0
    }

    /// The pointer, for a callback that runs more than once.
    pub(super) fn ptr(&self) -> *mut c_void {
        self.0
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Block,
    Try,
}

pub(super) fn body_request(
    path: &str,
    body: *const c_char,
    what: impl std::fmt::Display,
) -> Result<Request, Failure> {
    let body = arg_str(body, what)?;
    Ok(Request::from_json(path, body)?)
}

fn submit_ticket(
    pool: *const FfiPool,
    path: &str,
    body: *const c_char,
    out: *mut *mut FfiTicket,
    mode: Mode,
) -> Result<(), Failure> {
    let pool = arg_ref(pool, "pool")?;
    arg_out(out, "out")?;
    let req = body_request(path, body, "body_json")?;
    let ticket = match mode {
        Mode::Block => pool.pool.submit(req),
        Mode::Try => pool.pool.try_submit(req).map_err(crate::Error::from),
    }?;
    write_out(out, FfiTicket::new(ticket));
    Ok(())
}

/// Creates a pool from a JSON config (the same fields as the Rust `Config` and the CLI),
/// e.g. `{"base_url": "https://openrouter.ai/api/v1", "keys": [{"key": "sk-…",
/// "label": "acct-a", "max_concurrent": 4}]}`. Starts the worker threads.
///
/// Returns `KEYPOOL_OK` and stores the pool in `*out`; `KEYPOOL_CONFIG` if the config is
/// rejected (the message names the field and never quotes a key);
/// `KEYPOOL_INVALID_ARGUMENT` if `config_json` or `out` is NULL or the config is not
/// UTF-8. `*out` is written only on success.
///
/// Ownership: the string is copied; the caller owns the pool and frees it with
/// `keypool_pool_free`. Thread-safe, non-blocking (apart from starting threads).
#[unsafe(no_mangle)]
pub extern "C" fn keypool_pool_new(config_json: *const c_char, out: *mut *mut FfiPool) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            arg_out(out, "out")?;
            let config = Config::from_json(arg_str(config_json, "config_json")?)?;
            let pool = Pool::new(config)?;
            write_out(out, FfiPool { pool });
            Ok(())
        })())
    })
}

/// Shuts the pool down: stops taking requests (later submits return `KEYPOOL_CLOSED`),
/// answers every queued request `KEYPOOL_CANCELLED`, lets in-flight requests finish and
/// waits at most `timeout_ms` for every thread to exit (`UINT64_MAX`: as long as it
/// takes).
///
/// Returns `KEYPOOL_OK` once every thread has exited, `KEYPOOL_TIMEOUT` if some are still
/// finishing in-flight requests (they go on in the background). Idempotent: calling it
/// again returns `KEYPOOL_OK` (or `KEYPOOL_TIMEOUT` again while threads are still running),
/// never `KEYPOOL_CLOSED`, so a timed-out shutdown can simply be retried.
///
/// The pool handle stays valid; free it with `keypool_pool_free`. `pool` NULL:
/// `KEYPOOL_INVALID_ARGUMENT`. Thread-safe. Blocks up to `timeout_ms`. Callbacks of
/// cancelled requests run on the pool's dispatcher thread, not the calling thread.
///
/// From a callback (on a keypool thread) it cannot wait (a thread cannot wait for
/// itself to exit): it starts the shutdown as above and returns
/// `KEYPOOL_WOULD_DEADLOCK` at once; the threads exit on their own when their in-flight
/// requests finish, and a later `keypool_pool_shutdown` or `keypool_pool_free` on another
/// thread waits for them.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_pool_shutdown(pool: *mut FfiPool, timeout_ms: u64) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            let pool = arg_ref(pool, "pool")?;
            if on_pool_thread() {
                pool.pool.close(); // starts the shutdown; never waits on a keypool thread
                return Err(Failure {
                    status: Status::KEYPOOL_WOULD_DEADLOCK,
                    message: "keypool_pool_shutdown from a keypool thread (inside a callback): the shutdown has started (no new requests, queued ones are cancelled) but this thread cannot wait for the pool's threads; they exit when their in-flight requests finish — call keypool_pool_shutdown or keypool_pool_free on another thread to wait".to_owned(),
                });
            }
            let timeout = Duration::from_millis(timeout_ms);
            if Instant::now().checked_add(timeout).is_none() {
                pool.pool.close();
                return Ok(());
            }
            match pool.pool.close_timeout(timeout) {
                Ok(()) => Ok(()),
                Err(Error::Timeout {
                    phase: TimeoutPhase::Shutdown,
                    ..
                }) => Err(Failure::timeout(format!(
                    "shutdown: threads still finishing in-flight requests after {timeout_ms} ms; call keypool_pool_shutdown again to keep waiting"
                ))),
                Err(e) => Err(e.into()),
            }
        })())
    })
}

/// Frees a pool. If it is still running, shuts it down first, as
/// `keypool_pool_shutdown(pool, UINT64_MAX)` does: queued requests are answered
/// `KEYPOOL_CANCELLED`, in-flight ones finish (bounded by the config's `timeout_ms`), so
/// every outstanding ticket and callback gets its result. Tickets stay valid after their
/// pool is freed.
///
/// NULL is a no-op. Must be called once, and must not race any other call on the same
/// pool (every other pool function may be called from any thread at once). Must not be
/// called from a callback. Blocks until the threads have exited; call
/// `keypool_pool_shutdown` with a timeout first to bound the wait.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_pool_free(pool: *mut FfiPool) {
    ffi_panic_boundary!((), {
        if !pool.is_null() {
            // SAFETY: `pool` came from `Box::into_raw` in `keypool_pool_new` (the contract).
            let pool = unsafe { Box::from_raw(pool) };
            pool.pool.close();
        }
    })
}

/// Submits a chat completion: POSTs `body_json` to `/chat/completions` under the key's
/// base URL. Blocks while the queue is full (use `keypool_try_submit` not to) — except
/// from a callback, where a full queue gives `KEYPOOL_WOULD_DEADLOCK` at once.
///
/// Returns `KEYPOOL_OK` and stores a ticket in `*out`; `KEYPOOL_INVALID_REQUEST` if the
/// body is not valid JSON; `KEYPOOL_CLOSED` if the pool was shut down;
/// `KEYPOOL_INVALID_ARGUMENT` for a NULL argument or a body that is not UTF-8;
/// `KEYPOOL_WOULD_DEADLOCK` if called from a callback with the queue full.
///
/// Ownership: the body is copied; the caller owns the ticket (`keypool_ticket_free`).
/// `*out` is written only on success. Thread-safe: any number of threads may submit to
/// one pool at once.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_submit(
    pool: *mut FfiPool,
    body_json: *const c_char,
    out: *mut *mut FfiTicket,
) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish(submit_ticket(
            pool,
            DEFAULT_PATH,
            body_json,
            out,
            Mode::Block,
        ))
    })
}

/// Like `keypool_submit`, POSTing to `path` (e.g. "/embeddings") under the key's base
/// URL. The path must start with '/' and contain no spaces or control characters
/// (`KEYPOOL_INVALID_REQUEST` otherwise).
///
/// Ownership, NULL handling, thread-safety and blocking as for `keypool_submit`.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_submit_path(
    pool: *mut FfiPool,
    path: *const c_char,
    body_json: *const c_char,
    out: *mut *mut FfiTicket,
) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            arg_ref(pool, "pool")?;
            let path = arg_str(path, "path")?;
            submit_ticket(pool, path, body_json, out, Mode::Block)
        })())
    })
}

/// Like `keypool_submit` but never blocks: returns `KEYPOOL_BUSY` if the queue is full.
///
/// Ownership, NULL handling and thread-safety as for `keypool_submit`.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_try_submit(
    pool: *mut FfiPool,
    body_json: *const c_char,
    out: *mut *mut FfiTicket,
) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish(submit_ticket(pool, DEFAULT_PATH, body_json, out, Mode::Try))
    })
}

/// Submits a chat completion (to `/chat/completions`) whose result is handed to `cb`
/// instead of a ticket. Blocks while the queue is full (from a callback: returns
/// `KEYPOOL_WOULD_DEADLOCK` instead, see `keypool_callback`).
///
/// If this returns `KEYPOOL_OK`, `cb(result, user_data)` is called exactly once — on a
/// keypool thread (see `keypool_callback`), possibly before this call returns — and
/// owns `result` (it must call `keypool_result_free`). If this returns anything else,
/// `cb` is never called. Errors as for `keypool_submit`, plus `KEYPOOL_INVALID_ARGUMENT`
/// if `cb` is NULL.
///
/// `user_data` is passed through untouched (it may be NULL). Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_submit_callback(
    pool: *mut FfiPool,
    body_json: *const c_char,
    cb: Callback,
    user_data: *mut c_void,
) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            let pool = arg_ref(pool, "pool")?;
            let cb = cb.ok_or_else(|| Failure::invalid("cb is NULL"))?;
            let req = body_request(DEFAULT_PATH, body_json, "body_json")?;
            let user_data = UserData(user_data);
            pool.pool.submit_with(req, move |result| {
                let user_data = user_data.get();
                // Never unwind through the engine's thread or the caller of shutdown: if
                // building the result panics, the callback gets a KEYPOOL_PANIC result.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    FfiResult::from_engine(result)
                }))
                .unwrap_or_else(|p| {
                    FfiResult::failure(Failure {
                        status: Status::KEYPOOL_PANIC,
                        message: super::panic::panic_message(&*p),
                    })
                });
                let r = Box::into_raw(Box::new(r));
                // SAFETY: `cb` is the caller's function with the documented signature; a
                // C function cannot unwind into us.
                unsafe { cb(r, user_data) };
            })?;
            Ok(())
        })())
    })
}

/// Sends `n` chat completions (each `bodies[i]` POSTed to `/chat/completions`) and stores
/// their `n` results in `out_results[0..n]`, in input order. Blocks until every request
/// has been answered (each is bounded by the config's `timeout_ms`/`deadline_ms`).
///
/// A bad body does not fail the batch: a NULL or non-UTF-8 `bodies[i]` gives a result
/// with status `KEYPOOL_INVALID_ARGUMENT` at `i`, one that is not JSON
/// `KEYPOOL_INVALID_REQUEST`; a body refused because the pool shut down during the batch
/// gives `KEYPOOL_CLOSED` at `i`. Returns `KEYPOOL_OK` when `out_results` was filled
/// (check each result's status), `KEYPOOL_CLOSED` if the pool was shut down,
/// `KEYPOOL_INVALID_ARGUMENT` if `pool`, `bodies` or `out_results` is NULL,
/// `KEYPOOL_WOULD_DEADLOCK` (nothing sent) if called from a callback. `n == 0` returns
/// `KEYPOOL_OK` at once (`bodies` and `out_results` may then be NULL).
///
/// Ownership: `out_results` is a caller-provided array of `n` pointers, written only on
/// success; the caller owns and frees each result with `keypool_result_free`. Bodies are
/// copied. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_batch(
    pool: *mut FfiPool,
    bodies: *const *const c_char,
    n: usize,
    out_results: *mut *mut FfiResult,
) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            let pool = arg_ref(pool, "pool")?;
            if n == 0 {
                return Ok(());
            }
            if bodies.is_null() {
                return Err(Failure::invalid("bodies is NULL"));
            }
            arg_out(out_results, "out_results")?;
            if n > isize::MAX as usize / size_of::<*const c_char>() {
                return Err(Failure::invalid(format!("n is too large: {n}")));
            }
            if pool.pool.is_closed() {
                return Err(Error::Closed.into());
            }
            if on_pool_thread() {
                return Err(Error::WouldDeadlock("keypool_batch").into());
            }
            // SAFETY: non-NULL, and the caller promises `n` readable pointers.
            let bodies = unsafe { std::slice::from_raw_parts(bodies, n) };
            // Through `Pool::batch` (results in one shared sink, the caller woken once per
            // `queue_capacity / 8` completions while the queue is full, not once per
            // request): each body is parsed as the batch takes it; a bad one is set
            // aside with its index and never reaches the pool.
            let mut bad: Vec<(usize, Failure)> = Vec::new();
            let engine =
                pool.pool.batch(bodies.iter().enumerate().filter_map(
                    |(i, &b)| match body_request(DEFAULT_PATH, b, format_args!("bodies[{i}]")) {
                        Ok(req) => Some(req),
                        Err(mut f) => {
                            if f.status == Status::KEYPOOL_INVALID_REQUEST {
                                f.message = format!("bodies[{i}]: {}", f.message);
                            }
                            bad.push((i, f));
                            None
                        }
                    },
                ));
            let mut engine = engine.into_iter();
            let mut bad = bad.into_iter().peekable();
            let results: Vec<*mut FfiResult> = (0..n)
                .map(|i| {
                    let r = match bad.next_if(|(j, _)| *j == i) {
                        Some((_, f)) => FfiResult::failure(f),
                        // `Pool::batch` answers every request it took, so this always
                        // has one; were it short, a failure, never a missing result.
                        None => engine.next().map_or_else(
                            || {
                                FfiResult::failure(Failure {
                                    status: Status::KEYPOOL_PANIC,
                                    message: "keypool_batch: no result from the engine".into(),
                                })
                            },
                            FfiResult::from_engine,
                        ),
                    };
                    Box::into_raw(Box::new(r))
                })
                .collect();
            // SAFETY: non-NULL, and the caller promises room for `n` pointers.
            unsafe { ptr::copy_nonoverlapping(results.as_ptr(), out_results, n) };
            Ok(())
        })())
    })
}

/// A JSON snapshot of the pool's counters: `{"submitted", "completed", "queued",
/// "keys": [{"label", "max_concurrent", "in_flight", "max_in_flight", "sent",
/// "succeeded", "failed", "failures": {…}, "latency_p50_ms", …}]}`. Holds labels,
/// never keys. Works on a shut-down pool too.
///
/// Ownership: the caller frees the string with `keypool_string_free`. `pool` NULL:
/// returns NULL and sets `keypool_last_error()`. Thread-safe, non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_pool_stats_json(pool: *const FfiPool) -> *mut c_char {
    ffi_panic_boundary!(ptr::null_mut(), {
        match arg_ref(pool, "pool") {
            Ok(pool) => {
                clear_last_error();
                to_cstring(&pool.pool.stats().to_json()).into_raw()
            }
            Err(f) => {
                set_last_error(&f.message);
                ptr::null_mut()
            }
        }
    })
}
