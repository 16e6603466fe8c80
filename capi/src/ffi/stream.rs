//! `keypool_stream`: streamed responses (`"stream": true`) through the C ABI — a pull
//! form (`keypool_submit_stream` + `keypool_stream_next`) and a callback form
//! (`keypool_submit_stream_callback`).

use std::cell::UnsafeCell;
use std::ffi::{CString, c_char, c_void};
use std::ptr;
use std::time::Duration;

use super::error::{Failure, Status, finish, set_last_error};
use super::panic::ffi_panic_boundary;
use super::pool::{Callback, FfiPool, UserData, body_request};
use super::result::FfiResult;
use super::{arg_out, arg_ref, write_out};
use crate::{
    CancelHandle, DEFAULT_PATH, Error, ResponseStream, StreamChunk, StreamEvent, TimeoutPhase,
};

/// A streamed request's events, to pull with `keypool_stream_next` (C: `keypool_stream`).
///
/// Holds only receiving ends of channels: it stays valid after its pool is freed.
pub struct FfiStream {
    /// Used by one thread at a time (`keypool_stream_next`, the header's contract);
    /// in a cell so `keypool_stream_cancel` may run on another thread meanwhile,
    /// touching only `cancel`.
    stream: UnsafeCell<ResponseStream>,
    cancel: CancelHandle,
}

/// `keypool_stream_event_kind` of a chunk.
pub const KEYPOOL_STREAM_CHUNK: u32 = 1;
/// `keypool_stream_event_kind` of the final event (it carries the result).
pub const KEYPOOL_STREAM_DONE: u32 = 2;

/// One event of a stream (C: `keypool_stream_event`): a chunk, or the final result.
pub struct FfiStreamEvent {
    kind: u32,
    /// The chunk's JSON text, NUL-terminated (empty for the final event).
    json: CString,
    json_len: usize,
    /// The chunk's text delta, NUL-terminated (empty for the final event).
    delta: CString,
    delta_len: usize,
    result: Option<Box<FfiResult>>,
}

/// Bytes up to the first NUL (JSON text and deltas cannot hold one unescaped, but a
/// delta decoded from `\u0000` can): C sees a string that ends there.
fn c_text(s: &str) -> (CString, usize) {
    let bytes = s.as_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    (
        CString::new(&bytes[..end]).expect("no NUL before `end`"),
        end,
    )
}

impl FfiStreamEvent {
    fn chunk(c: &StreamChunk) -> FfiStreamEvent {
        let (json, json_len) = c_text(&c.json().to_string());
        let (delta, delta_len) = c_text(c.delta());
        FfiStreamEvent {
            kind: KEYPOOL_STREAM_CHUNK,
            json,
            json_len,
            delta,
            delta_len,
            result: None,
        }
    }

    fn done(result: FfiResult) -> FfiStreamEvent {
        FfiStreamEvent {
            kind: KEYPOOL_STREAM_DONE,
            json: CString::default(),
            json_len: 0,
            delta: CString::default(),
            delta_len: 0,
            result: Some(Box::new(result)),
        }
    }
}

/// Submits a streamed chat completion: POSTs `body_json` (a JSON object) to
/// `/chat/completions` with `"stream": true` and, unless the body sets it,
/// `"stream_options": {"include_usage": true}`. Blocks while the queue is full (from a
/// callback: `KEYPOOL_WOULD_DEADLOCK` instead).
///
/// Returns `KEYPOOL_OK` and stores a stream in `*out`; read its events with
/// `keypool_stream_next`. Errors as for `keypool_submit` (`KEYPOOL_INVALID_REQUEST` also
/// if the body is not a JSON object).
///
/// A stream holds one of its key's workers until it ends, so it counts against the
/// key's `max_concurrent`. It is retried on another key only while no chunk has been
/// handed over; after that a failure ends it with a `KEYPOOL_STREAM` result.
///
/// Ownership: the body is copied; the caller owns the stream (`keypool_stream_free`).
/// `*out` is written only on success. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_submit_stream(
    pool: *mut FfiPool,
    body_json: *const c_char,
    out: *mut *mut FfiStream,
) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            let pool = arg_ref(pool, "pool")?;
            arg_out(out, "out")?;
            let req = body_request(DEFAULT_PATH, body_json, "body_json")?;
            let stream = pool.pool.submit_stream(req)?;
            write_out(
                out,
                FfiStream {
                    cancel: stream.cancel_handle(),
                    stream: UnsafeCell::new(stream),
                },
            );
            Ok(())
        })())
    })
}

/// Waits at most `timeout_ms` milliseconds (0: just check; `UINT64_MAX`: as long as it
/// takes) for the stream's next event and stores it in `*out`.
///
/// Events come in order: every chunk (`KEYPOOL_STREAM_CHUNK`), then exactly one
/// `KEYPOOL_STREAM_DONE` carrying the result (`keypool_stream_event_result`).
/// Returns `KEYPOOL_OK` with an event; `KEYPOOL_TIMEOUT` if none arrived in time (the
/// stream stays valid); `KEYPOOL_CLOSED` once the final event has been taken;
/// `KEYPOOL_INVALID_ARGUMENT` if `stream` or `out` is NULL; `KEYPOOL_WOULD_DEADLOCK` from a
/// callback (keypool thread) when no event is ready and `timeout_ms` is not 0.
///
/// Ownership: the caller frees each event with `keypool_stream_event_free`. `*out` is
/// written only on `KEYPOOL_OK`. A stream must not be read from two threads at once
/// (`keypool_stream_cancel` may run meanwhile).
#[unsafe(no_mangle)]
pub extern "C" fn keypool_stream_next(
    stream: *mut FfiStream,
    timeout_ms: u64,
    out: *mut *mut FfiStreamEvent,
) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            let s = arg_ref(stream.cast_const(), "stream")?;
            arg_out(out, "out")?;
            // SAFETY: one thread reads a stream at a time (the contract above); a
            // concurrent `keypool_stream_cancel` reads only `s.cancel`.
            let s = unsafe { &mut *s.stream.get() };
            let timeout = (timeout_ms != u64::MAX).then(|| Duration::from_millis(timeout_ms));
            match s.next_timeout(timeout) {
                Ok(Some(StreamEvent::Chunk(c))) => {
                    write_out(out, FfiStreamEvent::chunk(&c));
                    Ok(())
                }
                Ok(Some(StreamEvent::Done(r))) => {
                    write_out(out, FfiStreamEvent::done(FfiResult::from_engine(r)));
                    Ok(())
                }
                Ok(None) => Err(Failure {
                    status: Status::KEYPOOL_CLOSED,
                    message: "the stream has ended: its final event was already taken".into(),
                }),
                Err(Error::Timeout {
                    phase: TimeoutPhase::Wait,
                    ..
                }) => Err(Failure::timeout(format!(
                    "no stream event after {timeout_ms} ms; the stream is still valid"
                ))),
                Err(e) => Err(e.into()),
            }
        })())
    })
}

/// Cancels the stream's request, as `keypool_ticket_cancel` does: waiting, it is never
/// sent; streaming, its connection is closed at once, its worker freed, its key not
/// blamed. The chunks already received can still be read; the final event then carries
/// a `KEYPOOL_CANCELLED` result. A cancel after the request ended is a no-op.
///
/// Returns true if this call ended the request; false if it had ended already (or
/// `stream` is NULL). Thread-safe: may be called from any thread, also while another
/// thread waits in `keypool_stream_next`; not after `keypool_stream_free`. Non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_stream_cancel(stream: *const FfiStream) -> bool {
    ffi_panic_boundary!(false, {
        match arg_ref(stream, "stream") {
            Ok(s) => s.cancel.cancel(),
            Err(f) => {
                set_last_error(&f.message);
                false
            }
        }
    })
}

/// Frees a stream. If it has not ended, the request is cancelled (see
/// `keypool_stream_cancel`): the connection is closed at once.
///
/// NULL is a no-op. Must not race other calls on the same stream. Non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_stream_free(stream: *mut FfiStream) {
    ffi_panic_boundary!((), {
        if !stream.is_null() {
            // SAFETY: `stream` came from `Box::into_raw` in this library (the contract).
            drop(unsafe { Box::from_raw(stream) });
        }
    })
}

fn event<'a>(e: *const FfiStreamEvent) -> Option<&'a FfiStreamEvent> {
    match arg_ref(e, "event") {
        Ok(e) => Some(e),
        Err(f) => {
            set_last_error(&f.message);
            None
        }
    }
}

/// One of an event's texts (chosen by `field`) with its length written to `*len` when
/// `len` is not NULL; NULL if `event_` is NULL.
fn text_out(
    event_: *const FfiStreamEvent,
    len: *mut usize,
    field: impl Fn(&FfiStreamEvent) -> (&CString, usize),
) -> *const c_char {
    let Some(e) = event(event_) else {
        return ptr::null();
    };
    let (text, n) = field(e);
    if !len.is_null() {
        // SAFETY: non-NULL, and the caller promises it is writable.
        unsafe { len.write(n) };
    }
    text.as_ptr()
}

/// `KEYPOOL_STREAM_CHUNK` (1) or `KEYPOOL_STREAM_DONE` (2); 0 if `event` is NULL.
/// Thread-safe (events are immutable), non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_stream_event_kind(event_: *const FfiStreamEvent) -> u32 {
    ffi_panic_boundary!(0, { event(event_).map_or(0, |e| e.kind) })
}

/// A chunk's text delta (every choice's `delta.content`, concatenated), NUL-terminated
/// UTF-8, with its length in bytes in `*len` if `len` is not NULL. Empty for role-only,
/// finish and usage chunks and for the final event. NULL if `event` is NULL.
///
/// Owned by the event: valid until `keypool_stream_event_free`.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_stream_event_delta(
    event_: *const FfiStreamEvent,
    len: *mut usize,
) -> *const c_char {
    ffi_panic_boundary!(ptr::null(), {
        text_out(event_, len, |e| (&e.delta, e.delta_len))
    })
}

/// A chunk's JSON (`chat.completion.chunk`) as NUL-terminated text, with its length in
/// `*len` if `len` is not NULL. Empty for the final event. NULL if `event` is NULL.
///
/// Owned by the event: valid until `keypool_stream_event_free`.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_stream_event_json(
    event_: *const FfiStreamEvent,
    len: *mut usize,
) -> *const c_char {
    ffi_panic_boundary!(ptr::null(), {
        text_out(event_, len, |e| (&e.json, e.json_len))
    })
}

/// The final event's result: the assembled `chat.completion` body (with usage) and
/// status `KEYPOOL_OK`, or the error that ended the stream (`KEYPOOL_STREAM`,
/// `KEYPOOL_HTTP`, `KEYPOOL_TIMEOUT`, …). Read it with the `keypool_result_*` accessors.
/// NULL for a chunk or if `event` is NULL.
///
/// Owned by the event: valid until `keypool_stream_event_free` (do not pass it to
/// `keypool_result_free`).
#[unsafe(no_mangle)]
pub extern "C" fn keypool_stream_event_result(event_: *const FfiStreamEvent) -> *const FfiResult {
    ffi_panic_boundary!(ptr::null(), {
        event(event_)
            .and_then(|e| e.result.as_deref())
            .map_or(ptr::null(), |r| r as *const FfiResult)
    })
}

/// Frees an event (and the result it holds). NULL is a no-op. Must not race other calls
/// on the same event.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_stream_event_free(event_: *mut FfiStreamEvent) {
    ffi_panic_boundary!((), {
        if !event_.is_null() {
            // SAFETY: `event_` came from `Box::into_raw` in this library (the contract).
            drop(unsafe { Box::from_raw(event_) });
        }
    })
}

/// A function the pool calls with each chunk of a stream, for
/// `keypool_submit_stream_callback`. Return `true` to go on, `false` to stop the stream
/// (it then ends with a `KEYPOOL_STREAM` result).
///
/// It runs on the keypool worker thread that reads the stream, once per chunk, in
/// order, before the next chunk is read — so keep it short. `chunk` is borrowed for the
/// call only (do not free it or keep it). It may call what a `keypool_callback` may
/// (see there): never anything that waits for the pool.
pub type ChunkCallback =
    Option<unsafe extern "C" fn(chunk: *const FfiStreamEvent, user_data: *mut c_void) -> bool>;

/// Submits a streamed chat completion (as `keypool_submit_stream`) whose chunks go to
/// `on_chunk` and whose final result goes to `on_done`, both with `user_data`.
///
/// If this returns `KEYPOOL_OK`, `on_chunk` runs for each chunk on the worker thread
/// reading the stream (see `keypool_chunk_callback`), then `on_done(result, user_data)`
/// exactly once on a keypool thread (see `keypool_callback`; it owns `result`). If it
/// returns anything else, neither is called. Errors as for `keypool_submit_stream`, plus
/// `KEYPOOL_INVALID_ARGUMENT` if a callback is NULL. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_submit_stream_callback(
    pool: *mut FfiPool,
    body_json: *const c_char,
    on_chunk: ChunkCallback,
    on_done: Callback,
    user_data: *mut c_void,
) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            let pool = arg_ref(pool, "pool")?;
            let on_chunk = on_chunk.ok_or_else(|| Failure::invalid("on_chunk is NULL"))?;
            let on_done = on_done.ok_or_else(|| Failure::invalid("on_done is NULL"))?;
            let req = body_request(DEFAULT_PATH, body_json, "body_json")?;
            let (ud_chunk, ud_done) = (UserData(user_data), UserData(user_data));
            pool.pool.submit_stream_with(
                req,
                move |c| {
                    let ev = FfiStreamEvent::chunk(c);
                    let ud = ud_chunk.ptr();
                    // SAFETY: the caller's function with the documented signature; a C
                    // function cannot unwind into us.
                    unsafe { on_chunk(&ev, ud) }
                },
                move |result| {
                    let ud = ud_done.get();
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
                    // SAFETY: as above; `r` is handed over to the callback.
                    unsafe { on_done(r, ud) };
                },
            )?;
            Ok(())
        })())
    })
}
