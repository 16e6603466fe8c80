//! What a failed answer means: [`blame`] (whose fault an answer is — the request's, the
//! model's on a key, the key's, the account's, the server's — from its status, body and
//! headers) and [`retry`] (what that fault means for the request and the key: retry or
//! not, cooldown, backoff).
//!
//! Pure judgement over an answer already read: no state, no threads, no I/O.
//!
//! May use: `api`, `limits`.

pub(crate) mod blame;
pub(crate) mod retry;
