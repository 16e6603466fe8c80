//! Retry policy: what is retryable, how long to back off, how to read `Retry-After`.

use std::time::{Duration, SystemTime};

use crate::config::RetryConfig;

/// What one attempt's outcome means for the request and for the key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Verdict {
    /// Worth another attempt (on another key when one is usable).
    pub retry: bool,
    /// The server's hint for when to try again.
    pub retry_after: Option<Duration>,
    /// Put the key in cooldown for this long (429).
    pub cooldown: Option<Duration>,
    /// Take the key out of rotation, with this reason (401, 403, 402).
    pub disable: Option<String>,
    /// Cool the key's whole group (a 429 attributed to the account).
    pub group_cooldown: Option<Duration>,
}

/// Judges an HTTP status (with its `x-should-retry` and retry-after hints).
pub(crate) fn judge_status(
    status: u16,
    should_retry: Option<&str>,
    retry_after: Option<Duration>,
    cfg: &RetryConfig,
) -> Verdict {
    let mut v = Verdict {
        retry_after,
        ..Verdict::default()
    };
    v.retry = matches!(status, 408 | 409 | 429) || (500..600).contains(&status);
    match status {
        429 => {
            let d = retry_after.unwrap_or(Duration::from_millis(cfg.default_cooldown_ms));
            v.cooldown = Some(d.min(Duration::from_millis(cfg.max_retry_after_ms)));
        }
        401 | 403 => {
            v.disable = Some(format!("HTTP {status}: key rejected"));
            // The request is not at fault: another key may serve it.
            v.retry = true;
        }
        402 if cfg.park_on_402 => {
            v.disable = Some("HTTP 402: out of credits".to_owned());
            v.retry = true;
        }
        _ => {}
    }
    match should_retry.map(str::trim) {
        Some("true") => v.retry = true,
        Some("false") if v.disable.is_none() => v.retry = false,
        _ => {}
    }
    v
}

/// The longest wait keypool ever derives from a server hint or the backoff policy:
/// 7 days. `Retry-After` values (and HTTP dates) further out saturate here before they
/// are turned into a [`Duration`], so no server value can overflow a clock.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Non-negative seconds to a [`Duration`], saturating at [`MAX_WAIT`] (a number too
/// large for `f64` parses as infinity and saturates too). NaN and negatives are `None`.
fn bounded_secs(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    // `min` first: `Duration::from_secs_f64` panics on values it cannot represent.
    Some(Duration::from_secs_f64(secs.min(MAX_WAIT.as_secs_f64())))
}

/// `min(base·2^n, max)` minus up to 25 % jitter, like the official OpenAI client.
/// Total for every config value: the result never exceeds [`MAX_WAIT`].
pub(crate) fn backoff(retry_index: u32, cfg: &RetryConfig) -> Duration {
    let base = cfg.base_delay_ms as f64 * 2f64.powi(retry_index.min(30) as i32);
    let capped = base.min(cfg.max_delay_ms as f64);
    let jitter = 1.0 - 0.25 * fastrand::f64();
    bounded_secs(capped * jitter / 1000.0).unwrap_or(Duration::ZERO)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            parse_retry_after(Some("250"), None),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_retry_after(None, Some("2")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after(Some("x"), Some("1.5")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after(None, Some("-1")), None);
        assert_eq!(parse_retry_after(None, None), None);
        let future = SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(None, Some(&httpdate::fmt_http_date(future))).unwrap();
        assert!(
            d > Duration::from_secs(27) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(30));
        assert_eq!(parse_retry_after(None, Some(&past)), Some(Duration::ZERO));
    }

    #[test]
    fn statuses() {
        let c = RetryConfig::default();
        for s in [408, 409, 429, 500, 502, 503] {
            assert!(judge_status(s, None, None, &c).retry, "{s}");
        }
        for s in [400, 404, 422] {
            assert!(!judge_status(s, None, None, &c).retry, "{s}");
        }
        assert!(judge_status(400, Some("true"), None, &c).retry);
        assert!(!judge_status(503, Some("false"), None, &c).retry);
        let v = judge_status(429, None, None, &c);
        assert_eq!(v.cooldown, Some(Duration::from_millis(1000)));
        let v = judge_status(429, None, Some(Duration::from_secs(3600)), &c);
        assert_eq!(v.cooldown, Some(Duration::from_millis(60_000)));
        assert!(judge_status(401, None, None, &c).disable.is_some());
        assert!(judge_status(402, None, None, &c).disable.is_some());
    }

    #[test]
    fn backoff_bounds() {
        let c = RetryConfig::default();
        for n in 0..10 {
            let d = backoff(n, &c).as_secs_f64();
            let full = (0.5 * 2f64.powi(n as i32)).min(8.0);
            assert!(d <= full + 1e-9 && d >= full * 0.75 - 1e-9, "n={n} d={d}");
        }
    }

    #[test]
    fn retry_after_never_panics_and_is_bounded() {
        let hostile = [
            "111111111111111111111",
            "1e300",
            "1.7976931348623157e308",
            "-1e300",
            "1e-300",
            "inf",
            "-inf",
            "infinity",
            "NaN",
            "-0",
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775807",
            "0x10",
            "",
            "   ",
            "1 2",
            "1,5",
            "+5",
            "5s",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Thu, 01 Jan 1970 00:00:00 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT garbage",
            "\u{0}",
            "ééé",
        ];
        for a in hostile {
            for b in hostile {
                let d = parse_retry_after(Some(a), Some(b));
                assert!(d.is_none_or(|d| d <= MAX_WAIT), "{a:?} {b:?}: {d:?}");
                let d = parse_retry_after(None, Some(b));
                assert!(d.is_none_or(|d| d <= MAX_WAIT), "{b:?}: {d:?}");
            }
        }
        assert_eq!(parse_retry_after(Some("1e300"), None), Some(MAX_WAIT));
        assert_eq!(
            parse_retry_after(None, Some("111111111111111111111")),
            Some(MAX_WAIT)
        );
        let far = SystemTime::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        assert_eq!(
            parse_retry_after(None, Some(&httpdate::fmt_http_date(far))),
            Some(MAX_WAIT)
        );
        assert_eq!(parse_retry_after(Some("-inf"), None), None);
        assert_eq!(
            parse_retry_after(Some("NaN"), Some("3")),
            Some(Duration::from_secs(3))
        );
        let long = "9".repeat(100_000);
        assert_eq!(parse_retry_after(Some(&long), None), Some(MAX_WAIT));
    }

    #[test]
    fn backoff_is_total_for_extreme_configs() {
        for (base, max) in [
            (u64::MAX, u64::MAX),
            (u64::MAX, 0),
            (0, u64::MAX),
            (1, u64::MAX),
            (0, 0),
        ] {
            let c = RetryConfig {
                base_delay_ms: base,
                max_delay_ms: max,
                ..RetryConfig::default()
            };
            for n in [0, 1, 30, 31, u32::MAX] {
                let d = backoff(n, &c);
                assert!(d <= MAX_WAIT, "{base} {max} {n}: {d:?}");
                // The pool adds the delay to `Instant::now()`: that must not overflow.
                let _ = std::time::Instant::now() + d;
            }
        }
    }
}
