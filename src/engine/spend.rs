//! The pool's spend cap (`max_cost`): the dollars its responses cost, summed, and the
//! switch that stops sending once they reach the cap.
//!
//! Every success adds its cost: the `usage.cost` the server reported (a stream's from
//! its last chunk), or, when it reported none, an estimate from the config's `prices`
//! for the request's model applied to the response's `usage` tokens. Once the sum
//! reaches `max_cost` the pool is exhausted for good: no request is sent any more —
//! the dispatcher answers every job it takes or holds (queued, set aside, waiting out
//! a backoff) with [`Error::BudgetExhausted`], a worker answers a job it was handed but
//! had not sent yet, and `submit` refuses new requests. Requests already on the wire
//! finish, so the overshoot is bounded by what is in flight when the cap is reached.
//!
//! With shared limits (`Config::shared`, feature `redis`) the sum lives in Redis
//! (`INCRBYFLOAT` on `kp:{namespace}:spend`): every process adds its costs there and
//! learns the total from the answer, so the cap holds for all of them together. A
//! process also reads the total when it starts. While Redis is unreachable each
//! process counts on alone (its local sum), and adds what it spent meanwhile once Redis
//! answers again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use parking_lot::Mutex;

use crate::error::Error;
use crate::request::Usage;

pub(crate) use crate::prices::ModelPrice;

/// The pool's spend and its cap.
pub(crate) struct Spend {
    cap: Option<f64>,
    prices: BTreeMap<String, ModelPrice>,
    inner: Mutex<Inner>,
    /// The cap is reached: nothing more is sent.
    exhausted: AtomicBool,
    /// The shared store (feature `redis`), where the pool's processes sum their spend.
    shared: Option<Arc<dyn crate::shared_limits::SharedLimits>>,
}

#[derive(Default)]
struct Inner {
    /// Dollars this pool's responses cost (reported or estimated).
    local: f64,
    /// The last total the shared store reported (all processes).
    shared_total: f64,
    /// Spent here while the shared store was unreachable, not yet added there.
    unshared: f64,
}

impl Spend {
    pub(crate) fn new(
        config: &crate::Config,
        shared: Option<Arc<dyn crate::shared_limits::SharedLimits>>,
    ) -> Spend {
        let spend = Spend {
            cap: config.max_cost,
            prices: config.prices.clone(),
            inner: Mutex::new(Inner::default()),
            exhausted: AtomicBool::new(false),
            shared: shared.filter(|_| config.max_cost.is_some()),
        };
        if let Some(cap) = spend.cap {
            // Spent by other processes before this one started (a zero add reads it).
            let total = spend
                .shared
                .as_ref()
                .and_then(|s| s.add_spend(0.0))
                .unwrap_or(0.0);
            spend.inner.lock().shared_total = total;
            if total >= cap - 1e-9 {
                spend.exhausted.store(true, SeqCst);
            }
        }
        spend
    }

    /// The cost of one success: `reported` (`usage.cost`), else the estimate from
    /// `prices` for `model` (the request's, then the name sent to the key) — `None`
    /// when neither is known.
    pub(crate) fn cost_of(
        &self,
        reported: Option<f64>,
        models: [Option<&str>; 2],
        usage: Usage,
    ) -> Option<f64> {
        if reported.is_some() {
            return reported;
        }
        if self.prices.is_empty() {
            return None;
        }
        let price = models
            .into_iter()
            .flatten()
            .find_map(|m| self.prices.get(m))?;
        crate::credits_config::dollars(price.cost(usage))
    }

    /// Adds one response's cost; returns true if this reached the cap (the caller
    /// nudges the dispatcher, which then answers every waiting job).
    pub(crate) fn add(&self, dollars: f64) -> bool {
        let Some(cap) = self.cap else {
            return false;
        };
        if dollars <= 0.0 {
            return false;
        }
        let total = {
            let mut s = self.inner.lock();
            s.local += dollars;
            s.unshared += dollars;
            s.shared_total.max(s.local)
        };
        let total = match &self.shared {
            Some(shared) => {
                // Outside the lock: one round trip, adding what this process spent
                // since its last successful add.
                let add = std::mem::take(&mut self.inner.lock().unshared);
                match shared.add_spend(add) {
                    Some(t) => {
                        let mut s = self.inner.lock();
                        s.shared_total = s.shared_total.max(t);
                        s.shared_total.max(s.local)
                    }
                    None => {
                        self.inner.lock().unshared += add;
                        total
                    }
                }
            }
            None => total,
        };
        // A float sum of cents may land a hair below the cap it adds up to.
        total >= cap - 1e-9 && !self.exhausted.swap(true, SeqCst)
    }

    /// Whether the cap is reached.
    pub(crate) fn is_exhausted(&self) -> bool {
        self.exhausted.load(SeqCst)
    }

    /// Dollars spent: this pool's, or the shared total when it is larger.
    pub(crate) fn spent(&self) -> f64 {
        let s = self.inner.lock();
        s.shared_total.max(s.local)
    }

    /// The error a request gets once the cap is reached; `None` before.
    pub(crate) fn refusal(&self) -> Option<Error> {
        let cap = self.cap?;
        self.is_exhausted().then(|| Error::BudgetExhausted {
            spent: self.spent(),
            max_cost: cap,
        })
    }
}

/// Records one success's cost for key `index`: its reported `usage.cost` in the key's
/// credit (`credits.rs`), and its cost — reported, else estimated from `prices` — in the
/// pool's spend. Reaching the cap is logged and nudges the dispatcher, which then
/// answers every job still waiting.
pub(crate) fn record(
    shared: &crate::shared::Shared,
    index: usize,
    job: &crate::job::Job,
    reported: Option<f64>,
    usage: Usage,
) {
    if let Some(c) = reported {
        // Marks a re-check due (done after the reply, `credits::recheck_if_due`).
        shared.keys[index]
            .credit
            .add_cost(c, shared.config.credits.recheck_cost);
    }
    let spend = &shared.spend;
    if spend.cap.is_none() {
        return;
    }
    let model = job.model().map(|m| &**m);
    let sent = model.and_then(|m| shared.config.keys[index].model_map.get(m));
    if let Some(c) = spend.cost_of(reported, [model, sent.map(String::as_str)], usage) {
        if spend.add(c) {
            log::warn!(
                "keypool: spend cap reached: ${:.4} of max_cost ${}; nothing more is sent",
                spend.spent(),
                spend.cap.unwrap_or(0.0)
            );
            shared.nudge();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_and_estimate() {
        let cfg = crate::Config {
            max_cost: Some(0.05),
            prices: BTreeMap::from([("m".to_owned(), ModelPrice::new(1.0, 2.0))]),
            ..crate::Config::default()
        };
        let s = Spend::new(&cfg, None);
        let usage = Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
        };
        let est = s.cost_of(None, [Some("m"), None], usage).unwrap();
        assert!((est - 0.002).abs() < 1e-12, "{est}");
        assert_eq!(s.cost_of(Some(0.5), [Some("m"), None], usage), Some(0.5));
        assert_eq!(s.cost_of(None, [Some("x"), None], usage), None);
        assert_eq!(s.cost_of(None, [Some("x"), Some("m")], usage), Some(est));
        for _ in 0..4 {
            assert!(!s.add(0.01));
        }
        assert!(s.refusal().is_none());
        assert!(s.add(0.01), "the fifth cent reaches the cap");
        assert!(!s.add(0.01), "reported once");
        let e = s.refusal().expect("exhausted");
        assert_eq!(e.code(), "budget_exhausted");
        assert!(e.to_string().contains("0.05"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        let mut prices = BTreeMap::new();
        assert!(crate::prices::check(Some(-1.0), &prices).is_err());
        assert!(crate::prices::check(Some(f64::NAN), &prices).is_err());
        assert!(crate::prices::check(Some(0.0), &prices).is_ok());
        prices.insert("m".into(), ModelPrice::new(f64::INFINITY, 0.0));
        let e = crate::prices::check(None, &prices).unwrap_err().to_string();
        assert!(e.contains("prices") && e.contains("prompt"), "{e}");
    }
}
