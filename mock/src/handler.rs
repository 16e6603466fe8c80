//! Request handling: routing, authentication, fault decisions and OpenAI-shaped answers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use std::collections::VecDeque;

use crate::body::{End, MockBody};
use crate::server::Shared;
use crate::stats::InFlight;

/// Largest request body accepted.
const MAX_BODY: usize = 16 << 20;

/// The error returned to hyper to close a connection without a response.
#[derive(Debug)]
pub(crate) struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}

impl std::error::Error for Dropped {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

fn route(path: &str) -> Option<Endpoint> {
    let rest = ["/api/v1", "/v1", ""]
        .iter()
        .find_map(|p| path.strip_prefix(p).filter(|r| r.starts_with('/')))?;
    match rest {
        "/chat/completions" => Some(Endpoint::Chat),
        "/completions" => Some(Endpoint::Completions),
        "/embeddings" => Some(Endpoint::Embeddings),
        _ => None,
    }
}

/// Whether `path` is OpenRouter's key-info route, `{,/v1,/api/v1}/key`.
fn is_key_info(path: &str) -> bool {
    ["/api/v1/key", "/v1/key", "/key"].contains(&path)
}

/// Whether `path` is the model list route, `{,/v1,/api/v1}/models`.
fn is_models(path: &str) -> bool {
    ["/api/v1/models", "/v1/models", "/models"].contains(&path)
}

/// The answer of a key whose rule refuses it everywhere (a revoked key: an active
/// [`crate::KeyRule`] with `always_status` 401 or 403, for every request and model),
/// for the routes that are no completion (`GET …/key`, `GET …/models`).
fn refused(shared: &Shared, key: &str) -> Option<(u16, Bytes)> {
    if shared.control.lock().cfg.public_info {
        return None;
    }
    if key.is_empty() {
        return Some((401, request_error(401, "missing API key")));
    }
    let c = shared.control.lock();
    let rs = c.rules.get(key)?;
    let r = &rs.rule;
    let status = r.always_status.filter(|s| matches!(s, 401 | 403))?;
    let active = r.fail_first == 0
        && r.model.is_none()
        && r.fail_for_ms
            .is_none_or(|ms| rs.set_at.elapsed() < Duration::from_millis(ms));
    active.then(|| {
        let body = r.body.clone().map_or_else(
            || error_json(status, &format!("mock {status}")),
            Bytes::from,
        );
        (status, body)
    })
}

/// A JSON answer to a `GET`.
fn json_answer(status: u16, body: Bytes) -> Response<MockBody> {
    let mut r = Response::new(MockBody::full(body, None));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    if let Ok(v) = hyper::header::HeaderValue::from_str("application/json") {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// `GET …/models`: the models of [`crate::MockServer::set_models`] in OpenAI's shape,
/// not counted as a request; 404 when the list is `None`.
fn models(shared: &Shared, key: &str) -> Response<MockBody> {
    if let Some((status, body)) = refused(shared, key) {
        return json_answer(status, body);
    }
    let Some(models) = shared.control.lock().models.clone() else {
        return json_answer(404, request_error(404, "not found"));
    };
    if !key.is_empty() {
        let mut c = shared.control.lock();
        c.credits.entry(key.to_owned()).or_default().listings += 1;
    }
    let data: Vec<Value> = models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "keypool-mock"}))
        .collect();
    json_answer(
        200,
        Bytes::from(json!({"object": "list", "data": data}).to_string()),
    )
}

/// `GET …/key`: the key's credit in OpenRouter's shape, not counted as a request. A
/// key refused by its rule (401, 403) is refused here too.
fn key_info(shared: &Shared, key: &str) -> Response<MockBody> {
    let (status, body) = if let Some(refusal) = refused(shared, key) {
        refusal
    } else {
        let mut c = shared.control.lock();
        let credit = c.credits.entry(key.to_owned()).or_default();
        credit.checks += 1;
        match &credit.key_body {
            Some(raw) => (200, Bytes::from(raw.clone())),
            None => (
                200,
                Bytes::from(
                    json!({"data": {
                        "label": "mock",
                        "limit": credit.limit,
                        "limit_remaining": credit.remaining(),
                        "usage": credit.spent,
                        "is_free_tier": false,
                        "limit_reset": null,
                    }})
                    .to_string(),
                ),
            ),
        }
    };
    json_answer(status, body)
}

/// Whether the key has a cap and nothing left (it gets 402).
fn out_of_credit(shared: &Shared, key: &str) -> bool {
    let c = shared.control.lock();
    c.credits
        .get(key)
        .and_then(crate::MockCredit::remaining)
        .is_some_and(|r| r <= 0.0)
}

/// Debits a success's cost and returns it (`None` when costs are off).
fn charge(shared: &Shared, key: &str) -> Option<f64> {
    let mut c = shared.control.lock();
    let cost = c.cfg.cost_per_request;
    if !(cost.is_finite() && cost > 0.0) {
        return None;
    }
    c.credits.entry(key.to_owned()).or_default().spent += cost;
    Some(cost)
}

fn bearer(req: &Request<Incoming>) -> String {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .unwrap_or("")
        .to_owned()
}

/// What to answer.
#[derive(Debug, Clone, PartialEq)]
enum Action {
    Success,
    Status(u16),
    Drop,
    Malformed,
    ErrorIn200(u16),
}

/// Counts a request against its key's [`crate::MockConfig::request_budget`]: the
/// rate-limit headers to send, and whether it is over the budget (answer 429).
fn spend_budget(shared: &Shared, key: &str, arrived: Duration) -> (Vec<(String, String)>, bool) {
    let mut c = shared.control.lock();
    let budget = match c.key_budgets.get(key) {
        Some(b) => *b,
        None => c.cfg.request_budget,
    };
    let Some((limit, window_ms)) = budget.filter(|b| b.1 > 0) else {
        return (Vec::new(), false);
    };
    let window = u128::from(window_ms) * 1000;
    let at = arrived.as_micros();
    let index = at / window;
    let reset_ms = ((index + 1) * window - at).div_ceil(1000);
    let used = c.budgets.entry(key.to_owned()).or_insert((index, 0));
    if used.0 != index {
        *used = (index, 0);
    }
    let over = used.1 >= limit;
    if !over {
        used.1 += 1;
    }
    let headers = vec![
        ("x-ratelimit-limit-requests".to_owned(), limit.to_string()),
        (
            "x-ratelimit-remaining-requests".to_owned(),
            (limit - used.1).to_string(),
        ),
        (
            "x-ratelimit-reset-requests".to_owned(),
            format!("{reset_ms}ms"),
        ),
    ];
    (headers, over)
}

/// The full decision for one request.
struct Plan {
    delay: Duration,
    action: Action,
    retry_after_ms: Option<u64>,
    retry_after_raw: Option<String>,
    should_retry: Option<bool>,
    /// Delay between body chunks, if the body is sent slowly.
    slow_body: Option<Duration>,
    /// Rate-limit (and other scripted) headers to send (name, value).
    ratelimit: Vec<(String, String)>,
    /// A scripted answer body, sent verbatim with `Action::Status` (a key rule's
    /// `body`, or a request directive's `"body"`).
    body: Option<Bytes>,
}

/// The body of an injected error status.
fn error_json(status: u16, message: &str) -> Bytes {
    typed_error(status, message, "mock_error")
}

/// The body of an error caused by the request itself (404, 405, 401, 400).
fn request_error(status: u16, message: &str) -> Bytes {
    typed_error(status, message, "invalid_request_error")
}

fn typed_error(status: u16, message: &str, kind: &str) -> Bytes {
    Bytes::from(json!({"error": {"message": message, "type": kind, "code": status}}).to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Characters of a message `content`: a string, or an array of parts with `text`.
fn content_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str).or(p.as_str()))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

fn tokens(chars: usize) -> u64 {
    (chars as u64 / 4).max(1)
}

fn success_body(ep: Endpoint, n: u64, req: &Value) -> Bytes {
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model");
    let created = unix_now();
    let v = match ep {
        Endpoint::Chat => {
            let messages = req.get("messages").and_then(Value::as_array);
            let mut all = 0usize;
            let mut last = String::new();
            for m in messages.into_iter().flatten() {
                let text = m.get("content").map(content_text).unwrap_or_default();
                all += text.chars().count();
                last = text;
            }
            let reply = format!("echo: {last}");
            let (p, c) = (tokens(all), tokens(reply.chars().count()));
            json!({
                "id": format!("chatcmpl-{n}"),
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop"
                }],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
            })
        }
        Endpoint::Completions => {
            let prompt = req.get("prompt").map(content_text).unwrap_or_default();
            let reply = format!("echo: {prompt}");
            let (p, c) = (
                tokens(prompt.chars().count()),
                tokens(reply.chars().count()),
            );
            json!({
                "id": format!("cmpl-{n}"),
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": reply, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
            })
        }
        Endpoint::Embeddings => {
            let input = req.get("input").map(content_text).unwrap_or_default();
            let p = tokens(input.chars().count());
            json!({
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "model": model,
                "usage": {"prompt_tokens": p, "total_tokens": p}
            })
        }
    };
    Bytes::from(v.to_string())
}

/// The reply text and token counts of a chat or legacy completion.
fn reply_of(ep: Endpoint, req: &Value) -> (String, u64, u64) {
    let (all, last) = if ep == Endpoint::Chat {
        let mut all = 0usize;
        let mut last = String::new();
        for m in req
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let text = m.get("content").map(content_text).unwrap_or_default();
            all += text.chars().count();
            last = text;
        }
        (all, last)
    } else {
        let prompt = req.get("prompt").map(content_text).unwrap_or_default();
        (prompt.chars().count(), prompt)
    };
    let reply = format!("echo: {last}");
    let (p, c) = (tokens(all), tokens(reply.chars().count()));
    (reply, p, c)
}

/// `text` cut into at most `n` pieces of about equal length (on char boundaries).
fn pieces(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let step = chars.len().div_ceil(n.max(1)).max(1);
    chars.chunks(step).map(|c| c.iter().collect()).collect()
}

/// A streamed (`"stream": true`) answer: server-sent events shaped like OpenAI's and
/// OpenRouter's, with the stream directives of the `"mock"` object (see the crate docs).
fn sse_response(
    shared: &Shared,
    n: u64,
    ep: Endpoint,
    key: &str,
    req: &Value,
    extra_headers: &[(String, String)],
    mut guard: InFlight,
) -> Response<MockBody> {
    let d = req
        .get("mock")
        .filter(|m| m.is_object())
        .cloned()
        .unwrap_or(Value::Null);
    let num = |k: &str| d.get(k).and_then(Value::as_u64);
    let nl = if as_bool(&d, "crlf") { "\r\n" } else { "\n" };
    let multiline = as_bool(&d, "multiline_data");
    let fields = as_bool(&d, "event_fields");
    let chunk_delay = Duration::from_millis(num("chunk_delay_ms").unwrap_or(0));
    let first_delay = Duration::from_millis(num("first_chunk_delay_ms").unwrap_or(0));
    // `fault_keys`: only these keys (bearer tokens) see the fault, so a retry on
    // another key succeeds.
    let faulty_key = match d.get("fault_keys").and_then(Value::as_array) {
        Some(keys) => keys.iter().any(|k| k.as_str() == Some(key)),
        None => true,
    };
    let fault = d
        .get("stream_fault")
        .and_then(Value::as_str)
        .filter(|_| faulty_key)
        .unwrap_or("");
    let fault_after = num("fault_after").unwrap_or(0) as usize;
    let include_usage = req
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model");
    let (reply, p, c) = reply_of(ep, req);
    let parts = pieces(
        &reply,
        num("stream_chunks").unwrap_or(4).clamp(1, 100_000) as usize,
    );
    let created = unix_now();
    let chat = ep == Endpoint::Chat;
    let id = format!("{}-{n}", if chat { "chatcmpl" } else { "cmpl" });
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = |choice: Value| json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
    let mut seq = 0u64;
    let mut event = |data: &str| {
        let mut e = String::new();
        if fields {
            e.push_str(&format!("event: chunk{nl}id: {seq}{nl}"));
        }
        seq += 1;
        if multiline && data.starts_with('{') {
            // JSON may break between tokens: `{` alone, then the rest.
            e.push_str(&format!("data: {{{nl}data: {}{nl}", &data[1..]));
        } else {
            e.push_str(&format!("data: {data}{nl}"));
        }
        e.push_str(nl);
        Bytes::from(e)
    };
    let mut steps: VecDeque<(Duration, Bytes)> = VecDeque::new();
    for _ in 0..num("comments").unwrap_or(0) {
        steps.push_back((
            chunk_delay,
            Bytes::from(format!(": OPENROUTER PROCESSING{nl}{nl}")),
        ));
    }
    let mut end = End::Finish;
    let role = if chat {
        chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}),
        )
    } else {
        chunk(json!({"index": 0, "text": "", "finish_reason": null}))
    };
    let fault_event = |steps: &mut VecDeque<(Duration, Bytes)>,
                       end: &mut End,
                       event: &mut dyn FnMut(&str) -> Bytes| {
        match fault {
            "truncate" => {}
            "abort" => *end = End::Abort,
            "stall" => *end = End::Stall,
            "malformed" => {
                steps.push_back((chunk_delay, event("{\"id\": \"broken\", \"choices\": [")))
            }
            "huge_line" => {
                let size = num("huge_line_bytes").unwrap_or(1 << 20) as usize;
                let mut line = b"data: ".to_vec();
                line.resize(size + 6, b'a');
                steps.push_back((chunk_delay, Bytes::from(line)));
                *end = End::Stall;
            }
            _ => {
                // OpenRouter's mid-stream error: an `error` object and finish_reason "error".
                let code = num("error_code").unwrap_or(502);
                let mut v = if chat {
                    chunk(json!({"index": 0, "delta": {"content": ""}, "finish_reason": "error"}))
                } else {
                    chunk(json!({"index": 0, "text": "", "finish_reason": "error"}))
                };
                v["error"] = json!({"code": code, "message": "Provider disconnected unexpectedly"});
                steps.push_back((chunk_delay, event(&v.to_string())));
                steps.push_back((Duration::ZERO, event("[DONE]")));
            }
        }
    };
    if !fault.is_empty() && fault_after == 0 {
        fault_event(&mut steps, &mut end, &mut event);
    } else {
        steps.push_back((
            if steps.is_empty() {
                Duration::ZERO
            } else {
                chunk_delay
            },
            event(&role.to_string()),
        ));
        let mut faulted = false;
        for (i, part) in parts.iter().enumerate() {
            if !fault.is_empty() && i == fault_after {
                fault_event(&mut steps, &mut end, &mut event);
                faulted = true;
                break;
            }
            let v = if chat {
                chunk(json!({"index": 0, "delta": {"content": part}, "finish_reason": null}))
            } else {
                chunk(json!({"index": 0, "text": part, "finish_reason": null}))
            };
            let delay = if i == 0 {
                first_delay.max(chunk_delay)
            } else {
                chunk_delay
            };
            steps.push_back((delay, event(&v.to_string())));
        }
        if !fault.is_empty() && !faulted {
            fault_event(&mut steps, &mut end, &mut event);
            faulted = true;
        }
        if !faulted {
            let last = if chat {
                chunk(json!({"index": 0, "delta": {}, "finish_reason": "stop"}))
            } else {
                chunk(json!({"index": 0, "text": "", "finish_reason": "stop"}))
            };
            steps.push_back((chunk_delay, event(&last.to_string())));
            if include_usage {
                let mut u = json!({"id": id, "object": object, "created": created, "model": model, "choices": [],
                    "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}});
                // OpenRouter reports the cost in the last chunk's usage.
                if let Some(cost) = charge(shared, key) {
                    u["usage"]["cost"] = json!(cost);
                }
                steps.push_back((Duration::ZERO, event(&u.to_string())));
            }
            steps.push_back((Duration::ZERO, event("[DONE]")));
        }
    }
    guard.status = 200;
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .header("x-request-id", format!("req-{n}"));
    for (k, v) in extra_headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(MockBody::steps(steps, end, Some(guard)))
        .unwrap_or_else(|_| Response::new(MockBody::full(error_json(500, "bad header"), None)))
}

/// Builds a response; the guard records `status` and ends the request when the body is
/// complete.
fn respond(
    n: u64,
    status: u16,
    body: Bytes,
    plan: Option<&Plan>,
    mut guard: InFlight,
) -> Response<MockBody> {
    guard.status = status;
    let mut b = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .header("x-request-id", format!("req-{n}"));
    let mut slow = None;
    if let Some(p) = plan {
        if let Some(ms) = p.retry_after_ms {
            guard.retry_after_ms = Some(ms);
            b = b.header("retry-after-ms", ms.to_string());
            if p.retry_after_raw.is_none() {
                b = b.header("retry-after", ms.div_ceil(1000).to_string());
            }
        }
        if let Some(raw) = &p.retry_after_raw {
            b = b.header("retry-after", raw.as_str());
        }
        for (k, v) in &p.ratelimit {
            b = b.header(k.as_str(), v.as_str());
        }
        if let Some(sr) = p.should_retry {
            b = b.header("x-should-retry", if sr { "true" } else { "false" });
        }
        slow = p.slow_body;
    }
    let body = match slow {
        Some(d) => MockBody::chunked(body, 4, Some(d), Some(guard)),
        None => MockBody::full(body, Some(guard)),
    };
    b.body(body).unwrap_or_else(|_| {
        let mut r = Response::new(MockBody::full(error_json(500, "bad header"), None));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

fn as_u64(v: &Value, k: &str) -> Option<u64> {
    v.get(k).and_then(Value::as_u64)
}

fn as_bool(v: &Value, k: &str) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or(false)
}

/// Decides what to do with a request of `key` carrying the body `req` (if it parsed).
fn plan(shared: &Shared, key: &str, req: Option<&Value>) -> Plan {
    let mut c = shared.control.lock();
    let crate::server::Control {
        cfg, rng, rules, ..
    } = &mut *c;
    let mut delay = cfg.latency_ms;
    let mut rule_status = None;
    let mut rule_retry = None;
    let mut rule_body = None;
    let mut rule_headers = Vec::new();
    if let Some(rs) = rules.get_mut(key) {
        if let Some(l) = rs.rule.latency_ms {
            delay = l;
        }
        let model = req.and_then(|r| r.get("model")).and_then(Value::as_str);
        let applies = rs.rule.model.as_deref().is_none_or(|m| Some(m) == model)
            && rs
                .rule
                .fail_for_ms
                .is_none_or(|ms| rs.set_at.elapsed() < Duration::from_millis(ms));
        if let (Some(s), true) = (rs.rule.always_status, applies) {
            if rs.rule.fail_first == 0 {
                rule_status = Some(s);
            } else if rs.remaining > 0 {
                rs.remaining -= 1;
                rule_status = Some(s);
            }
        }
        if rule_status.is_some() {
            rule_retry = rs.rule.retry_after_ms;
            rule_body = rs.rule.body.clone().map(Bytes::from);
            rule_headers = rs.rule.headers.clone();
        }
    }
    let range_retry = |rng: &mut fastrand::Rng| {
        let (lo, hi) = cfg.retry_after_ms;
        (hi > 0).then(|| rng.u64(lo.min(hi)..=hi))
    };
    let mut p = Plan {
        delay: Duration::ZERO,
        action: Action::Success,
        retry_after_ms: None,
        retry_after_raw: None,
        should_retry: None,
        slow_body: None,
        ratelimit: rule_headers,
        body: rule_body,
    };
    if let Some(s) = rule_status {
        p.action = Action::Status(s);
        p.retry_after_ms = rule_retry.or_else(|| if s == 429 { range_retry(rng) } else { None });
        p.delay = Duration::from_millis(delay);
        return p;
    }
    let directive = req.and_then(|r| r.get("mock")).filter(|m| m.is_object());
    if let Some(d) = directive {
        delay += as_u64(d, "delay_ms").unwrap_or(0);
        p.retry_after_ms = as_u64(d, "retry_after_ms");
        p.retry_after_raw = d.get("retry_after").and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
        p.should_retry = d.get("should_retry").and_then(Value::as_bool);
        // A scripted answer: this body (and these headers) with `status` (200 when
        // absent), as a real service documents it.
        p.body = d
            .get("body")
            .and_then(Value::as_str)
            .map(|b| Bytes::from(b.to_owned()));
        if let Some(h) = d.get("headers").and_then(Value::as_object) {
            for (k, v) in h {
                if let Some(v) = v.as_str() {
                    p.ratelimit.push((k.clone(), v.to_owned()));
                }
            }
        }
        if let Some(rl) = d.get("ratelimit").and_then(Value::as_object) {
            for (field, header) in [
                ("remaining_requests", "x-ratelimit-remaining-requests"),
                ("reset_requests", "x-ratelimit-reset-requests"),
                ("remaining_tokens", "x-ratelimit-remaining-tokens"),
                ("reset_tokens", "x-ratelimit-reset-tokens"),
            ] {
                let v = match rl.get(field) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    _ => continue,
                };
                p.ratelimit.push((header.to_owned(), v));
            }
        }
        p.action = if as_bool(d, "drop") {
            Action::Drop
        } else if as_bool(d, "malformed") {
            Action::Malformed
        } else if as_bool(d, "error_in_200") {
            Action::ErrorIn200(
                as_u64(d, "error_code")
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(502),
            )
        } else if let Some(s) = as_u64(d, "status").and_then(|s| u16::try_from(s).ok()) {
            if s == 200 && p.body.is_none() {
                Action::Success
            } else {
                Action::Status(s)
            }
        } else if p.body.is_some() {
            Action::Status(200)
        } else {
            Action::Success
        };
        if p.action == Action::Status(429)
            && p.retry_after_ms.is_none()
            && p.retry_after_raw.is_none()
        {
            p.retry_after_ms = range_retry(rng);
        }
        if as_bool(d, "slow_body") {
            p.slow_body = Some(Duration::from_millis(
                as_u64(d, "chunk_delay_ms").unwrap_or(50),
            ));
        }
        p.delay = Duration::from_millis(delay);
        return p;
    }
    if cfg.jitter_ms > 0 {
        delay += rng.u64(0..=cfg.jitter_ms);
    }
    if cfg.slow_rate > 0.0 && rng.f64() < cfg.slow_rate {
        delay += cfg.slow_ms;
    }
    if cfg.slow_body_rate > 0.0 && rng.f64() < cfg.slow_body_rate {
        let per_chunk = if cfg.slow_ms > 0 { cfg.slow_ms / 4 } else { 50 };
        p.slow_body = Some(Duration::from_millis(per_chunk));
    }
    let r = rng.f64();
    let mut acc = 0.0;
    let table = [
        (cfg.drop_rate, Action::Drop),
        (cfg.fail_429_rate, Action::Status(429)),
        (cfg.fail_500_rate, Action::Status(500)),
        (cfg.fail_502_rate, Action::Status(502)),
        (cfg.fail_503_rate, Action::Status(503)),
        (cfg.malformed_rate, Action::Malformed),
        (cfg.error_in_200_rate, Action::ErrorIn200(502)),
    ];
    for (rate, action) in table {
        if rate <= 0.0 {
            continue;
        }
        acc += rate;
        if r < acc {
            p.action = action;
            break;
        }
    }
    if p.action == Action::Status(429) {
        p.retry_after_ms = range_retry(rng);
    }
    p.delay = Duration::from_millis(delay);
    p
}

/// The hyper service: one request in, one response (or a dropped connection) out.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    connection: u64,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Dropped> {
    let key = bearer(&req);
    let path = req.uri().path();
    if req.method() == Method::GET && (is_key_info(path) || is_models(path)) {
        let wait = shared.control.lock().cfg.info_latency_ms;
        if wait > 0 {
            shared.timer.sleep(Duration::from_millis(wait)).await;
        }
        return Ok(if is_models(path) {
            models(&shared, &key)
        } else {
            key_info(&shared, &key)
        });
    }
    let guard = shared.acc.begin(&key, connection);
    let n = shared.ids.fetch_add(1, Ordering::Relaxed) + 1;
    let Some(ep) = route(req.uri().path()) else {
        return Ok(respond(
            n,
            404,
            request_error(404, "not found"),
            None,
            guard,
        ));
    };
    if req.method() != Method::POST {
        return Ok(respond(
            n,
            405,
            request_error(405, "method not allowed"),
            None,
            guard,
        ));
    }
    if key.is_empty() {
        return Ok(respond(
            n,
            401,
            request_error(401, "missing API key"),
            None,
            guard,
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(respond(
                n,
                400,
                request_error(400, "unreadable request body"),
                None,
                guard,
            ));
        }
    };
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let mut guard = guard;
    guard.model = parsed
        .as_ref()
        .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_owned));
    let cap = shared.control.lock().cfg.key_capacity;
    if cap.is_some_and(|c| guard.key_in_flight > c) {
        return Ok(respond(
            n,
            429,
            error_json(429, "mock 429: over the key's capacity"),
            None,
            guard,
        ));
    }
    let (budget_headers, over_budget) = spend_budget(&shared, &key, guard.arrived);
    if over_budget {
        let plan = Plan {
            delay: Duration::ZERO,
            action: Action::Status(429),
            retry_after_ms: None,
            retry_after_raw: None,
            should_retry: None,
            slow_body: None,
            ratelimit: budget_headers,
            body: None,
        };
        return Ok(respond(
            n,
            429,
            error_json(429, "mock 429: over the key's request budget"),
            Some(&plan),
            guard,
        ));
    }
    if out_of_credit(&shared, &key) {
        return Ok(respond(
            n,
            402,
            error_json(402, "mock 402: insufficient credits"),
            None,
            guard,
        ));
    }
    let mut plan = plan(&shared, &key, parsed.as_ref());
    plan.ratelimit.extend(budget_headers);
    if !plan.delay.is_zero() {
        shared.timer.sleep(plan.delay).await;
    }
    match (&plan.action, &parsed) {
        (Action::Drop, _) => {
            drop(guard); // status 0
            Err(Dropped)
        }
        (Action::Status(s), _) => {
            let s = *s;
            let body = plan
                .body
                .clone()
                .unwrap_or_else(|| error_json(s, &format!("mock {s}")));
            Ok(respond(n, s, body, Some(&plan), guard))
        }
        (_, None) => Ok(respond(
            n,
            400,
            request_error(400, "request body is not valid JSON"),
            Some(&plan),
            guard,
        )),
        (Action::Malformed, Some(_)) => {
            let body = Bytes::from_static(
                b"{\"id\":\"chatcmpl-malformed\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":",
            );
            Ok(respond(n, 200, body, Some(&plan), guard))
        }
        (Action::ErrorIn200(code), Some(_)) => {
            let body = Bytes::from(
                json!({"error": {"code": code, "message": "upstream error"}}).to_string(),
            );
            Ok(respond(n, 200, body, Some(&plan), guard))
        }
        (Action::Success, Some(v))
            if as_bool(v, "stream") && matches!(ep, Endpoint::Chat | Endpoint::Completions) =>
        {
            Ok(sse_response(
                &shared,
                n,
                ep,
                &key,
                v,
                &plan.ratelimit,
                guard,
            ))
        }
        (Action::Success, Some(v)) => {
            let mut body = success_body(ep, n, v);
            if let Some(cost) = charge(&shared, &key)
                && let Ok(mut b) = serde_json::from_slice::<Value>(&body)
            {
                b["usage"]["cost"] = json!(cost);
                body = Bytes::from(b.to_string());
            }
            Ok(respond(n, 200, body, Some(&plan), guard))
        }
    }
}
