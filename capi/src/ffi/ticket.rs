//! `keypool_ticket`: a handle on one submitted request's result.

use std::cell::UnsafeCell;
use std::time::Duration;

use super::error::{Failure, Status, finish, set_last_error};
use super::panic::ffi_panic_boundary;
use super::result::FfiResult;
use super::{arg_out, arg_ref, write_out};
use crate::{CancelHandle, Error, Ticket, TimeoutPhase};

/// A submitted request's result, to wait for (C: `keypool_ticket`).
///
/// Holds only the receiving end of a channel, so it stays valid after its pool is freed
/// (the pool answers every queued request `KEYPOOL_CANCELLED` when it shuts down).
pub struct FfiTicket {
    /// Used by one thread at a time (`keypool_ticket_wait`, the header's contract);
    /// in a cell so `keypool_ticket_cancel` may run on another thread meanwhile,
    /// touching only `cancel`.
    ticket: UnsafeCell<Ticket>,
    cancel: CancelHandle,
}

impl FfiTicket {
    pub(crate) fn new(ticket: Ticket) -> FfiTicket {
        FfiTicket {
            cancel: ticket.cancel_handle(),
            ticket: UnsafeCell::new(ticket),
        }
    }
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
/// `KEYPOOL_OK`. Blocks up to `timeout_ms`. A ticket must not be waited on from two
/// threads at once (`keypool_ticket_cancel` may run meanwhile); different tickets may be
/// waited on from different threads.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_ticket_wait(
    t: *mut FfiTicket,
    timeout_ms: u64,
    out: *mut *mut FfiResult,
) -> Status {
    ffi_panic_boundary!(Status::KEYPOOL_PANIC, {
        finish((|| {
            let t = arg_ref(t.cast_const(), "ticket")?;
            arg_out(out, "out")?;
            // SAFETY: one thread waits on a ticket at a time (the contract above); a
            // concurrent `keypool_ticket_cancel` reads only `t.cancel`.
            let ticket = unsafe { &mut *t.ticket.get() };
            if ticket.is_taken() {
                return Err(Failure::invalid(
                    "the ticket's result was already taken by an earlier keypool_ticket_wait",
                ));
            }
            match ticket.wait_timeout(Duration::from_millis(timeout_ms)) {
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

/// Cancels the ticket's request: it is answered `KEYPOOL_CANCELLED` at once, wherever
/// it is. A request still waiting (in the queue, or for a retry) is never sent; one on
/// the wire has its connection closed, its worker freed for the next request and its
/// key not blamed (no cooldown, nothing disabled). The ticket still yields exactly one
/// result: `keypool_ticket_wait` returns it (`KEYPOOL_CANCELLED` if the cancel came
/// first). A cancel after the request ended is a no-op.
///
/// Returns true if this call ended the request; false if it had ended already (or `t`
/// is NULL). Thread-safe: may be called from any thread, also while another thread
/// waits on the ticket in `keypool_ticket_wait`, and from a callback; not after
/// `keypool_ticket_free`. Non-blocking.
#[unsafe(no_mangle)]
pub extern "C" fn keypool_ticket_cancel(t: *const FfiTicket) -> bool {
    ffi_panic_boundary!(false, {
        match arg_ref(t, "ticket") {
            Ok(t) => t.cancel.cancel(),
            Err(f) => {
                set_last_error(&f.message);
                false
            }
        }
    })
}

/// Frees a ticket. Freeing does not cancel the request (`keypool_ticket_cancel` does):
/// it still runs, and its result is discarded.
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
