//! Account groups: limits that bind several keys together (`groups`, `keys[].group`).
//!
//! A group has no thread and makes no decision of its own: its state is checked and
//! taken by [`Gate::try_admit`](crate::admission::Gate::try_admit) of a member key in
//! the same critical section as the key's own rules (the key's lock, then the group's:
//! always in that order), and released by that key's `Gate::complete`. So per-key and
//! group limits hold together under every strategy, for retries and self-serve alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::admission::{Admit, Bucket, Daily};
use crate::config::GroupConfig;

/// The group's state, locked after a member key's.
#[derive(Debug)]
pub(crate) struct GroupState {
    /// Admissions of member keys not yet completed.
    pub out: usize,
    pub cooldown_until: Option<Instant>,
    pub rpm: Option<Bucket>,
    pub tpm: Option<Bucket>,
    /// Requests per UTC day (`rpd`) over all member keys.
    pub rpd: Option<Daily>,
    /// The daily quota is spent: every member key is out until then, for this reason.
    pub exhausted: Option<(Instant, String, u64)>,
}

/// One account's shared limits.
#[derive(Debug)]
pub(crate) struct GroupGate {
    pub name: Arc<str>,
    pub max: Option<usize>,
    /// `account_429`, lowercased (`"*"`: every 429).
    account_429: Option<String>,
    pub has_limits: bool,
    epoch: Instant,
    pub state: Mutex<GroupState>,
    // Lock-free mirrors, written only under the lock.
    full: AtomicBool,
    cooldown_until: AtomicU64,
    max_out: AtomicUsize,
    /// The daily quota's reset while it is spent, microseconds since `epoch` (0: none).
    exhausted_until: AtomicU64,
}

impl GroupGate {
    pub(crate) fn new(cfg: &GroupConfig, epoch: Instant) -> GroupGate {
        GroupGate {
            name: Arc::from(cfg.name.as_str()),
            max: cfg.max_concurrent,
            account_429: cfg.account_429.as_ref().map(|s| s.to_ascii_lowercase()),
            has_limits: cfg.rpm.is_some() || cfg.tpm.is_some(),
            epoch,
            state: Mutex::new(GroupState {
                out: 0,
                cooldown_until: None,
                rpm: cfg.rpm.map(|r| Bucket::per_minute(r as f64, epoch)),
                tpm: cfg.tpm.map(|t| Bucket::per_minute(t as f64, epoch)),
                rpd: cfg.rpd.map(Daily::new),
                exhausted: None,
            }),
            full: AtomicBool::new(false),
            cooldown_until: AtomicU64::new(0),
            max_out: AtomicUsize::new(0),
            exhausted_until: AtomicU64::new(0),
        }
    }

    fn micros(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    pub(crate) fn mirror(&self, g: &GroupState) {
        self.full
            .store(self.max.is_some_and(|m| g.out >= m), SeqCst);
        self.cooldown_until.store(
            g.cooldown_until.map_or(0, |u| self.micros(u).max(1)),
            SeqCst,
        );
        self.max_out.fetch_max(g.out, SeqCst);
        self.exhausted_until.store(
            g.exhausted
                .as_ref()
                .map_or(0, |(u, ..)| self.micros(*u).max(1)),
            SeqCst,
        );
    }

    /// The group's rules for one more request of `tokens`: `None` if they allow it.
    pub(crate) fn check(&self, g: &mut GroupState, tokens: u64, now: Instant) -> Option<Admit> {
        if let Some(d) = g.rpd.as_mut() {
            let (day, left) = crate::admission::utc_day();
            if !d.spent(day) {
                g.exhausted = None;
            } else {
                if g.exhausted.as_ref().is_none_or(|(u, ..)| *u <= now) {
                    let until = now.checked_add(left).unwrap_or(now);
                    g.exhausted = Some((until, self.quota_reason(d, left), unix_ms()));
                    self.mirror(g);
                    // Out from now on: asked again at once, the caller sees every
                    // member key out and stops waiting for them.
                    return Some(Admit::WakeAt(now));
                }
                return Some(Admit::Never);
            }
        }
        if let Some(until) = g.cooldown_until {
            if until > now {
                return Some(Admit::WakeAt(until));
            }
            g.cooldown_until = None;
        }
        if self.max.is_some_and(|m| g.out >= m) {
            return Some(Admit::Busy);
        }
        let a = g.rpm.as_mut().and_then(|b| b.ready_at(1.0, now));
        let b = g.tpm.as_mut().and_then(|b| b.ready_at(tokens as f64, now));
        a.max(b).map(Admit::WakeAt)
    }

    /// Applies one admission (after `check` allowed it, under the same locks).
    pub(crate) fn take(&self, g: &mut GroupState, tokens: u64) {
        g.out += 1;
        if let Some(d) = g.rpd.as_mut() {
            if d.take() {
                // The quota's last request: every member key is out from now on.
                let left = crate::admission::utc_day().1;
                let now = Instant::now();
                let reason = self.quota_reason(d, left);
                log::warn!("keypool: {reason}");
                g.exhausted = Some((now.checked_add(left).unwrap_or(now), reason, unix_ms()));
            }
        }
        if let Some(b) = g.rpm.as_mut() {
            b.take(1.0);
        }
        if let Some(b) = g.tpm.as_mut() {
            b.take(tokens as f64);
        }
        self.mirror(g);
    }

    /// Ends one admission; `cooldown` cools the whole account. True if a member key
    /// may now be admitted where it could not before (a slot freed from a full group).
    pub(crate) fn release(
        &self,
        g: &mut GroupState,
        cooldown: Option<Duration>,
        now: Instant,
    ) -> bool {
        let was_full = self.max.is_some_and(|m| g.out >= m);
        g.out = g.out.saturating_sub(1);
        if let Some(d) = cooldown {
            let until = now
                .checked_add(d)
                .unwrap_or(now + Duration::from_secs(86_400));
            if g.cooldown_until.is_none_or(|u| u < until) {
                g.cooldown_until = Some(until);
            }
        }
        self.mirror(g);
        was_full || cooldown.is_some()
    }

    /// Cools the account until `until` (a cooldown another process sharing the group
    /// published), unless it already cools longer.
    pub(crate) fn cool_until(&self, g: &mut GroupState, until: Instant) {
        if g.cooldown_until.is_none_or(|u| u < until) {
            g.cooldown_until = Some(until);
        }
        self.mirror(g);
    }

    /// Whether a 429 (its error message and headers) is the account's, by the
    /// configured `account_429` rule.
    pub(crate) fn is_account_429(&self, message: &str, headers: &[(String, String)]) -> bool {
        let Some(rule) = &self.account_429 else {
            return false;
        };
        if rule == "*" {
            return true;
        }
        message.to_ascii_lowercase().contains(rule.as_str())
            || headers.iter().any(|(k, v)| {
                format!("{k}: {v}")
                    .to_ascii_lowercase()
                    .contains(rule.as_str())
            })
    }

    /// When the account's cooldown ends, if it is cooling at `now`.
    pub(crate) fn cooling_until(&self, now: Instant) -> Option<Instant> {
        let until = self.cooldown_until.load(SeqCst);
        (until > self.micros(now)).then(|| self.epoch + Duration::from_micros(until))
    }

    fn quota_reason(&self, d: &Daily, left: Duration) -> String {
        format!("group {}: {}", self.name, d.reason(left))
    }

    /// When the daily quota resets, while it is spent (every member key is out).
    pub(crate) fn exhausted_until(&self, now: Instant) -> Option<Instant> {
        let until = self.exhausted_until.load(SeqCst);
        (until > self.micros(now)).then(|| self.epoch + Duration::from_micros(until))
    }

    /// Why the member keys are out, and since when (Unix ms), while the quota is spent.
    pub(crate) fn exhausted_reason(&self) -> Option<(String, u64)> {
        let g = self.state.lock();
        g.exhausted.as_ref().map(|(_, r, at)| (r.clone(), *at))
    }

    /// Gives back a request of a member key that never reached the wire.
    pub(crate) fn refund_day(&self) {
        let mut g = self.state.lock();
        if let Some(d) = g.rpd.as_mut() {
            d.refund();
            if g.exhausted.is_some() {
                g.exhausted = None;
                self.mirror(&g);
            }
        }
    }

    /// Every slot of the group is taken.
    pub(crate) fn is_full(&self) -> bool {
        self.full.load(SeqCst)
    }

    /// A snapshot for stats.
    pub(crate) fn snapshot(&self) -> crate::stats::GroupStats {
        let now = Instant::now();
        let mut g = self.state.lock();
        crate::stats::GroupStats {
            name: self.name.to_string(),
            max_concurrent: self.max,
            in_flight: g.out,
            max_in_flight: self.max_out.load(SeqCst),
            cooldown_remaining_ms: g.cooldown_until.map_or(0, |u| {
                u64::try_from(u.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
            }),
            rpm_budget: g.rpm.as_mut().map(|b| b.balance(now)),
            tpm_budget: g.tpm.as_mut().map(|b| b.balance(now)),
        }
    }
}

/// Now as Unix milliseconds (0 if the clock is before 1970).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_rule() {
        let epoch = Instant::now();
        let mut cfg = GroupConfig::new("a");
        let g = GroupGate::new(&cfg, epoch);
        assert!(!g.is_account_429("anything", &[]));
        cfg.account_429 = Some("*".into());
        assert!(GroupGate::new(&cfg, epoch).is_account_429("", &[]));
        cfg.account_429 = Some("X-RateLimit-Scope: account".into());
        let g = GroupGate::new(&cfg, epoch);
        let h = vec![("x-ratelimit-scope".to_owned(), "Account".to_owned())];
        assert!(g.is_account_429("rate limited", &h));
        assert!(!g.is_account_429("rate limited", &[]));
        cfg.account_429 = Some("account limit".into());
        let g = GroupGate::new(&cfg, epoch);
        assert!(g.is_account_429("Account limit reached", &[]));
    }
}
