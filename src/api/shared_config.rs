//! The `shared` section of the configuration: [`SharedConfig`] and [`OnUnavailable`],
//! and their validation; the shared limits themselves are `limits::shared_limits`.

use std::fmt;

use serde::Deserialize;

use crate::error::Error;

/// What admissions do while Redis cannot be reached. Defaults to `local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Fall back to local limits scaled by [`SharedConfig::local_share_percent`]:
    /// `max_concurrent`, `rpm` and `tpm` of each key and of each group times the share
    /// (rounded down, at least 1), counted in this process
    /// alone, until Redis answers again.
    #[default]
    Local,
    /// Refuse: every request that needs an admission while Redis is unreachable ends
    /// with [`Error::SharedUnavailable`].
    Fail,
}

/// Coordination through Redis: the `shared` object of the JSON config. See
/// [`Config::shared`](crate::Config::shared).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedConfig {
    /// `redis://[:password@]host[:port][/db]` (or `rediss://`, `redis+unix://`). Required.
    /// Its password never appears in `Debug`, errors or logs.
    pub redis_url: String,
    /// Separates independent teams or jobs on one Redis: only pools with the same
    /// namespace share limits. Also salts the hash that names keys in Redis.
    /// Defaults to `"keypool"`.
    pub namespace: String,
    /// Lifetime of a concurrency lease in milliseconds: a running request renews its
    /// lease every `lease_ms / 3`, and the slots of a crashed process come back within
    /// `lease_ms`. Between 300 and 3,600,000. Defaults to 30,000.
    pub lease_ms: u64,
    /// Connect, read and write timeout of every Redis call, in milliseconds, between 1
    /// and 60,000. Defaults to 1,000.
    pub timeout_ms: u64,
    /// What to do while Redis is unreachable. Defaults to `local`.
    pub on_unavailable: OnUnavailable,
    /// With `on_unavailable: local`, the percentage (1–100) of each key's and each
    /// group's limits this process uses on its own while Redis is down: e.g. 33 for one
    /// of three processes.
    /// Defaults to 100.
    pub local_share_percent: u32,
}

impl Default for SharedConfig {
    fn default() -> SharedConfig {
        SharedConfig {
            redis_url: String::new(),
            namespace: "keypool".to_owned(),
            lease_ms: 30_000,
            timeout_ms: 1_000,
            on_unavailable: OnUnavailable::Local,
            local_share_percent: 100,
        }
    }
}

impl SharedConfig {
    /// Shared limits through the Redis at `redis_url`, every other field at its default.
    pub fn new(redis_url: impl Into<String>) -> SharedConfig {
        SharedConfig {
            redis_url: redis_url.into(),
            ..SharedConfig::default()
        }
    }

    /// The namespace. Defaults to `"keypool"`.
    pub fn namespace(mut self, ns: impl Into<String>) -> SharedConfig {
        self.namespace = ns.into();
        self
    }

    /// The lease lifetime in milliseconds. Defaults to 30,000.
    pub fn lease_ms(mut self, ms: u64) -> SharedConfig {
        self.lease_ms = ms;
        self
    }

    /// The timeout of every Redis call in milliseconds. Defaults to 1,000.
    pub fn timeout_ms(mut self, ms: u64) -> SharedConfig {
        self.timeout_ms = ms;
        self
    }

    /// What to do while Redis is unreachable. Defaults to [`OnUnavailable::Local`].
    pub fn on_unavailable(mut self, mode: OnUnavailable) -> SharedConfig {
        self.on_unavailable = mode;
        self
    }

    /// This process's share of each key's limits while Redis is down, in percent.
    /// Defaults to 100.
    pub fn local_share_percent(mut self, pct: u32) -> SharedConfig {
        self.local_share_percent = pct;
        self
    }

    /// `redis_url` with any password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.redis_url)
    }
}

impl fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedConfig")
            .field("redis_url", &self.redacted_url())
            .field("namespace", &self.namespace)
            .field("lease_ms", &self.lease_ms)
            .field("timeout_ms", &self.timeout_ms)
            .field("on_unavailable", &self.on_unavailable)
            .field("local_share_percent", &self.local_share_percent)
            .finish()
    }
}

/// Replaces the userinfo of a URL (`scheme://user:pass@host`) by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => format!("{}***@{}", &url[..scheme_end + 3], &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Checks the `shared` section (field names under `shared.`).
pub(crate) fn check(c: &SharedConfig) -> Result<(), Error> {
    if !cfg!(feature = "redis") {
        return Err(Error::config(
            "shared",
            "this build of keypool has no shared limits: rebuild it with the `redis` cargo feature",
        ));
    }
    if c.redis_url.is_empty() {
        return Err(Error::config("shared.redis_url", "is required"));
    }
    #[cfg(feature = "redis")]
    if let Err(e) = ::redis::Client::open(c.redis_url.as_str()) {
        // The crate's message never quotes the URL, but mask it anyway.
        let msg = e.to_string().replace(&c.redis_url, &c.redacted_url());
        return Err(Error::config(
            "shared.redis_url",
            format!("not a valid Redis URL: {msg}"),
        ));
    }
    if c.namespace.is_empty()
        || c.namespace.len() > 64
        || !c
            .namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(Error::config(
            "shared.namespace",
            "must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.'",
        ));
    }
    if !(300..=3_600_000).contains(&c.lease_ms) {
        return Err(Error::config(
            "shared.lease_ms",
            format!("must be between 300 and 3600000, got {}", c.lease_ms),
        ));
    }
    if !(1..=60_000).contains(&c.timeout_ms) {
        return Err(Error::config(
            "shared.timeout_ms",
            format!("must be between 1 and 60000, got {}", c.timeout_ms),
        ));
    }
    if !(1..=100).contains(&c.local_share_percent) {
        return Err(Error::config(
            "shared.local_share_percent",
            format!("must be between 1 and 100, got {}", c.local_share_percent),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://:hunter2@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redact_url("redis://user:p@ss@host/1"), "redis://***@host/1");
        assert_eq!(redact_url("redis://127.0.0.1/0"), "redis://127.0.0.1/0");
        let c = SharedConfig::new("redis://:hunter2@h:1/0");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
