//! The one error type every fallible keypool operation returns.

use std::fmt;
use std::time::Duration;

use crate::request::Response;

/// Which party an error was blamed on ([`crate::Error::blame`]); the CLI writes it in
/// every error record as `"blame"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Blame {
    /// The request itself: a bad body, a flagged prompt, a size no key's budget covers.
    Request,
    /// The model on the key that answered (rate-limited upstream, not found there).
    Model,
    /// The key: revoked, rejected, rate-limited.
    Key,
    /// The key's account: credits spent, a quota exhausted, an in-flight budget.
    Account,
    /// The server or the network: 5xx, timeouts, cut connections, bad bodies.
    Server,
}

impl Blame {
    /// The lowercase name used in records: `"request"`, `"model"`, `"key"`,
    /// `"account"`, `"server"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Blame::Request => "request",
            Blame::Model => "model",
            Blame::Key => "key",
            Blame::Account => "account",
            Blame::Server => "server",
        }
    }
}

impl std::fmt::Display for Blame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which phase of a request ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TimeoutPhase {
    /// Opening the TCP/TLS connection took longer than `connect_timeout_ms`.
    Connect,
    /// One HTTP attempt (send + response) took longer than `timeout_ms`.
    Attempt,
    /// The request's overall deadline (`deadline_ms`, across retries and queueing) passed.
    Deadline,
    /// `submit_timeout` could not enqueue the request in time.
    Submit,
    /// `Ticket::wait_timeout` returned before the result was ready; the ticket is still valid.
    Wait,
    /// `Pool::close_timeout` returned before every thread had finished.
    Shutdown,
    /// A streamed response sent nothing for longer than `stream_idle_timeout_ms`.
    StreamIdle,
}

impl TimeoutPhase {
    /// A short lowercase name, as used in messages and JSON (`"connect"`, `"attempt"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutPhase::Connect => "connect",
            TimeoutPhase::Attempt => "attempt",
            TimeoutPhase::Deadline => "deadline",
            TimeoutPhase::Submit => "submit",
            TimeoutPhase::Wait => "wait",
            TimeoutPhase::Shutdown => "shutdown",
            TimeoutPhase::StreamIdle => "stream_idle",
        }
    }
}

/// How a streamed response failed ([`Error::Stream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamFailure {
    /// The stream ended without `data: [DONE]` (the connection closed early).
    Incomplete,
    /// An event was not a JSON object, or a chunk was not shaped like one.
    Malformed,
    /// The server reported an error inside the stream (`{"error": …}`, `finish_reason:
    /// "error"` or `event: error`).
    ErrorEvent,
    /// No data arrived for `stream_idle_timeout_ms`.
    Idle,
    /// The attempt's timeout or the request's deadline passed mid-stream.
    Timeout,
    /// A line or an event exceeded `max_response_bytes`.
    TooLarge,
    /// Reading the stream failed (connection reset, …).
    Interrupted,
    /// The caller dropped the stream, stopped it from a callback, or did not read it.
    Abandoned,
}

impl StreamFailure {
    /// A short lowercase name (`"incomplete"`, `"malformed"`, `"error_event"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            StreamFailure::Incomplete => "incomplete",
            StreamFailure::Malformed => "malformed",
            StreamFailure::ErrorEvent => "error_event",
            StreamFailure::Idle => "idle",
            StreamFailure::Timeout => "timeout",
            StreamFailure::TooLarge => "too_large",
            StreamFailure::Interrupted => "interrupted",
            StreamFailure::Abandoned => "abandoned",
        }
    }
}

/// Everything that can go wrong in keypool.
///
/// No variant ever contains an API key: keys are identified by their label, and every
/// configured key (and base-URL password) is masked as `[REDACTED:<label>]` /
/// `[REDACTED]` in server-provided text — messages, the kept response's body and
/// headers — before it reaches an error.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was rejected; `field` names the offending field
    /// (for example `keys[1].max_concurrent`).
    Config {
        /// Path of the offending field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A request could not be built (bad JSON body, bad path, bad header).
    InvalidRequest(String),
    /// The server answered with a non-success HTTP status (or, for HTTP 200, with an
    /// `{"error": …}` body). The full response — status, headers, body, key label,
    /// attempts — is kept.
    Http {
        /// HTTP status (the embedded error code when it is numeric and the status was 200).
        status: u16,
        /// Human-readable message extracted from the body, if any.
        message: String,
        /// The response as received on the last attempt.
        response: Box<Response>,
    },
    /// The server answered 2xx with a body that is not a success: not valid JSON (a
    /// truncated body, an HTML page from a proxy), JSON no reader holds as a value
    /// (nested deeper than 100 levels, a `\u` escape naming a lone surrogate, a number
    /// beyond `f64`), or, for a chat completion, no `choices` array. Retried like a 5xx (another key, after backoff); this is the
    /// last attempt's. [`Error::code`] is `"invalid_response"`.
    InvalidResponse {
        /// What is wrong, and the start of the body as text.
        message: String,
        /// The response as received on the last attempt (body kept, secrets masked).
        response: Box<Response>,
    },
    /// The request never got an HTTP response: connection refused or reset, DNS, TLS,
    /// a response that was cut short or exceeded the body size limit.
    Transport {
        /// Label of the key whose attempt failed (empty when no key was involved).
        key: String,
        /// What happened.
        message: String,
        /// Attempts made in total.
        attempts: u32,
    },
    /// A phase of the request ran out of time.
    Timeout {
        /// The phase that timed out.
        phase: TimeoutPhase,
        /// Label of the key involved, if any.
        key: Option<String>,
        /// Attempts made before giving up.
        attempts: u32,
    },
    /// `try_submit` found the queue full (or `submit_timeout` timed out enqueueing).
    Busy,
    /// The pool is closed (or closing) and takes no more requests.
    Closed,
    /// The request was cancelled by its caller ([`Ticket::cancel`](crate::Ticket::cancel),
    /// a dropped [`ResponseStream`](crate::ResponseStream), a cancel flag), or was
    /// queued when the pool shut down and was never sent.
    Cancelled,
    /// Every key is disabled (revoked, out of credit) so nothing can be sent.
    NoUsableKey {
        /// Why each key is unusable, e.g. `"acct-a: disabled (HTTP 401)"`.
        detail: String,
        /// Attempts the request made before every key was disabled (0 when none).
        attempts: u32,
        /// Label of the key that answered its last attempt, if it made one.
        key: Option<String>,
    },
    /// No key serves the request's model (`keys[].models`): refused at submit, before
    /// any round trip.
    ModelNotServed {
        /// The request's `"model"` (`None`: the body has none).
        model: Option<String>,
    },
    /// A worker panicked while handling the request; the worker survived.
    Panic(String),
    /// The ticket's result was already taken.
    ResultTaken,
    /// A response body did not fit the type asked of [`Response::json`]; the cause is
    /// [`source`](std::error::Error::source).
    Json(serde_json::Error),
    /// The pool could not start one of its threads (the system's thread limit, or not
    /// enough memory for its stack). Threads already started were stopped.
    Spawn {
        /// Name of the thread that could not start (`keypool-<label>-<n>`).
        thread: String,
        /// The system's error.
        message: String,
    },
    /// A call that waits for a pool (a blocking submit on a full queue, `batch`,
    /// `Ticket::wait`, waiting for shutdown) was made on a keypool thread, that is from
    /// inside a completion callback, where waiting can deadlock the pool. It returned at
    /// once: nothing was queued and no result was taken. Use the non-blocking form
    /// (`try_submit`, `Ticket::try_wait`) or hand the work to another thread. Holds what
    /// would have waited, e.g. `"submit on a full queue"`.
    WouldDeadlock(&'static str),
    /// A streamed response ([`Pool::submit_stream`](crate::Pool::submit_stream)) failed
    /// after its headers: cut short, malformed, an error event, idle. While nothing had
    /// reached the caller it was retried like any failure and this is the last attempt's;
    /// once the caller had chunks it is never retried (that would repeat text), and
    /// `chunks_delivered`/`text_bytes_delivered` say how much the caller has.
    /// [`Error::code`] is `"stream"`.
    Stream {
        /// What went wrong.
        kind: StreamFailure,
        /// Details (server text masked).
        message: String,
        /// Label of the key whose stream failed.
        key: String,
        /// The error code an error event carried, if any.
        status: Option<u16>,
        /// Attempts made in total.
        attempts: u32,
        /// Chunks already handed to the caller.
        chunks_delivered: u64,
        /// Bytes of text delta already handed to the caller.
        text_bytes_delivered: u64,
    },
    /// The limits shared with other processes (`Config::shared`) could not be reached
    /// (Redis down, slow or refusing) and `shared.on_unavailable` is `fail`, so the
    /// request was not sent. [`Error::code`] is `"shared_unavailable"`.
    SharedUnavailable {
        /// What failed (the Redis URL's password masked).
        message: String,
    },
    /// The server refused the request's content: a moderation flag or a guardrail
    /// block (OpenRouter's 403 with `metadata.reasons`/`flagged_input`, or a body naming
    /// moderation or flagging). The request is at fault: it was not retried on another
    /// key and no key was taken out of rotation. [`Error::code`] is `"flagged"`; the
    /// response (status, body with the reasons) is kept.
    Flagged {
        /// The server's message (secrets masked).
        message: String,
        /// The response as received.
        response: Box<Response>,
    },
    /// The pool's spend cap (`max_cost`) is reached: the request was not sent (refused
    /// at submit, or answered while it waited — queued, set aside or waiting to retry).
    /// Requests already in flight when the cap was reached finished. [`Error::code`] is
    /// `"budget_exhausted"`.
    BudgetExhausted {
        /// Dollars spent (reported `usage.cost`, else estimated from `prices`); with
        /// shared limits, by every process sharing the namespace.
        spent: f64,
        /// The cap, `max_cost`.
        max_cost: f64,
    },
}

impl Error {
    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The HTTP status behind this error, if it came from an HTTP response.
    pub fn http_status(&self) -> Option<u16> {
        self.response().map(Response::status)
    }

    /// The response behind this error, if it came from an HTTP response
    /// ([`Error::Http`] or [`Error::InvalidResponse`]).
    pub fn response(&self) -> Option<&Response> {
        match self {
            Error::Http { response, .. }
            | Error::InvalidResponse { response, .. }
            | Error::Flagged { response, .. } => Some(response),
            _ => None,
        }
    }

    /// Whom the failure was blamed on: the request (a bad or flagged request, one no
    /// key's budget covers), the model on a key, the key, its account, or the server
    /// (5xx, timeouts, transport). `None` for errors of the API itself (`Busy`,
    /// `Closed`, a config error, …). See docs/faults.md, "Whose fault is it".
    pub fn blame(&self) -> Option<crate::Blame> {
        use crate::Blame;
        match self {
            Error::Http { response, .. }
            | Error::InvalidResponse { response, .. }
            | Error::Flagged { response, .. } => response.blame.or(Some(Blame::Server)),
            Error::Transport { .. } | Error::Timeout { .. } | Error::Stream { .. } => {
                Some(Blame::Server)
            }
            Error::InvalidRequest(_) | Error::ModelNotServed { .. } => Some(Blame::Request),
            Error::NoUsableKey { .. } => Some(Blame::Key),
            _ => None,
        }
    }

    /// Time the request waited before its first attempt (submit to first send), when
    /// the error carries the response of an attempt; `None` otherwise.
    pub fn queue_time(&self) -> Option<Duration> {
        self.response().map(Response::queue_time)
    }

    /// Number of HTTP attempts made before this error (0 when none was made).
    pub fn attempts(&self) -> u32 {
        match self {
            Error::Http { response, .. }
            | Error::InvalidResponse { response, .. }
            | Error::Flagged { response, .. } => response.attempts(),
            Error::Transport { attempts, .. }
            | Error::Timeout { attempts, .. }
            | Error::NoUsableKey { attempts, .. }
            | Error::Stream { attempts, .. } => *attempts,
            _ => 0,
        }
    }

    /// A short stable code naming the variant (`"http"`, `"timeout"`, …), as used by the
    /// CLI's output records.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Config { .. } => "config",
            Error::InvalidRequest(_) => "invalid_request",
            Error::Http { .. } => "http",
            Error::InvalidResponse { .. } => "invalid_response",
            Error::Transport { .. } => "transport",
            Error::Timeout { .. } => "timeout",
            Error::Busy => "busy",
            Error::Closed => "closed",
            Error::Cancelled => "cancelled",
            Error::NoUsableKey { .. } => "no_usable_key",
            Error::ModelNotServed { .. } => "model_not_served",
            Error::Panic(_) => "panic",
            Error::ResultTaken => "result_taken",
            Error::Json(_) => "json",
            Error::Spawn { .. } => "spawn",
            Error::WouldDeadlock(_) => "would_deadlock",
            Error::Stream { .. } => "stream",
            Error::SharedUnavailable { .. } => "shared_unavailable",
            Error::Flagged { .. } => "flagged",
            Error::BudgetExhausted { .. } => "budget_exhausted",
        }
    }

    /// The server's `Retry-After` hint, if the error carried one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.response().and_then(|r| r.retry_after())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config { field, message } => write!(f, "invalid config: {field}: {message}"),
            Error::InvalidRequest(m) => write!(f, "invalid request: {m}"),
            Error::Http {
                status,
                message,
                response,
            } => {
                write!(f, "HTTP {status} from key {}", response.key_label())?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                write!(f, " (after {} attempt(s))", response.attempts())
            }
            Error::InvalidResponse { message, response } => write!(
                f,
                "invalid response (HTTP {}) from key {}: {message} (after {} attempt(s))",
                response.status(),
                response.key_label(),
                response.attempts()
            ),
            Error::Transport {
                key,
                message,
                attempts,
            } => {
                write!(
                    f,
                    "transport error on key {key}: {message} (after {attempts} attempt(s))"
                )
            }
            Error::Timeout {
                phase,
                key,
                attempts,
            } => {
                write!(f, "timed out in phase {}", phase.as_str())?;
                if let Some(k) = key {
                    write!(f, " on key {k}")?;
                }
                if *attempts > 0 {
                    write!(f, " (after {attempts} attempt(s))")?;
                }
                Ok(())
            }
            Error::Busy => f.write_str("pool is busy: the queue is full"),
            Error::Closed => f.write_str("pool is closed"),
            Error::Cancelled => f.write_str(
                "request cancelled (by its caller, or the pool shut down before it was sent)",
            ),
            Error::NoUsableKey { detail, .. } => write!(f, "no usable key: {detail}"),
            Error::ModelNotServed { model: Some(m) } => {
                write!(f, "no key serves model {m:?}")
            }
            Error::ModelNotServed { model: None } => {
                f.write_str("no key serves a request without a \"model\"")
            }
            Error::Panic(m) => write!(f, "a worker panicked while handling the request: {m}"),
            Error::ResultTaken => f.write_str("the ticket's result was already taken"),
            Error::Json(e) => write!(f, "the response body does not fit the requested type: {e}"),
            Error::Spawn { thread, message } => {
                write!(f, "could not start thread {thread}: {message}")
            }
            Error::WouldDeadlock(call) => write!(
                f,
                "{call} from a keypool thread (inside a completion callback) would wait for the pool and can deadlock it; use the non-blocking form or another thread"
            ),
            Error::Stream {
                kind,
                message,
                key,
                attempts,
                chunks_delivered,
                text_bytes_delivered,
                ..
            } => write!(
                f,
                "stream from key {key} failed ({}): {message}; {chunks_delivered} chunk(s) with {text_bytes_delivered} byte(s) of text were delivered before the failure (after {attempts} attempt(s))",
                kind.as_str()
            ),
            Error::SharedUnavailable { message } => {
                write!(f, "shared limits unavailable: {message}")
            }
            Error::Flagged { message, response } => {
                write!(
                    f,
                    "request flagged by the server (HTTP {}) on key {}",
                    response.status(),
                    response.key_label()
                )?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                f.write_str(" (the request's content; no key was blamed)")
            }
            Error::BudgetExhausted { spent, max_cost } => write!(
                f,
                "budget exhausted: ${spent:.4} spent of max_cost ${max_cost}; the request was not sent"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Json(e) => Some(e),
            _ => None,
        }
    }
}
