//! State shared by the pool handle, the dispatcher and every worker.

use std::sync::atomic::AtomicU64;

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
    pub submitted: AtomicU64,
    pub completed: AtomicU64,
}

impl Shared {
    /// Tells the dispatcher to re-evaluate key health.
    pub(crate) fn nudge(&self) {
        let _ = self.events_tx.try_send(());
    }
}
