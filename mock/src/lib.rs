//! # keypool-mock
//!
//! A loopback, OpenAI-compatible mock server for testing `keypool` and programs built on
//! it. It answers chat completions, legacy completions and embeddings, counts requests
//! **per API key** (the bearer token) — including the exact current and maximum number
//! of requests in flight — and injects faults on demand:
//!
//! - globally and at random, by rates in [`MockConfig`] (changeable at runtime with
//!   [`MockServer::set_config`]);
//! - per key, with a [`KeyRule`] (e.g. "this key always answers 401", or "the first 3
//!   requests of this key get 429");
//! - per request, deterministically, with a `"mock"` object in the request JSON:
//!
//! ```json
//! {"model": "m", "messages": [{"role": "user", "content": "hi"}],
//!  "mock": {"status": 429, "retry_after_ms": 100, "delay_ms": 50}}
//! ```
//!
//! Directive fields (all optional): `status` (u16: answer this status with an error
//! JSON body), `retry_after_ms` (u64: sets `retry-after-ms` and `retry-after` =
//! ceil(ms/1000) s), `retry_after` (string: the raw `retry-after` header value, e.g. an
//! HTTP date), `should_retry` (bool: sets `x-should-retry`), `delay_ms` (u64: extra delay
//! before answering), `drop` (bool: close the connection without a response),
//! `malformed` (bool: 200 with a body that is not valid JSON), `error_in_200` (bool: 200
//! with `{"error":{"code":502,"message":"upstream error"}}`), `error_code` (u16: the code
//! inside `error_in_200`, default 502), `slow_body` (bool: send the headers, then the body
//! in chunks with delays) and `chunk_delay_ms` (u64: the delay between those chunks,
//! default 50), `ratelimit` (object: sends OpenAI rate-limit headers
//! `x-ratelimit-{remaining,reset}-{requests,tokens}` from its fields
//! `remaining_requests`, `reset_requests`, `remaining_tokens`, `reset_tokens`, each a
//! number or a string sent as is).
//!
//! **Streaming.** A chat or legacy completion with `"stream": true` is answered with
//! server-sent events shaped like OpenAI's (`chat.completion.chunk`s: a role chunk, the
//! reply in content chunks, a finish chunk, a usage chunk when
//! `stream_options.include_usage` is true, then `data: [DONE]`). Stream directives:
//! `stream_chunks` (u64: content chunks, default 4), `chunk_delay_ms` (u64: delay before
//! each event after the first, default 0), `first_chunk_delay_ms` (u64: delay before
//! the first content chunk), `comments` (u64: `: OPENROUTER PROCESSING` comment lines
//! first), `crlf` (bool: CRLF line endings), `multiline_data` (bool: each JSON split
//! over two `data:` lines), `event_fields` (bool: `event: chunk` and `id: <n>` lines),
//! and faults: `stream_fault` — `"truncate"` (end without `[DONE]`), `"malformed"` (an
//! event that is not JSON), `"error_event"` (OpenRouter's mid-stream `{"error": {"code":
//! error_code, …}}` with `finish_reason: "error"`), `"stall"` (stop sending, keep the
//! connection open), `"abort"` (reset the connection), `"huge_line"` (a `data:` line of
//! `huge_line_bytes`, default 1 MiB, without end) — after `fault_after` content chunks
//! (default 0: before any event), and only for the keys listed in `fault_keys` (an
//! array of bearer tokens; default all keys), so a retry on another key succeeds.
//! A stream is in flight until its last event is handed to the connection.
//!
//! Error statuses answer `{"error":{"message":"mock <status>","type":"mock_error","code":<status>}}`.
//! Requests without a bearer token get 401 (recorded under the key `""`), unknown paths
//! 404, other methods than POST 405, and a body that is not JSON 400.
//!
//! Routes: `POST {,/v1,/api/v1}/chat/completions`, `…/completions` and `…/embeddings`;
//! `GET {,/v1,/api/v1}/key` answers OpenRouter's key info (`{"data": {"label", "limit",
//! "limit_remaining", "usage", "is_free_tier", "limit_reset"}}`) from the key's
//! [`MockCredit`] (not counted as a request); `GET {,/v1,/api/v1}/models` lists the
//! models of [`MockServer::set_models`] in OpenAI's shape (not counted either; 404 when
//! set to `None`). A key whose [`KeyRule`] answers 401 or 403 to every request (no
//! `fail_first`, no `model`) is refused on both routes too, as a revoked key is, and so
//! is a request without a key — unless [`MockConfig::public_info`] makes both public.
//! [`MockConfig::info_latency_ms`] stalls them.
//! A key with a cap and nothing left gets
//! 402 for every request; with [`MockConfig::cost_per_request`] each success reports
//! `usage.cost` (a stream in its usage chunk) and is debited.
//!
//! **Request budgets.** With [`MockConfig::request_budget`] (or one key's, from
//! [`MockServer::set_request_budget`]) each key may make `limit` requests per fixed window;
//! every answer says so in OpenAI's `x-ratelimit-{limit,remaining,reset}-requests`
//! headers, and a request beyond the limit gets 429.
//!
//! The `keypool-mock` binary ([`run_cli`], options in [`USAGE`]) prints its base URL as
//! one line on stdout and serves until stdin reaches end-of-file, for tests in other
//! languages:
//!
//! ```text
//! $ keypool-mock --latency-ms 20 --fail-429-rate 0.1 --retry-after-ms 100-500
//! http://127.0.0.1:41234/v1
//! ```
//!
//! **TLS.** [`MockServer::start_tls`] serves `https://` with a certificate signed by a
//! CA generated for it ([`MockTls`]; trust [`MockServer::ca_pem`]);
//! [`MockServer::start_with`] takes any [`MockTls`] (PEM files, a required client
//! certificate). The binary's `--tls` writes the CA to a file and prints its path on
//! stderr. [`MockStats::connections`] counts connections accepted,
//! [`RequestRecord::connection`] says which one a request came on.
//!
//! The server runs its own tokio runtime on background threads, so it is used from
//! plain blocking code:
//!
//! ```
//! use keypool_mock::{MockConfig, MockServer};
//! let server = MockServer::start(MockConfig::default()).unwrap();
//! assert!(server.url().starts_with("http://127.0.0.1:"));
//! assert_eq!(server.stats().total_requests, 0);
//! server.shutdown();
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod body;
mod cli;
mod handler;
mod server;
mod stats;
mod timer;
mod tls;

use std::collections::BTreeMap;
use std::time::Duration;

pub use cli::{USAGE, parse_args, run_cli};
pub use server::MockServer;
pub use tls::MockTls;

/// Global behaviour of the mock server: latency and random fault rates.
///
/// Rates are fractions in `0.0..=1.0`. For each request one uniform draw picks at most
/// one of drop, 429, 500, 502, 503, malformed and error-in-200, in that order of
/// precedence (so when rates add up to more than 1, earlier faults win); `slow_rate` and
/// `slow_body_rate` are drawn independently and combine with any outcome.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Fixed latency before answering, in milliseconds. Defaults to 0.
    pub latency_ms: u64,
    /// Extra uniform random latency in `0..=jitter_ms` milliseconds. Defaults to 0.
    pub jitter_ms: u64,
    /// Fraction of requests answered 429. Defaults to 0.
    pub fail_429_rate: f64,
    /// Inclusive range for the `retry-after-ms` header of 429 answers; `retry-after` is
    /// set to ceil(ms/1000) seconds. With the default `(0, 0)` 429 answers carry no
    /// retry headers (unless a [`KeyRule`] or a request directive sets them).
    pub retry_after_ms: (u64, u64),
    /// Fraction of requests answered 500. Defaults to 0.
    pub fail_500_rate: f64,
    /// Fraction of requests answered 502. Defaults to 0.
    pub fail_502_rate: f64,
    /// Fraction of requests answered 503. Defaults to 0.
    pub fail_503_rate: f64,
    /// Fraction of requests whose connection is closed without any response. Defaults to 0.
    pub drop_rate: f64,
    /// Fraction of requests answered after an extra `slow_ms` delay. Defaults to 0.
    pub slow_rate: f64,
    /// The extra delay of slow requests, in milliseconds; also four times the delay
    /// between body chunks of slow-body answers (50 ms per chunk when 0). Defaults to 0.
    pub slow_ms: u64,
    /// Fraction of answers whose headers are sent first and whose body follows in
    /// chunks with delays. Defaults to 0.
    pub slow_body_rate: f64,
    /// Fraction of requests answered 200 with a body that is not valid JSON. Defaults to 0.
    pub malformed_rate: f64,
    /// Fraction of requests answered 200 with
    /// `{"error":{"code":502,"message":"upstream error"}}`. Defaults to 0.
    pub error_in_200_rate: f64,
    /// Seed of the fault random generator, for reproducible runs. Defaults to `None`
    /// (random seed). Only used by [`MockServer::start`]/[`MockServer::start_on`] and
    /// when [`MockServer::set_config`] is given `Some`.
    pub seed: Option<u64>,
    /// Number of tokio worker threads. Defaults to 2. Only used at start.
    pub threads: usize,
    /// A capacity per key hidden from the client: a request arriving while its key
    /// already has this many in flight is answered 429 at once (no retry headers).
    /// Defaults to `None` (no limit).
    pub key_capacity: Option<usize>,
    /// Dollars each successful completion or embedding costs: when above 0 the answer
    /// carries `usage.cost` (a stream: in its usage chunk, sent when
    /// `stream_options.include_usage` is true and the stream has no fault) and the
    /// amount is debited from the key's balance ([`MockServer::set_credit`]). Defaults
    /// to 0.
    pub cost_per_request: f64,
    /// A real per-key request budget, `(limit, window_ms)`: each key may make `limit`
    /// requests per fixed window of `window_ms` (windows counted from server start, the
    /// clock of [`RequestRecord::arrived`]). Every answer carries OpenAI's
    /// `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests` (after this
    /// request) and `x-ratelimit-reset-requests` (the time left in the window, as
    /// `<n>ms`, rounded up); a request beyond the limit is answered 429 (with those
    /// headers, no retry headers) and does not count. Defaults to `None` (no budget;
    /// a `window_ms` of 0 is none too).
    pub request_budget: Option<(u64, u64)>,
    /// `GET …/key` and `GET …/models` answer without a key too, as a server whose
    /// listing is public does (OpenRouter's `/models`, Ollama). By default both refuse a
    /// request without a key with 401, as OpenRouter's `/key` and OpenAI's `/models` do.
    pub public_info: bool,
    /// Delay before answering `GET …/key` and `GET …/models`, in milliseconds (a server
    /// that stalls them). Defaults to 0.
    pub info_latency_ms: u64,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            latency_ms: 0,
            jitter_ms: 0,
            fail_429_rate: 0.0,
            retry_after_ms: (0, 0),
            fail_500_rate: 0.0,
            fail_502_rate: 0.0,
            fail_503_rate: 0.0,
            drop_rate: 0.0,
            slow_rate: 0.0,
            slow_ms: 0,
            slow_body_rate: 0.0,
            malformed_rate: 0.0,
            error_in_200_rate: 0.0,
            seed: None,
            threads: 2,
            key_capacity: None,
            cost_per_request: 0.0,
            request_budget: None,
            public_info: false,
            info_latency_ms: 0,
        }
    }
}

/// A per-key override, set with [`MockServer::set_key_rule`]. The default overrides
/// nothing.
///
/// An active rule wins over request directives and random faults.
#[derive(Debug, Clone, Default)]
pub struct KeyRule {
    /// Answer this status (with an error JSON body) — always when `fail_first` is 0,
    /// otherwise only for the first `fail_first` requests after the rule is set.
    pub always_status: Option<u16>,
    /// `retry-after-ms` (and `retry-after` = ceil(ms/1000) s) sent with `always_status`.
    pub retry_after_ms: Option<u64>,
    /// When non-zero, only the first `fail_first` requests of this key (counted from
    /// when the rule is set) get `always_status`; later ones are answered normally.
    pub fail_first: u32,
    /// Latency for this key's requests, replacing [`MockConfig::latency_ms`].
    pub latency_ms: Option<u64>,
    /// The body sent with `always_status`, verbatim (`None`: the mock's own error JSON).
    /// Lets a test answer exactly as a real service documents (OpenRouter's moderation
    /// 403, OpenAI's `insufficient_quota` 429, …).
    pub body: Option<String>,
    /// Extra headers sent with `always_status` (name, value), e.g. OpenRouter's
    /// `X-RateLimit-Reset`.
    pub headers: Vec<(String, String)>,
    /// When set, `always_status` applies only to requests whose `"model"` is this one;
    /// the key answers every other model normally.
    pub model: Option<String>,
    /// When set, `always_status` applies only to requests arriving within this many
    /// milliseconds of the rule being set (and within `fail_first`, if that is set too).
    pub fail_for_ms: Option<u64>,
}

/// One key's credit at the mock: the balance `GET {base}/key` reports (OpenRouter's
/// shape), from [`MockServer::credit`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MockCredit {
    /// The key's cap in dollars (`None`: no cap, `limit: null`).
    pub limit: Option<f64>,
    /// Dollars debited so far (the sum of the `usage.cost` sent for this key).
    pub spent: f64,
    /// `GET …/key` requests answered for this key (not counted in [`KeyRecord`]).
    pub checks: u64,
    /// `GET …/models` requests answered 200 for this key (not counted in [`KeyRecord`]).
    pub listings: u64,
    /// When set, `GET …/key` answers exactly this body (status 200), for hostile-input
    /// tests.
    pub key_body: Option<String>,
}

impl MockCredit {
    /// Dollars left (`limit - spent`, at least 0), or `None` without a cap.
    pub fn remaining(&self) -> Option<f64> {
        self.limit.map(|l| (l - self.spent).max(0.0))
    }
}

/// A snapshot of the server's accounting, from [`MockServer::stats`].
#[derive(Debug, Clone, Default)]
pub struct MockStats {
    /// Requests received (all keys, all outcomes) since start or the last reset.
    pub total_requests: u64,
    /// The most requests ever in flight at once, over all keys.
    pub max_in_flight_total: usize,
    /// Requests in flight now, over all keys.
    pub in_flight_total: usize,
    /// Connections accepted since start or the last reset (TLS ones counted before
    /// their handshake).
    pub connections: u64,
    /// TLS handshakes that failed since start or the last reset (an untrusted
    /// certificate, a missing client certificate, a plain-HTTP client, …).
    pub tls_failures: u64,
    /// Per-key records, by bearer token (`""` for requests without a key).
    pub keys: BTreeMap<String, KeyRecord>,
}

/// Accounting for one key (bearer token).
///
/// A request is in flight from when its headers are parsed until its response body has
/// been handed to the connection completely (or its connection was dropped).
#[derive(Debug, Clone, Default)]
pub struct KeyRecord {
    /// Requests received.
    pub requests: u64,
    /// Requests in flight now.
    pub in_flight: usize,
    /// The most requests of this key ever in flight at once.
    pub max_in_flight: usize,
    /// When the first request arrived, since server start.
    pub first_request: Option<Duration>,
    /// When the latest request arrived, since server start.
    pub last_request: Option<Duration>,
    /// Counts of statuses returned by finished requests (`0` = connection dropped).
    pub statuses: BTreeMap<u16, u64>,
    /// Every finished request, in arrival order.
    pub log: Vec<RequestRecord>,
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// When its headers were parsed, since server start.
    pub arrived: Duration,
    /// When its response was completely handed to the connection (or dropped), since
    /// server start.
    pub finished: Duration,
    /// The status returned (`0` = connection dropped without a response).
    pub status: u16,
    /// The `retry-after-ms` value sent, if any.
    pub retry_after_ms: Option<u64>,
    /// The request body's `"model"`, if it had a string one.
    pub model: Option<String>,
    /// The number of the connection it came on (connections are numbered from 1 in
    /// the order they were accepted).
    pub connection: u64,
}

impl KeyRecord {
    /// How many distinct connections this key's finished requests came on.
    pub fn connections(&self) -> usize {
        let mut c: Vec<u64> = self.log.iter().map(|r| r.connection).collect();
        c.sort_unstable();
        c.dedup();
        c.len()
    }
}
