//! Statistics: the public snapshot types and the latency histogram behind them.

use serde::Serialize;

/// Failures of one key, by class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FailureCounts {
    /// HTTP 429 responses.
    pub rate_limited: u64,
    /// Other HTTP 4xx responses (and errors embedded in a 200 body).
    pub client_error: u64,
    /// HTTP 5xx responses.
    pub server_error: u64,
    /// Connection failures, cut-short or oversized bodies.
    pub transport: u64,
    /// Connect or attempt timeouts.
    pub timeout: u64,
    /// Worker panics and anything else.
    pub other: u64,
}

/// A snapshot of one key's activity. Holds the label, never the key.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct KeyStats {
    /// Position in the config.
    pub index: usize,
    /// The key's label.
    pub label: String,
    /// Worker threads (the in-flight limit).
    pub max_concurrent: usize,
    /// Requests in flight now.
    pub in_flight: usize,
    /// Most requests ever in flight at once.
    pub max_in_flight: usize,
    /// HTTP attempts started.
    pub sent: u64,
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Failed attempts by class.
    pub failures: FailureCounts,
    /// Failed attempts of this key that were retried (on this or another key).
    pub retries: u64,
    /// Median attempt latency, milliseconds (0 before any attempt).
    pub latency_p50_ms: f64,
    /// 99th-percentile attempt latency, milliseconds.
    pub latency_p99_ms: f64,
    /// Median queue time (submit to first send) of requests first sent on this key,
    /// milliseconds.
    pub queue_p50_ms: f64,
    /// 99th-percentile queue time of requests first sent on this key, milliseconds.
    pub queue_p99_ms: f64,
    /// Median time to first token of streamed requests on this key (attempt start to
    /// the first chunk with text), milliseconds (0 before any).
    pub ttft_p50_ms: f64,
    /// 99th-percentile time to first token of streamed requests, milliseconds.
    pub ttft_p99_ms: f64,
    /// Sum of `usage.prompt_tokens` of successful responses.
    pub prompt_tokens: u64,
    /// Sum of `usage.completion_tokens` of successful responses.
    pub completion_tokens: u64,
    /// Milliseconds until the key's cooldown ends (0 when not cooling).
    pub cooldown_remaining_ms: u64,
    /// Why the key was taken out of rotation, if it was.
    pub disabled_reason: Option<String>,
    /// When it was taken out, as milliseconds since the Unix epoch.
    pub disabled_at_unix_ms: Option<u64>,
    /// Requests the key may still send now under its `rpm` limit, or else under the
    /// request budget learned from rate-limit headers (`None`: neither).
    pub rpm_budget: Option<f64>,
    /// Tokens the key may still use now under its `tpm` limit, or else under the token
    /// budget learned from rate-limit headers (`None`: neither).
    pub tpm_budget: Option<f64>,
    /// The request budget learned from the key's `x-ratelimit-*-requests` headers, as
    /// requests per minute (`None`: none learned, or `rpm` is configured).
    pub learned_rpm: Option<f64>,
    /// The token budget learned from the key's `x-ratelimit-*-tokens` headers, as
    /// tokens per minute (`None`: none learned, or `tpm` is configured).
    pub learned_tpm: Option<f64>,
    /// The key's account (`group`), if it has one.
    pub group: Option<String>,
    /// The learned concurrency limit now (`adaptive` keys; `None` otherwise).
    pub learned_limit: Option<usize>,
    /// Dollars left on the key at its last credit check (`credits.check`; `None` when
    /// never checked, the check failed, or the key has no cap).
    pub credit_remaining: Option<f64>,
    /// Dollars spent: the sum of the `usage.cost` its responses reported (0 when the
    /// provider reports none).
    pub cost: f64,
    /// The key is out of rotation for its credit (at its floor, a 402, OpenAI's
    /// `insufficient_quota`) and may come back when a re-check finds credit
    /// (`disabled_reason` says why); false for a key disabled for good (401).
    pub parked: bool,
    /// Times the key rejoined the rotation after being parked for its credit (a
    /// re-check found its balance above the floor again; `credits.recheck_ms`).
    pub rejoined: u64,
    /// Where the key stands now: in rotation, cooling, exhausted, parked or disabled.
    pub status: crate::metrics::KeyStatus,
    /// Attempt latencies in the fixed buckets of [`DURATION_BUCKETS`](crate::DURATION_BUCKETS).
    pub latency_histogram: crate::metrics::DurationHistogram,
    /// Queue times of requests first sent on this key, in the same buckets.
    pub queue_histogram: crate::metrics::DurationHistogram,
}

/// A snapshot of one account group's shared limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GroupStats {
    /// The group's name.
    pub name: String,
    /// Its in-flight limit (`None`: none).
    pub max_concurrent: Option<usize>,
    /// Requests of its keys in flight now (admitted, not yet completed).
    pub in_flight: usize,
    /// Most requests of its keys ever in flight at once.
    pub max_in_flight: usize,
    /// Milliseconds until the account's cooldown ends (0 when not cooling).
    pub cooldown_remaining_ms: u64,
    /// Requests its keys may still send now under the group's `rpm` (`None`: no limit).
    pub rpm_budget: Option<f64>,
    /// Tokens its keys may still use now under the group's `tpm` (`None`: no limit).
    pub tpm_budget: Option<f64>,
}

/// Sums over every key of a [`Stats`] snapshot, from [`Stats::totals`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Totals {
    /// Worker threads over all keys.
    pub max_concurrent: usize,
    /// Requests in flight now.
    pub in_flight: usize,
    /// HTTP attempts started.
    pub sent: u64,
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// Failed attempts by class.
    pub failures: FailureCounts,
    /// Failed attempts that were retried.
    pub retries: u64,
    /// Sum of `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// Sum of `usage.completion_tokens`.
    pub completion_tokens: u64,
    /// Keys taken out of rotation (disabled or parked).
    pub disabled_keys: usize,
}

/// A snapshot of the whole pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Requests accepted by `submit` and friends.
    pub submitted: u64,
    /// Requests answered (success or error).
    pub completed: u64,
    /// Requests waiting in the queue now.
    pub queued: usize,
    /// Per key, in config order.
    pub keys: Vec<KeyStats>,
    /// Per account group, in config order.
    pub groups: Vec<GroupStats>,
    /// Median queue time over all requests sent (submit to first send: in the queue,
    /// behind a full pool, waiting for a key to admit), milliseconds.
    pub queue_p50_ms: f64,
    /// 99th-percentile queue time over all requests sent, milliseconds.
    pub queue_p99_ms: f64,
    /// Key events dropped because 4,096 were waiting for a slow event handler
    /// ([`Pool::set_event_handler`](crate::Pool::set_event_handler)).
    pub events_dropped: u64,
}

impl Stats {
    /// Sums over every key (counters saturate rather than wrap).
    ///
    /// ```
    /// # let server = keypool_mock::MockServer::start(keypool_mock::MockConfig::default()).unwrap();
    /// # let config = keypool::Config::builder().base_url(server.url()).key("sk-a", 2).key("sk-b", 2).build()?;
    /// # let pool = keypool::Pool::new(config)?;
    /// pool.batch((0..10).map(|i| keypool::Request::chat("m", [("user", format!("q{i}"))])));
    /// let t = pool.stats().totals();
    /// assert_eq!(t.succeeded, 10);
    /// assert_eq!(t.max_concurrent, 4);
    /// # Ok::<(), keypool::Error>(())
    /// ```
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for k in &self.keys {
            t.max_concurrent += k.max_concurrent;
            t.in_flight += k.in_flight;
            t.sent = t.sent.saturating_add(k.sent);
            t.succeeded = t.succeeded.saturating_add(k.succeeded);
            t.failed = t.failed.saturating_add(k.failed);
            t.retries = t.retries.saturating_add(k.retries);
            t.prompt_tokens = t.prompt_tokens.saturating_add(k.prompt_tokens);
            t.completion_tokens = t.completion_tokens.saturating_add(k.completion_tokens);
            let (a, b) = (&mut t.failures, &k.failures);
            a.rate_limited = a.rate_limited.saturating_add(b.rate_limited);
            a.client_error = a.client_error.saturating_add(b.client_error);
            a.server_error = a.server_error.saturating_add(b.server_error);
            a.transport = a.transport.saturating_add(b.transport);
            a.timeout = a.timeout.saturating_add(b.timeout);
            a.other = a.other.saturating_add(b.other);
            t.disabled_keys += usize::from(k.disabled_reason.is_some());
        }
        t
    }

    /// The snapshot as JSON (same field names as the Rust structs).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("stats serialize")
    }
}

/// A log-linear histogram of microsecond values: exact below 64 µs, then 32 buckets per
/// power of two (about 3 % relative error). Fixed size, no allocation after creation.
#[derive(Clone)]
pub(crate) struct Histogram {
    counts: Box<[u32]>,
    total: u64,
}

const SUB: u32 = 32;
const LINEAR: u64 = 64;
const BUCKETS: usize = (LINEAR as usize) + (64 - 6) * SUB as usize;

impl Histogram {
    pub(crate) fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < LINEAR {
            return v as usize;
        }
        let b = 63 - v.leading_zeros(); // >= 6
        let sub = (v >> (b - 5)) & (SUB as u64 - 1);
        LINEAR as usize + (b as usize - 6) * SUB as usize + sub as usize
    }

    fn lower_bound(i: usize) -> u64 {
        if (i as u64) < LINEAR {
            return i as u64;
        }
        let j = i - LINEAR as usize;
        let b = (j / SUB as usize) as u32 + 6;
        let sub = (j % SUB as usize) as u64;
        (1u64 << b) | (sub << (b - 5))
    }

    /// Adds every count of `other`.
    pub(crate) fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
        self.total = self.total.saturating_add(other.total);
    }

    pub(crate) fn record(&mut self, micros: u64) {
        let i = Self::index(micros);
        self.counts[i] = self.counts[i].saturating_add(1);
        self.total += 1;
    }

    /// The value at quantile `q` (0..=1), in microseconds; 0 when empty.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c as u64;
            if seen >= rank {
                let lo = Self::lower_bound(i);
                let hi = if i + 1 < BUCKETS {
                    Self::lower_bound(i + 1)
                } else {
                    lo
                };
                return lo + (hi - lo) / 2;
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn quantiles_within_3_percent() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 100);
        }
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 / 500_000.0 - 1.0).abs() < 0.03, "{p50}");
        assert!((p99 / 990_000.0 - 1.0).abs() < 0.03, "{p99}");
        assert_eq!(Histogram::new().quantile(0.5), 0);
        let mut small = Histogram::new();
        small.record(7);
        assert_eq!(small.quantile(0.99), 7);
        let mut big = Histogram::new();
        big.record(u64::MAX);
        assert!(big.quantile(0.5) > 1 << 62);
    }
}
