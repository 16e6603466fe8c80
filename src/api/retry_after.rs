//! A server's retry hint (`retry-after-ms`, `Retry-After` in seconds or as an HTTP
//! date), read without trusting it, and [`MAX_WAIT`], the cap on every wait derived from
//! a server value. `Response::retry_after` exposes it; `policy::retry` acts on it.

use std::time::{Duration, SystemTime};

/// The longest wait keypool ever derives from a server hint or the backoff policy:
/// 7 days. `Retry-After` values (and HTTP dates) further out saturate here before they
/// are turned into a [`Duration`], so no server value can overflow a clock.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Non-negative seconds to a [`Duration`], saturating at [`MAX_WAIT`] (a number too
/// large for `f64` parses as infinity and saturates too). NaN and negatives are `None`.
pub(crate) fn bounded_secs(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    // `min` first: `Duration::from_secs_f64` panics on values it cannot represent.
    Some(Duration::from_secs_f64(secs.min(MAX_WAIT.as_secs_f64())))
}

/// Reads `retry-after-ms` (milliseconds) or `retry-after` (seconds, or an HTTP date).
///
/// Total: never panics for any header text. Negative, NaN or unparsable values are
/// ignored (`None`); anything longer than [`MAX_WAIT`] (7 days) saturates there. A
/// date in the past is zero. Callers clamp further to `max_retry_after_ms`.
pub(crate) fn parse_retry_after(ms: Option<&str>, after: Option<&str>) -> Option<Duration> {
    if let Some(ms) = ms.and_then(|s| s.trim().parse::<f64>().ok()) {
        if let Some(d) = bounded_secs(ms / 1000.0) {
            return Some(d);
        }
    }
    let after = after?.trim();
    if let Ok(secs) = after.parse::<f64>() {
        return bounded_secs(secs);
    }
    let when = httpdate::parse_http_date(after).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX_WAIT),
    )
}
