//! OpenAI-style rate-limit headers: pause a key *before* the server rejects it.
//!
//! When a response says `x-ratelimit-remaining-requests: 0` (or `-tokens: 0`), the key
//! cools until the matching `x-ratelimit-reset-*` instant. Resets come as OpenAI
//! durations (`1s`, `6m0s`, `20ms`, `1h2m3.5s`), plain seconds, or epoch seconds or
//! milliseconds from other servers; none is trusted: every pause is clamped to
//! `retry.max_retry_after_ms`, an unreadable reset pauses `retry.default_cooldown_ms`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// Seconds in an OpenAI duration (`6m0s`, `20ms`, `1.5s`), a plain number of seconds,
/// or an epoch instant (seconds above 10⁹, milliseconds above 10¹²). `None` if
/// unreadable or not finite.
pub(crate) fn reset_secs(v: &str) -> Option<f64> {
    if let Ok(n) = v.parse::<f64>() {
        if !n.is_finite() || n < 0.0 {
            return None;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        return Some(if n > 1e12 {
            n / 1000.0 - now
        } else if n > 1e9 {
            n - now
        } else {
            n
        });
    }
    let mut total = 0.0;
    let mut rest = v;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..end].parse().ok()?;
        rest = &rest[end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += n * scale;
    }
    total.is_finite().then_some(total)
}

/// How long to pause the key, if the headers say a budget is spent.
pub(crate) fn pause(
    headers: &[(String, String)],
    default: Duration,
    max: Duration,
) -> Option<Duration> {
    let mut out: Option<Duration> = None;
    for kind in ["requests", "tokens"] {
        let remaining = header(headers, &format!("x-ratelimit-remaining-{kind}"))
            .and_then(|v| v.parse::<f64>().ok());
        if remaining.is_none_or(|r| r.is_nan() || r > 0.0) {
            continue;
        }
        let wait = header(headers, &format!("x-ratelimit-reset-{kind}"))
            .and_then(reset_secs)
            .map_or(default, |s| crate::admission::secs_saturating(s, max));
        let wait = wait.min(max);
        if !wait.is_zero() {
            out = out.max(Some(wait));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn durations() {
        assert_eq!(reset_secs("1s"), Some(1.0));
        assert_eq!(reset_secs("6m0s"), Some(360.0));
        assert_eq!(reset_secs("20ms"), Some(0.02));
        assert_eq!(reset_secs("1h2m3.5s"), Some(3723.5));
        assert_eq!(reset_secs("2"), Some(2.0));
        assert_eq!(reset_secs(""), None);
        assert_eq!(reset_secs("soon"), None);
        assert_eq!(reset_secs("5x"), None);
        assert_eq!(reset_secs("-1"), None);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let e = reset_secs(&(now.as_secs() + 3).to_string()).unwrap();
        assert!((1.5..=3.5).contains(&e), "{e}");
        let e = reset_secs(&(now.as_millis() + 3000).to_string()).unwrap();
        assert!((2.5..=3.5).contains(&e), "{e}");
    }

    #[test]
    fn pauses_only_when_spent_and_clamps() {
        let d = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(pause(&h(&[]), d, max), None);
        let ok = h(&[
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "1s"),
        ]);
        assert_eq!(pause(&ok, d, max), None);
        let spent = h(&[
            ("X-RateLimit-Remaining-Requests", "0"),
            ("x-ratelimit-reset-requests", "250ms"),
        ]);
        assert_eq!(pause(&spent, d, max), Some(Duration::from_millis(250)));
        let huge = h(&[
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "99999999999999999999"),
        ]);
        assert_eq!(pause(&huge, d, max), Some(max));
        let garbage = h(&[
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "NaN"),
        ]);
        assert_eq!(pause(&garbage, d, max), Some(d));
        let past = h(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1000000001"),
        ]);
        assert_eq!(pause(&past, d, max), None);
    }
}
