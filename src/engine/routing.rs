//! Routing by model: which keys serve a request (`keys[].models`, `keys[].model_map`),
//! the one admission path every hand-off takes, and the per-key model rewrite.
//!
//! The request's `"model"` is read once at submit and cached on the job with the set of
//! keys that serve it (`Job::serves`); a request no key serves is refused there. The
//! dispatcher and self-serving workers both admit through [`admit`], so a job is never
//! handed to a key that does not serve its model — first attempt or retry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Deserialize;

use crate::admission::{Admit, Via};
use crate::config::{Config, KeyConfig};
use crate::job::Job;
pub(crate) use crate::model_verdicts::{FREE_MODELS, ModelVerdicts};
use crate::shared::Shared;

/// Distinct models remembered before the cache starts over.
const CACHE_MAX: usize = 1024;

/// For each key, whether it serves one model.
type Serving = Arc<[bool]>;

/// Which keys serve which model, memoised per model name.
pub(crate) struct Router {
    cache: Mutex<HashMap<Option<Arc<str>>, Serving>>,
}

impl Router {
    /// A router if any key restricts its models; `None` when every key serves all.
    pub(crate) fn for_config(config: &Config) -> Option<Router> {
        config
            .keys
            .iter()
            .any(|k| k.models.is_some())
            .then(|| Router {
                cache: Mutex::new(HashMap::new()),
            })
    }

    /// For each key, whether it serves `model`.
    pub(crate) fn serving(&self, config: &Config, model: Option<&Arc<str>>) -> Arc<[bool]> {
        let mut cache = self.cache.lock();
        if let Some(s) = cache.get(&model.cloned()) {
            return Arc::clone(s);
        }
        let s: Arc<[bool]> = config
            .keys
            .iter()
            .map(|k| k.serves(model.map(|m| &**m)))
            .collect();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(model.cloned(), Arc::clone(&s));
        s
    }
}

/// The `"model"` of a JSON body, if it has a string one.
pub(crate) fn model_of(body: &[u8]) -> Option<Arc<str>> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        model: Option<serde_json::Value>,
    }
    let head: Head = serde_json::from_slice(body).ok()?;
    match head.model? {
        serde_json::Value::String(s) => Some(Arc::from(s)),
        _ => None,
    }
}

/// Whether key `i` may take `job` at all (it serves the job's model).
pub(crate) fn serves(job: &Job, i: usize) -> bool {
    job.serves
        .as_ref()
        .is_none_or(|s| s.get(i).copied().unwrap_or(false))
}

/// The one admission every hand-off goes through: the key must serve the job's model,
/// then its gate (and its group's, in the same step) must admit.
pub(crate) fn admit(shared: &Shared, i: usize, job: &Job, via: Via, now: Instant) -> Admit {
    if !serves(job, i) {
        return Admit::Never;
    }
    if let Some(no) = shared.models.refuses(i, || job.model(), now) {
        return no;
    }
    shared.keys[i].gate.try_admit(via, job.est_tokens, now)
}

/// Whether key `i` could ever serve `job`: it serves the model, is not disabled or
/// parked, and the model is not excluded at its base URL.
pub(crate) fn could_serve(shared: &Shared, i: usize, job: &Job) -> bool {
    serves(job, i)
        && !shared.keys[i].gate.is_disabled()
        && !matches!(
            shared.models.refuses(i, || job.model(), Instant::now()),
            Some(Admit::Never)
        )
}

/// The body to send to key `cfg`: `None` to send the shared body as it is, or a
/// per-attempt copy whose `"model"` is the key's mapped name.
pub(crate) fn body_for(cfg: &KeyConfig, job: &Job) -> Option<Vec<u8>> {
    if cfg.model_map.is_empty() {
        return None;
    }
    let actual = cfg.model_map.get(&**job.model()?)?;
    let mut v: serde_json::Value = serde_json::from_slice(&job.req.body).ok()?;
    v.as_object_mut()?.insert(
        "model".to_owned(),
        serde_json::Value::String(actual.clone()),
    );
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model_matches;

    #[test]
    fn patterns() {
        assert!(model_matches("*", "anything"));
        assert!(model_matches("*", ""));
        assert!(model_matches("openai/*", "openai/gpt-4o"));
        assert!(!model_matches("openai/*", "anthropic/claude"));
        assert!(!model_matches("openai/*", "openai"));
        assert!(model_matches("gpt-4o", "gpt-4o"));
        assert!(!model_matches("gpt-4o", "gpt-4o-mini"));
        assert!(model_matches("*-mini", "gpt-4o-mini"));
        assert!(model_matches("a*b*c", "aXbYc"));
        assert!(!model_matches("a*b*c", "aXcYb"));
        assert!(!model_matches("ab*ba", "aba"));
    }

    #[test]
    fn model_is_read_from_the_body() {
        assert_eq!(
            model_of(br#"{"model":"m/x","messages":[]}"#).as_deref(),
            Some("m/x")
        );
        assert_eq!(model_of(br#"{"messages":[]}"#), None);
        assert_eq!(model_of(br#"{"model":5}"#), None);
        assert_eq!(model_of(b"not json"), None);
    }

    #[test]
    fn serving_keys() {
        let k = KeyConfig::new("sk-a")
            .models(["openai/*"])
            .map_model("fast", "openai/gpt-4o-mini");
        assert!(k.serves(Some("openai/gpt-4o")));
        assert!(k.serves(Some("fast")));
        assert!(!k.serves(Some("anthropic/claude")));
        assert!(!k.serves(None));
        assert!(KeyConfig::new("sk-b").serves(None));
    }
}
