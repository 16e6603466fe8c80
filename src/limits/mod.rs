//! Per-key limits: whether a key may take a request now, decided in one place before
//! the hand-off. [`admission`] (one `Gate` per key: idle workers, trial, cooldown, rate
//! budgets, disabled/parked; `try_admit` and `complete`), [`ratelimit`] (rate-limit
//! headers: pauses and learned budgets), [`adaptive`] (the learned concurrency limit),
//! [`group`] (an account's limits binding its keys), [`model_verdicts`] (a model cooling
//! or missing at a key), [`shared_limits`] (the same limits shared across processes
//! through Redis, feature `redis`).
//!
//! State machines and counters, no threads of their own except the shared limits'
//! renewer and subscriber (Redis); they never send an HTTP request.
//!
//! May use: `api`.

pub(crate) mod adaptive;
pub(crate) mod admission;
pub(crate) mod events;
pub(crate) mod group;
pub(crate) mod model_verdicts;
pub(crate) mod ratelimit;
pub(crate) mod shared_limits;
