//! State shared by the pool handle, the dispatcher and every worker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Instant;

use crossbeam_channel::Sender;

use crate::config::Config;
use crate::job::Job;
use crate::key::KeyState;

pub(crate) struct Shared {
    pub config: Config,
    pub keys: Vec<KeyState>,
    /// Workers hand retries (and jobs bounced off a cooling key) back to the dispatcher
    /// here. Unbounded, so a worker never blocks on it: no retry can deadlock the pool.
    pub retry_tx: Sender<Job>,
    /// Workers nudge the dispatcher when a key's health changes (capacity 1, `try_send`).
    pub events_tx: Sender<()>,
    /// Whether any key has a `tpm` limit (then jobs carry a token estimate).
    pub any_tpm: bool,
    /// Workers may take the next queued request themselves when they free up and no
    /// usable worker anywhere is idle (not for round-robin, whose rotation only the
    /// dispatcher knows). In a saturated pool this skips the dispatcher's two hand-offs.
    pub self_serve: bool,
    /// The dispatcher is blocked until a worker goes idle: a worker that does so nudges.
    pub wants_idle: AtomicBool,
    /// The dispatcher is blocked placing a job (new or retry) until a worker frees up:
    /// workers must not take queued requests past it.
    pub dispatcher_waiting: AtomicBool,
    /// Shutdown has begun: workers take no more queued requests.
    pub closing: AtomicBool,
    pub submitted: AtomicU64,
    pub completed: AtomicU64,
}

impl Shared {
    /// Whether a worker of a key that is usable now is waiting for the dispatcher.
    pub(crate) fn any_usable_idle(&self, now: Instant) -> bool {
        self.keys
            .iter()
            .any(|k| k.idle.load(SeqCst) > 0 && !k.is_disabled() && k.cooling_until(now).is_none())
    }

    /// Tells the dispatcher to re-evaluate key health.
    pub(crate) fn nudge(&self) {
        let _ = self.events_tx.try_send(());
    }
}
