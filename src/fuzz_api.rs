//! Thin entry points into crate-private parsers, for the `fuzz/` targets only.
//!
//! **Not part of the stable API**: hidden from the docs, exempt from semver, and free
//! to change or disappear in any release. Everything here takes plain bytes or strings
//! and returns plain data, so the fuzz crate never depends on internal types.

use std::time::Duration;

use crate::{Config, Usage};

/// The cap on any wait derived from a server hint (`retry::MAX_WAIT`, 7 days).
pub const MAX_WAIT: Duration = crate::retry::MAX_WAIT;

/// `retry::parse_retry_after`: `retry-after-ms` and `retry-after` header values.
pub fn retry_after(ms: Option<&str>, after: Option<&str>) -> Option<Duration> {
    crate::retry::parse_retry_after(ms, after)
}

/// The cap on a token count read from `usage` (`body::MAX_USAGE_TOKENS`).
pub const MAX_USAGE_TOKENS: u64 = crate::body::MAX_USAGE_TOKENS;

/// Why [`inspect_success`] rejected a 2xx body (mirrors the crate-private `Problem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// `{"error": …}` inside a 2xx, with its plausible HTTP code.
    Embedded(Option<u16>),
    /// Not a valid answer for the endpoint; why.
    Invalid(String),
    /// A choice failed (`choices[].error`, `finish_reason: "error"`), with its code.
    ChoiceFailed(Option<u16>),
}

/// `body::inspect_success`: the usage of a 2xx body, or why it is not a success.
pub fn inspect_success(
    body: &[u8],
    path: &str,
    content_type: Option<&str>,
) -> Result<Option<Usage>, Rejected> {
    crate::body::inspect_success_billed(body, path, content_type)
        .map(|(usage, _cost)| usage)
        .map_err(|p| match p {
            crate::body::Problem::Embedded(c) => Rejected::Embedded(c),
            crate::body::Problem::Invalid(m) => Rejected::Invalid(m),
            crate::body::Problem::ChoiceFailed(c, _) => Rejected::ChoiceFailed(c),
        })
}

/// `body::parse_usage`: the lenient `usage` of any body.
pub fn parse_usage(body: &[u8]) -> Option<Usage> {
    crate::body::parse_usage(body)
}

/// The longest message [`error_message`] returns, in bytes: 500 plus a 3-byte ellipsis.
pub const ERROR_MESSAGE_MAX_BYTES: usize = 503;

/// `body::error_message`: the one-line human message of an error body.
pub fn error_message(body: &[u8]) -> String {
    crate::body::error_message(body)
}

/// `body::Masker::new(secrets).mask_bytes(text)`: `None` when no secret occurs.
pub fn mask(secrets: Vec<(String, String)>, text: &[u8]) -> Option<Vec<u8>> {
    crate::body::Masker::new(secrets).mask_bytes(text)
}

/// `body::Masker::for_config(config).mask_str(text)`: every key and URL password of
/// `config` masked.
pub fn mask_for_config(config: &Config, text: &str) -> String {
    crate::body::Masker::for_config(config).mask_str(text.to_owned())
}
