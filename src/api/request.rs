//! What goes in ([`Request`]) and what comes out ([`Response`]).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::Serialize;

use crate::error::Error;

/// Path used when none is given: OpenAI-style chat completions.
pub const DEFAULT_PATH: &str = "/chat/completions";

/// One API call: a JSON body POSTed to a path under the key's base URL.
///
/// Cheap to clone: the body is shared.
#[derive(Clone)]
pub struct Request {
    pub(crate) path: Arc<str>,
    pub(crate) body: Arc<[u8]>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) deadline: Option<Duration>,
    /// Set by the caller to give the request up while it is not sent yet
    /// ([`Request::with_cancel`]).
    pub(crate) cancel: Option<Arc<AtomicBool>>,
    /// Keeps requests that share it on one key ([`Request::with_affinity`]).
    pub(crate) affinity: Option<Arc<str>>,
    /// Models to try, in order, when its own cannot be served
    /// ([`Request::with_fallback_models`]).
    pub(crate) fallbacks: Option<Arc<[Arc<str>]>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("path", &self.path)
            .field("body_len", &self.body.len())
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("deadline", &self.deadline)
            .field("cancelled", &self.is_cancelled())
            .field("affinity", &self.affinity.is_some())
            .finish()
    }
}

impl Request {
    /// A request with `body` POSTed to [`DEFAULT_PATH`].
    pub fn new(body: &serde_json::Value) -> Request {
        with_scratch(|out| {
            serde_json::to_writer(&mut *out, body)
                .expect("serializing a serde_json::Value cannot fail");
            Request::raw(DEFAULT_PATH, out)
        })
    }

    /// A chat completion request for `model` with `(role, content)` messages (any
    /// string types). For parameters (`temperature`, `max_tokens`, …) use
    /// [`ChatRequest`](crate::ChatRequest).
    ///
    /// ```
    /// let n = 3;
    /// let r = keypool::Request::chat("gpt-4o-mini", [("user", format!("Count to {n}"))]);
    /// assert_eq!(r.path(), "/chat/completions");
    /// ```
    pub fn chat<R, C>(model: &str, messages: impl IntoIterator<Item = (R, C)>) -> Request
    where
        R: Into<String>,
        C: Into<String>,
    {
        // Written straight to bytes (no `serde_json::Value` built, then serialised):
        // `{"model":…,"messages":[{"role":…,"content":…},…]}`.
        with_scratch(|out| {
            out.extend_from_slice(b"{\"model\":");
            write_json_str(out, model);
            out.extend_from_slice(b",\"messages\":[");
            for (i, (role, content)) in messages.into_iter().enumerate() {
                write_message(out, i, &role.into(), &content.into());
            }
            out.extend_from_slice(b"]}");
            Request::raw(DEFAULT_PATH, out)
        })
    }

    /// A request whose body is any serializable value, POSTed to [`DEFAULT_PATH`]
    /// (use [`with_path`](Request::with_path) for another endpoint).
    ///
    /// ```
    /// #[derive(serde::Serialize)]
    /// struct Embed<'a> { model: &'a str, input: &'a str }
    /// let r = keypool::Request::json(&Embed { model: "m", input: "hi" })?
    ///     .with_path("/embeddings")?;
    /// assert_eq!(r.path(), "/embeddings");
    /// # Ok::<(), keypool::Error>(())
    /// ```
    pub fn json(body: &impl Serialize) -> Result<Request, Error> {
        with_scratch(|out| {
            serde_json::to_writer(&mut *out, body)
                .map_err(|e| Error::InvalidRequest(format!("body cannot be serialized: {e}")))?;
            Ok(Request::raw(DEFAULT_PATH, out))
        })
    }

    /// A request from JSON text, validated here so a malformed body fails at submit
    /// time, not after a round trip.
    pub fn from_json(path: &str, body: &str) -> Result<Request, Error> {
        crate::json_scan::validate(body.as_bytes())
            .map_err(|e| Error::InvalidRequest(format!("body is not valid JSON: {e}")))?;
        let req = Request::raw(DEFAULT_PATH, body.as_bytes());
        if path == DEFAULT_PATH {
            Ok(req) // keeps the shared default path: no allocation
        } else {
            req.with_path(path)
        }
    }

    /// A request POSTing a copy of `body` to `path` (one allocation for the body).
    pub(crate) fn raw(path: &str, body: &[u8]) -> Request {
        Request {
            path: if path == DEFAULT_PATH {
                // Shared by every request to the default endpoint: no allocation.
                default_path()
            } else {
                Arc::from(path)
            },
            body: Arc::from(body),
            headers: Vec::new(),
            deadline: None,
            cancel: None,
            affinity: None,
            fallbacks: None,
        }
    }

    /// Sends to `path` (e.g. `/embeddings`) instead of `/chat/completions`. The path must
    /// start with `/` and contain no spaces or control characters.
    pub fn with_path(mut self, path: &str) -> Result<Request, Error> {
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(Error::InvalidRequest(format!(
                "path must start with '/' and contain no spaces or control characters: {path:?}"
            )));
        }
        self.path = Arc::from(path);
        Ok(self)
    }

    /// Adds a header to this request only.
    pub fn with_header(mut self, name: &str, value: &str) -> Result<Request, Error> {
        if ureq::http::HeaderName::from_bytes(name.as_bytes()).is_err()
            || ureq::http::HeaderValue::from_str(value).is_err()
        {
            return Err(Error::InvalidRequest(format!("invalid header {name:?}")));
        }
        if name.eq_ignore_ascii_case("authorization") {
            return Err(Error::InvalidRequest(
                "the Authorization header is set by the pool".into(),
            ));
        }
        self.headers.push((name.to_owned(), value.to_owned()));
        Ok(self)
    }

    /// Overall deadline for this request (queueing + all attempts), overriding the
    /// pool's `deadline_ms`.
    pub fn with_deadline(mut self, deadline: Duration) -> Request {
        self.deadline = Some(deadline);
        self
    }

    /// Gives the request a cancel flag: once `flag` is set, the request is answered
    /// [`Error::Cancelled`] instead of being sent — from the queue, or before a retry.
    /// An attempt already on the wire runs to its end: to cut that short too, use
    /// [`Ticket::cancel`](crate::Ticket::cancel) (or drop a
    /// [`ResponseStream`](crate::ResponseStream)). (The Python bindings set it on
    /// Ctrl-C; several requests may share one flag.)
    ///
    /// ```
    /// # use std::sync::{Arc, atomic::{AtomicBool, Ordering}};
    /// # let server = keypool_mock::MockServer::start(keypool_mock::MockConfig::default()).unwrap();
    /// # let pool = keypool::Pool::new(keypool::Config::builder().base_url(server.url()).key("sk-a", 1).build()?)?;
    /// let flag = Arc::new(AtomicBool::new(true)); // cancelled before it is sent
    /// let req = keypool::Request::chat("m", [("user", "hi")]).with_cancel(flag.clone());
    /// assert!(matches!(pool.submit(req)?.wait(), Err(keypool::Error::Cancelled)));
    /// # Ok::<(), keypool::Error>(())
    /// ```
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> Request {
        self.cancel = Some(flag);
        self
    }

    /// Gives the request an affinity: requests with the same one (a session, a
    /// conversation, a user) go to the same key while that key can admit them — they
    /// wait for it while it is only busy — and move only when it cannot (disabled,
    /// parked, cooling, not serving the model), to the next key in a consistent order
    /// (rendezvous hashing over the keys' labels), so a provider's prompt cache keeps
    /// hitting. Jobs without one never wait behind them. See also
    /// [`Config::affinity_from_user`](crate::Config::affinity_from_user).
    pub fn with_affinity(mut self, affinity: impl Into<String>) -> Request {
        self.affinity = Some(Arc::from(affinity.into()));
        self
    }

    /// Models to fall back to, in order, when the request's own `"model"` cannot be
    /// served: every key serving it is out (disabled, parked) or the provider said the
    /// model is not there (a 404 blamed on the model, on every key serving it). The
    /// request then goes, with its body's `"model"` replaced, to the next model's keys;
    /// [`Response::fallback_model`] says which one served. Never after a stream
    /// delivered text. Replaces the config's `fallback_models` for this model.
    pub fn with_fallback_models<S: Into<String>>(
        mut self,
        models: impl IntoIterator<Item = S>,
    ) -> Request {
        let list: Vec<Arc<str>> = models.into_iter().map(|m| Arc::from(m.into())).collect();
        self.fallbacks = Some(Arc::from(list));
        self
    }

    /// The request's affinity, if it has one ([`Request::with_affinity`]).
    pub fn affinity(&self) -> Option<&str> {
        self.affinity.as_deref()
    }

    /// Whether the request's cancel flag ([`Request::with_cancel`]) is set.
    pub fn is_cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The path this request is POSTed to.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The JSON body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Rough token estimate used by per-key `tpm` limits: prompt characters / 4 plus
    /// `max_tokens` (or `max_completion_tokens`).
    pub fn estimated_tokens(&self) -> u64 {
        let v: serde_json::Value = match serde_json::from_slice(&self.body) {
            Ok(v) => v,
            Err(_) => return (self.body.len() / 4) as u64,
        };
        let mut chars = 0usize;
        if let Some(msgs) = v.get("messages").and_then(|m| m.as_array()) {
            for m in msgs {
                match m.get("content") {
                    Some(serde_json::Value::String(s)) => chars += s.chars().count(),
                    Some(other) => chars += other.to_string().len(),
                    None => {}
                }
            }
        } else if let Some(p) = v.get("prompt").or_else(|| v.get("input")) {
            chars += p
                .as_str()
                .map(|s| s.chars().count())
                .unwrap_or_else(|| p.to_string().len());
        }
        let max = v
            .get("max_tokens")
            .or_else(|| v.get("max_completion_tokens"))
            .and_then(|m| m.as_u64())
            .unwrap_or(0);
        (chars / 4) as u64 + max
    }
}

/// [`DEFAULT_PATH`] as one shared `Arc`, allocated once per process.
fn default_path() -> Arc<str> {
    static PATH: std::sync::LazyLock<Arc<str>> =
        std::sync::LazyLock::new(|| Arc::from(DEFAULT_PATH));
    PATH.clone()
}

/// Bodies above this size do not keep their scratch buffer for the thread's next one.
const SCRATCH_KEEP: usize = 64 * 1024;

/// Runs `f` with this thread's scratch buffer, emptied (a fresh one when it is in use
/// further up the stack or the thread is exiting). Bodies are written there and then
/// copied into the request's shared `Arc<[u8]>`: one allocation per body, not a
/// growing `Vec` plus the copy.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut f = Some(f);
    let done = SCRATCH.try_with(|s| {
        let mut buf = s.try_borrow_mut().ok()?;
        let f = f.take()?;
        buf.clear();
        let r = f(&mut buf);
        if buf.capacity() > SCRATCH_KEEP {
            *buf = Vec::new();
        }
        Some(r)
    });
    match (done, f) {
        (Ok(Some(r)), _) => r,
        (_, Some(f)) => f(&mut Vec::new()),
        // `f` ran and returned: the first arm matched.
        (_, None) => unreachable!("the scratch closure ran without a result"),
    }
}

/// Appends `s` as a JSON string (quoted, escaped).
pub(crate) fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a `&str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends the `i`-th element of a `messages` array: `{"role":…,"content":…}`.
pub(crate) fn write_message(out: &mut Vec<u8>, i: usize, role: &str, content: &str) {
    if i > 0 {
        out.push(b',');
    }
    out.reserve(28 + role.len() + content.len());
    out.extend_from_slice(b"{\"role\":");
    write_json_str(out, role);
    out.extend_from_slice(b",\"content\":");
    write_json_str(out, content);
    out.push(b'}');
}

/// Token counts from a response's `usage` object, read leniently: each count is
/// clamped to `0..=u32::MAX`; negative numbers, `null` and non-numeric values read as
/// 0; fractions are truncated; numeric strings are accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`.
    pub completion_tokens: u64,
}

/// Response headers keypool keeps (lowercase names): rate-limit hints and request ids.
pub(crate) fn is_kept_header(name: &str) -> bool {
    matches!(
        name,
        "retry-after"
            | "retry-after-ms"
            | "x-should-retry"
            | "x-request-id"
            | "request-id"
            | "content-type"
    ) || name.starts_with("x-ratelimit-")
        || name.starts_with("openai-")
}

/// An HTTP response to a [`Request`], with which key served it and how.
#[derive(Clone)]
pub struct Response {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) key_label: Arc<str>,
    pub(crate) key_index: usize,
    pub(crate) attempts: u32,
    pub(crate) latency: Duration,
    pub(crate) keys_tried: Vec<usize>,
    /// Streams only: first attempt's start to the first text delta.
    pub(crate) ttft: Option<Duration>,
    /// Error paths only: whom the answer was blamed on (`blame.rs`).
    pub(crate) blame: Option<crate::Blame>,
    /// Submit to the first attempt's start.
    pub(crate) queue: Duration,
    /// The fallback model that served the request, if not the one it asked for.
    pub(crate) fallback: Option<Arc<str>>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("key_label", &self.key_label)
            .field("key_index", &self.key_index)
            .field("attempts", &self.attempts)
            .field("latency", &self.latency)
            .field("ttft", &self.ttft)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Response {
    /// The fallback model that served this request, if it was not the model it asked
    /// for ([`Request::with_fallback_models`], the config's `fallback_models`).
    pub fn fallback_model(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Whom this answer was blamed on, when it is the response behind an error (see
    /// [`Error::blame`](crate::Error::blame)); `None` for a success.
    pub fn blame(&self) -> Option<crate::Blame> {
        self.blame
    }

    /// HTTP status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The kept response headers (lowercase names): `retry-after`, `retry-after-ms`,
    /// `x-should-retry`, `x-ratelimit-*`, `x-request-id`, `content-type`.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The first kept header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The request id the server assigned (`x-request-id`, or the body's `id`).
    pub fn request_id(&self) -> Option<String> {
        self.header("x-request-id")
            .or_else(|| self.header("request-id"))
            .map(str::to_owned)
            .or_else(|| {
                self.json::<serde_json::Value>()
                    .ok()?
                    .get("id")?
                    .as_str()
                    .map(str::to_owned)
            })
    }

    /// The raw body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Takes the body out, leaving the response without one.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Parses the body as `T`: any `Deserialize` type, or [`Value`](crate::Value) for
    /// untyped JSON. A body that does not fit is [`Error::Json`].
    ///
    /// ```no_run
    /// # fn f(response: keypool::Response) -> Result<(), keypool::Error> {
    /// #[derive(serde::Deserialize)]
    /// struct Completion { id: String }
    /// let c: Completion = response.json()?;
    /// let v: keypool::Value = response.json()?;
    /// # Ok(()) }
    /// ```
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(Error::Json)
    }

    fn first_choice(&self) -> Option<Choice> {
        #[derive(serde::Deserialize)]
        struct Top {
            #[serde(default)]
            choices: Vec<Choice>,
        }
        let top: Top = serde_json::from_slice(&self.body).ok()?;
        top.choices.into_iter().next()
    }

    /// The assistant's text: the first choice's `message.content`, for chat
    /// completions (`None` if absent or not a string).
    pub fn content(&self) -> Option<String> {
        self.first_choice()?.message?.content
    }

    /// The first choice's `finish_reason` (`"stop"`, `"length"`, `"tool_calls"`, …).
    pub fn finish_reason(&self) -> Option<String> {
        self.first_choice()?.finish_reason
    }

    /// Token usage from the body's `usage`, if present.
    pub fn usage(&self) -> Option<Usage> {
        parse_usage(&self.body)
    }

    /// Label of the key that served the last attempt.
    pub fn key_label(&self) -> &str {
        &self.key_label
    }

    /// Index (config order) of the key that served the last attempt.
    pub fn key_index(&self) -> usize {
        self.key_index
    }

    /// HTTP attempts made, this one included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Indices of the keys tried, in order (the last one served this response).
    pub fn keys_tried(&self) -> &[usize] {
        &self.keys_tried
    }

    /// Streamed responses only: time from the first attempt's start to the first chunk
    /// with text (`None` for other responses, or a stream without text).
    pub fn time_to_first_token(&self) -> Option<Duration> {
        self.ttft
    }

    /// Time from the first attempt's start to this response.
    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// Time the request waited before its first attempt started: in the queue, behind
    /// a saturated pool, for a key to admit it (`submit` to the first send).
    /// [`latency`](Response::latency) starts where this ends.
    pub fn queue_time(&self) -> Duration {
        self.queue
    }

    /// The server's retry hint: `retry-after-ms`, or `retry-after` in seconds or as an
    /// HTTP date. Never panics, whatever the server sent: negative or unparsable values
    /// are `None`, and hints longer than 7 days (including numbers too large to
    /// represent and far-future dates) are clamped to 7 days. The pool itself honours
    /// at most `retry.max_retry_after_ms`.
    pub fn retry_after(&self) -> Option<Duration> {
        crate::retry_after::parse_retry_after(
            self.header("retry-after-ms"),
            self.header("retry-after"),
        )
    }
}

/// One entry of `choices`, read leniently (wrong types read as absent).
#[derive(serde::Deserialize)]
struct Choice {
    #[serde(default, deserialize_with = "lenient")]
    message: Option<Message>,
    #[serde(default, deserialize_with = "lenient")]
    finish_reason: Option<String>,
}

#[derive(serde::Deserialize)]
struct Message {
    #[serde(default, deserialize_with = "lenient")]
    content: Option<String>,
}

/// `Some(T)` if the value fits `T`, else `None` (never an error).
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

pub(crate) fn parse_usage(body: &[u8]) -> Option<Usage> {
    crate::body::parse_usage(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_json_shares_the_default_path_and_checks_others() {
        let a = Request::from_json(DEFAULT_PATH, r#"{"model":"m"}"#).unwrap();
        let b = Request::from_json(DEFAULT_PATH, "[]").unwrap();
        assert!(Arc::ptr_eq(&a.path, &b.path), "one shared default path");
        assert_eq!(a.path(), DEFAULT_PATH);
        assert_eq!(a.body(), br#"{"model":"m"}"#);
        let e = Request::from_json("/embeddings", "{}").unwrap();
        assert_eq!(e.path(), "/embeddings");
        assert!(Request::from_json("no-slash", "{}").is_err());
        assert!(Request::from_json("/x y", "{}").is_err());
        assert!(Request::from_json(DEFAULT_PATH, "{").is_err());
    }
}
