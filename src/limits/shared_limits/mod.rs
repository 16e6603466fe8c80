//! Per-key limits shared by many processes (issue 13): `max_concurrent`, `rpm`, `tpm`,
//! cooldowns and disabled keys — and the same for each key's group (account):
//! `max_concurrent`, `rpm`, `tpm` and cooldown — kept in Redis so several pools —
//! threads, processes or hosts — that use the same keys respect one budget together.
//!
//! The local [`Gate`](crate::admission::Gate) still decides first (idle worker, local
//! cooldown, trial, local budget); when it would admit, it asks its [`KeyLink`] once —
//! one atomic Redis script that drops expired leases, checks the shared disabled flag,
//! cooldown, concurrency and rate budget, and takes a lease and the budget only if all
//! pass. `Gate::complete` hands the lease back, with the attempt's cooldown or disable
//! verdict, in a second script. Nothing here is polled: see `redis.rs` for the lease
//! renewer and the release subscriber.
//!
//! The configuration type is `api::shared_config`. Without the `redis` cargo feature
//! nothing here runs, and a config that sets `shared` is rejected by validation with a
//! message saying so.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::KeyVerdict;
use crate::error::Error;

#[cfg(feature = "redis")]
mod redis;

/// The shared store's answer to one admission.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) enum SharedAdmit {
    /// Admitted: a lease (or a local fallback slot) and the budget are taken. The
    /// lease's number in this pool (never 0), for its release and refund.
    Yes(u64),
    /// Every shared slot of the key is taken, or its shared budget is spent: ask again at
    /// this instant at the latest (a release elsewhere nudges the dispatcher earlier).
    WakeAt(Instant),
    /// The key cools down everywhere until this instant (a 429 seen by some process).
    Cooling(Instant),
    /// The key's group (account) cools down everywhere until this instant (a 429 some
    /// process attributed to the account).
    GroupCooling(Instant),
    /// Some process disabled the key (401/403) or parked it (402), with this reason.
    Disabled(String),
    /// Redis is unreachable and `on_unavailable` is `fail`.
    Unavailable,
}

/// Shared per-key limits, implemented over Redis (`redis.rs`).
pub(crate) trait SharedLimits: Send + Sync {
    /// Takes a lease and the rate budget (`tokens` for `tpm`) of key `key` — and of its
    /// group, if it has one — or says why not. One atomic step: all or nothing.
    fn acquire(&self, key: usize, tokens: u64) -> SharedAdmit;
    /// Ends admission `lease` of key `key` (its number from [`SharedAdmit::Yes`]):
    /// gives its lease (and its group's) back, publishing the attempt's cooldown (the
    /// key's, the group's) or disable verdict to every process.
    fn release(&self, key: usize, lease: u64, verdict: &KeyVerdict);
    /// Disables (parks) key `key` in every process with this reason, outside an
    /// admission (a credit check found it at its floor).
    fn disable(&self, key: usize, reason: &str);
    /// Gives back the budget of admission `lease`, which never reached the wire.
    fn refund(&self, key: usize, lease: u64, tokens: u64);
    /// Corrects the shared `tpm` budget once the real usage is known.
    fn correct_tokens(&self, key: usize, estimated: u64, actual: u64);
    /// Why Redis is unavailable, for [`Error::SharedUnavailable`].
    fn unavailable_reason(&self) -> String;
    /// Tells every process sharing these keys that `model` cools at each of them for
    /// `cooldown` (a model verdict: an upstream 429/503, or OpenRouter's free-model
    /// limit under the name [`FREE_MODELS`](crate::model_verdicts::FREE_MODELS)). Each process
    /// records it in its own `ModelVerdicts`, so admissions ask no one. Best effort:
    /// with Redis unreachable the verdict stays local (logged at debug).
    fn cool_model(&self, keys: &[usize], model: &str, cooldown: Duration);
    /// Adds `dollars` to the spend every process of the namespace shares (`max_cost`)
    /// and returns the new total (`0.0` reads it); `None` while Redis is unreachable.
    fn add_spend(&self, dollars: f64) -> Option<f64> {
        let _ = dollars;
        None
    }
}

/// One key's handle on the shared limits, held by its gate.
#[derive(Clone)]
pub(crate) struct KeyLink {
    limits: Arc<dyn SharedLimits>,
    index: usize,
}

impl fmt::Debug for KeyLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyLink")
            .field("index", &self.index)
            .finish()
    }
}

impl KeyLink {
    pub(crate) fn new(limits: Arc<dyn SharedLimits>, index: usize) -> KeyLink {
        KeyLink { limits, index }
    }

    pub(crate) fn acquire(&self, tokens: u64) -> SharedAdmit {
        self.limits.acquire(self.index, tokens)
    }

    pub(crate) fn release(&self, lease: u64, verdict: &KeyVerdict) {
        self.limits.release(self.index, lease, verdict)
    }

    pub(crate) fn disable(&self, reason: &str) {
        self.limits.disable(self.index, reason)
    }

    pub(crate) fn refund(&self, lease: u64, tokens: u64) {
        self.limits.refund(self.index, lease, tokens)
    }

    pub(crate) fn correct_tokens(&self, estimated: u64, actual: u64) {
        self.limits.correct_tokens(self.index, estimated, actual)
    }

    /// The error of a request refused because Redis is unreachable
    /// (`on_unavailable: fail`).
    pub(crate) fn unavailable_error(&self) -> Error {
        Error::SharedUnavailable {
            message: self.limits.unavailable_reason(),
        }
    }
}

/// Starts the shared limits of a pool, if its config asks for them. `events` nudges the
/// pool's dispatcher when another process releases a lease or shares a model verdict;
/// `models` is the pool's table of model verdicts, where those shared by other
/// processes are recorded.
#[cfg_attr(not(feature = "redis"), allow(unused_variables))]
pub(crate) fn start(
    config: &crate::Config,
    events: crossbeam_channel::Sender<()>,
    models: Arc<crate::model_verdicts::ModelVerdicts>,
) -> Result<Option<Arc<dyn SharedLimits>>, Error> {
    let Some(sc) = &config.shared else {
        return Ok(None);
    };
    #[cfg(feature = "redis")]
    {
        let limits = redis::RedisLimits::start(sc, config, events, models)?;
        Ok(Some(Arc::new(limits)))
    }
    #[cfg(not(feature = "redis"))]
    {
        crate::shared_config::check(sc)?;
        Ok(None)
    }
}
