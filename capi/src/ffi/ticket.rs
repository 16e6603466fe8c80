//! `keypool_ticket`: a handle on one submitted request's result.

use std::time::Duration;

use super::error::{Failure, Status, finish};
use super::panic::ffi_panic_boundary;
use super::result::FfiResult;
use super::{arg_mut, arg_out, write_out};
use crate::{Error, Ticket, TimeoutPhase};

/// A submitted request's result, to wait for (C: `keypool_ticket`).
///
/// Holds only the receiving end of a channel, so it stays valid after its pool is freed
/// (the pool answers every queued request `KEYPOOL_CANCELLED` when it shuts down).
pub struct FfiTicket {
    pub(crate) ticket: Ticket,
}

/// Waits at most `timeout_ms` milliseconds for the request's result (0: just check;
/// `UINT64_MAX`: wait as long as it takes).
///
/// Returns `KEYPOOL_OK` and stores a new result in `*out` when the request has ended —
/// whether it succeeded or not: ask `keypool_result_status(*out)`. A ticket of a pool that
/// was shut down or freed yields its result too (`KEYPOOL_CANCELLED` if it was never sent).
/// Returns `KEYPOOL_TIMEOUT` if the result is not ready yet: the ticket stays valid, wait
/// again. Returns `KEYPOOL_INVALID_ARGUMENT` if `t` or `out` is NULL or the result was
/// already taken by an earlier wait.
///
/// From a callback (on a keypool thread) it never waits: with `timeout_ms` 0 it checks
/// as usual; with any other timeout it returns the result if it is ready and
/// `KEYPOOL_WOULD_DEADLOCK` at once if not (the ticket stays valid).
///
/// Ownership: the caller owns `*out` and frees it with `keypool_result_free`; the ticket
/// still has to be freed with `keypool_ticket_free`. `*out` is written only on
/// `KEYPOOL_OK`. Blocks up to `timeout_ms`. A ticket must not be used from two threads
/// at once; different tickets may be waited on from different threads.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_ticket_wait(
    t: *mut FfiTicket,
    timeout_ms: u64,
    out: *mut *mut FfiResult,
) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            let t = arg_mut(t, "ticket")?;
            arg_out(out, "out")?;
            if t.ticket.is_taken() {
                return Err(Failure::invalid(
                    "the ticket's result was already taken by an earlier keypool_ticket_wait",
                ));
            }
            match t.ticket.wait_timeout(Duration::from_millis(timeout_ms)) {
                Err(Error::Timeout {
                    phase: TimeoutPhase::Wait,
                    ..
                }) => Err(Failure::timeout(format!(
                    "the result is not ready after {timeout_ms} ms; the ticket is still valid"
                ))),
                Err(e @ Error::WouldDeadlock(_)) => Err(Failure {
                    status: Status::KEYPOOL_WOULD_DEADLOCK,
                    message: format!(
                        "keypool_ticket_wait: {e}; the result is not ready and the ticket is still valid (timeout_ms 0 only checks)"
                    ),
                }),
                Err(Error::ResultTaken) => Err(Failure::invalid(
                    "the ticket's result was already taken by an earlier keypool_ticket_wait",
                )),
                result => {
                    write_out(out, FfiResult::from_engine(result));
                    Ok(())
                }
            }
        })())
    })
}

/// Frees a ticket. Freeing does not cancel the request: it still runs, and its result
/// is discarded.
///
/// NULL is a no-op. Must not race other calls on the same ticket. Non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_ticket_free(t: *mut FfiTicket) {
    ffi_panic_boundary!((), {
        if !t.is_null() {
            // SAFETY: `t` came from `Box::into_raw` in this library (the contract).
            drop(unsafe { Box::from_raw(t) });
        }
    })
}
