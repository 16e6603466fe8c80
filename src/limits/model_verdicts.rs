//! Verdicts on a model at a key: a model cooling at one key (an upstream 429/503,
//! OpenRouter's free-model limit for every `:free` model) or missing at a base URL (a
//! 404). The key's gate is untouched, so its other models keep flowing; asked by
//! `routing::admit` once any verdict exists, recorded by the worker and by the shared
//! limits' subscriber.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Instant;

use parking_lot::Mutex;

use crate::admission::Admit;

/// Most `(key, model)` verdicts held at once: a hostile server naming a new model in
/// every answer cannot grow the table without bound (past it, expired cooldowns are
/// dropped, then new verdicts are not recorded: the request is still retried).
const MODEL_VERDICTS_MAX: usize = 4096;

/// Verdicts on a model at one key (`blame::Fault::ModelBusy` / `ModelMissing`): the key
/// keeps serving its other models. Asked by [`admit`] (the dispatcher and self-serve
/// alike) only once some verdict was recorded; jobs read their model lazily then.
#[derive(Debug, Default)]
pub(crate) struct ModelVerdicts {
    /// Set by the first verdict: until then `admit` pays nothing.
    active: AtomicBool,
    /// `(key index, model)` → cooling until that instant, or `None`: the model does not
    /// exist at the key's base URL (for the rest of the pool's life).
    map: Mutex<HashMap<KeyModel, Option<Instant>>>,
}

/// A key (by index) and a model.
type KeyModel = (usize, Arc<str>);

/// The table's name for "every `:free` model" (no model is named this: it starts with
/// the `:` a model name ends its variant with). Shared under this name too.
pub(crate) const FREE_MODELS: &str = ":free";

impl ModelVerdicts {
    /// Whether any verdict was ever recorded.
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(SeqCst)
    }

    /// `Some(Never)` if a job's model (read by `model` only once a verdict exists) is
    /// excluded at key `i`, `Some(WakeAt)` while it cools there, else `None`.
    pub(crate) fn refuses<'a>(
        &self,
        i: usize,
        model: impl FnOnce() -> Option<&'a Arc<str>>,
        now: Instant,
    ) -> Option<Admit> {
        if !self.active.load(SeqCst) {
            return None;
        }
        let model = model()?;
        let map = self.map.lock();
        let verdict = |m: &Arc<str>| match map.get(&(i, Arc::clone(m)))? {
            None => Some(Admit::Never),
            Some(until) if *until > now => Some(Admit::WakeAt(*until)),
            Some(_) => None,
        };
        verdict(model).or_else(|| {
            // OpenRouter's free-model limit binds every `:free` model of the account.
            model
                .ends_with(":free")
                .then(|| verdict(&Arc::from(FREE_MODELS)))
                .flatten()
        })
    }

    /// Cools every `:free` model at each key in `keys` until `until` (OpenRouter's
    /// free-model limit is the account's, across its free models).
    pub(crate) fn cool_free(&self, keys: impl IntoIterator<Item = usize>, until: Instant) {
        let free: Arc<str> = Arc::from(FREE_MODELS);
        for i in keys {
            self.record(i, &free, Some(until));
        }
    }

    /// Cools `model` at key `i` until `until` (a longer cooldown already there stays).
    pub(crate) fn cool(&self, i: usize, model: &Arc<str>, until: Instant) {
        self.record(i, model, Some(until));
    }

    /// Excludes `model` at every key in `keys` (those sharing a base URL).
    pub(crate) fn exclude(&self, keys: impl IntoIterator<Item = usize>, model: &Arc<str>) {
        for i in keys {
            self.record(i, model, None);
        }
    }

    /// Until when `model` cools at key `i` (tests).
    #[cfg(all(test, feature = "redis"))]
    pub(crate) fn cooling_until(&self, i: usize, model: &str) -> Option<Instant> {
        (*self.map.lock().get(&(i, Arc::from(model)))?).filter(|u| *u > Instant::now())
    }

    fn record(&self, i: usize, model: &Arc<str>, until: Option<Instant>) {
        let mut map = self.map.lock();
        if map.len() >= MODEL_VERDICTS_MAX {
            let now = Instant::now();
            map.retain(|_, u| u.is_none_or(|u| u > now));
            if map.len() >= MODEL_VERDICTS_MAX {
                return;
            }
        }
        let e = map.entry((i, Arc::clone(model))).or_insert(until);
        *e = match (*e, until) {
            (None, _) | (_, None) => None,
            (Some(a), Some(b)) => Some(a.max(b)),
        };
        self.active.store(true, SeqCst);
    }
}
