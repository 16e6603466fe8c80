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

/// The `"user"` of a JSON body, if it has a non-empty string one (OpenAI's end-user
/// id), for [`Config::affinity_from_user`](crate::Config::affinity_from_user).
pub(crate) fn user_of(body: &[u8]) -> Option<String> {
    head_string(body, |h| h.user).filter(|s| !s.is_empty())
}

/// The top-level fields routing reads from a request body.
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    model: Option<serde_json::Value>,
    #[serde(default)]
    user: Option<serde_json::Value>,
}

/// One of a body's top-level fields, if the body is a JSON object and it is a string.
fn head_string(body: &[u8], field: fn(Head) -> Option<serde_json::Value>) -> Option<String> {
    let head: Head = serde_json::from_slice(body).ok()?;
    match field(head)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    }
}

/// An affinity's hash (FNV-1a, 64 bits): stable across runs and processes.
pub(crate) fn affinity_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Rendezvous (highest random weight) hashing: key `i`'s weight for the affinity
/// `h`, from its label, so the order survives keys being added or reordered and a
/// key's departure moves only its own affinities.
pub(crate) fn affinity_weight(shared: &Shared, i: usize, h: u64) -> u64 {
    // splitmix64's finaliser over both hashes.
    let mut z = h ^ affinity_hash(&shared.keys[i].label).rotate_left(29);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key an affinity job belongs on now: the first key, by weight, that serves it
/// and is not out (disabled, parked) or cooling. `None` when there is none.
pub(crate) fn affinity_home(shared: &Shared, job: &Job, h: u64, now: Instant) -> Option<usize> {
    (0..shared.keys.len())
        .filter(|&i| {
            let g = &shared.keys[i].gate;
            serves(job, i) && !g.is_disabled() && g.cooling_until(now).is_none()
        })
        .max_by_key(|&i| (affinity_weight(shared, i, h), std::cmp::Reverse(i)))
}

/// The `"model"` of a JSON body, if it has a string one.
pub(crate) fn model_of(body: &[u8]) -> Option<Arc<str>> {
    head_string(body, |h| h.model).map(Arc::from)
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
