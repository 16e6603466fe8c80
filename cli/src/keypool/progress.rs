//! The progress bar and the end-of-run summary, both on stderr.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// A progress bar on stderr, hidden when stderr is not a terminal or when quiet; and
/// notes that go above it (or straight to stderr when it is hidden, unless quiet).
pub struct Progress {
    bar: ProgressBar,
    quiet: bool,
    last_message: Instant,
    /// Without a terminal: a plain progress line at most this often (not quiet).
    every: Duration,
    /// When the run (this progress) started, and when the last plain line was printed.
    start: Instant,
    last_line: Instant,
    done: u64,
    /// The number of items, when known.
    total: Option<u64>,
}

impl Progress {
    /// Whether a bar would be drawn: stderr is a terminal and not quiet.
    pub fn would_show(quiet: bool) -> bool {
        !quiet && std::io::stderr().is_terminal()
    }

    /// A bar for `total` items (unknown when `None`), drawn if [`Progress::would_show`].
    pub fn new(total: Option<u64>, quiet: bool, every: Duration) -> Progress {
        let bar = if !Progress::would_show(quiet) {
            ProgressBar::hidden()
        } else {
            let template = if total.is_some() {
                "{elapsed_precise} [{wide_bar:.cyan/blue}] {pos}/{len} {rate} ETA {eta} {msg}"
            } else {
                "{elapsed_precise} {spinner} {pos} done {rate} {msg}"
            };
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("valid template")
                    .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0}/s", s.per_sec());
                    })
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        };
        let now = Instant::now();
        Progress {
            bar,
            quiet,
            last_message: now - Duration::from_secs(1),
            every,
            start: now,
            last_line: now,
            done: 0,
            total,
        }
    }

    /// The items this run will do (the lines left to answer), for the plain lines.
    pub fn expect(&mut self, total: Option<u64>) {
        self.total = total;
    }

    /// Whether the bar is drawn.
    pub fn visible(&self) -> bool {
        !self.bar.is_hidden()
    }

    /// A clone of the bar (for the reader thread to shrink the total).
    pub fn bar(&self) -> ProgressBar {
        self.bar.clone()
    }

    /// One more record written; refreshes the error/retry counters at most 5 times a
    /// second (`counters` is only called then).
    pub fn inc(&mut self, counters: impl FnOnce() -> (u64, u64)) {
        self.bar.inc(1);
        self.done += 1;
        if self.visible() {
            if self.last_message.elapsed() >= Duration::from_millis(200) {
                self.last_message = Instant::now();
                let (errors, retries) = counters();
                self.bar
                    .set_message(format!("errors {errors} retries {retries}"));
            }
        } else if !self.quiet && self.last_line.elapsed() >= self.every {
            // No terminal (a log file, CI): a plain line now and then instead.
            self.last_line = Instant::now();
            let (errors, retries) = counters();
            let secs = self.start.elapsed().as_secs_f64();
            let total = self.total.map_or_else(String::new, |t| format!("/{t}"));
            eprintln!(
                "keypool: {}{total} done, {:.0}/s, errors {errors}, retries {retries}, {secs:.0}s",
                self.done,
                self.done as f64 / secs.max(1e-3)
            );
        }
    }

    /// Prints a line to stderr above the bar (nothing when quiet).
    pub fn note(&self, msg: &str) {
        if self.quiet {
            return;
        }
        if self.visible() {
            self.bar.println(msg);
        } else {
            eprintln!("{msg}");
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn ms(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}s", v / 1000.0)
    } else {
        format!("{}ms", v.round() as u64)
    }
}

/// Keys that stopped taking requests, one line each with the reason: disabled (a
/// rejected key, for good), parked (out of credit, back when a re-check finds some) or
/// cooling down (rate limited). Empty when every key is in use.
pub fn key_states(stats: &keypool::Stats) -> String {
    let mut out = String::new();
    for k in &stats.keys {
        if k.rejoined > 0 {
            let _ = writeln!(
                out,
                "keypool: key {} rejoined {} time(s) after its credit was topped up",
                k.label, k.rejoined
            );
        }
        if let Some(why) = &k.disabled_reason {
            // Parked: out for its credit, back when a re-check finds some.
            let state = if k.parked { "parked" } else { "disabled" };
            let _ = writeln!(out, "keypool: key {} {state}: {why}", k.label);
        } else if k.cooldown_remaining_ms > 0 {
            let _ = writeln!(
                out,
                "keypool: key {} cooling down for {} more (rate limited)",
                k.label,
                ms(k.cooldown_remaining_ms as f64)
            );
        }
    }
    out
}

/// Learned limits and budgets, credit left and spend, one line per key that has any.
/// Empty when no key learns its concurrency or a rate budget, checks credits or
/// reports costs.
pub fn key_capacity(stats: &keypool::Stats) -> String {
    let mut out = String::new();
    for k in &stats.keys {
        let mut parts = Vec::new();
        if let Some(n) = k.learned_limit {
            parts.push(format!("learned limit {n} of {}", k.max_concurrent));
        }
        if let Some(r) = k.learned_rpm {
            parts.push(format!("learned budget {r:.0} requests/min"));
        }
        if let Some(t) = k.learned_tpm {
            parts.push(format!("learned budget {t:.0} tokens/min"));
        }
        if let Some(c) = k.credit_remaining {
            parts.push(format!("credit left ${c:.4}"));
        }
        if k.cost > 0.0 {
            parts.push(format!("spent ${:.4}", k.cost));
        }
        if !parts.is_empty() {
            let _ = writeln!(out, "keypool: key {}: {}", k.label, parts.join(", "));
        }
    }
    out
}

/// The per-key table, counting HTTP attempts (not records): attempts, ok, failed,
/// 429s, retries, p50/p99 latency and tokens, plus a total row.
pub fn key_table(stats: &keypool::Stats) -> String {
    let headers = [
        "key", "attempts", "ok", "failed", "429s", "retries", "p50", "p99", "tokens",
    ];
    let mut rows: Vec<[String; 9]> = Vec::new();
    let mut total = [0u64; 6];
    for k in &stats.keys {
        let tokens = k.prompt_tokens + k.completion_tokens;
        let nums = [
            k.sent,
            k.succeeded,
            k.failed,
            k.failures.rate_limited,
            k.retries,
            tokens,
        ];
        for (t, n) in total.iter_mut().zip(nums) {
            *t += n;
        }
        rows.push([
            k.label.clone(),
            k.sent.to_string(),
            k.succeeded.to_string(),
            k.failed.to_string(),
            k.failures.rate_limited.to_string(),
            k.retries.to_string(),
            ms(k.latency_p50_ms),
            ms(k.latency_p99_ms),
            tokens.to_string(),
        ]);
    }
    if stats.keys.len() > 1 {
        rows.push([
            "total".into(),
            total[0].to_string(),
            total[1].to_string(),
            total[2].to_string(),
            total[3].to_string(),
            total[4].to_string(),
            String::new(),
            String::new(),
            total[5].to_string(),
        ]);
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(out, "{c:<w$}");
            } else {
                let _ = write!(out, "  {c:>w$}");
            }
        }
        out.push('\n');
    };
    line(&mut out, &headers);
    for r in &rows {
        line(&mut out, &r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_key_and_a_total() {
        let mut a = keypool::KeyStats::default();
        a.label = "acct-a".into();
        a.sent = 10;
        a.succeeded = 9;
        a.failed = 1;
        a.latency_p50_ms = 41.6;
        a.latency_p99_ms = 12_345.0;
        a.prompt_tokens = 5;
        a.completion_tokens = 7;
        let mut b = keypool::KeyStats::default();
        b.label = "b".into();
        let mut stats = keypool::Stats::default();
        stats.keys = vec![a, b];
        let t = key_table(&stats);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("key "));
        assert!(lines[1].starts_with("acct-a") && lines[1].contains("42ms"));
        assert!(lines[1].contains("12.3s") && lines[1].ends_with("12"));
        assert!(lines[3].starts_with("total"));
        assert_eq!(key_capacity(&stats), "");
        stats.keys[1].learned_limit = Some(5);
        stats.keys[1].max_concurrent = 8;
        stats.keys[1].credit_remaining = Some(1.5);
        assert_eq!(
            key_capacity(&stats),
            "keypool: key b: learned limit 5 of 8, credit left $1.5000\n"
        );
        stats.keys[0].learned_rpm = Some(1500.0);
        stats.keys[0].learned_tpm = Some(200_000.4);
        assert_eq!(
            key_capacity(&stats).lines().next(),
            Some(
                "keypool: key acct-a: learned budget 1500 requests/min, learned budget 200000 tokens/min"
            )
        );
    }
}
