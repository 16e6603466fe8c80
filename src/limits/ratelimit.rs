//! OpenAI-style rate-limit headers: pause a key *before* the server rejects it, and
//! learn its budgets.
//!
//! When a response says `x-ratelimit-remaining-requests: 0` (or `-tokens: 0`), the key
//! cools until the matching `x-ratelimit-reset-*` instant. Resets come as OpenAI
//! durations (`1s`, `6m0s`, `20ms`, `1h2m3.5s`), plain seconds, or epoch seconds or
//! milliseconds from other servers; none is trusted: every pause is clamped to
//! `retry.max_retry_after_ms`, an unreadable reset pauses `retry.default_cooldown_ms`.
//!
//! When a response also says `x-ratelimit-limit-requests` (or `-tokens`), a key without
//! a configured `rpm` (or `tpm`) learns a budget from it ([`observe`], applied by the
//! key's gate, `admission::Learned`): `limit` per window, the window being the longest
//! reset seen on the key so far (clamped to `retry.max_retry_after_ms`, at least
//! [`MIN_WINDOW`]). For a fixed window the first response after a boundary reports
//! nearly the whole window; for OpenAI's per-minute budgets, which refill continuously,
//! the reset grows towards the minute as the budget drains. So the estimate grows from
//! below and is never slower than the server; until it is right, the pause at
//! `remaining: 0` is the backstop. Counts are clamped to `0..=`[`MAX_COUNT`] (a
//! `limit` of 0 counts as 1: one request per window, never a key parked for good);
//! anything unreadable (text, NaN, negative, infinite) is ignored.

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

/// The largest count believed from a rate-limit header; larger values are clamped.
pub(crate) const MAX_COUNT: u64 = 1_000_000_000_000;

/// The shortest window a learned budget assumes.
pub(crate) const MIN_WINDOW: Duration = Duration::from_millis(1);

/// What one response's headers say about one budget (requests or tokens), sanitised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Budget {
    /// `x-ratelimit-limit-*`, clamped to `1..=MAX_COUNT`.
    pub limit: Option<u64>,
    /// `x-ratelimit-remaining-*`, clamped to `0..=MAX_COUNT`.
    pub remaining: Option<u64>,
    /// `x-ratelimit-reset-*`, clamped to `0..=max`.
    pub reset: Option<Duration>,
}

impl Budget {
    /// At most a tenth of the limit left (or nothing left): a learning key should not
    /// ask for more concurrency now.
    pub(crate) fn low(&self) -> bool {
        match (self.remaining, self.limit) {
            (Some(r), Some(l)) => r.saturating_mul(10) <= l,
            (Some(r), None) => r == 0,
            _ => false,
        }
    }
}

/// What one response's rate-limit headers say, sanitised (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Observed {
    /// `x-ratelimit-*-requests`.
    pub requests: Budget,
    /// `x-ratelimit-*-tokens`.
    pub tokens: Budget,
}

impl Observed {
    /// Either budget is low ([`Budget::low`]).
    pub(crate) fn low(&self) -> bool {
        self.requests.low() || self.tokens.low()
    }
}

/// A count from a header: a finite, non-negative number (fractions floored), clamped to
/// [`MAX_COUNT`]; `None` for anything else.
pub(crate) fn count(v: &str) -> Option<u64> {
    let n: f64 = v.trim().parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    // `as` saturates; the clamp keeps every later sum and product far from overflow.
    Some((n.floor() as u64).min(MAX_COUNT))
}

/// Reads the rate-limit headers of a response; `None` when it has none worth keeping
/// (no readable `limit` or `remaining` of either kind). Resets are clamped to `max`.
pub(crate) fn observe(headers: &[(String, String)], max: Duration) -> Option<Observed> {
    let read = |kind: &str| Budget {
        limit: header(headers, &format!("x-ratelimit-limit-{kind}"))
            .and_then(count)
            .map(|l| l.max(1)),
        remaining: header(headers, &format!("x-ratelimit-remaining-{kind}")).and_then(count),
        reset: header(headers, &format!("x-ratelimit-reset-{kind}"))
            .and_then(reset_secs)
            .map(|s| crate::admission::secs_saturating(s, max)),
    };
    let o = Observed {
        requests: read("requests"),
        tokens: read("tokens"),
    };
    let any = |b: &Budget| b.limit.is_some() || b.remaining.is_some();
    (any(&o.requests) || any(&o.tokens)).then_some(o)
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
    fn hostile_counts_are_clamped_or_ignored() {
        assert_eq!(count("10"), Some(10));
        assert_eq!(count(" 7.9 "), Some(7));
        assert_eq!(count("0"), Some(0));
        for bad in [
            "", "NaN", "nan", "inf", "-inf", "-1", "-0.5", "ten", "1e999", "0x10",
        ] {
            assert_eq!(count(bad), None, "{bad:?}");
        }
        assert_eq!(count("1e300"), Some(MAX_COUNT));
        assert_eq!(count("18446744073709551616"), Some(MAX_COUNT));
        let max = Duration::from_secs(60);
        assert_eq!(observe(&h(&[]), max), None);
        assert_eq!(
            observe(&h(&[("x-ratelimit-limit-requests", "lots")]), max),
            None
        );
        let o = observe(
            &h(&[
                ("x-ratelimit-limit-requests", "0"),
                ("x-ratelimit-remaining-requests", "-3"),
                ("x-ratelimit-reset-requests", "99999999h"),
                ("x-ratelimit-limit-tokens", "1e308"),
                ("x-ratelimit-remaining-tokens", "NaN"),
                ("x-ratelimit-reset-tokens", "-1s"),
            ]),
            max,
        )
        .unwrap();
        // A limit of 0 counts as one request per window, never a key parked for good.
        assert_eq!(o.requests.limit, Some(1));
        assert_eq!(o.requests.remaining, None);
        assert_eq!(o.requests.reset, Some(max));
        assert_eq!(o.tokens.limit, Some(MAX_COUNT));
        assert_eq!(o.tokens.remaining, None);
        assert_eq!(o.tokens.reset, None);
        let o = observe(
            &h(&[
                ("x-ratelimit-limit-requests", "100"),
                ("x-ratelimit-remaining-requests", "9"),
                ("x-ratelimit-reset-requests", "850ms"),
            ]),
            max,
        )
        .unwrap();
        assert_eq!(o.requests.reset, Some(Duration::from_millis(850)));
        assert!(o.low(), "9 of 100 left is low");
        let mut ok = o;
        ok.requests.remaining = Some(11);
        assert!(!ok.low());
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
