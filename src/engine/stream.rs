//! Streamed responses (`"stream": true`): the caller's [`ResponseStream`], the chunks it
//! yields, and the worker side that reads the server-sent events of one attempt,
//! forwards each chunk, and assembles the final `chat.completion`.
//!
//! A stream is a request like any other: admitted by its key's gate, held by one of the
//! key's workers for its whole length (so it counts against `max_concurrent`), settled
//! after. It is retried (other key, backoff, `Retry-After`) only while nothing has been
//! handed to the caller; after that a failure ends it with [`Error::Stream`], which says
//! how much was delivered — never a silent duplicate of text already delivered.

use std::io::{BufReader, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, SendTimeoutError, Sender};
use serde_json::{Map, Value};

use crate::body;
use crate::error::{Error, StreamFailure, TimeoutPhase};
use crate::job::Job;
use crate::key::FailClass;
use crate::request::{Request, Response};
use crate::retry::{Verdict, judge_fault};
use crate::sse::{SseError, SseReader};
use crate::thread_role::on_pool_thread;
use crate::ticket::{CancelHandle, RequestResult};
use crate::transport::{HttpRequest, HttpResponse, HttpStream, TransportError};
use crate::worker::KeyWorkerCtx;

/// Chunks buffered between the worker and a caller that reads slower than the server
/// sends. A full buffer makes the worker wait (within the attempt's time).
pub(crate) const CHUNK_BUFFER: usize = 64;

/// Most choices (`n`) and tool calls per choice assembled; more is a malformed stream.
const MAX_CHOICES: u64 = 128;
const MAX_TOOL_CALLS: u64 = 128;

/// One chunk of a streamed response, as the server sent it.
#[derive(Debug, Clone)]
pub struct StreamChunk {
    pub(crate) json: Value,
    pub(crate) delta: String,
    pub(crate) event: Option<String>,
    pub(crate) id: Option<String>,
    pub(crate) seq: u64,
}

impl StreamChunk {
    /// The chunk's parsed JSON (a `chat.completion.chunk`).
    pub fn json(&self) -> &Value {
        &self.json
    }

    /// The text this chunk adds: every choice's `delta.content` (or `text`, for legacy
    /// completions), concatenated. Empty for role-only, finish and usage chunks.
    pub fn delta(&self) -> &str {
        &self.delta
    }

    /// The SSE `event:` field, if the server sent one.
    pub fn event(&self) -> Option<&str> {
        self.event.as_deref()
    }

    /// The SSE last event id (`id:` field), if the server sent one.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Position of this chunk in the stream, from 0.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The first choice's `finish_reason`, if this chunk carries one.
    pub fn finish_reason(&self) -> Option<&str> {
        self.json
            .get("choices")?
            .as_array()?
            .iter()
            .find_map(|c| c.get("finish_reason")?.as_str())
    }
}

/// One event of a streamed response: chunks as they arrive, then exactly one final
/// outcome.
#[derive(Debug)]
pub enum StreamEvent {
    /// A chunk: its parsed JSON and its text delta.
    Chunk(StreamChunk),
    /// The final outcome, always the last event: the assembled response (a
    /// `chat.completion`-shaped body with the full message, `finish_reason` and
    /// `usage`), or the error that ended the stream.
    Done(RequestResult),
}

/// Where a stream's chunks go: the caller's [`ResponseStream`], or a callback run on
/// the worker thread.
pub(crate) enum ChunkSink {
    Channel(Sender<StreamChunk>),
    /// Returns false to abandon the stream.
    Callback(Box<dyn FnMut(StreamChunk) -> bool + Send>),
}

/// A stream job's state that survives retries: where chunks go and how much of the
/// stream the caller already has.
pub(crate) struct StreamState {
    pub sink: ChunkSink,
    /// Chunks handed to the caller.
    pub chunks: u64,
    /// Bytes of text delta handed to the caller.
    pub text_bytes: u64,
}

impl StreamState {
    pub(crate) fn new(sink: ChunkSink) -> Box<StreamState> {
        Box::new(StreamState {
            sink,
            chunks: 0,
            text_bytes: 0,
        })
    }

    pub(crate) fn delivered(&self) -> bool {
        self.chunks > 0
    }
}

/// The caller's side of a streamed request, from [`Pool::submit_stream`](crate::Pool::submit_stream).
///
/// Iterate it (blocking) for [`StreamEvent`]s: every chunk as it arrives, then one
/// [`StreamEvent::Done`] with the assembled response or the error; after that the
/// iterator ends. Dropping it before the end cancels the request
/// ([`ResponseStream::cancel`]).
#[derive(Debug)]
pub struct ResponseStream {
    chunks: Receiver<StreamChunk>,
    result: Receiver<RequestResult>,
    cancel: CancelHandle,
    /// The final outcome, received but held back while chunks are still buffered.
    pending: Option<RequestResult>,
    chunks_closed: bool,
    done: bool,
}

impl ResponseStream {
    pub(crate) fn new(
        chunks: Receiver<StreamChunk>,
        result: Receiver<RequestResult>,
        cancel: CancelHandle,
    ) -> Self {
        ResponseStream {
            chunks,
            result,
            cancel,
            pending: None,
            chunks_closed: false,
            done: false,
        }
    }

    /// The next event, waiting at most `timeout` (`None`: as long as it takes).
    /// `Ok(None)` once [`StreamEvent::Done`] has been returned; `Err(Error::Timeout)`
    /// with phase `Wait` if nothing arrived in time (the stream stays valid).
    ///
    /// On a keypool thread (inside a callback) it never waits: an event not ready yet
    /// gives [`Error::WouldDeadlock`].
    pub fn next_timeout(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<StreamEvent>, Error> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.done {
                return Ok(None);
            }
            // Chunks first: a worker hands every chunk over before the final result,
            // so once the result is here every chunk before it is already buffered.
            if let Ok(c) = self.chunks.try_recv() {
                return Ok(Some(StreamEvent::Chunk(c)));
            }
            if self.pending.is_none() {
                if let Ok(r) = self.result.try_recv() {
                    self.pending = Some(r);
                    continue; // look for chunks once more
                }
            }
            if let Some(r) = self.pending.take() {
                self.done = true;
                return Ok(Some(StreamEvent::Done(r)));
            }
            if timeout.is_some_and(|t| t.is_zero()) {
                return Err(wait_timeout());
            }
            if on_pool_thread() {
                return Err(Error::WouldDeadlock("waiting for a stream event"));
            }
            let mut sel = Select::new();
            let c = (!self.chunks_closed).then(|| sel.recv(&self.chunks));
            let r = sel.recv(&self.result);
            let op = match deadline {
                Some(d) => sel.select_deadline(d).map_err(|_| wait_timeout())?,
                None => sel.select(),
            };
            if Some(op.index()) == c {
                match op.recv(&self.chunks) {
                    Ok(chunk) => return Ok(Some(StreamEvent::Chunk(chunk))),
                    Err(_) => self.chunks_closed = true, // only the result is left
                }
            } else {
                debug_assert_eq!(op.index(), r);
                // The reply always answers before it goes; a lost sender is a cancel.
                self.pending = Some(op.recv(&self.result).unwrap_or(Err(Error::Cancelled)));
            }
        }
    }

    /// Drains the stream and returns its final outcome (chunks are discarded).
    pub fn wait(mut self) -> RequestResult {
        loop {
            match self.next_timeout(None) {
                Ok(Some(StreamEvent::Done(r))) => return r,
                Ok(Some(StreamEvent::Chunk(_))) => {}
                Ok(None) => return Err(Error::ResultTaken),
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the final outcome has been returned.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Cancels the request, as [`Ticket::cancel`](crate::Ticket::cancel) does: waiting,
    /// it is never sent; streaming, its connection is shut down at once, its worker
    /// freed, its key not blamed. The stream then ends with
    /// [`StreamEvent::Done`]`(Err(`[`Error::Cancelled`]`))` after the chunks already
    /// buffered. True if this call ended the request; false if it had ended already.
    /// Dropping the stream before its end does the same.
    pub fn cancel(&self) -> bool {
        self.cancel.cancel()
    }

    /// A handle that cancels this stream's request from any thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }
}

impl Drop for ResponseStream {
    /// A stream dropped before its end is cancelled: the worker stops reading at once.
    fn drop(&mut self) {
        if !self.done {
            self.cancel.cancel();
        }
    }
}

fn wait_timeout() -> Error {
    Error::Timeout {
        phase: TimeoutPhase::Wait,
        key: None,
        attempts: 0,
    }
}

impl Iterator for ResponseStream {
    type Item = StreamEvent;

    /// Blocks for the next event; `None` after [`StreamEvent::Done`]. On a keypool
    /// thread an event not ready yet ends the stream with `Done(Err(WouldDeadlock))`.
    fn next(&mut self) -> Option<StreamEvent> {
        match self.next_timeout(None) {
            Ok(e) => e,
            Err(e) => {
                self.done = true;
                Some(StreamEvent::Done(Err(e)))
            }
        }
    }
}

/// Makes `req` a streamed request: `"stream": true`, and usage in the final chunk
/// (`stream_options.include_usage`) unless the caller set it.
pub(crate) fn prepare(req: Request) -> Result<Request, Error> {
    let mut v: Value = serde_json::from_slice(&req.body)
        .map_err(|e| Error::InvalidRequest(format!("body is not valid JSON: {e}")))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(Error::InvalidRequest(
            "a streamed request's body must be a JSON object".into(),
        ));
    };
    obj.insert("stream".into(), Value::Bool(true));
    match obj.get_mut("stream_options") {
        Some(Value::Object(o)) => {
            o.entry("include_usage").or_insert(Value::Bool(true));
        }
        Some(Value::Null) | None => {
            obj.insert(
                "stream_options".into(),
                serde_json::json!({"include_usage": true}),
            );
        }
        Some(_) => {} // the caller's own value, sent as is
    }
    let body = serde_json::to_vec(&v).expect("serializing a serde_json::Value cannot fail");
    Ok(Request {
        body: body.into(),
        ..req
    })
}

type Failure = Box<(Error, Verdict, FailClass)>;

/// One streamed attempt on the worker's key: open the stream, forward chunks, assemble.
/// Returns the assembled response, or the error with its verdict (never a retry once
/// the caller has data).
pub(crate) fn attempt(
    ctx: &KeyWorkerCtx,
    job: &mut Job,
    http: &HttpRequest<'_>,
    first_start: Instant,
    t0: Instant,
    deadline_bound: bool,
) -> Result<Response, Failure> {
    let cfg = &ctx.shared.config;
    let idle =
        (cfg.stream_idle_timeout_ms > 0).then(|| Duration::from_millis(cfg.stream_idle_timeout_ms));
    let stream = match ctx.transport.send_stream(http, idle) {
        Ok(s) => s,
        Err(e) => {
            return Err(Box::new(crate::worker::transport_failure(
                ctx,
                job,
                e,
                deadline_bound,
            )));
        }
    };
    let is_sse = stream
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .is_some_and(|(_, v)| {
            v.trim_start()
                .get(..17)
                .is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream"))
        });
    if !(200..300).contains(&stream.status) || !is_sse {
        // An error status, or a server that answered with one JSON body: judged like
        // any response (a plain `chat.completion` is a success with no chunks).
        let resp = read_whole(stream, cfg.max_response_bytes).map_err(|e| {
            Box::new(crate::worker::transport_failure(
                ctx,
                job,
                e,
                deadline_bound,
            ))
        })?;
        return crate::worker::judge_response(ctx, job, resp, first_start);
    }
    let mut run = Run {
        ctx,
        job,
        t0,
        first_start,
        timeout: http.timeout,
        deadline_bound,
        idle,
    };
    run.read(stream)
}

fn read_whole(stream: HttpStream, max: u64) -> Result<HttpResponse, TransportError> {
    let mut body = Vec::new();
    stream
        .body
        .take(max.saturating_add(1))
        .read_to_end(&mut body)
        .map_err(|e| TransportError::Failed(e.to_string()))?;
    if body.len() as u64 > max {
        return Err(TransportError::Failed(format!(
            "response body exceeds the {max}-byte limit (max_response_bytes)"
        )));
    }
    Ok(HttpResponse {
        status: stream.status,
        headers: stream.headers,
        body,
    })
}

struct Run<'a> {
    ctx: &'a KeyWorkerCtx,
    job: &'a mut Job,
    t0: Instant,
    first_start: Instant,
    timeout: Duration,
    deadline_bound: bool,
    idle: Option<Duration>,
}

impl Run<'_> {
    fn state(&mut self) -> &mut StreamState {
        self.job.stream.as_mut().expect("a stream job")
    }

    /// A failure of kind `kind`: retried (by `verdict`) while the caller has nothing,
    /// final once it has.
    fn fail(
        &mut self,
        kind: StreamFailure,
        message: String,
        status: Option<u16>,
        verdict: Verdict,
        class: FailClass,
    ) -> Failure {
        let masker = body::Masker::for_config(&self.ctx.shared.config);
        let message = masker.mask_str(message);
        let attempts = self.job.attempts;
        let key = self.ctx.shared.keys[self.ctx.index].label.to_string();
        let st = self.state();
        let (chunks, text_bytes, delivered) = (st.chunks, st.text_bytes, st.delivered());
        let verdict = if delivered {
            Verdict {
                retry: false,
                ..verdict
            }
        } else {
            verdict
        };
        Box::new((
            Error::Stream {
                kind,
                message,
                key,
                status,
                attempts,
                chunks_delivered: chunks,
                text_bytes_delivered: text_bytes,
            },
            verdict,
            class,
        ))
    }

    fn retry() -> Verdict {
        Verdict {
            retry: true,
            ..Verdict::default()
        }
    }

    fn read(&mut self, stream: HttpStream) -> Result<Response, Failure> {
        let cfg = &self.ctx.shared.config;
        let max = usize::try_from(cfg.max_response_bytes).unwrap_or(usize::MAX);
        let (status, headers) = (stream.status, stream.headers);
        let mut sse = SseReader::new(BufReader::with_capacity(16 * 1024, stream.body), max);
        let mut asm = Assembler::new(self.job.req.path.ends_with("/chat/completions"), max);
        let mut ttft = None;
        let mut seq = 0u64;
        loop {
            let ev = match sse.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    return Err(self.fail(
                        StreamFailure::Incomplete,
                        "the stream ended without `data: [DONE]`".into(),
                        None,
                        Self::retry(),
                        FailClass::ServerError,
                    ));
                }
                Err(SseError::TooLarge(n)) => {
                    return Err(self.fail(
                        StreamFailure::TooLarge,
                        format!("an event or line exceeds the {n}-byte limit (max_response_bytes)"),
                        None,
                        Self::retry(),
                        FailClass::Transport,
                    ));
                }
                Err(SseError::Io(e)) => return Err(self.io_failure(e)),
            };
            if ev.data == "[DONE]" {
                break;
            }
            let parsed: Result<Value, _> = serde_json::from_str(&ev.data);
            let is_error_event = ev.event.as_deref() == Some("error");
            let v = match parsed {
                Ok(v @ Value::Object(_)) => v,
                _ if is_error_event => Value::Object(Map::new()),
                Ok(_) | Err(_) => {
                    let snippet = body::clean(&ev.data, 200);
                    return Err(self.fail(
                        StreamFailure::Malformed,
                        format!("an event is not a JSON object: {snippet}"),
                        None,
                        Self::retry(),
                        FailClass::ServerError,
                    ));
                }
            };
            let finish_error = v
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.get("finish_reason").and_then(Value::as_str) == Some("error"))
                });
            if is_error_event || v.get("error").is_some() || finish_error {
                return Err(self.error_event(&ev.data, &v));
            }
            let delta = match asm.add(&v) {
                Ok(d) => d,
                Err(why) => {
                    return Err(self.fail(
                        StreamFailure::Malformed,
                        why,
                        None,
                        Self::retry(),
                        FailClass::ServerError,
                    ));
                }
            };
            if ttft.is_none() && !delta.is_empty() {
                let now = Instant::now();
                ttft = Some(now.saturating_duration_since(self.first_start));
                self.ctx.shared.keys[self.ctx.index].record_ttft(now - self.t0);
            }
            let chunk = StreamChunk {
                json: v,
                delta,
                event: ev.event,
                id: ev.id,
                seq,
            };
            seq += 1;
            self.deliver(chunk)?;
        }
        if asm.chunks == 0 {
            return Err(self.fail(
                StreamFailure::Malformed,
                "the stream ended with `[DONE]` before any chunk".into(),
                None,
                Self::retry(),
                FailClass::ServerError,
            ));
        }
        // Read what follows `[DONE]` (normally nothing) so the connection can be reused;
        // a bounded amount, then give up on it.
        let mut rest = sse.into_inner();
        let _ = std::io::copy(&mut (&mut rest).take(64 * 1024), &mut std::io::sink());

        let ks = &self.ctx.shared.keys[self.ctx.index];
        let usage = asm.usage_counts();
        // OpenRouter's `usage.cost`, in the last chunk: summed like a plain answer's
        // (a re-check it makes due runs after the reply, `credits::recheck_if_due`),
        // and counted against `max_cost` (else estimated from `prices`).
        crate::spend::record(
            &self.ctx.shared,
            self.ctx.index,
            self.job,
            asm.cost(),
            usage,
        );
        ks.record_success(usage.prompt_tokens, usage.completion_tokens);
        if ks.gate.has_limits() {
            ks.gate.correct_tokens(
                self.job.est_tokens,
                usage.prompt_tokens.saturating_add(usage.completion_tokens),
            );
        }
        let body = serde_json::to_vec(&asm.finish()).expect("serializing a Value cannot fail");
        Ok(Response {
            status,
            headers,
            body,
            key_label: ks.label.clone(),
            key_index: self.ctx.index,
            attempts: self.job.attempts,
            latency: self.first_start.elapsed(),
            keys_tried: self.job.tried.clone(),
            ttft,
            blame: None,
            queue: self.job.queue_time(),
            fallback: self.job.fallback.clone(),
        })
    }

    /// Hands a chunk to the caller; a caller that is gone (or never reads within the
    /// attempt's time) ends the stream.
    fn deliver(&mut self, chunk: StreamChunk) -> Result<(), Failure> {
        let text = chunk.delta.len() as u64;
        let until = self.t0 + self.timeout;
        let st = self.state();
        let ok = match &mut st.sink {
            ChunkSink::Channel(tx) => match tx.send_deadline(chunk, until) {
                Ok(()) => Ok(()),
                Err(SendTimeoutError::Timeout(_)) => {
                    Err("the caller did not read the stream within the attempt's timeout")
                }
                Err(SendTimeoutError::Disconnected(_)) => Err("the caller dropped the stream"),
            },
            ChunkSink::Callback(f) => match catch_unwind(AssertUnwindSafe(|| f(chunk))) {
                Ok(true) => Ok(()),
                Ok(false) => Err("the chunk callback stopped the stream"),
                Err(p) => {
                    log::error!(
                        "keypool: a stream chunk callback panicked: {}",
                        crate::worker::panic_message(&p)
                    );
                    Err("the chunk callback panicked")
                }
            },
        };
        match ok {
            Ok(()) => {
                st.chunks += 1;
                st.text_bytes = st.text_bytes.saturating_add(text);
                Ok(())
            }
            Err(why) => Err(self.fail(
                StreamFailure::Abandoned,
                why.to_owned(),
                None,
                Verdict::default(),
                FailClass::Other,
            )),
        }
    }

    fn io_failure(&mut self, e: std::io::Error) -> Failure {
        if e.kind() == std::io::ErrorKind::TimedOut {
            let elapsed = self.t0.elapsed();
            // The attempt's own limit (or the deadline) if it is used up; otherwise the
            // idle limit between reads.
            let (kind, phase) =
                if self.idle.is_some() && elapsed + Duration::from_millis(5) < self.timeout {
                    (StreamFailure::Idle, TimeoutPhase::StreamIdle)
                } else if self.deadline_bound {
                    (StreamFailure::Timeout, TimeoutPhase::Deadline)
                } else {
                    (StreamFailure::Timeout, TimeoutPhase::Attempt)
                };
            let retry = phase != TimeoutPhase::Deadline;
            if !self.state().delivered() {
                let key = self.ctx.shared.keys[self.ctx.index].label.to_string();
                return Box::new((
                    Error::Timeout {
                        phase,
                        key: Some(key),
                        attempts: self.job.attempts,
                    },
                    Verdict {
                        retry,
                        ..Verdict::default()
                    },
                    FailClass::Timeout,
                ));
            }
            let message = match phase {
                TimeoutPhase::StreamIdle => format!(
                    "no data for {} ms (stream_idle_timeout_ms)",
                    self.idle.unwrap_or_default().as_millis()
                ),
                p => format!("timed out in phase {}", p.as_str()),
            };
            return self.fail(kind, message, None, Verdict::default(), FailClass::Timeout);
        }
        self.fail(
            StreamFailure::Interrupted,
            format!("reading the stream failed: {e}"),
            None,
            Self::retry(),
            FailClass::Transport,
        )
    }

    /// An error reported inside the stream (OpenRouter: `{"error": …}` with
    /// `finish_reason: "error"`; others: an `event: error`). Judged by its code while
    /// the caller has nothing (a 429 cools the key, a 5xx retries elsewhere).
    fn error_event(&mut self, data: &str, v: &Value) -> Failure {
        let code = v.get("error").and_then(body::embedded_code);
        let message = match v.get("error") {
            Some(_) => body::error_message(data.as_bytes()),
            None => body::clean(data, 200),
        };
        let status = code.unwrap_or(502);
        // Whose fault, as for any answer (`blame.rs`): a flagged prompt mid-stream
        // takes no key out.
        let model = self.job.model().cloned();
        let fault = crate::blame::judge(status, data.as_bytes(), model.as_deref());
        let mut verdict = judge_fault(&fault, None, None, &[], &self.ctx.shared.config.retry);
        crate::worker::scope(self.ctx, self.job, &fault, &mut verdict, model.as_ref());
        self.job.model_overloaded = fault == crate::blame::Fault::ModelBusy && status == 503;
        let class = match status {
            429 => FailClass::RateLimited,
            500..=599 => FailClass::ServerError,
            _ => FailClass::ClientError,
        };
        self.fail(
            StreamFailure::ErrorEvent,
            format!("the server reported an error in the stream: {message}"),
            code,
            verdict,
            class,
        )
    }
}

/// Builds the final response from the chunks.
struct Assembler {
    chat: bool,
    max: usize,
    chunks: u64,
    text_bytes: usize,
    id: Value,
    model: Value,
    created: Value,
    fingerprint: Value,
    object: Option<String>,
    choices: std::collections::BTreeMap<u64, ChoiceAsm>,
    usage: Value,
}

#[derive(Default)]
struct ChoiceAsm {
    role: Option<String>,
    content: String,
    text: bool,
    reasoning: String,
    finish_reason: Value,
    tool_calls: std::collections::BTreeMap<u64, Map<String, Value>>,
}

fn append_str(dst: &mut String, v: Option<&Value>) -> usize {
    match v.and_then(Value::as_str) {
        Some(s) => {
            dst.push_str(s);
            s.len()
        }
        None => 0,
    }
}

impl Assembler {
    fn new(chat: bool, max: usize) -> Assembler {
        Assembler {
            chat,
            max,
            chunks: 0,
            text_bytes: 0,
            id: Value::Null,
            model: Value::Null,
            created: Value::Null,
            fingerprint: Value::Null,
            object: None,
            choices: Default::default(),
            usage: Value::Null,
        }
    }

    /// Adds a chunk; returns its text delta.
    fn add(&mut self, v: &Value) -> Result<String, String> {
        self.chunks += 1;
        for (field, slot) in [
            ("id", &mut self.id),
            ("model", &mut self.model),
            ("created", &mut self.created),
            ("system_fingerprint", &mut self.fingerprint),
        ] {
            if slot.is_null() {
                if let Some(x) = v.get(field) {
                    *slot = x.clone();
                }
            }
        }
        if self.object.is_none() {
            self.object = v.get("object").and_then(Value::as_str).map(str::to_owned);
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = u.clone();
        }
        let choices = match v.get("choices") {
            None | Some(Value::Null) => return Ok(String::new()),
            Some(Value::Array(cs)) => cs,
            Some(_) => return Err("a chunk whose `choices` is not an array".into()),
        };
        let mut delta_text = String::new();
        for c in choices {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            if index >= MAX_CHOICES {
                return Err(format!(
                    "a choice index of {index} (at most {MAX_CHOICES} are assembled)"
                ));
            }
            let ch = self.choices.entry(index).or_default();
            let mut added = 0;
            if let Some(d) = c.get("delta").filter(|d| d.is_object()) {
                if let Some(r) = d.get("role").and_then(Value::as_str) {
                    ch.role = Some(r.to_owned());
                }
                let before = ch.content.len();
                added += append_str(&mut ch.content, d.get("content"));
                delta_text.push_str(&ch.content[before..]);
                added += append_str(&mut ch.reasoning, d.get("reasoning"));
                if let Some(Value::Array(calls)) = d.get("tool_calls") {
                    for call in calls {
                        let ti = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                        if ti >= MAX_TOOL_CALLS {
                            return Err(format!("a tool call index of {ti}"));
                        }
                        let t = ch.tool_calls.entry(ti).or_default();
                        for k in ["id", "type"] {
                            if let Some(x) = call.get(k).filter(|x| !x.is_null()) {
                                t.insert(k.into(), x.clone());
                            }
                        }
                        if let Some(f) = call.get("function") {
                            let fun = t.entry("function").or_insert_with(
                                || serde_json::json!({"name": "", "arguments": ""}),
                            );
                            for k in ["name", "arguments"] {
                                if let Some(s) = f.get(k).and_then(Value::as_str) {
                                    if let Some(Value::String(dst)) = fun.get_mut(k) {
                                        dst.push_str(s);
                                        added += s.len();
                                    }
                                }
                            }
                        }
                    }
                }
            } else if let Some(t) = c.get("text").and_then(Value::as_str) {
                ch.text = true;
                ch.content.push_str(t);
                delta_text.push_str(t);
                added += t.len();
            }
            if let Some(fr) = c.get("finish_reason").filter(|f| !f.is_null()) {
                ch.finish_reason = fr.clone();
            }
            self.text_bytes += added;
            if self.text_bytes > self.max {
                return Err(format!(
                    "the assembled response exceeds {} bytes (max_response_bytes)",
                    self.max
                ));
            }
        }
        Ok(delta_text)
    }

    fn usage_counts(&self) -> crate::request::Usage {
        if self.usage.is_null() {
            return Default::default();
        }
        let wrapped = serde_json::json!({"usage": self.usage});
        body::parse_usage(wrapped.to_string().as_bytes()).unwrap_or_default()
    }

    /// The stream's `usage.cost` (dollars), when a sane number (`credits::dollars`).
    fn cost(&self) -> Option<f64> {
        self.usage
            .get("cost")
            .and_then(Value::as_f64)
            .and_then(crate::credits_config::dollars)
    }

    fn finish(self) -> Value {
        let text_mode = !self.chat
            && (self.object.as_deref() == Some("text_completion")
                || self.choices.values().any(|c| c.text));
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, c)| {
                if text_mode {
                    return serde_json::json!({
                        "index": index, "text": c.content, "finish_reason": c.finish_reason
                    });
                }
                let mut msg = Map::new();
                msg.insert(
                    "role".into(),
                    Value::String(c.role.unwrap_or_else(|| "assistant".into())),
                );
                msg.insert("content".into(), Value::String(c.content));
                if !c.reasoning.is_empty() {
                    msg.insert("reasoning".into(), Value::String(c.reasoning));
                }
                if !c.tool_calls.is_empty() {
                    msg.insert(
                        "tool_calls".into(),
                        Value::Array(
                            c.tool_calls
                                .into_iter()
                                .map(|(i, mut t)| {
                                    t.insert("index".into(), i.into());
                                    Value::Object(t)
                                })
                                .collect(),
                        ),
                    );
                }
                serde_json::json!({
                    "index": index, "message": msg, "finish_reason": c.finish_reason
                })
            })
            .collect();
        let mut out = Map::new();
        out.insert("id".into(), self.id);
        out.insert(
            "object".into(),
            Value::String(
                if text_mode {
                    "text_completion"
                } else {
                    "chat.completion"
                }
                .into(),
            ),
        );
        out.insert("created".into(), self.created);
        out.insert("model".into(), self.model);
        if !self.fingerprint.is_null() {
            out.insert("system_fingerprint".into(), self.fingerprint);
        }
        out.insert("choices".into(), Value::Array(choices));
        out.insert("usage".into(), self.usage);
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_content_tools_and_usage() {
        let mut a = Assembler::new(true, 1 << 20);
        let chunks = [
            serde_json::json!({"id":"c1","model":"m","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}),
            serde_json::json!({"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}),
            serde_json::json!({"choices":[{"index":0,"delta":{"content":"lo","tool_calls":[{"index":0,"id":"t","type":"function","function":{"name":"f","arguments":"{\"a\""}}]}}]}),
            serde_json::json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]},"finish_reason":"tool_calls"}]}),
            serde_json::json!({"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}),
        ];
        let deltas: Vec<String> = chunks.iter().map(|c| a.add(c).unwrap()).collect();
        assert_eq!(deltas, ["", "Hel", "lo", "", ""]);
        assert_eq!(a.usage_counts().completion_tokens, 2);
        assert_eq!(a.cost(), None);
        let v = a.finish();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(v["usage"]["total_tokens"], 5);
    }

    #[test]
    fn stream_cost_is_read_from_the_last_usage_and_distrusted() {
        let cost_of = |usage: Value| {
            let mut a = Assembler::new(true, 1 << 20);
            a.add(&serde_json::json!({"choices":[{"index":0,"delta":{"content":"x"}}]}))
                .unwrap();
            a.add(&serde_json::json!({"choices": [], "usage": usage}))
                .unwrap();
            a.cost()
        };
        assert_eq!(
            cost_of(serde_json::json!({"prompt_tokens": 1, "cost": 0.25})),
            Some(0.25)
        );
        for bad in [
            serde_json::json!({"cost": "0.25"}),
            serde_json::json!({"cost": -1}),
            serde_json::json!({"cost": 1e300}),
            serde_json::json!({"cost": null}),
            serde_json::json!({"cost": {"total": 1}}),
            serde_json::json!({}),
        ] {
            assert_eq!(cost_of(bad.clone()), None, "{bad}");
        }
    }

    #[test]
    fn hostile_chunks_are_errors_not_panics() {
        let mut a = Assembler::new(true, 8);
        assert!(a.add(&serde_json::json!({"choices": 5})).is_err());
        assert!(
            a.add(&serde_json::json!({"choices":[{"index": u64::MAX}]}))
                .is_err()
        );
        assert!(
            a.add(&serde_json::json!({"choices":[{"delta":{"content":"123456789"}}]}))
                .is_err()
        );
    }

    #[test]
    fn prepare_asks_for_usage_unless_set() {
        let r = prepare(Request::chat("m", [("user", "hi")])).unwrap();
        let v: Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        let r = Request::new(&serde_json::json!({"stream_options": {"include_usage": false}}));
        let v: Value = serde_json::from_slice(prepare(r).unwrap().body()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], false);
        assert!(prepare(Request::new(&serde_json::json!([1]))).is_err());
    }
}
