//! Metrics: fixed-bucket duration histograms kept with atomics where latencies are
//! recorded, and [`Stats::to_prometheus`], the Prometheus text exposition format.
//!
//! Names follow Prometheus conventions: a `keypool_` prefix, base units (`_seconds`,
//! `_dollars`), `_total` on counters. Series are labelled with the key's *label*
//! (`key="…"`), never the key itself.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::stats::{KeyStats, Stats};

/// Upper bounds (seconds) of the duration histograms' buckets, in increasing order;
/// a last `+Inf` bucket is implied. From 5 ms (a cached answer on a local server) to
/// 5 minutes (a long generation).
pub const DURATION_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The bounds in microseconds (exact: every bound is a whole number of µs).
const BOUNDS_US: [u64; 15] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
];

/// A snapshot of one duration histogram, Prometheus style.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DurationHistogram {
    /// Cumulative counts: `buckets[i]` observations took at most
    /// [`DURATION_BUCKETS`]`[i]` seconds. Empty before any observation was possible
    /// (a default snapshot); otherwise one per bound.
    pub buckets: Vec<u64>,
    /// Observations (the `+Inf` bucket).
    pub count: u64,
    /// Sum of every observation, seconds.
    pub sum_seconds: f64,
}

impl DurationHistogram {
    /// Adds `other`'s counts (both from this crate's recorders: same bounds).
    pub(crate) fn merge(&mut self, other: &DurationHistogram) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a = a.saturating_add(*b);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum_seconds += other.sum_seconds;
    }
}

/// A duration recorder: one relaxed atomic add per bucket hit, plus count and sum.
#[derive(Default)]
pub(crate) struct Buckets {
    counts: [AtomicU64; 15],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Buckets {
    pub(crate) fn record(&self, micros: u64) {
        // Non-cumulative here (one add); made cumulative in `snapshot`.
        if let Some(i) = BOUNDS_US.iter().position(|&b| micros <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        let _ = self
            .sum_us
            .fetch_update(Relaxed, Relaxed, |s| Some(s.saturating_add(micros)));
    }

    pub(crate) fn snapshot(&self) -> DurationHistogram {
        let mut run = 0u64;
        let buckets = self
            .counts
            .iter()
            .map(|c| {
                run = run.saturating_add(c.load(Relaxed));
                run
            })
            .collect();
        let count = self.count.load(Relaxed).max(run);
        DurationHistogram {
            buckets,
            count,
            sum_seconds: self.sum_us.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// Where a key stands now, for [`KeyStats::status`] and the `keypool_key_state` metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KeyStatus {
    /// In rotation (possibly busy, or on a trial request).
    #[default]
    Ok,
    /// Cooling down after a 429 (its own or its account's): back when it ends.
    Cooling,
    /// Out until its quota resets (a daily quota spent): back on its own.
    Exhausted,
    /// Out for its credit; back when a credit check finds credit.
    Parked,
    /// Out for good (HTTP 401, a 403 proven to be the key's).
    Disabled,
}

impl KeyStatus {
    /// Every status, in the order the metrics list them.
    pub const ALL: [KeyStatus; 5] = [
        KeyStatus::Ok,
        KeyStatus::Cooling,
        KeyStatus::Exhausted,
        KeyStatus::Parked,
        KeyStatus::Disabled,
    ];

    /// The lowercase name (`"ok"`, `"cooling"`, `"exhausted"`, `"parked"`, `"disabled"`).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Ok => "ok",
            KeyStatus::Cooling => "cooling",
            KeyStatus::Exhausted => "exhausted",
            KeyStatus::Parked => "parked",
            KeyStatus::Disabled => "disabled",
        }
    }
}

/// Escapes a label value: backslash, double quote and line feed.
fn label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value: integers as such, floats as Go's `ParseFloat` reads them.
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{v}")
    }
}

/// Builds the exposition text, one metric family at a time.
struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // HELP text: only backslash and line feed need escaping; ours have neither.
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                label_value(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(value);
        self.out.push('\n');
    }

    fn per_key<T: ToString>(
        &mut self,
        stats: &Stats,
        name: &str,
        kind: &str,
        help: &str,
        f: impl Fn(&KeyStats) -> T,
    ) {
        self.family(name, kind, help);
        for k in &stats.keys {
            self.sample(name, &[("key", &k.label)], &f(k).to_string());
        }
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &DurationHistogram) {
        let bucket = format!("{name}_bucket");
        let mut with_le: Vec<(&str, &str)> = labels.to_vec();
        let bounds: Vec<String> = DURATION_BUCKETS.iter().map(|b| float(*b)).collect();
        for (i, le) in bounds.iter().enumerate() {
            with_le.push(("le", le));
            let n = h.buckets.get(i).copied().unwrap_or(0);
            self.sample(&bucket, &with_le, &n.to_string());
            with_le.pop();
        }
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, &h.count.to_string());
        self.sample(&format!("{name}_sum"), labels, &float(h.sum_seconds));
        self.sample(&format!("{name}_count"), labels, &h.count.to_string());
    }
}

impl Stats {
    /// The snapshot in the Prometheus text exposition format (version 0.0.4), for a
    /// `/metrics` endpoint (`keypool run --metrics-addr`) or a file for node_exporter's
    /// textfile collector. Every series of a key is labelled `key="<label>"`: the key's
    /// label, never the key. See `docs/metrics.md` for the list.
    ///
    /// ```
    /// # let server = keypool_mock::MockServer::start(keypool_mock::MockConfig::default()).unwrap();
    /// # let config = keypool::Config::builder().base_url(server.url()).key_config(keypool::KeyConfig::new("sk-a").label("acct-a").max_concurrent(2)).build()?;
    /// # let pool = keypool::Pool::new(config)?;
    /// pool.batch((0..3).map(|i| keypool::Request::chat("m", [("user", format!("q{i}"))])));
    /// let text = pool.stats().to_prometheus();
    /// assert!(text.contains("keypool_requests_total{key=\"acct-a\",outcome=\"success\"} 3\n"));
    /// # Ok::<(), keypool::Error>(())
    /// ```
    pub fn to_prometheus(&self) -> String {
        let mut w = Writer {
            out: String::with_capacity(4096 + self.keys.len() * 4096),
        };
        w.family(
            "keypool_submitted_total",
            "counter",
            "Requests accepted by the pool.",
        );
        w.sample("keypool_submitted_total", &[], &self.submitted.to_string());
        w.family(
            "keypool_completed_total",
            "counter",
            "Requests answered (success or error).",
        );
        w.sample("keypool_completed_total", &[], &self.completed.to_string());
        w.family(
            "keypool_queue_depth",
            "gauge",
            "Requests waiting in the pool's queue.",
        );
        w.sample("keypool_queue_depth", &[], &self.queued.to_string());
        w.family(
            "keypool_events_dropped_total",
            "counter",
            "Key events dropped because too many waited for the event handler.",
        );
        w.sample(
            "keypool_events_dropped_total",
            &[],
            &self.events_dropped.to_string(),
        );

        w.family(
            "keypool_requests_total",
            "counter",
            "HTTP attempts by key and outcome (success, or the failure's class).",
        );
        for k in &self.keys {
            let f = &k.failures;
            for (outcome, n) in [
                ("success", k.succeeded),
                ("rate_limited", f.rate_limited),
                ("client_error", f.client_error),
                ("server_error", f.server_error),
                ("transport", f.transport),
                ("timeout", f.timeout),
                ("other", f.other),
            ] {
                w.sample(
                    "keypool_requests_total",
                    &[("key", &k.label), ("outcome", outcome)],
                    &n.to_string(),
                );
            }
        }
        w.per_key(
            self,
            "keypool_retries_total",
            "counter",
            "Failed attempts of the key that were retried.",
            |k| k.retries,
        );
        w.per_key(
            self,
            "keypool_in_flight",
            "gauge",
            "Requests in flight on the key now.",
            |k| k.in_flight,
        );
        w.per_key(
            self,
            "keypool_max_concurrent",
            "gauge",
            "The key's in-flight limit (worker threads).",
            |k| k.max_concurrent,
        );
        w.per_key(
            self,
            "keypool_prompt_tokens_total",
            "counter",
            "Prompt tokens of the key's successful responses (usage.prompt_tokens).",
            |k| k.prompt_tokens,
        );
        w.per_key(
            self,
            "keypool_completion_tokens_total",
            "counter",
            "Completion tokens of the key's successful responses (usage.completion_tokens).",
            |k| k.completion_tokens,
        );
        w.per_key(
            self,
            "keypool_cost_dollars_total",
            "counter",
            "Dollars spent on the key, as its responses reported (usage.cost).",
            |k| float(k.cost),
        );
        w.per_key(
            self,
            "keypool_key_up",
            "gauge",
            "1 if the key is in rotation (not cooling, exhausted, parked or disabled).",
            |k| u8::from(k.status == KeyStatus::Ok),
        );
        w.family(
            "keypool_key_state",
            "gauge",
            "1 for the key's current state (ok, cooling, exhausted, parked, disabled), 0 for the others.",
        );
        for k in &self.keys {
            for s in KeyStatus::ALL {
                w.sample(
                    "keypool_key_state",
                    &[("key", &k.label), ("state", s.as_str())],
                    if k.status == s { "1" } else { "0" },
                );
            }
        }
        w.per_key(
            self,
            "keypool_key_cooldown_seconds",
            "gauge",
            "Seconds until the key's cooldown ends (0 when not cooling).",
            |k| float(k.cooldown_remaining_ms as f64 / 1000.0),
        );
        w.per_key(
            self,
            "keypool_key_rejoined_total",
            "counter",
            "Times the key came back after being parked for its credit.",
            |k| k.rejoined,
        );
        if self.keys.iter().any(|k| k.credit_remaining.is_some()) {
            w.family(
                "keypool_key_credit_remaining_dollars",
                "gauge",
                "Dollars left on the key at its last credit check.",
            );
            for k in &self.keys {
                if let Some(c) = k.credit_remaining {
                    w.sample(
                        "keypool_key_credit_remaining_dollars",
                        &[("key", &k.label)],
                        &float(c),
                    );
                }
            }
        }

        w.family(
            "keypool_request_duration_seconds",
            "histogram",
            "Duration of each HTTP attempt on the key (a stream: until its last chunk).",
        );
        for k in &self.keys {
            w.histogram(
                "keypool_request_duration_seconds",
                &[("key", &k.label)],
                &k.latency_histogram,
            );
        }
        let mut queue = DurationHistogram::default();
        for k in &self.keys {
            queue.merge(&k.queue_histogram);
        }
        w.family(
            "keypool_queue_duration_seconds",
            "histogram",
            "Time from submit to a request's first send (queue, full pool, keys not admitting).",
        );
        w.histogram("keypool_queue_duration_seconds", &[], &queue);

        if !self.groups.is_empty() {
            w.family(
                "keypool_group_in_flight",
                "gauge",
                "Requests of the account group's keys in flight now.",
            );
            for g in &self.groups {
                w.sample(
                    "keypool_group_in_flight",
                    &[("group", &g.name)],
                    &g.in_flight.to_string(),
                );
            }
            w.family(
                "keypool_group_cooldown_seconds",
                "gauge",
                "Seconds until the account group's cooldown ends (0 when not cooling).",
            );
            for g in &self.groups {
                w.sample(
                    "keypool_group_cooldown_seconds",
                    &[("group", &g.name)],
                    &float(g.cooldown_remaining_ms as f64 / 1000.0),
                );
            }
        }
        w.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_bounds_inclusive() {
        let b = Buckets::default();
        for us in [1, 5_000, 5_001, 2_000_000, u64::MAX] {
            b.record(us);
        }
        let h = b.snapshot();
        assert_eq!(h.buckets.len(), DURATION_BUCKETS.len());
        assert_eq!(h.buckets[0], 2, "le is inclusive");
        assert_eq!(h.buckets[1], 3);
        assert_eq!(h.buckets[8], 4, "2 s <= 2.5 s");
        assert_eq!(*h.buckets.last().unwrap(), 4, "u64::MAX only in +Inf");
        assert_eq!(h.count, 5);
        assert!(h.sum_seconds.is_finite());
        for (b, us) in DURATION_BUCKETS.iter().zip(BOUNDS_US) {
            assert_eq!((b * 1e6).round() as u64, us);
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = String::new();
        label_value(&mut s, "a\\b\"c\nd");
        assert_eq!(s, "a\\\\b\\\"c\\nd");
        assert_eq!(float(0.005), "0.005");
        assert_eq!(float(300.0), "300");
        assert_eq!(float(f64::INFINITY), "+Inf");
    }
}
