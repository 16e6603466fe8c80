//! Pool configuration: built in Rust with [`ConfigBuilder`] or loaded from JSON with
//! [`Config::from_json`] (the same field names the C ABI and the CLI use).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Upper bound for [`KeyConfig::max_concurrent`]: one thread per slot, so a typo like
/// `50000` is rejected rather than spawning fifty thousand threads.
pub const MAX_CONCURRENT_LIMIT: usize = 1024;
/// Upper bound for the number of keys in one pool.
pub const MAX_KEYS: usize = 4096;

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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
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
        }
    }
}

/// One API key and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
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
        }
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

    /// Limits tokens per minute. Defaults to unlimited.
    pub fn tpm(mut self, tpm: u64) -> KeyConfig {
        self.tpm = Some(tpm);
        self
    }
}

/// Everything a [`Pool`](crate::Pool) needs. Load it with [`Config::from_json`] or build it
/// with [`Config::builder`]; both are validated by [`Config::validate`], which
/// [`Pool::new`](crate::Pool::new) also calls.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Base URL requests' paths are appended to. Defaults to `https://openrouter.ai/api/v1`.
    pub base_url: String,
    /// Dispatch strategy. Defaults to `first_available`.
    pub strategy: Strategy,
    /// Timeout of one HTTP attempt (connect, send, receive). Defaults to 600,000 ms.
    pub timeout_ms: u64,
    /// Timeout for opening a connection. Defaults to 10,000 ms.
    pub connect_timeout_ms: u64,
    /// Overall deadline of one request across queueing and retries; 0 means none.
    /// Defaults to 0.
    pub deadline_ms: u64,
    /// Requests that may wait for a free worker before `submit` blocks (and
    /// `try_submit` returns `Busy`). Defaults to 1024.
    pub queue_capacity: usize,
    /// Headers sent with every request (e.g. OpenRouter's `HTTP-Referer`, `X-Title`).
    /// Defaults to none.
    pub headers: BTreeMap<String, String>,
    /// Largest response body read, in bytes; a larger one is a transport error.
    /// Defaults to 16 MiB.
    pub max_response_bytes: u64,
    /// Stack size of each worker thread, in bytes. Defaults to 256 KiB.
    pub worker_stack_size: usize,
    /// Retry, backoff and key-health policy.
    pub retry: RetryConfig,
    /// The keys. At least one is required.
    pub keys: Vec<KeyConfig>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            base_url: "https://openrouter.ai/api/v1".to_owned(),
            strategy: Strategy::default(),
            timeout_ms: 600_000,
            connect_timeout_ms: 10_000,
            deadline_ms: 0,
            queue_capacity: 1024,
            headers: BTreeMap::new(),
            max_response_bytes: 16 * 1024 * 1024,
            worker_stack_size: 256 * 1024,
            retry: RetryConfig::default(),
            keys: Vec::new(),
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
        if self.queue_capacity == 0 {
            return Err(Error::config("queue_capacity", "must be at least 1"));
        }
        if self.max_response_bytes == 0 {
            return Err(Error::config("max_response_bytes", "must be at least 1"));
        }
        if self.worker_stack_size < 64 * 1024 {
            return Err(Error::config(
                "worker_stack_size",
                "must be at least 65536 bytes",
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(Error::config("retry.max_attempts", "must be at least 1"));
        }
        check_headers("headers", &self.headers)?;
        let mut labels = std::collections::HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let key = k.key.expose();
            if key.trim().is_empty() {
                return Err(Error::config(format!("keys[{i}].key"), "must not be empty"));
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

    /// Per-attempt timeout in milliseconds. Defaults to 600,000.
    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.config.timeout_ms = ms;
        self
    }

    /// Connect timeout in milliseconds. Defaults to 10,000.
    pub fn connect_timeout_ms(mut self, ms: u64) -> Self {
        self.config.connect_timeout_ms = ms;
        self
    }

    /// Overall per-request deadline in milliseconds; 0 for none. Defaults to 0.
    pub fn deadline_ms(mut self, ms: u64) -> Self {
        self.config.deadline_ms = ms;
        self
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

    /// Whether a key's first request goes alone (see [`RetryConfig::probe_keys`]).
    /// Defaults to true.
    pub fn probe_keys(mut self, on: bool) -> Self {
        self.config.retry.probe_keys = on;
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
