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

/// `min(base·2^n, max)` minus up to 25 % jitter, like the official OpenAI client.
pub(crate) fn backoff(retry_index: u32, cfg: &RetryConfig) -> Duration {
    let base = cfg.base_delay_ms as f64 * 2f64.powi(retry_index.min(30) as i32);
    let capped = base.min(cfg.max_delay_ms as f64);
    let jitter = 1.0 - 0.25 * fastrand::f64();
    Duration::from_secs_f64(capped * jitter / 1000.0)
}

/// Reads `retry-after-ms` (milliseconds) or `retry-after` (seconds, or an HTTP date).
pub(crate) fn parse_retry_after(ms: Option<&str>, after: Option<&str>) -> Option<Duration> {
    if let Some(ms) = ms.and_then(|s| s.trim().parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    let after = after?.trim();
    if let Ok(secs) = after.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(after).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
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
}
