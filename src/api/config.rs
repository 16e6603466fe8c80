//! Pool configuration: built in Rust with [`ConfigBuilder`] or loaded from JSON with
//! [`Config::from_json`] (the same field names the C ABI and the CLI use).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Upper bound for [`KeyConfig::max_concurrent`]: one thread per slot, so a typo like
/// `50000` is rejected rather than spawning fifty thousand threads.
pub const MAX_CONCURRENT_LIMIT: usize = 1024;
/// Upper bound for the number of keys in one pool.
pub const MAX_KEYS: usize = 4096;
/// Upper bound for the worker threads of one pool (the sum of `max_concurrent`).
pub const MAX_TOTAL_WORKERS: usize = 8192;
/// Upper bound for [`Config::queue_capacity`]. The queue is allocated up front (about
/// 250 bytes a slot), so the largest queue costs about 256 MiB.
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;
/// Upper bound for [`Config::worker_stack_size`]: 256 MiB.
pub const MAX_WORKER_STACK_SIZE: usize = 256 << 20;
/// Upper bound for the length of one API key, in bytes.
pub const MAX_KEY_BYTES: usize = 8192;
/// Upper bound for every duration in the config (timeouts, deadline, delays,
/// cooldowns): 7 days, in milliseconds.
pub const MAX_DURATION_MS: u64 = 7 * 24 * 3600 * 1000;
/// Upper bound for [`KeyConfig::weight`].
pub const MAX_WEIGHT: u32 = 1_000_000;

/// An API key. Its `Debug` and `Display` never show the secret.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a secret key.
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(key.into())
    }

    /// The secret itself. Only the transport should need this.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for ApiKey {
    fn from(s: &str) -> ApiKey {
        ApiKey(s.to_owned())
    }
}

impl From<String> for ApiKey {
    fn from(s: String) -> ApiKey {
        ApiKey(s)
    }
}

/// How the dispatcher picks a key for each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Strict rotation over the usable keys: key 0, 1, 2, …, 0, 1, … Each request waits
    /// for its key's next free worker.
    RoundRobin,
    /// The first key, in config order, with an idle worker; when none is idle, the first
    /// one to become idle. The default.
    #[default]
    FirstAvailable,
    /// The key with the fewest requests in flight relative to its `max_concurrent`,
    /// ties broken by config order.
    LeastLoaded,
}

impl Strategy {
    /// The JSON / CLI name: `round_robin`, `first_available` or `least_loaded`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::FirstAvailable => "first_available",
            Strategy::LeastLoaded => "least_loaded",
        }
    }
}

impl FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Strategy, Error> {
        match s {
            "round_robin" => Ok(Strategy::RoundRobin),
            "first_available" => Ok(Strategy::FirstAvailable),
            "least_loaded" => Ok(Strategy::LeastLoaded),
            other => Err(Error::config(
                "strategy",
                format!(
                    "unknown strategy {other:?}; expected round_robin, first_available or least_loaded"
                ),
            )),
        }
    }
}

/// Retry and key-health policy.
///
/// `#[non_exhaustive]`: start from [`RetryConfig::default`] and use the setters (or
/// assign fields), so new fields never break your code.
///
/// ```
/// use std::time::Duration;
/// let r = keypool::RetryConfig::default()
///     .max_attempts(5)
///     .base_delay(Duration::from_millis(200));
/// assert_eq!(r.base_delay_ms, 200);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Attempts per request, the first included. `1` disables retries. Defaults to 3.
    pub max_attempts: u32,
    /// Backoff base: attempt `n` (from 0) waits `min(base·2^n, max)` minus up to 25 %
    /// jitter. Defaults to 500 ms.
    pub base_delay_ms: u64,
    /// Backoff ceiling. Defaults to 8,000 ms.
    pub max_delay_ms: u64,
    /// Longest `Retry-After` / `retry-after-ms` honoured; longer hints are clamped.
    /// Defaults to 60,000 ms.
    pub max_retry_after_ms: u64,
    /// Cooldown for a key that answered 429 without a usable `Retry-After`.
    /// Defaults to 1,000 ms.
    pub default_cooldown_ms: u64,
    /// Take a key out of rotation for good when it answers 402 (out of credits).
    /// Defaults to true.
    pub park_on_402: bool,
    /// Send a key's first request alone and open the key to `max_concurrent` only once
    /// the server has accepted it (any answer but 401/402/403), so a revoked key costs
    /// one request instead of a burst. Defaults to true.
    pub probe_keys: bool,
    /// With `probe_keys`, also prove each key cheaply as the pool starts: an
    /// authenticated `GET {base_url}/key` (OpenRouter) or `/models` (OpenAI, vLLM with
    /// `--api-key`), in parallel for all keys, opens a key the server accepts at once
    /// instead of after its first completion — only where that path refuses a request
    /// without a key, so a public endpoint never vouches for a key. Anything else leaves
    /// the key on trial. Defaults to true.
    pub prove_keys: bool,
    /// Learn a budget from `x-ratelimit-limit-*` / `-remaining-*` / `-reset-*` headers for
    /// a key without a configured `rpm`/`tpm`, and pace it before it is rejected. When
    /// false, those headers only pause a key whose `remaining` reached 0. Turn it off
    /// when a proxy forwards headers that do not describe your key. Defaults to true.
    pub learn_rate_limits: bool,
}

impl Default for RetryConfig {
    fn default() -> RetryConfig {
        RetryConfig {
            max_attempts: 3,
            base_delay_ms: 500,
            max_delay_ms: 8_000,
            max_retry_after_ms: 60_000,
            default_cooldown_ms: 1_000,
            park_on_402: true,
            probe_keys: true,
            prove_keys: true,
            learn_rate_limits: true,
        }
    }
}

/// Milliseconds of a `Duration`, saturating (the config bounds are far below).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RetryConfig {
    /// Attempts per request, the first included (1 = no retries). Defaults to 3.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Backoff base. Defaults to 500 ms.
    pub fn base_delay(mut self, d: Duration) -> Self {
        self.base_delay_ms = ms(d);
        self
    }

    /// Backoff ceiling. Defaults to 8 s.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay_ms = ms(d);
        self
    }

    /// Longest `Retry-After` honoured. Defaults to 60 s.
    pub fn max_retry_after(mut self, d: Duration) -> Self {
        self.max_retry_after_ms = ms(d);
        self
    }

    /// Cooldown after a 429 without a usable hint. Defaults to 1 s.
    pub fn default_cooldown(mut self, d: Duration) -> Self {
        self.default_cooldown_ms = ms(d);
        self
    }

    /// Park a key that answers 402 (out of credits). Defaults to true.
    pub fn park_on_402(mut self, on: bool) -> Self {
        self.park_on_402 = on;
        self
    }

    /// Send a key's first request alone (see the field). Defaults to true.
    pub fn probe_keys(mut self, on: bool) -> Self {
        self.probe_keys = on;
        self
    }

    /// Prove keys with an authenticated `GET` as the pool starts (see the field).
    /// Defaults to true.
    pub fn prove_keys(mut self, on: bool) -> Self {
        self.prove_keys = on;
        self
    }

    /// Learn budgets from rate-limit headers (see the field). Defaults to true.
    pub fn learn_rate_limits(mut self, on: bool) -> Self {
        self.learn_rate_limits = on;
        self
    }
}

/// One API key and its limits. Build it with [`KeyConfig::new`] and the setters
/// (`#[non_exhaustive]`: new fields never break your code).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KeyConfig {
    /// The secret key, sent as `Authorization: Bearer <key>`. Never shown in output.
    pub key: ApiKey,
    /// A name that stands in for the key in stats, errors and logs.
    /// Defaults to `key-<index>`.
    #[serde(default)]
    pub label: Option<String>,
    /// Worker threads for this key: the most requests it ever has in flight.
    /// Defaults to 4; at most [`MAX_CONCURRENT_LIMIT`].
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Overrides the pool's `base_url` for this key. Defaults to none.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Extra headers for this key, added after (and overriding) the pool's.
    /// Defaults to none.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Requests per minute this key may send (token bucket). Defaults to unlimited.
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Tokens per minute this key may use (estimated from the request, corrected by the
    /// response's `usage`). Defaults to unlimited.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Requests per UTC day this key may send. At its quota the key is out ("exhausted
    /// until" the next midnight UTC) and comes back then, on trial. Defaults to
    /// unlimited.
    #[serde(default)]
    pub rpd: Option<u32>,
    /// The models this key serves: exact names or simple patterns with `*` (`"openai/*"`,
    /// `"*"`). A request goes only to keys that serve its `"model"`; names in
    /// `model_map` are served too. Defaults to none (every model).
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Per-key model names: a request for a logical name (the map's key) is sent to this
    /// key with `"model"` rewritten to the value (the id this key's provider expects).
    /// Defaults to none.
    #[serde(default)]
    pub model_map: BTreeMap<String, String>,
    /// Share of requests under `round_robin` (smooth weighted round-robin, as nginx
    /// does it). Defaults to 1.
    #[serde(default)]
    pub weight: Option<u32>,
    /// The name of the account (`groups[].name`) whose limits this key shares.
    /// Defaults to none.
    #[serde(default)]
    pub group: Option<String>,
    /// Learn this key's real concurrency (AIMD): start low, grow by about one per
    /// round trip on success, cut to 80 % on a 429, never above `max_concurrent` nor
    /// below 1. A 429 without `Retry-After` then cuts the limit instead of cooling the
    /// key. Defaults to false.
    #[serde(default)]
    pub adaptive: bool,
}

/// An account whose limits bind all its keys together (`keys[].group`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// The name keys refer to with `group`.
    pub name: String,
    /// Requests in flight over all the group's keys. Defaults to unlimited.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// Requests per minute over all the group's keys. Defaults to unlimited.
    #[serde(default)]
    pub rpm: Option<u32>,
    /// Tokens per minute over all the group's keys. Defaults to unlimited.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Requests per UTC day over all the group's keys: at the quota every member key is
    /// out until the next midnight UTC. Defaults to unlimited.
    #[serde(default)]
    pub rpd: Option<u32>,
    /// Which 429s of a member key are the account's, cooling the whole group: `"*"`
    /// for every 429, otherwise a text that, found (ignoring case) in the 429's error
    /// message or in one of its headers written `name: value`, marks it as the
    /// account's (e.g. `"x-ratelimit-scope: account"`, or a phrase of the provider's
    /// account-level message). Defaults to none: a 429 cools only its key.
    #[serde(default)]
    pub account_429: Option<String>,
}

impl GroupConfig {
    /// A group without limits.
    pub fn new(name: impl Into<String>) -> GroupConfig {
        GroupConfig {
            name: name.into(),
            max_concurrent: None,
            rpm: None,
            tpm: None,
            rpd: None,
            account_429: None,
        }
    }

    /// Limits the group's requests per UTC day. Defaults to unlimited.
    pub fn rpd(mut self, rpd: u32) -> GroupConfig {
        self.rpd = Some(rpd);
        self
    }

    /// Limits the group's requests in flight. Defaults to unlimited.
    pub fn max_concurrent(mut self, n: usize) -> GroupConfig {
        self.max_concurrent = Some(n);
        self
    }

    /// Limits the group's requests per minute. Defaults to unlimited.
    pub fn rpm(mut self, rpm: u32) -> GroupConfig {
        self.rpm = Some(rpm);
        self
    }

    /// Limits the group's tokens per minute. Defaults to unlimited.
    pub fn tpm(mut self, tpm: u64) -> GroupConfig {
        self.tpm = Some(tpm);
        self
    }

    /// Sets which 429s cool the whole group (see the field). Defaults to none.
    pub fn account_429(mut self, rule: impl Into<String>) -> GroupConfig {
        self.account_429 = Some(rule.into());
        self
    }
}

/// Whether `model` matches `pattern`: `*` matches any run of characters (none included),
/// everything else itself.
pub(crate) fn model_matches(pattern: &str, model: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = model.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: exact
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn default_max_concurrent() -> usize {
    4
}

impl KeyConfig {
    /// A key with default settings (`max_concurrent` 4, default label).
    pub fn new(key: impl Into<ApiKey>) -> KeyConfig {
        KeyConfig {
            key: key.into(),
            label: None,
            max_concurrent: default_max_concurrent(),
            base_url: None,
            headers: BTreeMap::new(),
            rpm: None,
            tpm: None,
            rpd: None,
            models: None,
            model_map: BTreeMap::new(),
            weight: None,
            group: None,
            adaptive: false,
        }
    }

    /// Whether this key serves `model` (`None`: a request without a model, served by
    /// keys without a `models` list).
    pub fn serves(&self, model: Option<&str>) -> bool {
        let Some(list) = &self.models else {
            return true;
        };
        let Some(m) = model else {
            return false;
        };
        self.model_map.contains_key(m) || list.iter().any(|p| model_matches(p, m))
    }

    /// Restricts the models this key serves (patterns with `*`). Defaults to every model.
    pub fn models<S: Into<String>>(mut self, models: impl IntoIterator<Item = S>) -> KeyConfig {
        self.models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// Sends requests for `logical` to this key as `actual`. Defaults to none.
    pub fn map_model(mut self, logical: impl Into<String>, actual: impl Into<String>) -> KeyConfig {
        self.model_map.insert(logical.into(), actual.into());
        self
    }

    /// Sets the round-robin weight. Defaults to 1.
    pub fn weight(mut self, weight: u32) -> KeyConfig {
        self.weight = Some(weight);
        self
    }

    /// Puts the key in the account `group` (see [`GroupConfig`]). Defaults to none.
    pub fn group(mut self, group: impl Into<String>) -> KeyConfig {
        self.group = Some(group.into());
        self
    }

    /// Learns the key's concurrency (AIMD) up to `max_concurrent`. Defaults to false.
    pub fn adaptive(mut self, on: bool) -> KeyConfig {
        self.adaptive = on;
        self
    }

    /// Sets the label. Defaults to `key-<index>`.
    pub fn label(mut self, label: impl Into<String>) -> KeyConfig {
        self.label = Some(label.into());
        self
    }

    /// Sets the number of workers. Defaults to 4.
    pub fn max_concurrent(mut self, n: usize) -> KeyConfig {
        self.max_concurrent = n;
        self
    }

    /// Overrides the base URL for this key. Defaults to the pool's.
    pub fn base_url(mut self, url: impl Into<String>) -> KeyConfig {
        self.base_url = Some(url.into());
        self
    }

    /// Adds a header for this key. Defaults to none.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> KeyConfig {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Limits requests per minute. Defaults to unlimited.
    pub fn rpm(mut self, rpm: u32) -> KeyConfig {
        self.rpm = Some(rpm);
        self
    }

    /// Limits this key's requests per UTC day (see the field). Defaults to unlimited.
    pub fn rpd(mut self, rpd: u32) -> KeyConfig {
        self.rpd = Some(rpd);
        self
    }

    /// Limits this key's tokens per minute. Defaults to unlimited.
    pub fn tpm(mut self, tpm: u64) -> KeyConfig {
        self.tpm = Some(tpm);
        self
    }
}

/// Everything a [`Pool`](crate::Pool) needs. Load it with [`Config::from_json`] or build it
/// with [`Config::builder`]; both are validated by [`Config::validate`], which
/// [`Pool::new`](crate::Pool::new) also calls.
///
/// `#[non_exhaustive]`: build it with [`Config::builder`] or [`Config::from_json`] (or
/// start from [`Config::default`] and assign fields), so new fields never break your
/// code.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct Config {
    /// Base URL requests' paths are appended to. Defaults to `https://openrouter.ai/api/v1`.
    pub base_url: String,
    /// Dispatch strategy. Defaults to `first_available`.
    pub strategy: Strategy,
    /// Use a request's OpenAI `"user"` field as its affinity when it has none of its
    /// own ([`Request::with_affinity`](crate::Request::with_affinity)): a user's
    /// requests then stay on one key while it can admit, so a provider's prompt cache
    /// hits. Defaults to false.
    pub affinity_from_user: bool,
    /// Per model, the models to fall back to, in order, when it cannot be served (see
    /// [`Request::with_fallback_models`](crate::Request::with_fallback_models), which
    /// overrides it per request). JSON: `"fallback_models": {"x": ["y", "z"]}`.
    /// Defaults to none.
    pub fallback_models: BTreeMap<String, Vec<String>>,
    /// Time allowed for one HTTP attempt as a whole: resolving, connecting, sending
    /// the request and reading the whole response (a stream included) end by then,
    /// however the server trickles. Use `deadline_ms` to bound a request across
    /// retries. Defaults to 600,000 ms.
    pub timeout_ms: u64,
    /// Timeout for opening a connection. Defaults to 10,000 ms.
    pub connect_timeout_ms: u64,
    /// Overall deadline of one request across queueing and retries; 0 means none.
    /// Defaults to 0.
    pub deadline_ms: u64,
    /// Longest wait for more data on a streamed response ([`Pool::submit_stream`](crate::Pool::submit_stream)),
    /// including the wait for its headers; 0 means no idle limit (`timeout_ms` and
    /// `deadline_ms` still bound the whole stream). Defaults to 60,000 ms.
    pub stream_idle_timeout_ms: u64,
    /// Requests that may wait for a free worker before `submit` blocks (and
    /// `try_submit` returns `Busy`). Retries waiting out a backoff count against it
    /// too: while `queue_capacity` of them wait, no new request is taken from the
    /// queue, so at most about twice this many requests (plus one per worker) are held
    /// at once, whatever a server does. At most [`MAX_QUEUE_CAPACITY`]. Defaults to 1024.
    pub queue_capacity: usize,
    /// Headers sent with every request (e.g. OpenRouter's `HTTP-Referer`, `X-Title`).
    /// Defaults to none.
    pub headers: BTreeMap<String, String>,
    /// Largest response body read, in bytes; a larger one is a transport error.
    /// Defaults to 16 MiB.
    pub max_response_bytes: u64,
    /// Stack size of each worker thread, in bytes, between 64 KiB and
    /// [`MAX_WORKER_STACK_SIZE`]. Defaults to 256 KiB.
    pub worker_stack_size: usize,
    /// Retry, backoff and key-health policy.
    pub retry: RetryConfig,
    /// The keys. At least one is required.
    pub keys: Vec<KeyConfig>,
    /// Share each key's limits (`max_concurrent`, `rpm`, `tpm`, cooldowns, disabled
    /// keys) with every other pool — thread, process or host — configured with the same
    /// Redis and namespace. Needs the `redis` cargo feature: a build without it rejects
    /// a config that sets this field. Defaults to `None` (limits are this pool's own).
    pub shared: Option<crate::shared_config::SharedConfig>,
    /// Accounts whose limits bind their keys together (`keys[].group`).
    /// Defaults to none.
    pub groups: Vec<GroupConfig>,
    /// Credit checks at `GET {base_url}/key` (OpenRouter). Defaults to off.
    pub credits: crate::credits_config::CreditsConfig,
    /// Extra CAs to trust and a client certificate for `https://` (see
    /// [`TlsConfig`](crate::TlsConfig)). The platform's store (or `SSL_CERT_FILE` /
    /// `SSL_CERT_DIR`) and the bundled roots are always trusted. Defaults to none.
    pub tls: crate::tls_config::TlsConfig,
    /// The pool's spend cap in dollars: once the responses' summed cost (`usage.cost`,
    /// else estimated from `prices`) reaches it, nothing more is sent — waiting requests
    /// end with [`Error::BudgetExhausted`] and later submits are refused with it.
    /// Requests in flight then finish, so the overshoot is bounded by what is in
    /// flight. Shared by every process with the same `shared` namespace. Defaults to
    /// none (no cap).
    pub max_cost: Option<f64>,
    /// Per-model prices in dollars per million tokens, to estimate a response's cost
    /// (for `max_cost`) when the server reports no `usage.cost`. Looked up by the
    /// request's `"model"`, then by the name sent to the key (`model_map`). Defaults to
    /// none.
    pub prices: BTreeMap<String, crate::prices::ModelPrice>,
}

// Validation keeps `max_cost` and `prices` finite, so equality is reflexive.
impl Eq for Config {}

impl Default for Config {
    fn default() -> Config {
        Config {
            base_url: "https://openrouter.ai/api/v1".to_owned(),
            strategy: Strategy::default(),
            affinity_from_user: false,
            fallback_models: BTreeMap::new(),
            timeout_ms: 600_000,
            connect_timeout_ms: 10_000,
            deadline_ms: 0,
            stream_idle_timeout_ms: 60_000,
            queue_capacity: 1024,
            headers: BTreeMap::new(),
            max_response_bytes: 16 * 1024 * 1024,
            worker_stack_size: 256 * 1024,
            retry: RetryConfig::default(),
            keys: Vec::new(),
            shared: None,
            groups: Vec::new(),
            credits: crate::credits_config::CreditsConfig::default(),
            tls: crate::tls_config::TlsConfig::default(),
            max_cost: None,
            prices: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Starts a builder with every field at its default.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder {
            config: Config::default(),
        }
    }

    /// Parses and validates a JSON config. Errors name the offending field, e.g.
    /// `keys[0].max_concurrent`.
    pub fn from_json(json: &str) -> Result<Config, Error> {
        let de = &mut serde_json::Deserializer::from_str(json);
        let serde_error = |e: serde_path_to_error::Error<serde_json::Error>| {
            let path = e.path().to_string();
            let field = if path == "." {
                "config".to_owned()
            } else {
                path
            };
            Error::config(
                redact_path(&field),
                redact_serde_message(&e.into_inner().to_string()),
            )
        };
        let config: Config = serde_path_to_error::deserialize(&mut *de).map_err(serde_error)?;
        // Only whitespace may follow the object.
        de.end()
            .map_err(|e| Error::config("config", redact_serde_message(&e.to_string())))?;
        config.validate()?;
        Ok(config)
    }

    /// The label of key `index`: its configured label or `key-<index>`.
    pub fn key_label(&self, index: usize) -> String {
        self.keys
            .get(index)
            .and_then(|k| k.label.clone())
            .unwrap_or_else(|| format!("key-{index}"))
    }

    /// The base URL key `index` uses.
    pub fn key_base_url(&self, index: usize) -> &str {
        self.keys[index]
            .base_url
            .as_deref()
            .unwrap_or(&self.base_url)
    }

    /// Checks every rule; the error names the first offending field. It never echoes a
    /// key: every configured key is masked in it, and echoed values are cut at 100
    /// characters.
    pub fn validate(&self) -> Result<(), Error> {
        self.check().map_err(|e| match e {
            Error::Config { field, message } => {
                let masker = crate::body::Masker::for_config(self);
                Error::Config {
                    field: masker.mask_str(field),
                    message: masker.mask_str(message),
                }
            }
            other => other,
        })
    }

    fn check(&self) -> Result<(), Error> {
        if self.keys.is_empty() {
            return Err(Error::config("keys", "at least one key is required"));
        }
        if self.keys.len() > MAX_KEYS {
            return Err(Error::config(
                "keys",
                format!("at most {MAX_KEYS} keys are allowed"),
            ));
        }
        check_url("base_url", &self.base_url)?;
        if self.timeout_ms == 0 {
            return Err(Error::config("timeout_ms", "must be at least 1"));
        }
        if self.connect_timeout_ms == 0 {
            return Err(Error::config("connect_timeout_ms", "must be at least 1"));
        }
        if self.queue_capacity == 0 || self.queue_capacity > MAX_QUEUE_CAPACITY {
            return Err(Error::config(
                "queue_capacity",
                format!(
                    "must be between 1 and {MAX_QUEUE_CAPACITY}, got {}",
                    self.queue_capacity
                ),
            ));
        }
        for (field, ms) in [
            ("timeout_ms", self.timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("deadline_ms", self.deadline_ms),
            ("retry.base_delay_ms", self.retry.base_delay_ms),
            ("retry.max_delay_ms", self.retry.max_delay_ms),
            ("retry.max_retry_after_ms", self.retry.max_retry_after_ms),
            ("retry.default_cooldown_ms", self.retry.default_cooldown_ms),
        ] {
            if ms > MAX_DURATION_MS {
                return Err(Error::config(
                    field,
                    format!("must be at most {MAX_DURATION_MS} (7 days), got {ms}"),
                ));
            }
        }
        if self.max_response_bytes == 0 {
            return Err(Error::config("max_response_bytes", "must be at least 1"));
        }
        if self.worker_stack_size < 64 * 1024 || self.worker_stack_size > MAX_WORKER_STACK_SIZE {
            return Err(Error::config(
                "worker_stack_size",
                format!(
                    "must be between 65536 and {MAX_WORKER_STACK_SIZE} bytes, got {}",
                    self.worker_stack_size
                ),
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(Error::config("retry.max_attempts", "must be at least 1"));
        }
        check_headers("headers", &self.headers)?;
        if let Some((field, message)) = self.tls.problem() {
            return Err(Error::config(field, message));
        }
        if let Some((field, message)) = self.credits.problem() {
            return Err(Error::config(field, message));
        }
        crate::prices::check(self.max_cost, &self.prices)?;
        if let Some(shared) = &self.shared {
            crate::shared_config::check(shared)?;
        }
        let mut labels = std::collections::HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let key = k.key.expose();
            if key.trim().is_empty() {
                return Err(Error::config(format!("keys[{i}].key"), "must not be empty"));
            }
            if key.len() > MAX_KEY_BYTES {
                return Err(Error::config(
                    format!("keys[{i}].key"),
                    format!("must be at most {MAX_KEY_BYTES} bytes, got {}", key.len()),
                ));
            }
            if !key.bytes().all(|b| (0x21..0x7f).contains(&b)) {
                return Err(Error::config(
                    format!("keys[{i}].key"),
                    "must be printable ASCII without spaces or control characters (it is sent in a header)",
                ));
            }
            if k.max_concurrent == 0 || k.max_concurrent > MAX_CONCURRENT_LIMIT {
                return Err(Error::config(
                    format!("keys[{i}].max_concurrent"),
                    format!(
                        "must be between 1 and {MAX_CONCURRENT_LIMIT}, got {}",
                        k.max_concurrent
                    ),
                ));
            }
            if let Some(label) = &k.label {
                if label.is_empty() {
                    return Err(Error::config(
                        format!("keys[{i}].label"),
                        "must not be empty",
                    ));
                }
                if label.chars().any(char::is_control) || label.len() > 64 {
                    return Err(Error::config(
                        format!("keys[{i}].label"),
                        "must be at most 64 bytes without control characters",
                    ));
                }
                // A label is shown everywhere a key must not be.
                if let Some(j) = self.keys.iter().position(|other| {
                    let other = other.key.expose();
                    !other.is_empty() && label.contains(other)
                }) {
                    let whose = if j == i {
                        "its own key".to_owned()
                    } else {
                        format!("the key of keys[{j}]")
                    };
                    return Err(Error::config(
                        format!("keys[{i}].label"),
                        format!("must not contain an API key (it contains {whose})"),
                    ));
                }
            }
            let label = self.key_label(i);
            if !labels.insert(label.clone()) {
                return Err(Error::config(
                    format!("keys[{i}].label"),
                    format!("duplicate label {label:?}"),
                ));
            }
            if let Some(url) = &k.base_url {
                check_url(&format!("keys[{i}].base_url"), url)?;
            }
            check_headers(&format!("keys[{i}].headers"), &k.headers)?;
            if k.rpm == Some(0) {
                return Err(Error::config(
                    format!("keys[{i}].rpm"),
                    "must be at least 1 (omit it for no limit)",
                ));
            }
            if k.tpm == Some(0) {
                return Err(Error::config(
                    format!("keys[{i}].tpm"),
                    "must be at least 1 (omit it for no limit)",
                ));
            }
            if k.rpd == Some(0) {
                return Err(Error::config(
                    format!("keys[{i}].rpd"),
                    "must be at least 1 (omit it for no limit)",
                ));
            }
            if let Some(models) = &k.models {
                if models.iter().any(|m| m.is_empty() || m.len() > 256) {
                    return Err(Error::config(
                        format!("keys[{i}].models"),
                        "every entry must be 1 to 256 bytes",
                    ));
                }
            }
            if k.model_map
                .iter()
                .any(|(a, b)| a.is_empty() || b.is_empty() || b.len() > 256)
            {
                return Err(Error::config(
                    format!("keys[{i}].model_map"),
                    "names must be 1 to 256 bytes",
                ));
            }
            if let Some(w) = k.weight {
                if w == 0 || w > MAX_WEIGHT {
                    return Err(Error::config(
                        format!("keys[{i}].weight"),
                        format!("must be between 1 and {MAX_WEIGHT}, got {w}"),
                    ));
                }
            }
            if let Some(g) = &k.group {
                if !self.groups.iter().any(|x| &x.name == g) {
                    return Err(Error::config(
                        format!("keys[{i}].group"),
                        format!("no group named {} in groups", echo(g)),
                    ));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            if g.name.is_empty() || g.name.len() > 64 || g.name.chars().any(char::is_control) {
                return Err(Error::config(
                    format!("groups[{i}].name"),
                    "must be 1 to 64 bytes without control characters",
                ));
            }
            if !names.insert(g.name.as_str()) {
                return Err(Error::config(
                    format!("groups[{i}].name"),
                    format!("duplicate group {}", echo(&g.name)),
                ));
            }
            if g.max_concurrent == Some(0) {
                return Err(Error::config(
                    format!("groups[{i}].max_concurrent"),
                    "must be at least 1 (omit it for no limit)",
                ));
            }
            if g.rpm == Some(0) {
                return Err(Error::config(
                    format!("groups[{i}].rpm"),
                    "must be at least 1 (omit it for no limit)",
                ));
            }
            if g.tpm == Some(0) {
                return Err(Error::config(
                    format!("groups[{i}].tpm"),
                    "must be at least 1 (omit it for no limit)",
                ));
            }
            if g.rpd == Some(0) {
                return Err(Error::config(
                    format!("groups[{i}].rpd"),
                    "must be at least 1 (omit it for no limit)",
                ));
            }
            if g.account_429.as_deref() == Some("") {
                return Err(Error::config(
                    format!("groups[{i}].account_429"),
                    "must not be empty (omit it for key-only 429s)",
                ));
            }
        }
        let workers: usize = self.keys.iter().map(|k| k.max_concurrent).sum();
        if workers > MAX_TOTAL_WORKERS {
            return Err(Error::config(
                "keys",
                format!(
                    "at most {MAX_TOTAL_WORKERS} worker threads in total (the sum of max_concurrent), got {workers}"
                ),
            ));
        }
        Ok(())
    }
}

/// serde's messages quote the offending value; for a key that could be the secret.
///
/// Drops the contents of every double-quoted string (escape-aware: `\"` inside a value
/// does not end it), and the backtick-quoted name after `unknown field` / `unknown
/// variant` unless it looks like a field name (lowercase letters and `_`, at most 40).
/// The result is at most about 300 characters.
fn redact_serde_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(320));
    let mut chars = msg.chars();
    while let Some(c) = chars.next() {
        if c == '"' {
            // Skip to the closing quote, honouring escapes; an unterminated string
            // drops everything to the end.
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => break,
                    _ => {}
                }
            }
            out.push_str("\"…\"");
            continue;
        }
        if c == '`' && (out.ends_with("unknown field ") || out.ends_with("unknown variant ")) {
            // The name may hold backticks itself (found by the config_keys fuzz
            // target). serde goes on with "`, expected …" or "`, there are no …",
            // and the list of names after that holds neither: the last one ends it.
            let rest = chars.as_str();
            let end = ["`, expected ", "`, there are no "]
                .iter()
                .filter_map(|d| rest.rfind(d))
                .max();
            let name = &rest[..end.unwrap_or(rest.len())];
            chars = rest[end.map_or(rest.len(), |e| e + 1)..].chars();
            let plain = !name.is_empty()
                && name.len() <= 40
                && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            out.push('`');
            out.push_str(if plain { name } else { "…" });
            out.push('`');
            continue;
        }
        out.push(c);
    }
    cap(&out, 300)
}

/// `s` cut at `max` bytes (on a character boundary) with an ellipsis.
fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &s[..cut])
}

/// A config value quoted in an error: `Debug`-quoted, any URL password masked, and cut
/// at 100 characters.
fn echo(value: &str) -> String {
    let mut v = value.to_owned();
    for secret in crate::body::url_secrets(value) {
        v = v.replace(&secret, "[REDACTED]");
    }
    let head: String = v.chars().take(100).collect();
    if head.len() < v.len() {
        format!("{head:?}…")
    } else {
        format!("{head:?}")
    }
}

/// A serde field path (`keys[0].lable`, `headers.X-Title`): a segment that is not a
/// plain name (ASCII letters, `_`, `-`, at most 40; no digits — keys have them) is
/// shown as `…`, since an unknown field or a map key could be a pasted secret.
fn redact_path(path: &str) -> String {
    let segments: Vec<String> = path
        .split('.')
        .map(|seg| {
            let (name, index) = seg.split_at(seg.find('[').unwrap_or(seg.len()));
            let plain = name.len() <= 40
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphabetic() || b == b'_' || b == b'-');
            let index_ok = index
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'[' || b == b']');
            match (plain, index_ok) {
                (true, true) => seg.to_owned(),
                (true, false) => format!("{name}[…]"),
                _ => "…".to_owned(),
            }
        })
        .collect();
    cap(&segments.join("."), 200)
}

/// A field path that may hold a user-chosen name (a header name): cut at 200 bytes.
fn echo_field(field: &str) -> String {
    cap(field, 200)
}

fn check_url(field: &str, url: &str) -> Result<(), Error> {
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e| Error::config(field, format!("not a valid URL ({e}): {}", echo(url))))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(Error::config(
                field,
                format!("must start with http:// or https://: {}", echo(url)),
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(Error::config(field, format!("has no host: {}", echo(url))));
    }
    if uri.query().is_some() {
        return Err(Error::config(
            field,
            format!("must not contain a query string: {}", echo(url)),
        ));
    }
    Ok(())
}

fn check_headers(field: &str, headers: &BTreeMap<String, String>) -> Result<(), Error> {
    for (name, value) in headers {
        if ureq::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(Error::config(
                echo_field(&format!("{field}.{name}")),
                "not a valid header name",
            ));
        }
        if ureq::http::HeaderValue::from_str(value).is_err() {
            return Err(Error::config(
                echo_field(&format!("{field}.{name}")),
                "not a valid header value",
            ));
        }
        if name.eq_ignore_ascii_case("authorization") {
            return Err(Error::config(
                format!("{field}.{name}"),
                "set the key in keys[].key, not as an Authorization header",
            ));
        }
    }
    Ok(())
}

/// Builds a [`Config`] in Rust. Every setter documents its default.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    config: Config,
}

impl ConfigBuilder {
    /// Base URL. Defaults to `https://openrouter.ai/api/v1`.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.config.base_url = url.into();
        self
    }

    /// Dispatch strategy. Defaults to [`Strategy::FirstAvailable`].
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.config.strategy = s;
        self
    }

    /// Timeout of each phase of one attempt (see [`Config::timeout_ms`]), in
    /// milliseconds. Defaults to 600,000.
    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.config.timeout_ms = ms;
        self
    }

    /// Timeout of each phase of one attempt (see [`Config::timeout_ms`]). Defaults to
    /// 10 minutes.
    pub fn timeout(self, d: Duration) -> Self {
        self.timeout_ms(ms(d))
    }

    /// Connect timeout in milliseconds. Defaults to 10,000.
    pub fn connect_timeout_ms(mut self, ms: u64) -> Self {
        self.config.connect_timeout_ms = ms;
        self
    }

    /// Connect timeout. Defaults to 10 s.
    pub fn connect_timeout(self, d: Duration) -> Self {
        self.connect_timeout_ms(ms(d))
    }

    /// Idle limit of streamed responses in milliseconds; 0 for none. Defaults to 60,000.
    pub fn stream_idle_timeout_ms(mut self, ms: u64) -> Self {
        self.config.stream_idle_timeout_ms = ms;
        self
    }

    /// Overall per-request deadline in milliseconds; 0 for none. Defaults to 0.
    pub fn deadline_ms(mut self, ms: u64) -> Self {
        self.config.deadline_ms = ms;
        self
    }

    /// Overall per-request deadline: queueing, every attempt and backoff. Defaults to
    /// none.
    pub fn deadline(self, d: Duration) -> Self {
        self.deadline_ms(ms(d))
    }

    /// Queue capacity. Defaults to 1024.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.config.queue_capacity = n;
        self
    }

    /// Adds a header sent with every request. Defaults to none.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.headers.insert(name.into(), value.into());
        self
    }

    /// Largest response body in bytes. Defaults to 16 MiB.
    pub fn max_response_bytes(mut self, n: u64) -> Self {
        self.config.max_response_bytes = n;
        self
    }

    /// Worker thread stack size in bytes. Defaults to 256 KiB.
    pub fn worker_stack_size(mut self, n: usize) -> Self {
        self.config.worker_stack_size = n;
        self
    }

    /// Retry policy. Defaults to [`RetryConfig::default`].
    pub fn retry(mut self, r: RetryConfig) -> Self {
        self.config.retry = r;
        self
    }

    /// Attempts per request (1 = no retries). Defaults to 3.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.config.retry.max_attempts = n;
        self
    }

    /// Models to fall back to, in order, when `model` cannot be served (see
    /// [`Config::fallback_models`]).
    pub fn fallback_models<S: Into<String>>(
        mut self,
        model: impl Into<String>,
        fallbacks: impl IntoIterator<Item = S>,
    ) -> Self {
        self.config.fallback_models.insert(
            model.into(),
            fallbacks.into_iter().map(Into::into).collect(),
        );
        self
    }

    /// Use a request's `"user"` field as its affinity (see
    /// [`Config::affinity_from_user`]). Defaults to false.
    pub fn affinity_from_user(mut self, on: bool) -> Self {
        self.config.affinity_from_user = on;
        self
    }

    /// Whether a key's first request goes alone (see [`RetryConfig::probe_keys`]).
    /// Defaults to true.
    pub fn probe_keys(mut self, on: bool) -> Self {
        self.config.retry.probe_keys = on;
        self
    }

    /// Whether keys on trial are proven with an authenticated `GET` as the pool starts
    /// (see [`RetryConfig::prove_keys`]). Defaults to true.
    pub fn prove_keys(mut self, on: bool) -> Self {
        self.config.retry.prove_keys = on;
        self
    }

    /// Adds a key with `max_concurrent` workers and the default label.
    pub fn key(mut self, key: impl Into<ApiKey>, max_concurrent: usize) -> Self {
        self.config
            .keys
            .push(KeyConfig::new(key).max_concurrent(max_concurrent));
        self
    }

    /// Adds a fully specified key.
    pub fn key_config(mut self, key: KeyConfig) -> Self {
        self.config.keys.push(key);
        self
    }

    /// Shares each key's limits with other processes through Redis (needs the `redis`
    /// cargo feature). Defaults to none.
    pub fn shared(mut self, shared: crate::shared_config::SharedConfig) -> Self {
        self.config.shared = Some(shared);
        self
    }

    /// Extra CAs to trust and a client certificate for `https://` (see
    /// [`TlsConfig`](crate::TlsConfig)). Defaults to none.
    pub fn tls(mut self, tls: crate::tls_config::TlsConfig) -> Self {
        self.config.tls = tls;
        self
    }

    /// Credit checks at `GET {base_url}/key` (see [`CreditsConfig`](crate::CreditsConfig)).
    /// Defaults to off.
    pub fn credits(mut self, credits: crate::credits_config::CreditsConfig) -> Self {
        self.config.credits = credits;
        self
    }

    /// The pool's spend cap in dollars (see [`Config::max_cost`]). Defaults to none.
    pub fn max_cost(mut self, dollars: f64) -> Self {
        self.config.max_cost = Some(dollars);
        self
    }

    /// A model's price in dollars per million prompt and completion tokens, to
    /// estimate costs the server does not report (see [`Config::prices`]). Defaults to
    /// none.
    pub fn price(mut self, model: impl Into<String>, prompt: f64, completion: f64) -> Self {
        self.config.prices.insert(
            model.into(),
            crate::prices::ModelPrice::new(prompt, completion),
        );
        self
    }

    /// Adds an account whose limits bind its keys together. Defaults to none.
    pub fn group(mut self, group: GroupConfig) -> Self {
        self.config.groups.push(group);
        self
    }

    /// Validates and returns the config.
    pub fn build(self) -> Result<Config, Error> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_with_backticks_are_not_echoed() {
        // Found by the config_keys fuzz target: the name ended at its own backtick
        // and the rest of it, a key, was shown.
        let key = "sk-live-0123456789";
        for json in [
            format!(r#"{{"strategy":"x`y {key}","keys":[{{"key":"{key}"}}]}}"#),
            format!(r#"{{"x`, expected {key}":1,"keys":[{{"key":"{key}"}}]}}"#),
            format!(r#"{{"strategy":"`, there are no {key}`, expected ","keys":[]}}"#),
        ] {
            let e = Config::from_json(&json).unwrap_err().to_string();
            assert!(!e.contains(key), "{e}");
            assert!(e.contains("unknown"), "{e}");
        }
        let e = Config::from_json(r#"{"stratgy":1,"keys":[]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `stratgy`, expected one of"),
            "{e}"
        );
    }
}
