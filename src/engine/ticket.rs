//! One-shot result delivery: the internal [`Reply`] every job carries, and the public
//! [`Ticket`] a caller waits on.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};

use crate::deadline::Slot;
use crate::error::{Error, TimeoutPhase};
use crate::request::Response;
use crate::thread_role::on_pool_thread;

/// The result type every request ends in.
pub type RequestResult = Result<Response, Error>;

type Callback = Box<dyn FnOnce(RequestResult) + Send>;

/// Where a job's result goes. Delivered exactly once: by [`Reply::send`], or — if the
/// job is dropped anywhere without an answer (shutdown, a channel torn down, a panic) —
/// by `Drop`, with [`Error::Cancelled`]. This is the "no ticket left hanging" guarantee.
pub(crate) struct Reply {
    callback: Option<Callback>,
}

impl Reply {
    pub(crate) fn new(f: impl FnOnce(RequestResult) + Send + 'static) -> Reply {
        Reply {
            callback: Some(Box::new(f)),
        }
    }

    /// Delivers the result. A panicking user callback is caught and logged: it must
    /// not take down the keypool thread that runs it (a worker or the dispatcher).
    pub(crate) fn send(mut self, result: RequestResult) {
        if let Some(f) = self.callback.take() {
            call(f, result);
        }
    }

    /// Disarms the reply without delivering anything: used when `submit` itself fails
    /// and reports the error to the caller directly.
    pub(crate) fn defuse(mut self) {
        self.callback = None;
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(f) = self.callback.take() {
            call(f, Err(Error::Cancelled));
        }
    }
}

fn call(f: Callback, result: RequestResult) {
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(result))) {
        log::error!(
            "keypool: a completion callback panicked: {}",
            crate::worker::panic_message(&p)
        );
    }
}

/// A handle on one submitted request's result.
///
/// Every ticket is answered exactly once — with the response, an error, or
/// [`Error::Cancelled`] if the request was cancelled ([`Ticket::cancel`]) or the pool
/// shut down before it was sent. Dropping a ticket does not cancel the request; its
/// result is discarded.
#[derive(Debug)]
pub struct Ticket {
    rx: Receiver<RequestResult>,
    taken: bool,
    cancel: CancelHandle,
}

/// Cancels one request from any thread: a clonable handle from
/// [`Ticket::cancel_handle`] or [`ResponseStream::cancel_handle`](crate::ResponseStream::cancel_handle),
/// for cancelling while another thread waits on the ticket.
///
/// See [`Ticket::cancel`] for what a cancel does.
#[derive(Clone)]
pub struct CancelHandle {
    slot: Arc<Slot>,
}

impl std::fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelHandle")
            .field("answered", &self.slot.is_answered())
            .finish()
    }
}

impl CancelHandle {
    pub(crate) fn new(slot: Arc<Slot>) -> CancelHandle {
        CancelHandle { slot }
    }

    /// Cancels the request (see [`Ticket::cancel`]). True if this call ended it; false
    /// if it had already ended (answered, or cancelled before): then nothing happens.
    pub fn cancel(&self) -> bool {
        self.slot.cancel()
    }
}

impl Ticket {
    pub(crate) fn new(rx: Receiver<RequestResult>, cancel: CancelHandle) -> Ticket {
        Ticket {
            rx,
            taken: false,
            cancel,
        }
    }

    /// Cancels the request: it is answered [`Error::Cancelled`] at once, wherever it is.
    ///
    /// - Still waiting — in the queue, set aside by the dispatcher, or waiting for a
    ///   retry — it is never sent (it leaves the queue when the dispatcher next reaches
    ///   it, unsent).
    /// - On the wire, its connection is shut down: the worker stops reading at once and
    ///   is free for the next request. The key is not blamed (no cooldown, no strike).
    ///   With a custom [`Transport`](crate::Transport) the attempt runs to its end, and
    ///   its outcome is discarded.
    /// - Already answered: nothing happens.
    ///
    /// Returns true if this call ended the request. Either way the ticket still yields
    /// exactly one result ([`wait`](Ticket::wait)): `Cancelled` if the cancel came
    /// first. Never blocks; callable from a completion callback. To cancel from another
    /// thread while this one waits, use a [`cancel_handle`](Ticket::cancel_handle).
    ///
    /// ```
    /// # let server = keypool_mock::MockServer::start(keypool_mock::MockConfig::default()).unwrap();
    /// # let pool = keypool::Pool::new(keypool::Config::builder().base_url(server.url()).key("sk-a", 1).build()?)?;
    /// use keypool::{Error, Request};
    /// // A request the server answers after 30 s.
    /// let slow = Request::from_json("/chat/completions", r#"{"model": "m", "mock": {"delay_ms": 30000}}"#)?;
    /// let ticket = pool.submit(slow)?;
    /// std::thread::sleep(std::time::Duration::from_millis(50)); // on the wire by now
    /// assert!(ticket.cancel());
    /// assert!(matches!(ticket.wait(), Err(Error::Cancelled)));
    /// # Ok::<(), keypool::Error>(())
    /// ```
    pub fn cancel(&self) -> bool {
        self.cancel.cancel()
    }

    /// A handle that cancels this ticket's request from any thread ([`Ticket::cancel`]).
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Blocks until the result is ready.
    ///
    /// On a keypool thread (inside a completion callback) it never blocks: it returns the
    /// result if it is ready, otherwise [`Error::WouldDeadlock`] (the ticket is consumed;
    /// the request still runs and its result is discarded). Use
    /// [`try_wait`](Ticket::try_wait) there.
    pub fn wait(mut self) -> RequestResult {
        if self.taken {
            return Err(Error::ResultTaken);
        }
        if on_pool_thread() {
            return self
                .try_wait()
                .unwrap_or(Err(Error::WouldDeadlock("waiting for a ticket's result")));
        }
        self.taken = true;
        // A disconnected sender without a value cannot happen (Reply's Drop answers),
        // but a result is still owed: call it what it is.
        self.rx.recv().unwrap_or(Err(Error::Cancelled))
    }

    /// Waits at most `timeout`. If the result is not ready yet, returns
    /// `Err(Error::Timeout { phase: TimeoutPhase::Wait, .. })` and the ticket stays valid.
    ///
    /// On a keypool thread (inside a completion callback) it never waits: a result not
    /// ready yet gives [`Error::WouldDeadlock`] (or the `Wait` timeout if `timeout` is
    /// zero), and the ticket stays valid.
    pub fn wait_timeout(&mut self, timeout: Duration) -> RequestResult {
        if self.taken {
            return Err(Error::ResultTaken);
        }
        if !timeout.is_zero() && on_pool_thread() {
            return self
                .try_wait()
                .unwrap_or(Err(Error::WouldDeadlock("waiting for a ticket's result")));
        }
        match self.rx.recv_timeout(timeout) {
            Ok(r) => {
                self.taken = true;
                r
            }
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout {
                phase: TimeoutPhase::Wait,
                key: None,
                attempts: 0,
            }),
            Err(RecvTimeoutError::Disconnected) => {
                self.taken = true;
                Err(Error::Cancelled)
            }
        }
    }

    /// Returns the result if it is ready, `None` if not (or if it was already taken).
    pub fn try_wait(&mut self) -> Option<RequestResult> {
        if self.taken {
            return None;
        }
        match self.rx.try_recv() {
            Ok(r) => {
                self.taken = true;
                Some(r)
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.taken = true;
                Some(Err(Error::Cancelled))
            }
        }
    }

    /// Whether the result has been taken out of this ticket.
    pub fn is_taken(&self) -> bool {
        self.taken
    }
}
