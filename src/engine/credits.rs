//! Credits (OpenRouter): the optional balance check of `GET {base_url}/key`, and the
//! per-key sum of the `usage.cost` responses report.
//!
//! No polling loop: a key is checked once before its first request (by one of its own
//! workers, before `Pool::new` returns), after a 402 on it, and — when
//! `credits.recheck_cost` is set — after that many dollars of summed `usage.cost`. A
//! check that finds `limit_remaining` at or below `credits.floor` parks the key (the
//! same "disabled" state as a 402). The `/key` answer is hostile input: anything that is
//! not a well-formed, finite, non-negative, plausible number is ignored, never parks a
//! key and never panics.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

use crate::credits_config::dollars;
use crate::transport::HttpRequest;
use crate::worker::KeyWorkerCtx;

/// Largest `/key` body read, in bytes.
const MAX_KEY_BODY: u64 = 64 * 1024;

/// What a `/key` answer says about the balance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Balance {
    /// `limit` is null: no cap.
    Unlimited,
    /// Dollars left.
    Remaining(f64),
}

/// Reads `{"data": {"limit": …, "limit_remaining": …}}`; `None` for anything else
/// (not JSON, missing or non-numeric fields, NaN-like, negative or absurd numbers).
pub(crate) fn parse_key_info(body: &[u8]) -> Option<Balance> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let data = v.get("data")?.as_object()?;
    match data.get("limit")? {
        Value::Null => return Some(Balance::Unlimited),
        Value::Number(n) => {
            dollars(n.as_f64()?)?;
        }
        _ => return None,
    }
    let remaining = dollars(data.get("limit_remaining")?.as_f64()?)?;
    Some(Balance::Remaining(remaining))
}

/// Per-key credit state.
#[derive(Debug, Default)]
pub(crate) struct KeyCredit {
    inner: Mutex<Inner>,
    /// Taken by the first worker of the key, which checks before its first request.
    start_claimed: AtomicBool,
}

#[derive(Debug, Default)]
struct Inner {
    remaining: Option<f64>,
    cost: f64,
    cost_at_check: f64,
    checking: bool,
    /// `recheck_cost` dollars were spent since the last check.
    due: bool,
    /// When a parked key was last checked (or parked), for `recheck_ms`.
    parked_check: Option<std::time::Instant>,
    /// Times the key rejoined after a park.
    rejoined: u64,
}

impl KeyCredit {
    /// Adds a response's `usage.cost` (already sanitised); returns true (and marks it
    /// due) when a re-check is due: `recheck` dollars since the last check.
    pub(crate) fn add_cost(&self, cost: f64, recheck: f64) -> bool {
        let mut s = self.inner.lock();
        s.cost = (s.cost + cost).min(f64::MAX);
        if recheck > 0.0 && !s.checking && s.cost - s.cost_at_check >= recheck {
            s.due = true;
        }
        s.due
    }

    /// Dollars of `usage.cost` summed over the key's responses.
    pub(crate) fn cost(&self) -> f64 {
        self.inner.lock().cost
    }

    /// Times the key rejoined the rotation after being parked for its credit.
    pub(crate) fn rejoined(&self) -> u64 {
        self.inner.lock().rejoined
    }

    /// The balance at the last check (`None`: never checked, failed or unlimited).
    pub(crate) fn remaining(&self) -> Option<f64> {
        self.inner.lock().remaining
    }
}

/// Checks the key's balance if checks are on and this worker is the key's first.
/// Returns true for the key's first worker (the one that also re-checks a park).
pub(crate) fn check_at_start(ctx: &KeyWorkerCtx) -> bool {
    let credit = &ctx.shared.keys[ctx.index].credit;
    let first = !credit.start_claimed.swap(true, SeqCst);
    if first && ctx.shared.config.credits.check {
        check(ctx);
    }
    first
}

/// Checks the key's balance if `recheck_cost` dollars were spent since the last check.
pub(crate) fn recheck_if_due(ctx: &KeyWorkerCtx) {
    let due = ctx.shared.keys[ctx.index].credit.inner.lock().due;
    if due {
        check(ctx);
    }
}

/// When a worker of a key parked for its credit should wake to check it again
/// (`recheck_ms` after the park or the last check); `None` when it should not (checks
/// off, not parked, `recheck_ms` 0). Every idle worker of a parked key waits for it —
/// the one that parked it among them — and the first to wake checks
/// (`recheck_parked` skips a check made less than `recheck_ms` ago).
pub(crate) fn parked_recheck_at(ctx: &KeyWorkerCtx) -> Option<Instant> {
    let cfg = &ctx.shared.config.credits;
    if !cfg.check || cfg.recheck_ms == 0 {
        return None;
    }
    let ks = &ctx.shared.keys[ctx.index];
    if !ks.gate.is_parked() {
        return None;
    }
    let mut s = ks.credit.inner.lock();
    let since = *s.parked_check.get_or_insert_with(Instant::now);
    since.checked_add(Duration::from_millis(cfg.recheck_ms))
}

/// Checks a key parked for its credit again, if requests are waiting: above the floor
/// (or uncapped), it rejoins the rotation on trial (one request first). Logged, and
/// counted in `KeyStats::rejoined`.
pub(crate) fn recheck_parked(ctx: &KeyWorkerCtx) {
    let sh = &ctx.shared;
    let ks = &sh.keys[ctx.index];
    let every = Duration::from_millis(sh.config.credits.recheck_ms);
    {
        let mut s = ks.credit.inner.lock();
        // Another worker of this key has just checked (they wake together).
        if s.parked_check.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        s.parked_check = Some(Instant::now());
    }
    let waiting = !ctx.intake.is_empty() || sh.backlog.load(SeqCst) > 0;
    if !waiting || !ks.gate.is_parked() {
        return;
    }
    let floor = sh.config.credits.floor;
    let above = match check(ctx) {
        Some(Balance::Remaining(r)) => r > floor,
        Some(Balance::Unlimited) => true,
        None => false,
    };
    if above && ks.gate.unpark() {
        let mut s = ks.credit.inner.lock();
        s.rejoined += 1;
        s.parked_check = None;
        drop(s);
        log::warn!(
            "keypool: key {} rejoined: its credit is above the floor again",
            ks.label
        );
        sh.nudge();
    }
}

/// Checks the key's balance now (checks on, no other check of this key running), and
/// parks the key if it is at or below the floor. Returns the balance read, if any.
pub(crate) fn check(ctx: &KeyWorkerCtx) -> Option<Balance> {
    let cfg = &ctx.shared.config.credits;
    if !cfg.check {
        return None;
    }
    let ks = &ctx.shared.keys[ctx.index];
    {
        let mut s = ks.credit.inner.lock();
        if s.checking {
            return None;
        }
        s.checking = true;
        s.due = false;
        s.cost_at_check = s.cost;
    }
    let url = format!("{}/key", ctx.base_url);
    let req = HttpRequest {
        url: &url,
        key: &ctx.key,
        headers: &ctx.headers,
        body: b"",
        timeout: ctx.attempt_timeout.min(std::time::Duration::from_millis(
            ctx.shared.config.connect_timeout_ms.max(1000),
        )),
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ctx.transport.get(&req, MAX_KEY_BODY)
    }));
    let balance = match outcome {
        Ok(Ok(resp)) if (200..300).contains(&resp.status) => parse_key_info(&resp.body),
        Ok(Ok(resp)) => {
            log::debug!(
                "keypool: credit check of key {} answered HTTP {}",
                ks.label,
                resp.status
            );
            None
        }
        Ok(Err(e)) => {
            log::debug!("keypool: credit check of key {} failed: {e:?}", ks.label);
            None
        }
        Err(_) => None,
    };
    {
        let mut s = ks.credit.inner.lock();
        s.checking = false;
        match balance {
            Some(Balance::Remaining(r)) => s.remaining = Some(r),
            Some(Balance::Unlimited) => s.remaining = None,
            None => {}
        }
    }
    // A balance read for this key is the server accepting it: the key opens now rather
    // than after its first completion (`retry.prove_keys`; see `key_proof`).
    let above_floor = match balance {
        Some(Balance::Remaining(r)) => r > cfg.floor,
        Some(Balance::Unlimited) => true,
        None => false,
    };
    let cfg_retry = &ctx.shared.config.retry;
    if above_floor && cfg_retry.probe_keys && cfg_retry.prove_keys && ks.gate.prove() {
        ctx.shared.nudge();
    }
    if let Some(Balance::Remaining(r)) = balance {
        if r <= cfg.floor {
            let reason = format!("credit {r} at or below floor {}", cfg.floor);
            if ks.gate.park(reason.clone()) {
                ks.credit.inner.lock().parked_check = Some(Instant::now());
                ks.log_disabled(&reason);
                ctx.shared.nudge();
            }
        }
    }
    balance
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_info_is_read_leniently() {
        let ok = br#"{"data":{"label":"x","limit":10,"limit_remaining":2.5,"usage":7.5,"is_free_tier":false,"limit_reset":null}}"#;
        assert_eq!(parse_key_info(ok), Some(Balance::Remaining(2.5)));
        assert_eq!(
            parse_key_info(br#"{"data":{"limit":null,"limit_remaining":null}}"#),
            Some(Balance::Unlimited)
        );
        for bad in [
            &b"not json"[..],
            b"[]",
            b"{}",
            b"{\"data\":null}",
            b"{\"data\":{\"limit\":10}}",
            b"{\"data\":{\"limit\":10,\"limit_remaining\":-1}}",
            b"{\"data\":{\"limit\":10,\"limit_remaining\":1e308}}",
            b"{\"data\":{\"limit\":10,\"limit_remaining\":\"0\"}}",
            b"{\"data\":{\"limit\":\"x\",\"limit_remaining\":0}}",
            b"{\"data\":{\"limit\":1e999,\"limit_remaining\":0}}",
        ] {
            assert_eq!(
                parse_key_info(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn cost_sums_and_asks_for_a_recheck() {
        let c = KeyCredit::default();
        assert!(!c.add_cost(0.4, 1.0));
        assert!(c.add_cost(0.7, 1.0));
        assert!((c.cost() - 1.1).abs() < 1e-9);
        let never = KeyCredit::default();
        assert!(!never.add_cost(5.0, 0.0), "recheck_cost 0: never due");
    }
}
