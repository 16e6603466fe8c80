//! Reading what a server sent, without trusting it: the shape of a 2xx body (is it a
//! success at all?), token usage, the human message of an error body in its common
//! shapes, and masking of secrets (API keys, URL passwords) in server-provided text.
//!
//! Everything here is total: no input panics, allocates without bound beyond the body
//! itself, or produces an unbounded message.

use serde_json::Value;

use crate::config::Config;
use crate::json_scan;
use crate::request::Usage;

/// Largest token count read from a `usage` field: larger values saturate here, so the
/// sum of two never overflows and per-key counters grow by a bounded amount per
/// response.
pub(crate) const MAX_USAGE_TOKENS: u64 = u32::MAX as u64;

/// Longest message taken from a JSON error body, in bytes (plus an ellipsis).
const JSON_MESSAGE_MAX: usize = 500;
/// Longest message taken from a plain-text or HTML body, in bytes (plus an ellipsis).
const TEXT_MESSAGE_MAX: usize = 200;
/// Longest `error.metadata.raw` (OpenRouter) quoted in a message.
const METADATA_MAX: usize = 200;

// ---------------------------------------------------------------------------------
// 2xx bodies
// ---------------------------------------------------------------------------------

/// Why a 2xx response is not a success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// `{"error": …}` inside the 2xx body (OpenRouter does this); the numeric
    /// `error.code` when it is a plausible HTTP status.
    Embedded(Option<u16>),
    /// The body is not what the endpoint answers: not JSON, or a chat completion
    /// without a `choices` array. Says what is wrong.
    Invalid(String),
    /// A choice failed (OpenRouter documents `choices[].error` and `finish_reason:
    /// "error"`): its numeric `error.code` when plausible, and the error as
    /// `{"error": …}` JSON (for its message and the blame table).
    ChoiceFailed(Option<u16>, Vec<u8>),
}

/// Judges a 2xx body for a request to `path`: its usage if it is a success, else why
/// it is not.
///
/// - `text/event-stream` bodies (a streamed request) are passed through unchecked.
/// - Every other body must be valid JSON that `serde_json::Value` can hold, nested at
///   most 100 levels — no `\u` escape naming a lone surrogate, no number beyond `f64`
///   — so every success can be read back (`Response::json`; the CLI writes it as JSON
///   in its record, itself still readable); anything else is an `invalid_response`.
/// - `{"error": <non-null, non-false>}` is an error inside a 2xx.
/// - For chat completions (`…/chat/completions`) the body must be an object with a
///   `choices` array. An empty array is accepted: it is a well-formed answer (the
///   caller sees `Response::content() == None`); retrying it would re-bill a request
///   the provider considers served.
///
/// One pass of the JSON validator (`json_scan.rs`), which locates `choices`, `usage`
/// and `error`; only `usage` (and `error`, when present) is then decoded: no
/// `serde_json::Value` is built for a success.
#[cfg(test)]
pub(crate) fn inspect_success(
    body: &[u8],
    path: &str,
    content_type: Option<&str>,
) -> Result<Option<Usage>, Problem> {
    inspect_success_billed(body, path, content_type).map(|(u, _)| u)
}

/// [`inspect_success`] and the `usage.cost` (dollars, OpenRouter) of a success, when
/// present and sane (finite, non-negative, at most `credits::MAX_DOLLARS`).
pub(crate) fn inspect_success_billed(
    body: &[u8],
    path: &str,
    content_type: Option<&str>,
) -> Result<(Option<Usage>, Option<f64>), Problem> {
    if content_type.is_some_and(|c| {
        c.trim_start()
            .get(..17)
            .is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream"))
    }) {
        return Ok((None, None));
    }
    // JSON is UTF-8, and the caller parses the whole body later: `from_slice` alone
    // would not check the strings it skips (found by the `body_success` fuzz target).
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(Problem::Invalid("body is not valid UTF-8".into()));
    };
    let shape = Shape::of(text.as_bytes())
        .map_err(|e| Problem::Invalid(format!("body is not valid JSON ({e})")))?;
    if let Some(e) = &shape.error {
        return Err(Problem::Embedded(embedded_code(e)));
    }
    if let Some(r) = shape.choices_range.clone() {
        if let Some(p) = failed_choice(&body[r]) {
            return Err(p);
        }
    }
    if let Some(e) = &shape.limit {
        // JSON, but not what serde_json (so `Response::json`, the CLI's records)
        // reads: a success must be readable by every reader.
        return Err(Problem::Invalid(format!(
            "body is JSON past common reader limits ({e})"
        )));
    }
    let path = path.split(['?', '#']).next().unwrap_or(path);
    if path.ends_with("/chat/completions") {
        match shape.choices {
            Kind::Array => {}
            Kind::Missing if !shape.object => {
                return Err(Problem::Invalid(
                    "a chat completion must be a JSON object".into(),
                ));
            }
            Kind::Missing => {
                return Err(Problem::Invalid(
                    "a chat completion without a `choices` array".into(),
                ));
            }
            Kind::Other => {
                return Err(Problem::Invalid(
                    "a chat completion whose `choices` is not an array".into(),
                ));
            }
        }
    }
    Ok((shape.usage, shape.cost))
}

/// The `usage` of a body, leniently (see [`Usage`]); `None` if the body is not JSON or
/// has no `usage` object.
pub(crate) fn parse_usage(body: &[u8]) -> Option<Usage> {
    Shape::of(body).ok()?.usage
}

pub(crate) fn embedded_code(e: &Value) -> Option<u16> {
    e.get("code")
        .and_then(|c| {
            c.as_u64()
                .or_else(|| c.as_str().and_then(|s| s.trim().parse().ok()))
        })
        .filter(|c| (100..600).contains(c))
        .map(|c| c as u16)
}

/// What a body's top-level `choices` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Missing,
    Array,
    Other,
}

/// A failed choice in a `choices` array's bytes, if any. Only an array that holds the
/// text `"error"` (an `error` member or an `"error"` finish reason) is decoded: a
/// success pays one byte search.
fn failed_choice(choices: &[u8]) -> Option<Problem> {
    const NEEDLE: &[u8] = b"\"error\"";
    choices.windows(NEEDLE.len()).position(|w| w == NEEDLE)?;
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(choices) else {
        return None;
    };
    for c in &items {
        let err = c
            .get("error")
            .filter(|e| !matches!(e, Value::Null | Value::Bool(false)));
        let finish_error = c.get("finish_reason").and_then(Value::as_str) == Some("error");
        if err.is_none() && !finish_error {
            continue;
        }
        let code = err.and_then(embedded_code);
        let e = err.cloned().unwrap_or_else(
            || serde_json::json!({"message": "a choice ended with finish_reason \"error\""}),
        );
        let wrapped = serde_json::to_vec(&serde_json::json!({ "error": e })).unwrap_or_default();
        return Some(Problem::ChoiceFailed(code, wrapped));
    }
    None
}

/// What a 2xx body looks like, read in one pass.
struct Shape {
    object: bool,
    choices: Kind,
    /// Where the top-level `choices` value is, when it is an array.
    choices_range: Option<std::ops::Range<usize>>,
    usage: Option<Usage>,
    /// `usage.cost`, when a sane number.
    cost: Option<f64>,
    /// A top-level `error` that is not `null` or `false`.
    error: Option<Value>,
    /// Where the body passes the limits of a value every reader holds (deeper than
    /// 100 levels, a lone surrogate escape, a number beyond `f64`), if it does.
    limit: Option<json_scan::Invalid>,
}

impl Shape {
    /// One pass of [`json_scan::scan_value`] over `body` (which it validates), then
    /// serde_json on the few bytes of `usage` and `error`, when present. Duplicate
    /// keys: the last one wins, as in most JSON readers.
    fn of(body: &[u8]) -> Result<Shape, json_scan::Invalid> {
        let (mut choices, mut usage, mut error) = (Kind::Missing, None, None);
        let mut choices_range = None;
        let (top, limit) = json_scan::scan_value(body, |key, value| match top_field(key) {
            Field::Choices => {
                choices = if body[value.start] == b'[' {
                    choices_range = Some(value.clone());
                    Kind::Array
                } else {
                    choices_range = None;
                    Kind::Other
                }
            }
            Field::Usage => usage = Some(value),
            Field::Error => error = Some(value),
            Field::Other => {}
        })?;
        // Already known to be JSON: serde_json can only refuse an `error` it reads
        // more strictly than a validator (a number beyond f64, a lone surrogate in
        // a string); it is still an error.
        let (usage, cost) = usage.map_or((None, None), |r| usage_of(&body[r]));
        let error = error.and_then(|r| {
            let v = serde_json::from_slice::<Value>(&body[r]).unwrap_or(Value::Bool(true));
            (!matches!(v, Value::Null | Value::Bool(false))).then_some(v)
        });
        Ok(Shape {
            object: top == json_scan::Top::Object,
            choices,
            choices_range,
            usage,
            cost,
            error,
            limit,
        })
    }
}

/// Top-level keys that matter; everything else is skipped.
enum Field {
    Choices,
    Usage,
    Error,
    Other,
}

/// Which [`Field`] a top-level key names.
fn top_field(key: json_scan::Key<'_>) -> Field {
    if key_is(key, "choices") {
        Field::Choices
    } else if key_is(key, "usage") {
        Field::Usage
    } else if key_is(key, "error") {
        Field::Error
    } else {
        Field::Other
    }
}

/// A `usage` value (already validated): an object with lenient counts and its sane
/// `cost`, or anything else (no usage).
fn usage_of(v: &[u8]) -> (Option<Usage>, Option<f64>) {
    if v.first() != Some(&b'{') {
        return (None, None);
    }
    let (mut prompt, mut completion, mut cost) = (None, None, None);
    // Cannot fail: the whole body was validated, and this is one of its values.
    let _ = json_scan::scan(v, |key, r| {
        if key_is(key, "prompt_tokens") {
            prompt = Some(r);
        } else if key_is(key, "completion_tokens") {
            completion = Some(r);
        } else if key_is(key, "cost") {
            cost = Some(r);
        }
    });
    let usage = Usage {
        prompt_tokens: prompt.map_or(0, |r| count(&v[r])),
        completion_tokens: completion.map_or(0, |r| count(&v[r])),
    };
    // Anything but a sane number is ignored.
    let cost = cost
        .filter(|r| matches!(v[r.start], b'-' | b'0'..=b'9'))
        .and_then(|r| std::str::from_utf8(&v[r]).ok()?.parse::<f64>().ok())
        .and_then(crate::credits_config::dollars);
    (Some(usage), cost)
}

/// Whether a member's key is `name`.
fn key_is(key: json_scan::Key<'_>, name: &str) -> bool {
    if key.escaped {
        unescape(key.raw).is_some_and(|k| k == name)
    } else {
        key.raw == name.as_bytes()
    }
}

/// The text of a raw JSON string (between its quotes); `None` for an escape that
/// names no character (a lone surrogate).
fn unescape(raw: &[u8]) -> Option<String> {
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    serde_json::from_slice::<String>(&quoted).ok()
}

/// A token count as a server may send it (`v`: one valid JSON value): clamped to
/// `0..=MAX_USAGE_TOKENS`; negative numbers and anything that is not a number (or a
/// numeric string) read as 0; fractions are truncated; an integer beyond `u64` (or a
/// number beyond `f64`) reads as the cap.
fn count(v: &[u8]) -> u64 {
    let text = match v.first() {
        Some(b'"') => {
            let raw = &v[1..v.len() - 1];
            let owned;
            let s = if raw.contains(&b'\\') {
                owned = unescape(raw).unwrap_or_default();
                owned.as_str()
            } else {
                std::str::from_utf8(raw).unwrap_or("")
            };
            return count_of_text(s.trim());
        }
        Some(b'-' | b'0'..=b'9') => std::str::from_utf8(v).unwrap_or(""),
        _ => return 0,
    };
    if text.starts_with('-') {
        0
    } else if text.bytes().all(|c| c.is_ascii_digit()) {
        text.parse::<u64>()
            .map_or(MAX_USAGE_TOKENS, |n| n.min(MAX_USAGE_TOKENS))
    } else {
        text.parse::<f64>().map_or(0, count_of_f64)
    }
}

/// A numeric string's count: an integer, else a float, else 0.
fn count_of_text(s: &str) -> u64 {
    match s.parse::<u64>() {
        Ok(v) => v.min(MAX_USAGE_TOKENS),
        Err(_) => s.parse::<f64>().map(count_of_f64).unwrap_or(0),
    }
}

fn count_of_f64(v: f64) -> u64 {
    if v.is_nan() || v <= 0.0 {
        0
    } else {
        v.min(MAX_USAGE_TOKENS as f64) as u64
    }
}

// ---------------------------------------------------------------------------------
// Error messages
// ---------------------------------------------------------------------------------

/// The human message of an error body, in every common shape:
///
/// - OpenAI / Anthropic `{"error": {"message", "type", "code"}}`; OpenRouter adds
///   `error.metadata` (`provider_name`, `raw`), quoted briefly after the message;
/// - `{"error": "text"}`;
/// - vLLM / Mistral `{"object": "error", "message": …}` and plain `{"message": …}`;
/// - FastAPI `{"detail": "…"}` and `{"detail": [{"loc": […], "msg": …}, …]}`;
/// - a JSON array of one of these (some gateways wrap errors in a list);
/// - plain text, or HTML from a proxy (its `<title>`, else its text without tags).
///
/// Whitespace and control characters are collapsed to single spaces and the result is
/// truncated (500 bytes for JSON messages, 200 for text) with an ellipsis. Empty when
/// the body is empty.
pub(crate) fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(m) = json_message(&v, 0) {
            let m = clean(&m, JSON_MESSAGE_MAX);
            if !m.is_empty() {
                return m;
            }
        }
        // JSON of no known shape: show it compactly.
        return clean(&v.to_string(), TEXT_MESSAGE_MAX);
    }
    text_message(body)
}

/// A plain-text or HTML body as a short one-line message.
pub(crate) fn text_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let t = text.trim_start();
    let looks_html = t.starts_with('<')
        && (t.len() < 5 || {
            let head = t.get(..t.len().min(512)).unwrap_or("").to_ascii_lowercase();
            head.contains("<html")
                || head.contains("<!doctype")
                || head.contains("<head")
                || head.contains("<body")
                || head.contains("<title")
                || head.contains("<h1")
        });
    if looks_html {
        if let Some(title) = html_title(t) {
            let title = clean(&decode_entities(&title), TEXT_MESSAGE_MAX);
            if !title.is_empty() {
                return title;
            }
        }
        return clean(&decode_entities(&strip_tags(t)), TEXT_MESSAGE_MAX);
    }
    clean(t, TEXT_MESSAGE_MAX)
}

fn json_message(v: &Value, depth: u8) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) if depth == 0 => items.first().and_then(|f| json_message(f, 1)),
        Value::Object(o) => {
            if let Some(e) = o
                .get("error")
                .filter(|e| !matches!(e, Value::Null | Value::Bool(false)))
            {
                return Some(match e {
                    Value::String(s) => s.clone(),
                    Value::Object(_) => error_object_message(e),
                    other => other.to_string(),
                });
            }
            if let Some(d) = o.get("detail").filter(|d| !d.is_null()) {
                return Some(match d {
                    Value::String(s) => s.clone(),
                    Value::Array(items) => fastapi_details(items),
                    Value::Object(_) => str_field(d, "msg")
                        .or_else(|| str_field(d, "message"))
                        .unwrap_or_else(|| d.to_string()),
                    other => other.to_string(),
                });
            }
            str_field(v, "message")
                .or_else(|| str_field(v, "msg"))
                .or_else(|| str_field(v, "error_description"))
        }
        _ => None,
    }
}

fn str_field(v: &Value, k: &str) -> Option<String> {
    v.get(k)?.as_str().map(str::to_owned)
}

/// `error.message` (or `type`/`code` when there is none), plus OpenRouter's
/// `metadata.provider_name` and `metadata.raw`, briefly.
fn error_object_message(e: &Value) -> String {
    let mut m = match e.get("message") {
        Some(Value::String(s)) => s.clone(),
        Some(m) if !m.is_null() => m.to_string(),
        _ => {
            let kind = str_field(e, "type");
            let code = e.get("code").filter(|c| !c.is_null()).map(|c| match c {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
            match (kind, code) {
                (Some(k), Some(c)) => format!("{k} ({c})"),
                (Some(k), None) => k,
                (None, Some(c)) => c,
                (None, None) => e.to_string(),
            }
        }
    };
    if let Some(meta) = e.get("metadata").filter(|m| m.is_object()) {
        let provider = str_field(meta, "provider_name");
        let raw = meta.get("raw").filter(|r| !r.is_null()).map(|r| {
            let raw = match r {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            clean(&raw, METADATA_MAX)
        });
        match (provider, raw) {
            (Some(p), Some(r)) => m.push_str(&format!(" (provider {p}: {r})")),
            (Some(p), None) => m.push_str(&format!(" (provider {p})")),
            (None, Some(r)) => m.push_str(&format!(" ({r})")),
            (None, None) => {}
        }
    }
    m
}

/// FastAPI validation errors: `loc.path: msg; …`, the first three and a count.
fn fastapi_details(items: &[Value]) -> String {
    let mut parts = Vec::new();
    for item in items.iter().take(3) {
        let msg = str_field(item, "msg")
            .or_else(|| str_field(item, "message"))
            .unwrap_or_else(|| item.to_string());
        let loc = item.get("loc").and_then(Value::as_array).map(|l| {
            l.iter()
                .map(|p| match p {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(".")
        });
        parts.push(match loc {
            Some(l) if !l.is_empty() => format!("{l}: {msg}"),
            _ => msg,
        });
    }
    let mut s = parts.join("; ");
    if items.len() > 3 {
        s.push_str(&format!(" (+{} more)", items.len() - 3));
    }
    s
}

fn html_title(html: &str) -> Option<String> {
    let lower = html.to_ascii_lowercase();
    let start = lower.find("<title")?;
    let open_end = start + lower[start..].find('>')? + 1;
    let close = open_end + lower[open_end..].find("</title")?;
    html.get(open_end..close).map(str::to_owned)
}

/// Text of an HTML document: tags removed, `<script>`/`<style>` contents dropped.
fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len().min(4096));
    let lower = html.to_ascii_lowercase();
    let mut i = 0;
    let bytes = html.as_bytes();
    while i < bytes.len() && out.len() < 4 * TEXT_MESSAGE_MAX {
        if bytes[i] == b'<' {
            let rest = &lower[i..];
            let skip_to = if rest.starts_with("<script") {
                rest.find("</script").map(|e| i + e)
            } else if rest.starts_with("<style") {
                rest.find("</style").map(|e| i + e)
            } else {
                Some(i)
            };
            let from = skip_to.unwrap_or(bytes.len());
            match lower[from.min(lower.len())..].find('>') {
                Some(e) => i = from + e + 1,
                None => break,
            }
            out.push(' ');
        } else {
            let next = lower[i..].find('<').map_or(bytes.len(), |e| i + e);
            out.push_str(&html[i..next]);
            i = next;
        }
    }
    out
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    s.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&amp;", "&")
}

/// One line: control characters and runs of whitespace become one space, trimmed, cut
/// at `max` bytes (on a character boundary) with an ellipsis.
pub(crate) fn clean(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max + 4));
    let mut space = false;
    for c in s.chars() {
        if c.is_whitespace() || c.is_control() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        if out.len() + c.len_utf8() > max {
            out.push('…');
            return out;
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------

/// Replaces every occurrence of a set of secrets in server-provided text.
///
/// Built on the error path only (a success body goes to the caller, who owns the key,
/// unchanged). Patterns are sorted; a byte-pair filter skips most positions, and a
/// binary search finds the longest secret starting at the others, so the cost is about
/// linear in the text whatever the number of keys.
pub(crate) struct Masker {
    /// (secret, replacement), sorted by secret, no empty secrets.
    pats: Vec<(Vec<u8>, String)>,
    /// Bit `a*256+b` set when some secret starts with bytes `a b`.
    pairs: Vec<u64>,
    /// Byte `a` is a whole one-byte secret.
    singles: [bool; 256],
}

impl Masker {
    /// A masker for `(secret, replacement)` pairs; empty secrets are ignored.
    pub(crate) fn new(secrets: impl IntoIterator<Item = (String, String)>) -> Masker {
        let mut pats: Vec<(Vec<u8>, String)> = secrets
            .into_iter()
            .filter(|(s, _)| !s.is_empty())
            .map(|(s, r)| (s.into_bytes(), r))
            .collect();
        pats.sort_by(|a, b| a.0.cmp(&b.0));
        pats.dedup_by(|a, b| a.0 == b.0);
        let mut pairs = vec![0u64; 65536 / 64];
        let mut singles = [false; 256];
        for (p, _) in &pats {
            if p.len() == 1 {
                singles[p[0] as usize] = true;
            } else {
                let i = (p[0] as usize) << 8 | p[1] as usize;
                pairs[i / 64] |= 1 << (i % 64);
            }
        }
        Masker {
            pats,
            pairs,
            singles,
        }
    }

    /// Every secret a pool's configuration holds: each key (and its JSON-escaped form,
    /// if different), replaced by `[REDACTED:<label>]`; the password (or, without one,
    /// the user) of every base URL's userinfo, raw and percent-decoded, replaced by
    /// `[REDACTED]`.
    pub(crate) fn for_config(config: &Config) -> Masker {
        let mut secrets = Vec::with_capacity(config.keys.len() + 2);
        for (i, k) in config.keys.iter().enumerate() {
            let key = k.key.expose();
            // Validation rejects a label holding a key, but it masks its own error with
            // this masker: such a label must not stand in for anything.
            let label = config.key_label(i);
            let rep = if config.keys.iter().any(|o| {
                let o = o.key.expose();
                !o.is_empty() && label.contains(o)
            }) {
                "[REDACTED]".to_owned()
            } else {
                format!("[REDACTED:{label}]")
            };
            // As a JSON string may carry it: `"` and `\` escaped, `/` maybe as `\/`.
            let json = serde_json::to_string(key).unwrap_or_default();
            let json = json.get(1..json.len().saturating_sub(1)).unwrap_or("");
            for variant in [json.to_owned(), json.replace('/', "\\/")] {
                if variant != key {
                    secrets.push((variant, rep.clone()));
                }
            }
            secrets.push((key.to_owned(), rep));
        }
        let urls = std::iter::once(config.base_url.as_str())
            .chain(config.keys.iter().filter_map(|k| k.base_url.as_deref()));
        for url in urls {
            for s in url_secrets(url) {
                secrets.push((s, "[REDACTED]".to_owned()));
            }
        }
        Masker::new(secrets)
    }

    /// The longest secret starting at `t`'s beginning, if any.
    fn match_at(&self, t: &[u8]) -> Option<usize> {
        if t.len() >= 2 {
            let i = (t[0] as usize) << 8 | t[1] as usize;
            if self.pairs[i / 64] & (1 << (i % 64)) != 0 {
                if let Some(n) = self.longest_prefix(t) {
                    return Some(n);
                }
            }
        }
        self.singles[t[0] as usize].then(|| {
            self.pats
                .binary_search_by(|(p, _)| p.as_slice().cmp(&t[..1]))
                .unwrap_or(0)
        })
    }

    /// Index of the longest pattern that is a prefix of `t`.
    fn longest_prefix(&self, t: &[u8]) -> Option<usize> {
        // Patterns that are prefixes of `t` all sort at or before `t`; the longest of
        // them is the last such. Walk back, narrowing to the common prefix each time.
        let mut hi = self.pats.partition_point(|(p, _)| p.as_slice() <= t);
        while hi > 0 {
            let (p, _) = &self.pats[hi - 1];
            if t.starts_with(p) {
                return Some(hi - 1);
            }
            let lcp = p.iter().zip(t).take_while(|(a, b)| a == b).count();
            if lcp < 2 {
                return None;
            }
            let bound = &t[..lcp];
            hi = self.pats[..hi - 1].partition_point(|(p, _)| p.as_slice() <= bound);
        }
        None
    }

    /// `text` with every secret replaced, or `None` when it holds none (no copy).
    pub(crate) fn mask_bytes(&self, text: &[u8]) -> Option<Vec<u8>> {
        if self.pats.is_empty() {
            return None;
        }
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        let mut i = 0;
        while i < text.len() {
            match self.match_at(&text[i..]) {
                Some(idx) => {
                    let (p, rep) = &self.pats[idx];
                    let o = out.get_or_insert_with(|| Vec::with_capacity(text.len()));
                    o.extend_from_slice(&text[copied..i]);
                    o.extend_from_slice(rep.as_bytes());
                    i += p.len();
                    copied = i;
                }
                None => i += 1,
            }
        }
        let mut o = out?;
        o.extend_from_slice(&text[copied..]);
        Some(o)
    }

    /// `text` with every secret replaced.
    pub(crate) fn mask_str(&self, text: String) -> String {
        match self.mask_bytes(text.as_bytes()) {
            // Secrets and replacements are whole UTF-8 strings, so the result is too.
            Some(b) => String::from_utf8(b)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            None => text,
        }
    }
}

/// The secrets in a URL's userinfo (`scheme://user:password@host`): the password, or
/// the user when there is no password (a token used as user name), raw and
/// percent-decoded.
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let Some((_, rest)) = url.split_once("://") else {
        return Vec::new();
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return Vec::new();
    };
    let secret = match userinfo.split_once(':') {
        Some((_, pass)) => pass,
        None => userinfo,
    };
    let mut out = Vec::new();
    if !secret.is_empty() {
        out.push(secret.to_owned());
        let decoded = percent_decode(secret);
        if decoded != secret && !decoded.is_empty() {
            out.push(decoded);
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "/chat/completions";

    #[test]
    fn success_shapes() {
        let ok = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
        assert_eq!(
            inspect_success(ok, CHAT, None),
            Ok(Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 2
            }))
        );
        assert_eq!(inspect_success(br#"{"choices":[]}"#, CHAT, None), Ok(None));
        assert_eq!(
            inspect_success(
                br#"{"choices":[], "error": null}"#,
                "/v1/chat/completions?x=1",
                None
            ),
            Ok(None)
        );
        for bad in [
            &b"{}"[..],
            b"[]",
            b"42",
            b"\"text\"",
            br#"{"choices": null}"#,
            br#"{"choices": {"0": 1}}"#,
            b"",
            b"<html><body>502</body></html>",
            br#"{"id":"x","choices":[{"message":"#,
            b"{\"choices\":[]} trailing",
            // Invalid UTF-8 in a string the one-pass reader skips (fuzz corpus
            // body_success/invalid-utf8-in-skipped-string).
            b"{\"choices\":[],\"x\":{\"a\xff\x91\":1}}",
            b"{\"choices\":[\"\xc3\"]}",
        ] {
            assert!(
                matches!(inspect_success(bad, CHAT, None), Err(Problem::Invalid(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // JSON that serde_json cannot read into a `Value` is no success either.
        let nested = |d: usize| {
            format!(
                "{{\"choices\":[],\"x\":{}{}}}",
                "[".repeat(d),
                "]".repeat(d)
            )
        };
        // 100 levels with the top-level object: accepted; 101: refused.
        assert_eq!(inspect_success(nested(99).as_bytes(), CHAT, None), Ok(None));
        let deeper = nested(100);
        for bad in [
            deeper.as_str(),
            r#"{"choices":[{"message":{"content":"\ud800"}}]}"#,
            r#"{"choices":[],"n":1e400}"#,
        ] {
            match inspect_success(bad.as_bytes(), CHAT, None) {
                Err(Problem::Invalid(why)) => {
                    assert!(
                        why.starts_with("body is JSON past common reader limits"),
                        "{why}"
                    )
                }
                other => panic!("{other:?} for {bad:.40}"),
            }
        }
        // Other endpoints: valid JSON of any shape.
        assert_eq!(inspect_success(b"{}", "/embeddings", None), Ok(None));
        assert_eq!(inspect_success(b"[1]", "/completions", None), Ok(None));
        assert!(matches!(
            inspect_success(b"<html>", "/embeddings", None),
            Err(Problem::Invalid(_))
        ));
        // A stream is not JSON and is not checked.
        assert_eq!(
            inspect_success(
                b"data: {}\n\n",
                CHAT,
                Some("text/event-stream; charset=utf-8")
            ),
            Ok(None)
        );
        // Errors inside a 2xx.
        assert_eq!(
            inspect_success(br#"{"error":{"code":502,"message":"x"}}"#, CHAT, None),
            Err(Problem::Embedded(Some(502)))
        );
        assert_eq!(
            inspect_success(br#"{"error":{"code":"429"}}"#, CHAT, None),
            Err(Problem::Embedded(Some(429)))
        );
        assert_eq!(
            inspect_success(br#"{"error":"boom","choices":[]}"#, CHAT, None),
            Err(Problem::Embedded(None))
        );
        assert_eq!(
            inspect_success(br#"{"error":{"code":99999}}"#, CHAT, None),
            Err(Problem::Embedded(None))
        );
        assert_eq!(
            inspect_success(br#"{"error":false,"choices":[]}"#, CHAT, None),
            Ok(None)
        );
    }

    #[test]
    fn keys_are_matched_after_their_escapes_and_the_last_duplicate_wins() {
        let body = br#"{"ch\u006fices":[],"usage":{"prompt_tokens":1},"us\u0061ge":{"prompt\u005ftokens":7,"completion_tokens":"2","completion_tokens":3,"cost":0.25}}"#;
        let (usage, cost) = inspect_success_billed(body, CHAT, None).unwrap();
        let u = usage.unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (7, 3));
        assert_eq!(cost, Some(0.25));
        // A key whose escape names no character matches nothing; no reader holds it
        // as a value, so it is no success.
        let body = br#"{"choices":[],"\ud800usage":{"prompt_tokens":1}}"#;
        assert!(matches!(
            inspect_success(body, CHAT, None),
            Err(Problem::Invalid(m)) if m.contains("lone surrogate")
        ));
        assert_eq!(parse_usage(body), None);
        // An embedded error is found through an escaped key too, and the last
        // `error` decides.
        let body = br#"{"\u0065rror":{"code":429},"choices":[]}"#;
        assert_eq!(
            inspect_success(body, CHAT, None),
            Err(Problem::Embedded(Some(429)))
        );
        let body = br#"{"error":{"code":429},"error":null,"choices":[]}"#;
        assert_eq!(inspect_success(body, CHAT, None), Ok(None));
        // An error serde_json cannot decode as a value (a number beyond f64) is
        // still an error.
        let body = br#"{"error":{"code":1e400},"choices":[]}"#;
        assert_eq!(
            inspect_success(body, CHAT, None),
            Err(Problem::Embedded(None))
        );
    }

    #[test]
    fn cost_is_read_only_when_a_sane_number() {
        for (v, want) in [
            ("0.5", Some(0.5)),
            ("0", Some(0.0)),
            ("-1", None),
            ("\"0.5\"", None),
            ("null", None),
            ("[0.5]", None),
        ] {
            let body = format!(r#"{{"choices":[],"usage":{{"cost":{v}}}}}"#);
            let (_, cost) = inspect_success_billed(body.as_bytes(), CHAT, None).unwrap();
            assert_eq!(cost, want, "{v}");
        }
    }

    #[test]
    fn usage_is_bounded_whatever_the_server_sends() {
        let cases: [(&str, u64); 16] = [
            ("18446744073709551615", MAX_USAGE_TOKENS),
            ("1e300", MAX_USAGE_TOKENS),
            ("-0", 0),
            ("\"  9 \"", 9),
            ("111111111111111111111111111", MAX_USAGE_TOKENS),
            ("-5", 0),
            ("-1e300", 0),
            ("12.9", 12),
            ("\"17\"", 17),
            ("\"1e300\"", MAX_USAGE_TOKENS),
            ("\"-3\"", 0),
            ("\"many\"", 0),
            ("null", 0),
            ("true", 0),
            ("[1,2]", 0),
            ("{\"a\":1}", 0),
        ];
        for (v, want) in cases {
            let body = format!(
                r#"{{"choices":[],"usage":{{"prompt_tokens":{v},"completion_tokens":{v},"total_tokens":{v}}}}}"#
            );
            let u = inspect_success(body.as_bytes(), CHAT, None)
                .unwrap_or_else(|e| panic!("{v}: {e:?}"))
                .unwrap();
            assert_eq!((u.prompt_tokens, u.completion_tokens), (want, want), "{v}");
            assert_eq!(parse_usage(body.as_bytes()), Some(u));
            // The sum the pool computes cannot overflow.
            let _ = u.prompt_tokens + u.completion_tokens;
        }
        // Beyond f64: valid JSON, but no success (no reader holds it); the lenient
        // reader still bounds it.
        let body = r#"{"choices":[],"usage":{"prompt_tokens":1e400,"completion_tokens":2}}"#;
        assert!(matches!(
            inspect_success(body.as_bytes(), CHAT, None),
            Err(Problem::Invalid(_))
        ));
        assert_eq!(
            parse_usage(body.as_bytes()).map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((MAX_USAGE_TOKENS, 2))
        );
        for usage in ["null", "\"x\"", "[1]", "5"] {
            let body = format!(r#"{{"choices":[],"usage":{usage}}}"#);
            assert_eq!(
                inspect_success(body.as_bytes(), CHAT, None),
                Ok(None),
                "{usage}"
            );
        }
    }

    #[test]
    fn error_message_shapes() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
                "Rate limit reached",
            ),
            (
                r#"{"error":{"code":502,"message":"Provider returned error","metadata":{"provider_name":"Acme","raw":"{\"detail\":\"overloaded\"}"}}}"#,
                r#"Provider returned error (provider Acme: {"detail":"overloaded"})"#,
            ),
            (
                r#"{"error":{"code":403,"message":"Flagged","metadata":{"reasons":["x"]}}}"#,
                "Flagged",
            ),
            (
                r#"{"object":"error","message":"model not found","type":"NotFoundError","code":404}"#,
                "model not found",
            ),
            (r#"{"detail":"Not authenticated"}"#, "Not authenticated"),
            (
                r#"{"detail":[{"loc":["body","messages",0],"msg":"field required","type":"missing"},{"loc":["body","model"],"msg":"bad"}]}"#,
                "body.messages.0: field required; body.model: bad",
            ),
            (r#"{"message":"Too many requests"}"#, "Too many requests"),
            (r#"{"error":"invalid api key"}"#, "invalid api key"),
            (
                r#"[{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED"}}]"#,
                "Resource exhausted",
            ),
            (
                r#"{"error":{"type":"overloaded_error","code":"529"}}"#,
                "overloaded_error (529)",
            ),
            (
                "upstream connect error\n\n  or disconnect",
                "upstream connect error or disconnect",
            ),
            (
                "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>",
                "502 Bad Gateway",
            ),
            (
                "<!DOCTYPE html><html><body><script>var x='<b>';</script><h1>Service &amp; co\n unavailable</h1></body></html>",
                "Service & co unavailable",
            ),
            ("", ""),
            (r#"{"weird":[1,2]}"#, r#"{"weird":[1,2]}"#),
            ("{\"message\":\"a\\u001b[31mred\\nline\"}", "a [31mred line"),
        ];
        for (body, want) in cases {
            assert_eq!(error_message(body.as_bytes()), *want, "{body}");
        }
        let long = "x ".repeat(10_000);
        let m = error_message(long.as_bytes());
        assert!(m.len() <= TEXT_MESSAGE_MAX + 3 && m.ends_with('…'), "{m}");
        let long = format!(r#"{{"error":{{"message":"{}"}}}}"#, "é".repeat(5_000));
        let m = error_message(long.as_bytes());
        assert!(
            m.len() <= JSON_MESSAGE_MAX + 3 && m.ends_with('…'),
            "{}",
            m.len()
        );
        let big_html = format!("<html><body>{}</body></html>", "<p>x</p>".repeat(100_000));
        assert!(error_message(big_html.as_bytes()).len() <= TEXT_MESSAGE_MAX + 3);
    }

    #[test]
    fn masker_replaces_every_secret() {
        let m = Masker::new([
            ("sk-abc".to_owned(), "[A]".to_owned()),
            ("sk-abcdef".to_owned(), "[LONG]".to_owned()),
            ("sk-xyz".to_owned(), "[X]".to_owned()),
            ("q".to_owned(), "[Q]".to_owned()),
            (String::new(), "[EMPTY]".to_owned()),
        ]);
        assert_eq!(
            m.mask_str("Bearer sk-abcdef, sk-abc0 sk-ab sk-xyzsk-xyz q".to_owned()),
            "Bearer [LONG], [A]0 sk-ab [X][X] [Q]"
        );
        assert_eq!(m.mask_bytes(b"nothing to see"), None);
        assert_eq!(m.mask_bytes(b""), None);
        // A pattern that is a prefix of a non-matching longer one still matches.
        assert_eq!(m.mask_str("sk-abcdeX".to_owned()), "[A]deX");
        let many: Vec<(String, String)> = (0..4096)
            .map(|i| (format!("sk-or-v1-{i:060}"), format!("[K{i}]")))
            .collect();
        let m = Masker::new(many);
        let text = format!("x sk-or-v1-{:060} y sk-or-v1-{:059}", 4095, 1);
        assert_eq!(m.mask_str(text), format!("x [K4095] y sk-or-v1-{:059}", 1));
    }

    #[test]
    fn masker_never_uses_a_label_holding_a_key() {
        // Found by the `config_keys` fuzz target: key 1's label is key 0, and
        // `Config::validate` masked its base_url error with that label.
        let mut config = Config::default();
        config.keys.push(crate::KeyConfig::new("sk-s0"));
        config
            .keys
            .push(crate::KeyConfig::new("sk-t1").label("sk-s0"));
        let m = Masker::for_config(&config);
        assert_eq!(
            m.mask_str("a sk-t1 b sk-s0".to_owned()),
            "a [REDACTED] b [REDACTED:key-0]"
        );
        config.base_url = "sk-t1".to_owned();
        let e = config.validate().unwrap_err().to_string();
        assert!(!e.contains("sk-t1") && !e.contains("sk-s0"), "{e}");
    }

    #[test]
    fn masker_for_config() {
        let config = Config::builder()
            .base_url("http://user:p%40ss@127.0.0.1:1/v1")
            .key_config(crate::KeyConfig::new("sk-a/b\\c").label("acct-a"))
            .key("sk-other", 1)
            .build()
            .unwrap();
        let m = Masker::for_config(&config);
        let text = r#"key sk-a/b\c json "sk-a\/b\\c" other sk-other url p%40ss p@ss"#;
        assert_eq!(
            m.mask_str(text.to_owned()),
            r#"key [REDACTED:acct-a] json "[REDACTED:acct-a]" other [REDACTED:key-1] url [REDACTED] [REDACTED]"#
        );
        assert_eq!(url_secrets("https://tok@h/x"), vec!["tok".to_owned()]);
        assert!(url_secrets("https://h/x@y").is_empty());
        assert!(url_secrets("https://h:1/v1").is_empty());
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("a%4"), "a%4");
        assert_eq!(percent_decode("%41%zz"), "A%zz");
    }
}
