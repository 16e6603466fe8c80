//! The engine: the threads and channels that move a request from `submit` to its one
//! result. [`pool`] (`Pool`, startup, intake, close), [`dispatch`] (the dispatcher
//! thread), [`worker`] (a key's worker threads: one attempt, the verdict, the retry
//! hand-back), [`job`] and [`ticket`] (a request in motion, its one-shot reply),
//! [`deadline`] (the deadline registry), [`queue_space`] (backpressure for blocked
//! submitters), [`batch`] and [`stream`] (`Pool::stream`, streamed responses),
//! [`routing`] (which keys serve a model, the one admission path), [`shared`] (state
//! the pool, the dispatcher and the workers share), [`key`] (a key's counters and
//! gate), [`key_proof`] and [`credits`] (the requests a key's own threads make about the
//! key: its proof, its balance), [`thread_role`] (which threads are the pool's).
//!
//! The top layer: everything below it, nothing above it but the crate root's
//! re-exports.
//!
//! May use: `api`, `transport`, `limits`, `policy`.

pub(crate) mod batch;
pub(crate) mod credits;
pub(crate) mod deadline;
pub(crate) mod dispatch;
pub(crate) mod event_handler;
pub(crate) mod job;
pub(crate) mod key;
pub(crate) mod key_proof;
pub(crate) mod pool;
pub(crate) mod queue_space;
pub(crate) mod routing;
pub(crate) mod shared;
pub(crate) mod spend;
pub(crate) mod stream;
pub(crate) mod thread_role;
pub(crate) mod ticket;
pub(crate) mod worker;
