//! State shared by the pool handle, the dispatcher and every worker.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::Mutex;

use crate::config::Config;
use crate::deadline::Deadlines;
use crate::job::Job;
use crate::key::KeyState;

pub(crate) struct Shared {
    pub config: Config,
    pub keys: Vec<KeyState>,
    /// Workers hand retries (and jobs bounced off a cooling key) back to the dispatcher
    /// here. Unbounded, so a worker never blocks on it: no retry can deadlock the pool.
    /// Its size is bounded all the same: see `backlog`.
    pub retry_tx: Sender<Job>,
    /// Jobs handed back to the dispatcher and not yet placed again (in the retry
    /// channel, waiting out a backoff, or ready). While it is at `queue_capacity` the
    /// dispatcher takes no new requests, so the queue fills and `submit` blocks: memory
    /// stays bounded by configuration during a 5xx storm.
    pub backlog: AtomicUsize,
    /// Workers nudge the dispatcher when a key's health changes (capacity 1, `try_send`).
    pub events_tx: Sender<()>,
    /// Deadlines of queued requests, answered by the dispatcher wherever the job waits.
    pub deadlines: Deadlines,
    /// Masks every configured key (and base-URL password) in server-provided text on
    /// error paths; built once.
    pub masker: crate::body::Masker,
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
    /// Where blocking submits wait for queue space; every take from the intake calls
    /// its `took`.
    pub space: crate::queue_space::QueueSpace,
    /// Set if the dispatcher failed for good (repeated panics): every later request is
    /// refused with this message, every queued one answered with it.
    pub broken: Mutex<Option<String>>,
    /// Which keys serve which model (`None`: every key serves every model).
    pub router: Option<crate::routing::Router>,
    /// Jobs the dispatcher holds aside (none of their keys could take them while
    /// another key stood idle): workers take no queued request past them.
    pub aside: AtomicUsize,
    /// Verdicts on a model at a key (cooling upstream, not found at its base URL);
    /// also written by the shared limits' subscriber (verdicts of other processes).
    pub models: std::sync::Arc<crate::routing::ModelVerdicts>,
    /// The shared limits (`Config::shared`), for sharing model verdicts.
    pub limits: Option<std::sync::Arc<dyn crate::shared_limits::SharedLimits>>,
    /// The account groups' gates, in config order (each also held by its keys' gates).
    pub groups: Vec<std::sync::Arc<crate::group::GroupGate>>,
    /// The spend cap (`max_cost`) and the dollars spent.
    pub spend: crate::spend::Spend,
    pub submitted: AtomicU64,
    pub completed: AtomicU64,
    /// Test hook: the dispatcher panics while holding its next this-many jobs.
    #[cfg(test)]
    pub test_dispatcher_panics: std::sync::atomic::AtomicU32,
}

impl Shared {
    /// Whether a worker of a key that is usable now is waiting for the dispatcher.
    /// (A heuristic for who places the next request; admission is `Gate::try_admit`.)
    pub(crate) fn any_usable_idle(&self, now: Instant) -> bool {
        self.keys.iter().any(|k| k.gate.usable_idle(now))
    }

    /// Whether any group has a `tpm` limit (then jobs carry a token estimate).
    pub(crate) fn groups_tpm(&self) -> bool {
        self.config.groups.iter().any(|g| g.tpm.is_some())
    }

    /// Whether the retry backlog is full (see `backlog`).
    pub(crate) fn backlog_full(&self) -> bool {
        self.backlog.load(SeqCst) >= self.config.queue_capacity
    }

    /// Test hook (see `test_dispatcher_panics`).
    #[cfg(test)]
    pub(crate) fn test_maybe_panic(&self) {
        let left = &self.test_dispatcher_panics;
        if left
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("test: injected dispatcher panic");
        }
    }

    /// Called after every take from the intake queue (`intake`): wakes blocked
    /// submitters once the queue has drained to its low-water mark.
    #[inline]
    pub(crate) fn took_from(&self, intake: &crossbeam_channel::Receiver<Job>) {
        self.space.took(|| intake.len());
    }

    /// Shares a model cooldown (`model` at each of `keys` for `d`) with every process
    /// using those keys, when limits are shared (`Config::shared`); the caller has
    /// recorded it locally already.
    pub(crate) fn share_model_cooldown(&self, keys: &[usize], model: &str, d: Duration) {
        if let Some(l) = &self.limits {
            l.cool_model(keys, model, d);
        }
    }

    /// Tells the dispatcher to re-evaluate key health.
    pub(crate) fn nudge(&self) {
        let _ = self.events_tx.try_send(());
    }
}
