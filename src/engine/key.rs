//! Per-key shared state: counters and stats, plus the key's admission state machine
//! ([`Gate`], in `admission.rs`) that decides whether the key may take a request.
//! The worker threads that use it live in `worker.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::admission::Gate;
use crate::config::{Config, KeyConfig};
use crate::group::GroupGate;
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

/// Everything the dispatcher, the workers and `stats()` share about one key.
pub(crate) struct KeyState {
    pub index: usize,
    pub label: Arc<str>,
    pub max_concurrent: usize,
    /// Admission: idle workers, trial, cooldown, budget, disabled. The one place that
    /// decides whether this key may take a request.
    pub gate: Gate,
    pub in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    sent: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    fail: [AtomicU64; 6],
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    latency: Mutex<Histogram>,
    /// Streams: attempt start to first text delta.
    ttft: Mutex<Histogram>,
    /// Queue time (submit to first send) of requests first sent on this key.
    queue: Mutex<Histogram>,
    /// Attempt latency and queue time in the fixed Prometheus buckets (`metrics.rs`).
    latency_buckets: crate::metrics::Buckets,
    queue_buckets: crate::metrics::Buckets,
    /// Balance at the last credit check, summed `usage.cost` (`credits.rs`).
    pub credit: crate::credits::KeyCredit,
    /// Requests this key refused with an unexplained 403 that another key then served
    /// (`worker::forbidden_evidence`).
    pub forbidden_strikes: std::sync::atomic::AtomicU32,
}

impl KeyState {
    #[cfg(test)]
    pub(crate) fn new(config: &Config, index: usize, epoch: Instant) -> KeyState {
        KeyState::with_groups(config, index, epoch, &[])
    }

    /// Key `index` of `config`; `groups` are the gates of `config.groups`, in order.
    pub(crate) fn with_groups(
        config: &Config,
        index: usize,
        epoch: Instant,
        groups: &[Arc<GroupGate>],
    ) -> KeyState {
        let k: &KeyConfig = &config.keys[index];
        let mut gate =
            Gate::new(config.retry.probe_keys, k.rpm.map(u64::from), k.tpm, epoch).with_rpd(k.rpd);
        if let Some(name) = &k.group {
            if let Some(g) = groups.iter().find(|g| &*g.name == name.as_str()) {
                gate = gate.with_group(Arc::clone(g));
            }
        }
        if k.adaptive {
            gate = gate.with_adaptive(k.max_concurrent);
        }
        KeyState {
            index,
            label: Arc::from(config.key_label(index)),
            max_concurrent: k.max_concurrent,
            gate,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            succeeded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            fail: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            latency: Mutex::new(Histogram::new()),
            ttft: Mutex::new(Histogram::new()),
            queue: Mutex::new(Histogram::new()),
            latency_buckets: Default::default(),
            queue_buckets: Default::default(),
            credit: Default::default(),
            forbidden_strikes: Default::default(),
        }
    }

    /// Notes a key being taken out of rotation (once, by whoever disabled it). The
    /// warning itself is the key event's (`events.rs`: "key … disabled: …", "… parked:
    /// …"), logged by the event thread; this debug line names the thread that did it.
    pub(crate) fn log_disabled(&self, reason: &str) {
        log::debug!("keypool: key {} taken out: {reason}", self.label);
    }

    // ---- counters ----

    pub(crate) fn begin(&self) {
        let n = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.max_in_flight.fetch_max(n, Relaxed);
        self.sent.fetch_add(1, Relaxed);
    }

    pub(crate) fn end(&self, latency: Duration) {
        self.in_flight.fetch_sub(1, Relaxed);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.lock().record(us);
        self.latency_buckets.record(us);
    }

    /// A request's queue time (submit to its first send, which was on this key).
    pub(crate) fn record_queue(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.queue.lock().record(us);
        self.queue_buckets.record(us);
    }

    /// Adds this key's queue-time histogram into `into` (for the pool's quantiles).
    pub(crate) fn merge_queue(&self, into: &mut Histogram) {
        into.merge(&self.queue.lock());
    }

    /// A stream's time to first token on this key.
    pub(crate) fn record_ttft(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.ttft.lock().record(us);
    }

    pub(crate) fn record_success(&self, prompt: u64, completion: u64) {
        self.succeeded.fetch_add(1, Relaxed);
        saturating_add(&self.prompt_tokens, prompt);
        saturating_add(&self.completion_tokens, completion);
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
        let (q50, q99) = {
            let h = self.queue.lock();
            (h.quantile(0.50), h.quantile(0.99))
        };
        let (t50, t99) = {
            let h = self.ttft.lock();
            (h.quantile(0.50), h.quantile(0.99))
        };
        let f = |c: FailClass| self.fail[c as usize].load(Relaxed);
        let (rpm_budget, tpm_budget) = self.gate.budgets(now);
        let (learned_rpm, learned_tpm) = self.gate.learned_budgets();
        let disabled = self.gate.disabled();
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
            queue_p50_ms: q50 as f64 / 1000.0,
            queue_p99_ms: q99 as f64 / 1000.0,
            ttft_p50_ms: t50 as f64 / 1000.0,
            ttft_p99_ms: t99 as f64 / 1000.0,
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
            cooldown_remaining_ms: self
                .gate
                .cooling_until(now)
                .map(|u| {
                    u64::try_from(u.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
                })
                .unwrap_or(0),
            disabled_at_unix_ms: disabled.as_ref().map(|(_, t)| *t),
            disabled_reason: disabled.map(|(r, _)| r),
            rpm_budget,
            tpm_budget,
            learned_rpm,
            learned_tpm,
            group: self.gate.group().map(|g| g.name.to_string()),
            learned_limit: self.gate.learned_limit(),
            credit_remaining: self.credit.remaining(),
            cost: self.credit.cost(),
            rejoined: self.credit.rejoined(),
            parked: self.gate.is_parked(),
            status: self.status(now),
            latency_histogram: self.latency_buckets.snapshot(),
            queue_histogram: self.queue_buckets.snapshot(),
        }
    }
}

impl KeyState {
    /// Where the key stands at `now`.
    fn status(&self, now: Instant) -> crate::metrics::KeyStatus {
        use crate::metrics::KeyStatus;
        if self.gate.is_disabled() {
            if self.gate.is_parked() {
                KeyStatus::Parked
            } else if self.gate.out_until().is_some() {
                KeyStatus::Exhausted
            } else {
                KeyStatus::Disabled
            }
        } else if self.gate.cooling_until(now).is_some() {
            KeyStatus::Cooling
        } else {
            KeyStatus::Ok
        }
    }
}

/// Adds without ever wrapping: a server reporting absurd usage pins the counter at
/// `u64::MAX` instead of sending it back to zero.
fn saturating_add(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Relaxed, Relaxed, |c| Some(c.saturating_add(n)));
}

#[cfg(test)]
mod tests {
    use super::*;

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
