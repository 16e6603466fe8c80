//! Cancellation: a request given up by its caller ([`Ticket::cancel`](crate::Ticket::cancel),
//! a dropped [`ResponseStream`](crate::ResponseStream)) is answered
//! [`Error::Cancelled`](crate::Error::Cancelled) at once, wherever it is.
//!
//! Its reply lives in a [`Slot`](crate::deadline::Slot) shared by the job and the
//! caller's handle (the same slot the deadline registry answers). Cancelling takes the
//! reply: a job still waiting — in the queue, set aside, in a retry's backoff — is
//! dropped unsent by whoever takes it next, as a job whose deadline passed is. A job on
//! the wire has its connection shut down: the attempt's worker registers it here while
//! the attempt runs ([`on_wire`]), the TCP layer under ureq (or, for `https://`, the
//! TLS layer that drives its socket) attaches each connection the attempt uses
//! ([`attach`]), and the cancel shuts that socket down, which ends a blocked read or
//! write at once. The worker then settles the key neutrally (no cooldown, no strike:
//! the caller gave up, the key did nothing wrong) and is free for the next request.
//!
//! A connection can change hands between attempts (keep-alive): a socket remembers
//! which attempt uses it, taken under its own lock whenever an attempt attaches it or
//! the connection pool hands it out, and a cancel shuts it down only while it is still
//! that attempt's.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

/// What a cancellable attempt's request holds (its reply slot, in the engine's
/// `deadline.rs`): connections attach to it so that a cancel can shut them down.
pub(crate) trait Attempt: Send + Sync {
    /// Attempt `attempt` now uses `conn` (`claim` marks it so, under the request's
    /// lock). False if the request was cancelled: the attempt must stop.
    fn attach(&self, attempt: u64, conn: Weak<dyn Conn>, claim: &mut dyn FnMut(u64)) -> bool;
}

/// A connection a cancel can shut down.
pub(crate) trait Conn: Send + Sync {
    /// Shuts the connection down if attempt `attempt` is still the one using it.
    fn close_if_used_by(&self, attempt: u64);
}

thread_local! {
    /// The attempt this thread is running, if its request can be cancelled.
    static ATTEMPT: RefCell<Option<(u64, Arc<dyn Attempt>)>> = const { RefCell::new(None) };
}

/// Attempt numbers: never 0 (no attempt), never reused.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// Marks this thread's attempt for `slot` as on the wire until dropped.
#[must_use]
pub(crate) struct OnWire(());

impl Drop for OnWire {
    fn drop(&mut self) {
        ATTEMPT.with(|a| a.borrow_mut().take());
    }
}

/// Registers the attempt about to run on this thread (a job without a slot cannot be
/// cancelled: nothing to register).
pub(crate) fn on_wire(slot: Option<Arc<dyn Attempt>>) -> Option<OnWire> {
    let slot = slot?;
    let id = NEXT.fetch_add(1, Relaxed);
    ATTEMPT.with(|a| *a.borrow_mut() = Some((id, slot)));
    Some(OnWire(()))
}

/// The attempt running on this thread (0: none, or one that cannot be cancelled).
pub(crate) fn current() -> u64 {
    ATTEMPT.with(|a| a.borrow().as_ref().map_or(0, |(id, _)| *id))
}

/// Attaches `conn` to this thread's attempt, so a cancel can shut it down; `claim`
/// runs under the slot's lock and marks the connection as this attempt's. False if
/// the request was already cancelled: nothing more may be sent.
pub(crate) fn attach(conn: Weak<dyn Conn>, claim: impl FnOnce(u64)) -> bool {
    let mut claim = Some(claim);
    let mut claim = move |a: u64| {
        if let Some(c) = claim.take() {
            c(a);
        }
    };
    ATTEMPT.with(|a| match a.borrow().as_ref() {
        Some((id, slot)) => slot.attach(*id, conn, &mut claim),
        None => {
            claim(0);
            true
        }
    })
}
