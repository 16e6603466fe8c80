//! Learned concurrency (AIMD) for keys with `adaptive: true`.
//!
//! The limit starts at 1 and grows by about one per round trip while the key is used
//! up to its limit (`1/limit` per success); a 429 cuts it to 80 % (at least 1), once
//! per overshoot: 429s of requests admitted before the last cut do not cut again. The
//! limit that drew the 429 is remembered as a ceiling; growing to it again is a probe,
//! made `probe_wait` times more slowly, and `probe_wait` doubles (up to
//! [`MAX_PROBE_WAIT`]) each time the same probe fails again — so a hidden capacity
//! costs a few 429s to find and then fewer and fewer — and resets once the limit grows past
//! the ceiling without a 429. The limit never exceeds `max_concurrent` (the key's worker count)
//! and never drops below 1. The state lives inside the key's gate, under its lock: the
//! gate admits only while fewer than `limit` admissions are out.

/// The slowest probing: one step towards a failed ceiling per this many windows.
pub(crate) const MAX_PROBE_WAIT: u32 = 64;

/// Multiplicative decrease on a 429.
const BETA: f64 = 0.8;

/// The AIMD state of one key.
#[derive(Debug, Clone)]
pub(crate) struct Aimd {
    limit: usize,
    max: usize,
    /// Progress towards the next +1.
    acc: f64,
    /// Cuts made so far; an admission remembers the count it was admitted under.
    cuts: u64,
    /// The limit that last drew a 429, until a probe at it holds.
    ceiling: Option<usize>,
    probe_wait: u32,
}

impl Aimd {
    /// Starts at 1, never above `max` (at least 1).
    pub(crate) fn new(max: usize) -> Aimd {
        Aimd {
            limit: 1,
            max: max.max(1),
            acc: 0.0,
            cuts: 0,
            ceiling: None,
            probe_wait: 1,
        }
    }

    /// Admissions allowed out at once now.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Cuts so far (carried by each admission).
    pub(crate) fn cuts(&self) -> u64 {
        self.cuts
    }

    /// A request succeeded; `busy` says the key was using its whole limit.
    pub(crate) fn on_success(&mut self, busy: bool) {
        if !busy || self.limit >= self.max {
            return;
        }
        let probing = self.ceiling.is_some_and(|c| self.limit + 1 >= c);
        let wait = if probing { self.probe_wait as f64 } else { 1.0 };
        self.acc += 1.0 / (self.limit as f64 * wait);
        if self.acc >= 1.0 {
            self.acc = 0.0;
            self.limit += 1;
            if self.ceiling.is_some_and(|c| self.limit > c) {
                // Grew past the ceiling without a 429: the probe held, the ceiling
                // was transient.
                self.ceiling = None;
                self.probe_wait = 1;
            }
        }
    }

    /// A request admitted under `cuts` got a 429. True if the limit was cut.
    pub(crate) fn on_429(&mut self, cuts: u64) -> bool {
        if cuts != self.cuts {
            return false; // part of an overshoot already answered
        }
        self.cuts += 1;
        if self.ceiling == Some(self.limit) {
            self.probe_wait = (self.probe_wait * 2).min(MAX_PROBE_WAIT);
        }
        self.ceiling = Some(self.limit);
        self.limit = ((self.limit as f64 * BETA) as usize).clamp(1, self.max);
        self.acc = 0.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the AIMD against a server that rejects above `cap` in flight, one window
    /// at a time (a 429 is fast: the window's rejections come back first); returns
    /// (limit after, 429s, requests).
    fn simulate(cap: usize, max: usize, windows: usize) -> (usize, u64, u64) {
        let mut a = Aimd::new(max);
        let (mut rejected, mut total) = (0u64, 0u64);
        for _ in 0..windows {
            let cuts = a.cuts();
            let n = a.limit();
            for i in 0..n {
                total += 1;
                if i < n.saturating_sub(cap) {
                    rejected += 1;
                    a.on_429(cuts);
                } else {
                    a.on_success(true);
                }
            }
        }
        (a.limit(), rejected, total)
    }

    #[test]
    fn converges_below_hidden_capacity_with_few_429s() {
        for cap in [1, 3, 8, 20] {
            let (limit, rejected, total) = simulate(cap, 32, 2_000);
            assert!(
                limit <= cap + 1 && limit + 2 >= cap * 8 / 10,
                "cap {cap}: {limit}"
            );
            assert!(
                (rejected as f64) < 0.02 * total as f64,
                "cap {cap}: {rejected}/{total}"
            );
        }
    }

    #[test]
    fn bounded_by_max_and_one() {
        let mut a = Aimd::new(4);
        for _ in 0..10_000 {
            a.on_success(true);
        }
        assert_eq!(a.limit(), 4);
        for _ in 0..100 {
            let c = a.cuts();
            a.on_429(c);
        }
        assert_eq!(a.limit(), 1);
        // An idle key does not grow.
        for _ in 0..100 {
            a.on_success(false);
        }
        assert_eq!(a.limit(), 1);
    }

    #[test]
    fn one_cut_per_overshoot() {
        let mut a = Aimd::new(32);
        for _ in 0..1_000 {
            a.on_success(true);
        }
        let before = a.limit();
        let c = a.cuts();
        assert!(a.on_429(c));
        assert!(
            !a.on_429(c),
            "a second 429 of the same window must not cut again"
        );
        assert_eq!(a.limit(), (before as f64 * 0.8) as usize);
    }
}
