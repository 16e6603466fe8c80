//! # keypool
//!
//! Spread OpenAI-compatible LLM API requests (OpenRouter, OpenAI, vLLM, Ollama, …)
//! across many API keys, so a batch of thousands of prompts finishes as fast as the
//! keys allow, with no request lost.
//!
//! - Blocking and thread-based: no async runtime. Each key has its own worker threads
//!   (exactly `max_concurrent`) and its own HTTP agent with keep-alive.
//! - One dispatcher thread hands each request to a key by [`Strategy`], blocking on
//!   channels — never polling.
//! - [`Pool::submit`] returns a [`Ticket`]; [`Pool::batch`] returns results in input
//!   order; [`Pool::stream`] yields them as they complete, in bounded memory.
//! - Every request ends in exactly one result, shutdown included.
//! - API keys never appear in `Debug`, `Display`, errors, logs or stats: labels stand
//!   in for them.
//!
//! ```
//! use keypool::{Config, Pool, Request};
//! # let server = keypool_mock::MockServer::start(keypool_mock::MockConfig::default()).unwrap();
//! let config = Config::from_json(&format!(r#"{{
//!     "base_url": "{}",
//!     "strategy": "first_available",
//!     "keys": [{{"key": "sk-a", "label": "acct-a", "max_concurrent": 5}},
//!              {{"key": "sk-b", "label": "acct-b", "max_concurrent": 5}}]
//! }}"#, server.url()))?;
//! let pool = Pool::new(config)?;
//! let ticket = pool.submit(Request::chat("gpt-4o-mini", [("user", "Say hi")]))?;
//! let response = ticket.wait()?;
//! assert_eq!(response.status(), 200);
//! assert!(response.content().is_some());
//! # Ok::<(), keypool::Error>(())
//! ```
#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![forbid(unsafe_code)]

// The engine's modules, grouped by layer (ARCHITECTURE.md), each folder's `mod.rs`
// saying what it owns and which folders it may use; `scripts/layers.py` checks that
// no import climbs a layer. Every module keeps its short path (`crate::config`,
// `crate::pool`, …) through the imports below.
mod api;
mod engine;
mod limits;
mod policy;
mod transport;

use api::{
    body, chat, config, credits_config, error, json_scan, metrics, prices, request, retry_after,
    shared_config, stats, tls_config,
};
use engine::{
    batch, credits, deadline, dispatch, job, key, key_proof, pool, queue_space, routing, shared,
    spend, stream, thread_role, ticket, worker,
};
use limits::{adaptive, admission, events, group, model_verdicts, ratelimit, shared_limits};
use policy::{blame, retry};
use transport::{cancel, sse};

/// Entry points for the `fuzz/` targets. Not part of the stable API: hidden, exempt
/// from semver, may change in any release.
#[doc(hidden)]
#[path = "fuzz_api.rs"]
pub mod __fuzz;

pub use batch::{ResultStream, Window};
pub use chat::ChatRequest;
pub use config::{
    ApiKey, Config, ConfigBuilder, GroupConfig, KeyConfig, MAX_CONCURRENT_LIMIT, MAX_DURATION_MS,
    MAX_KEY_BYTES, MAX_KEYS, MAX_QUEUE_CAPACITY, MAX_TOTAL_WORKERS, MAX_WEIGHT,
    MAX_WORKER_STACK_SIZE, RetryConfig, Strategy,
};
pub use credits_config::CreditsConfig;
pub use error::{Blame, Error, StreamFailure, TimeoutPhase};
pub use events::{KeyEvent, KeyEventKind};
pub use metrics::{DURATION_BUCKETS, DurationHistogram, KeyStatus};
pub use pool::{Pool, TrySubmitError};
pub use prices::ModelPrice;
pub use request::{DEFAULT_PATH, Request, Response, Usage};
/// The JSON library keypool's API takes and returns: `keypool::serde_json::json!`,
/// [`Value`] for untyped bodies.
pub use serde_json::{self, Value};
pub use shared_config::{OnUnavailable, SharedConfig};
pub use stats::{FailureCounts, GroupStats, KeyStats, Stats, Totals};
pub use stream::{ResponseStream, StreamChunk, StreamEvent};
pub use ticket::{CancelHandle, RequestResult, Ticket};
pub use tls_config::TlsConfig;
pub use transport::{
    HttpRequest, HttpResponse, HttpStream, TlsTrust, Transport, TransportError, TransportSettings,
    UreqTransport,
};

/// The crate version, e.g. `"0.1.0"`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Engine internals for the C ABI crate (`keypool-capi`, `capi/`).
///
/// **Not part of the stable API**: hidden from the docs, may change in any release
/// without notice. Only `keypool-capi` (same version, same repository) may use it.
#[doc(hidden)]
pub mod __capi {
    /// Which threads belong to a pool (see `src/thread_role.rs`).
    pub mod thread_role {
        /// Whether the calling thread is one of a pool's threads (dispatcher or
        /// worker), where waiting for a pool would deadlock.
        pub fn on_pool_thread() -> bool {
            crate::thread_role::on_pool_thread()
        }
    }

    /// An `Error::Config` naming `field` (for the C ABI's status-mapping tests).
    pub fn config_error(field: impl Into<String>, message: impl Into<String>) -> crate::Error {
        crate::Error::config(field, message)
    }

    /// Every field of a [`crate::Response`], to build one outside the engine (for the C
    /// ABI's result-mapping tests).
    #[derive(Debug, Clone)]
    pub struct ResponseParts {
        /// HTTP status.
        pub status: u16,
        /// Kept response headers.
        pub headers: Vec<(String, String)>,
        /// Response body.
        pub body: Vec<u8>,
        /// Label of the key that answered.
        pub key_label: std::sync::Arc<str>,
        /// Index of the key that answered.
        pub key_index: usize,
        /// Attempts made.
        pub attempts: u32,
        /// Latency of the last attempt.
        pub latency: std::time::Duration,
        /// Keys tried, in order.
        pub keys_tried: Vec<usize>,
    }

    impl ResponseParts {
        /// The `Response` with these fields.
        pub fn build(self) -> crate::Response {
            crate::Response {
                status: self.status,
                headers: self.headers,
                body: self.body,
                key_label: self.key_label,
                key_index: self.key_index,
                attempts: self.attempts,
                latency: self.latency,
                keys_tried: self.keys_tried,
                ttft: None,
                blame: None,
                queue: std::time::Duration::ZERO,
                fallback: None,
            }
        }
    }
}

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// docs/rust.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/rust.md")]
pub struct DocsRustDoctests;

/// docs/cli.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/cli.md")]
pub struct DocsCliDoctests;

/// docs/configuration.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/configuration.md")]
pub struct DocsConfigurationDoctests;

/// docs/routing.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/routing.md")]
pub struct DocsRoutingDoctests;

/// docs/shared-limits.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/shared-limits.md")]
pub struct DocsSharedLimitsDoctests;

/// docs/faults.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/faults.md")]
pub struct DocsFaultsDoctests;

/// docs/https.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/https.md")]
pub struct DocsHttpsDoctests;

/// docs/c.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/c.md")]
pub struct DocsCDoctests;

/// docs/go.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/go.md")]
pub struct DocsGoDoctests;

/// docs/python.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/python.md")]
pub struct DocsPythonDoctests;

/// docs/metrics.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/metrics.md")]
pub struct DocsMetricsDoctests;

/// docs/benchmarks.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/benchmarks.md")]
pub struct DocsBenchmarksDoctests;

/// docs/cancellation.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/cancellation.md")]
pub struct DocsCancellationDoctests;

/// docs/cli-check.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/cli-check.md")]
pub struct DocsCliCheckDoctests;

/// docs/internals.md's Rust examples (if any), compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../docs/internals.md")]
pub struct DocsInternalsDoctests;
