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
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(unsafe_code)]

mod admission;
mod batch;
mod body;
mod config;
mod deadline;
mod dispatch;
mod error;
// The C ABI: the only module allowed `unsafe` (raw pointers from C).
#[allow(unsafe_code)]
mod ffi;
mod job;
mod key;
mod pool;
mod request;
mod retry;
mod shared;
mod stats;
mod thread_role;
mod ticket;
mod transport;
mod worker;

/// Entry points for the `fuzz/` targets. Not part of the stable API: hidden, exempt
/// from semver, may change in any release.
#[doc(hidden)]
#[path = "fuzz_api.rs"]
pub mod __fuzz;

pub use batch::ResultStream;
pub use config::{
    ApiKey, Config, ConfigBuilder, KeyConfig, MAX_CONCURRENT_LIMIT, MAX_KEYS, RetryConfig, Strategy,
};
pub use error::{Error, TimeoutPhase};
pub use pool::Pool;
pub use request::{DEFAULT_PATH, Request, Response, Usage};
pub use stats::{FailureCounts, KeyStats, Stats};
pub use ticket::{RequestResult, Ticket};
pub use transport::{
    HttpRequest, HttpResponse, Transport, TransportError, TransportSettings, UreqTransport,
};

/// The crate version, e.g. `"0.1.0"`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
