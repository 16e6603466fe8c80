//! The public vocabulary: what a user builds, sends, receives and reads — the
//! configuration ([`config`]: `Config`, its builder and validation; its sections
//! [`tls_config`], [`credits_config`], [`shared_config`]), [`error`] (`Error`, `Blame`),
//! [`request`] (`Request`, `Response`, `Usage`), [`retry_after`] (a server's retry hint,
//! the cap on every wait), [`chat`] (`ChatRequest`), [`stats`] (the snapshot types and
//! the latency histogram), and the reading of server answers those values expose:
//! [`body`] (is a 2xx a success, lenient `usage`, error messages, masking secrets) over
//! [`json_scan`] (the one-pass JSON validator).
//!
//! The bottom layer: plain values and pure functions, no threads, no I/O.
//!
//! May use: nothing.

pub(crate) mod body;
pub(crate) mod chat;
pub(crate) mod config;
pub(crate) mod credits_config;
pub(crate) mod error;
pub(crate) mod json_scan;
pub(crate) mod metrics;
pub(crate) mod prices;
pub(crate) mod request;
pub(crate) mod retry_after;
pub(crate) mod shared_config;
pub(crate) mod stats;
pub(crate) mod tls_config;
