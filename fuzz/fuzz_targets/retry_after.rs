//! `Retry-After` / `retry-after-ms` parsing: total, bounded by `MAX_WAIT`, safe to add
//! to a clock, numerically faithful, and `retry-after-ms` wins when usable.
//!
//! Input: UTF-8 (lossy). Without a newline the whole text is tried as each header
//! alone; `ms\nafter` also tries the two together.
#![no_main]

use std::time::{Duration, Instant, SystemTime};

use keypool::__fuzz::{MAX_WAIT, retry_after};
use libfuzzer_sys::fuzz_target;

fn check(d: Option<Duration>, what: &str) {
    if let Some(d) = d {
        assert!(d <= MAX_WAIT, "{what}: {d:?} > MAX_WAIT");
        assert!(Instant::now().checked_add(d).is_some(), "{what}: {d:?}");
        assert!(SystemTime::now().checked_add(d).is_some(), "{what}: {d:?}");
    }
}

/// What a numeric header value must give: `secs` clamped to `MAX_WAIT`; `None` for NaN
/// and negatives.
fn expected(secs: f64) -> Option<f64> {
    (!secs.is_nan() && secs >= 0.0).then(|| secs.min(MAX_WAIT.as_secs_f64()))
}

fn close(d: Option<Duration>, want: Option<f64>, what: &str) {
    match (d, want) {
        (None, None) => {}
        (Some(d), Some(w)) => {
            let got = d.as_secs_f64();
            assert!(
                (got - w).abs() <= 1e-6 * w.max(1.0),
                "{what}: got {got}, want {w}"
            );
        }
        _ => panic!("{what}: got {d:?}, want {want:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let t = text.as_ref();

    let after_only = retry_after(None, Some(t));
    check(after_only, "after");
    let ms_only = retry_after(Some(t), None);
    check(ms_only, "ms");
    assert_eq!(retry_after(None, None), None);

    if let Ok(x) = t.trim().parse::<f64>() {
        close(ms_only, expected(x / 1000.0), "ms numeric");
        close(after_only, expected(x), "after numeric");
    } else {
        assert_eq!(ms_only, None, "ms accepts only numbers: {t:?}");
    }

    if let Some((a, b)) = t.split_once('\n') {
        let both = retry_after(Some(a), Some(b));
        check(both, "both");
        let a_alone = retry_after(Some(a), None);
        if a_alone.is_some() {
            assert_eq!(both, a_alone, "a usable retry-after-ms wins: {a:?} {b:?}");
        } else if b.trim().parse::<f64>().is_ok() {
            // (HTTP dates depend on the clock; numbers do not.)
            assert_eq!(both, retry_after(None, Some(b)), "{a:?} {b:?}");
        }
    }
});
