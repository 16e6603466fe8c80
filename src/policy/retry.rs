//! Retry policy: what is retryable, how long to back off, how to read `Retry-After`.

use std::time::Duration;

use crate::blame::Fault;
use crate::config::RetryConfig;
use crate::retry_after::bounded_secs;
pub(crate) use crate::retry_after::{MAX_WAIT, parse_retry_after};

/// What one attempt's outcome means for the request and for the key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Verdict {
    /// Worth another attempt (on another key when one is usable).
    pub retry: bool,
    /// The server's hint for when to try again.
    pub retry_after: Option<Duration>,
    /// Put the key in cooldown for this long (429).
    pub cooldown: Option<Duration>,
    /// Take the key out of rotation, with this reason (401, a spent credit, a spent
    /// quota).
    pub disable: Option<String>,
    /// With `disable`: only for this long (a spent quota's reset).
    pub disable_for: Option<Duration>,
    /// With `disable`: the key is parked for its credit, not revoked; a credit check
    /// that finds its balance above the floor brings it back.
    pub park: bool,
    /// Cool the key's whole group (a 429 attributed to the account).
    pub group_cooldown: Option<Duration>,
    /// Cool this key for the request's model only (the model is busy upstream).
    pub model_cooldown: Option<Duration>,
    /// The request's model does not exist at this key's base URL: exclude it there.
    pub model_missing: bool,
    /// Not the request's fault (the key, its account, the model at this base URL, an
    /// unexplained 403): the attempt is not charged against `max_attempts` and the
    /// request moves on at once.
    pub uncharged: bool,
}

/// The verdict for an error answer whose fault is `fault` (`blame::judge`), with its
/// `x-should-retry` and retry-after hints and its headers. A 403 that does not say why
/// ([`Fault::Forbidden`]) is judged by the worker, which knows the request's history.
pub(crate) fn judge_fault(
    fault: &Fault,
    should_retry: Option<&str>,
    retry_after: Option<Duration>,
    headers: &[(String, String)],
    cfg: &RetryConfig,
) -> Verdict {
    let max = Duration::from_millis(cfg.max_retry_after_ms);
    let default = Duration::from_millis(cfg.default_cooldown_ms);
    let mut v = Verdict {
        retry_after,
        ..Verdict::default()
    };
    match fault {
        Fault::Request | Fault::Flagged | Fault::Forbidden => {}
        Fault::Transient | Fault::Server => v.retry = true,
        // A model's rate limit (upstream, or OpenRouter's free-model limit): OpenAI's
        // "Rate limit reached for gpt-4o …" names the model and carries its reset in
        // x-ratelimit-reset-*, honoured like a key-wide 429's.
        Fault::ModelBusy | Fault::FreeModels => {
            v.retry = true;
            v.model_cooldown = Some(crate::blame::cooldown_429(
                retry_after,
                headers,
                default,
                max,
            ));
        }
        Fault::ModelMissing | Fault::ModelDenied => {
            v.retry = true;
            v.model_missing = true;
            v.uncharged = true;
        }
        Fault::KeyRejected => {
            v.disable = Some("HTTP 401: key rejected".to_owned());
            v.retry = true;
            v.uncharged = true;
        }
        Fault::NoCredit if cfg.park_on_402 => {
            v.disable = Some("out of credits (HTTP 402 or insufficient_quota)".to_owned());
            v.park = true;
            v.retry = true;
            v.uncharged = true;
        }
        Fault::NoCredit => {}
        Fault::RateLimited => {
            v.retry = true;
            // A reset beyond `max_retry_after_ms` (a daily quota spent): the key is out
            // until then instead of knocking every cooldown. A reset more than a day
            // away is not believed (no provider documents one; a hostile or broken
            // value must not starve a key): it cools like any 429, clamped.
            if let Some(w) = crate::blame::reset_wait(retry_after, headers, MAX_WAIT)
                .filter(|w| *w > max && *w <= crate::blame::MAX_EXHAUSTED)
            {
                let at = std::time::SystemTime::now() + w;
                v.disable = Some(format!(
                    "exhausted until {} (a 429 whose reset is beyond max_retry_after_ms)",
                    httpdate::fmt_http_date(at)
                ));
                v.disable_for = Some(w);
                v.uncharged = true;
                return v;
            }
            v.cooldown = Some(crate::blame::cooldown_429(
                retry_after,
                headers,
                default,
                max,
            ));
        }
    }
    // The server's explicit word on retrying wins, except over a key's fault (the
    // request itself may still succeed on another key).
    match should_retry.map(str::trim) {
        Some("true") if *fault != Fault::Flagged => v.retry = true,
        Some("false") if !v.uncharged => v.retry = false,
        _ => {}
    }
    v
}

/// `min(base·2^n, max)` minus up to 25 % jitter, like the official OpenAI client.
/// Total for every config value: the result never exceeds [`MAX_WAIT`].
pub(crate) fn backoff(retry_index: u32, cfg: &RetryConfig) -> Duration {
    let base = cfg.base_delay_ms as f64 * 2f64.powi(retry_index.min(30) as i32);
    let capped = base.min(cfg.max_delay_ms as f64);
    let jitter = 1.0 - 0.25 * fastrand::f64();
    bounded_secs(capped * jitter / 1000.0).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

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
    fn verdicts() {
        let c = RetryConfig::default();
        let v = |f: Fault, sr: Option<&str>| judge_fault(&f, sr, None, &[], &c);
        assert!(v(Fault::Server, None).retry);
        assert!(v(Fault::Transient, None).retry);
        assert!(!v(Fault::Request, None).retry);
        assert!(!v(Fault::Flagged, Some("true")).retry);
        assert!(v(Fault::Request, Some("true")).retry);
        assert!(!v(Fault::Server, Some("false")).retry);
        let r = v(Fault::RateLimited, None);
        assert_eq!(r.cooldown, Some(Duration::from_millis(1000)));
        assert!(!r.uncharged);
        let r = judge_fault(
            &Fault::RateLimited,
            None,
            Some(Duration::from_secs(3600)),
            &[],
            &c,
        );
        // A reset beyond max_retry_after_ms: the key is out until then, at most a day.
        assert_eq!(r.cooldown, None);
        assert_eq!(r.disable_for, Some(Duration::from_secs(3600)));
        assert!(r.uncharged && r.retry && r.disable.unwrap().contains("exhausted until"));
        // Beyond a day: not believed, a clamped cooldown as for any 429.
        let far = vec![("x-ratelimit-reset".to_owned(), "1e300".to_owned())];
        let r = judge_fault(&Fault::RateLimited, None, None, &far, &c);
        assert_eq!(r.disable_for, None);
        assert_eq!(r.cooldown, Some(Duration::from_millis(60_000)));
        let r = v(Fault::KeyRejected, Some("false"));
        assert!(r.disable.is_some() && r.retry && r.uncharged && !r.park);
        let r = v(Fault::NoCredit, None);
        assert!(r.disable.is_some() && r.park && r.uncharged);
        let r = v(Fault::ModelBusy, None);
        assert!(r.model_cooldown.is_some() && r.cooldown.is_none() && r.disable.is_none());
        let r = v(Fault::ModelMissing, None);
        assert!(r.model_missing && r.uncharged && r.cooldown.is_none());
        for f in [
            Fault::Request,
            Fault::Flagged,
            Fault::Forbidden,
            Fault::Transient,
        ] {
            let r = v(f, None);
            assert!(r.disable.is_none() && r.cooldown.is_none() && r.model_cooldown.is_none());
        }
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
