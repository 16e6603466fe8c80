//! Per-key shared state: counters, health (cooldown, disabled), rate-limit buckets.
//! The worker threads that use it live in `worker.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::config::{Config, KeyConfig};
use crate::stats::{FailureCounts, Histogram, KeyStats};

/// Failure classes counted per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailClass {
    RateLimited,
    ClientError,
    ServerError,
    Transport,
    Timeout,
    Other,
}

/// A token bucket: `capacity` tokens, refilled at `rate` per second.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl Bucket {
    /// `per_minute` with a burst of about one second's worth (at least 1): any window of
    /// `T` seconds sees at most `per_minute·T/60 + burst`.
    fn per_minute(per_minute: f64, now: Instant) -> Bucket {
        let capacity = (per_minute / 60.0).ceil().max(1.0);
        Bucket {
            capacity,
            tokens: capacity,
            rate: per_minute / 60.0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
        self.last = now;
    }

    /// `None` if `n` tokens are available now, else when they will be.
    fn ready_at(&mut self, n: f64, now: Instant) -> Option<Instant> {
        self.refill(now);
        let n = n.min(self.capacity);
        if self.tokens >= n {
            None
        } else {
            Some(now + Duration::from_secs_f64((n - self.tokens) / self.rate))
        }
    }

    fn take(&mut self, n: f64) {
        self.tokens -= n;
    }
}

#[derive(Debug, Default)]
struct Limits {
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
}

/// Everything the dispatcher, the workers and `stats()` share about one key.
pub(crate) struct KeyState {
    pub index: usize,
    pub label: Arc<str>,
    pub max_concurrent: usize,
    epoch: Instant,
    pub in_flight: AtomicUsize,
    /// Workers of this key blocked waiting for a job from the dispatcher.
    pub idle: AtomicUsize,
    max_in_flight: AtomicUsize,
    sent: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    fail: [AtomicU64; 6],
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    latency: Mutex<Histogram>,
    /// Cooldown end, microseconds since `epoch` (0: none). Only ever raised.
    cooldown_until: AtomicU64,
    disabled: AtomicBool,
    disabled_reason: Mutex<Option<(String, u64)>>,
    /// Until the key has answered once with anything but "bad key", it gets one
    /// request at a time, so a revoked key costs one request, not `max_concurrent`.
    unproven: AtomicBool,
    /// A probe request is out on this (unproven) key.
    probe_out: AtomicBool,
    limits: Option<Mutex<Limits>>,
}

impl KeyState {
    pub(crate) fn new(config: &Config, index: usize, epoch: Instant) -> KeyState {
        let k: &KeyConfig = &config.keys[index];
        let limits = (k.rpm.is_some() || k.tpm.is_some()).then(|| {
            Mutex::new(Limits {
                rpm: k.rpm.map(|r| Bucket::per_minute(r as f64, epoch)),
                tpm: k.tpm.map(|t| Bucket::per_minute(t as f64, epoch)),
            })
        });
        KeyState {
            index,
            label: Arc::from(config.key_label(index)),
            max_concurrent: k.max_concurrent,
            epoch,
            in_flight: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            fail: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            latency: Mutex::new(Histogram::new()),
            cooldown_until: AtomicU64::new(0),
            disabled: AtomicBool::new(false),
            disabled_reason: Mutex::new(None),
            unproven: AtomicBool::new(config.retry.probe_keys),
            probe_out: AtomicBool::new(false),
            limits,
        }
    }

    fn micros_since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    // ---- health ----

    pub(crate) fn is_disabled(&self) -> bool {
        self.disabled.load(Relaxed)
    }

    /// When the key's cooldown ends, if it is cooling at `now`.
    pub(crate) fn cooling_until(&self, now: Instant) -> Option<Instant> {
        let until = self.cooldown_until.load(Relaxed);
        (until > self.micros_since_epoch(now)).then(|| self.epoch + Duration::from_micros(until))
    }

    /// Extends the cooldown to at least `now + d`. Never shortens it.
    pub(crate) fn cool_down(&self, now: Instant, d: Duration) {
        let until = self.micros_since_epoch(now + d);
        self.cooldown_until.fetch_max(until, Relaxed);
    }

    pub(crate) fn disable(&self, reason: String) {
        let mut r = self.disabled_reason.lock();
        if r.is_none() {
            let unix_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            log::warn!("keypool: key {} disabled: {reason}", self.label);
            *r = Some((reason, unix_ms));
        }
        self.disabled.store(true, Relaxed);
    }

    pub(crate) fn disabled_reason(&self) -> Option<String> {
        self.disabled_reason.lock().as_ref().map(|(r, _)| r.clone())
    }

    /// Whether the dispatcher may hand this key another request as far as probing
    /// goes: a proven key always may; an unproven one only while no probe is out.
    pub(crate) fn probe_allows(&self) -> bool {
        !self.unproven.load(Relaxed) || !self.probe_out.load(Relaxed)
    }

    /// Whether the key is still waiting for its first accepted request.
    pub(crate) fn is_unproven(&self) -> bool {
        self.unproven.load(Relaxed)
    }

    /// The dispatcher handed this key a request.
    pub(crate) fn note_dispatched(&self) {
        if self.unproven.load(Relaxed) {
            self.probe_out.store(true, Relaxed);
        }
    }

    /// An attempt on this key ended: `proven` if the server accepted the key (any
    /// answer but 401/402/403). Returns true if this changed what the dispatcher may do.
    pub(crate) fn note_attempt_end(&self, proven: bool) -> bool {
        if !self.unproven.load(Relaxed) {
            return false;
        }
        if proven {
            self.unproven.store(false, Relaxed);
        }
        self.probe_out.store(false, Relaxed);
        true
    }

    // ---- rate limits ----

    pub(crate) fn has_limits(&self) -> bool {
        self.limits.is_some()
    }

    /// `None` if the key can afford a request of `tokens` now, else when it can.
    pub(crate) fn budget_ready_at(&self, tokens: u64, now: Instant) -> Option<Instant> {
        let mut l = self.limits.as_ref()?.lock();
        let a = l.rpm.as_mut().and_then(|b| b.ready_at(1.0, now));
        let b = l.tpm.as_mut().and_then(|b| b.ready_at(tokens as f64, now));
        a.max(b)
    }

    /// Spends the budget of one request of `tokens`.
    pub(crate) fn spend(&self, tokens: u64) {
        if let Some(l) = &self.limits {
            let mut l = l.lock();
            if let Some(b) = l.rpm.as_mut() {
                b.take(1.0);
            }
            if let Some(b) = l.tpm.as_mut() {
                let n = (tokens as f64).min(b.capacity);
                b.take(n);
            }
        }
    }

    /// Corrects the token bucket once the real usage is known.
    pub(crate) fn correct_tokens(&self, estimated: u64, actual: u64) {
        if let Some(l) = &self.limits {
            if let Some(b) = l.lock().tpm.as_mut() {
                b.tokens += estimated as f64 - actual as f64;
                b.tokens = b.tokens.min(b.capacity);
            }
        }
    }

    // ---- counters ----

    pub(crate) fn begin(&self) {
        let n = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.max_in_flight.fetch_max(n, Relaxed);
        self.sent.fetch_add(1, Relaxed);
    }

    pub(crate) fn end(&self, latency: Duration) {
        self.in_flight.fetch_sub(1, Relaxed);
        self.latency.lock().record(latency.as_micros() as u64);
    }

    pub(crate) fn record_success(&self, prompt: u64, completion: u64) {
        self.succeeded.fetch_add(1, Relaxed);
        // Saturating: token counts come from the server.
        let add = |c: &AtomicU64, n: u64| {
            let _ = c.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_add(n)));
        };
        add(&self.prompt_tokens, prompt);
        add(&self.completion_tokens, completion);
    }

    pub(crate) fn record_failure(&self, class: FailClass, retried: bool) {
        self.failed.fetch_add(1, Relaxed);
        self.fail[class as usize].fetch_add(1, Relaxed);
        if retried {
            self.retries.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> KeyStats {
        let now = Instant::now();
        let (p50, p99) = {
            let h = self.latency.lock();
            (h.quantile(0.50), h.quantile(0.99))
        };
        let f = |c: FailClass| self.fail[c as usize].load(Relaxed);
        let (rpm_budget, tpm_budget) = match &self.limits {
            Some(l) => {
                let mut l = l.lock();
                let rpm = l.rpm.as_mut().map(|b| {
                    b.refill(now);
                    b.tokens
                });
                let tpm = l.tpm.as_mut().map(|b| {
                    b.refill(now);
                    b.tokens
                });
                (rpm, tpm)
            }
            None => (None, None),
        };
        let disabled = self.disabled_reason.lock().clone();
        KeyStats {
            index: self.index,
            label: self.label.to_string(),
            max_concurrent: self.max_concurrent,
            in_flight: self.in_flight.load(Relaxed),
            max_in_flight: self.max_in_flight.load(Relaxed),
            sent: self.sent.load(Relaxed),
            succeeded: self.succeeded.load(Relaxed),
            failed: self.failed.load(Relaxed),
            failures: FailureCounts {
                rate_limited: f(FailClass::RateLimited),
                client_error: f(FailClass::ClientError),
                server_error: f(FailClass::ServerError),
                transport: f(FailClass::Transport),
                timeout: f(FailClass::Timeout),
                other: f(FailClass::Other),
            },
            retries: self.retries.load(Relaxed),
            latency_p50_ms: p50 as f64 / 1000.0,
            latency_p99_ms: p99 as f64 / 1000.0,
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
            cooldown_remaining_ms: self
                .cooling_until(now)
                .map(|u| u.saturating_duration_since(now).as_millis() as u64)
                .unwrap_or(0),
            disabled_at_unix_ms: disabled.as_ref().map(|(_, t)| *t),
            disabled_reason: disabled.map(|(r, _)| r),
            rpm_budget,
            tpm_budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooldowns_only_lengthen() {
        let config = Config::builder().key("sk-a", 1).build().unwrap();
        let epoch = Instant::now();
        let k = KeyState::new(&config, 0, epoch);
        let now = epoch + Duration::from_secs(1);
        assert_eq!(k.cooling_until(now), None);
        k.cool_down(now, Duration::from_secs(5));
        let long = k.cooling_until(now).expect("cooling");
        // A shorter hint later on leaves the longer cooldown in place…
        k.cool_down(now + Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(k.cooling_until(now), Some(long));
        // …a longer one extends it.
        k.cool_down(now, Duration::from_secs(9));
        assert!(k.cooling_until(now).unwrap() > long);
        assert_eq!(k.cooling_until(now + Duration::from_secs(10)), None);
    }

    #[test]
    fn token_counters_saturate() {
        let config = Config::builder().key("sk-a", 1).build().unwrap();
        let k = KeyState::new(&config, 0, Instant::now());
        k.record_success(u64::MAX - 1, 5);
        k.record_success(u64::MAX, u64::MAX);
        let s = k.snapshot();
        assert_eq!((s.prompt_tokens, s.completion_tokens), (u64::MAX, u64::MAX));
        assert_eq!(s.succeeded, 2);
    }
}
