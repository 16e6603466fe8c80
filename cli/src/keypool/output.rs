//! Output records (OpenAI Batch API output lines plus a `keypool` object) and the
//! writer that appends them one full line per write.

use std::io::Write;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// How one input line ended.
pub enum Outcome {
    /// The pool's result for the request.
    Result(keypool::RequestResult),
    /// The line could not be turned into a request; the message says why.
    Invalid(String),
}

impl Outcome {
    /// True for a result that was never answered because the pool was shut down: such
    /// a request is not written, so a resumed run sends it again.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Outcome::Result(Err(keypool::Error::Cancelled)))
    }

    /// True for a success.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Result(Ok(_)))
    }
}

#[derive(Serialize)]
struct ResponseJson {
    status_code: u16,
    request_id: Option<String>,
    body: Value,
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    code: &'a str,
    message: String,
    /// Whom the failure was blamed on: "request", "model", "key", "account",
    /// "server" (`keypool::Error::blame`); absent when no party was.
    #[serde(skip_serializing_if = "Option::is_none")]
    blame: Option<&'static str>,
}

#[derive(Serialize)]
struct Meta<'a> {
    key: Option<&'a str>,
    attempts: u32,
    latency_ms: u64,
    /// Submit to first send (`null` when no attempt carried a response).
    queue_ms: Option<u64>,
    line: u64,
    /// The fallback model that served a success (`Response::fallback_model`); absent
    /// when the requested model served, and on every failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    fallback_model: Option<&'a str>,
}

#[derive(Serialize)]
struct Record<'a> {
    id: String,
    custom_id: &'a str,
    response: Option<ResponseJson>,
    error: Option<ErrorJson<'a>>,
    keypool: Meta<'a>,
}

/// A success's body is always JSON a `Value` holds (the engine accepts no other: at
/// most 100 levels deep, no lone surrogate escape, no number beyond f64), so it is
/// written as JSON; an error's body may be anything (HTML from a proxy) and is then
/// written as its text.
fn response_json(r: &keypool::Response) -> ResponseJson {
    let body: Value = serde_json::from_slice(r.body()).unwrap_or_else(|_| Value::String(r.text()));
    // The header, else the body's `id` from the parse above (`Response::request_id`
    // would parse the body a second time).
    let request_id = r
        .header("x-request-id")
        .or_else(|| r.header("request-id"))
        .or_else(|| body.get("id")?.as_str())
        .map(str::to_owned);
    ResponseJson {
        status_code: r.status(),
        request_id,
        body,
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// Serializes one record as a JSON line (with its trailing newline) into `buf`.
/// `elapsed` is the CLI's own measure, used when the library reports no latency.
pub fn encode(
    buf: &mut Vec<u8>,
    id: String,
    custom_id: &str,
    line: u64,
    outcome: &Outcome,
    elapsed: Duration,
) {
    let record = match outcome {
        Outcome::Result(Ok(resp)) => Record {
            id,
            custom_id,
            response: Some(response_json(resp)),
            error: None,
            keypool: Meta {
                key: Some(resp.key_label()),
                attempts: resp.attempts(),
                latency_ms: millis(resp.latency()),
                queue_ms: Some(millis(resp.queue_time())),
                line,
                fallback_model: resp.fallback_model(),
            },
        },
        Outcome::Result(Err(e)) => {
            let resp = e.response();
            let key = match (resp, e) {
                (Some(r), _) => Some(r.key_label()),
                (None, keypool::Error::Transport { key, .. })
                | (None, keypool::Error::Stream { key, .. })
                    if !key.is_empty() =>
                {
                    Some(key.as_str())
                }
                (None, keypool::Error::Timeout { key, .. })
                | (None, keypool::Error::NoUsableKey { key, .. }) => key.as_deref(),
                _ => None,
            };
            Record {
                id,
                custom_id,
                response: resp.map(response_json),
                error: Some(ErrorJson {
                    code: e.code(),
                    message: e.to_string(),
                    blame: e.blame().map(keypool::Blame::as_str),
                }),
                keypool: Meta {
                    key,
                    attempts: e.attempts(),
                    latency_ms: millis(resp.map_or(elapsed, |r| r.latency())),
                    queue_ms: e.queue_time().map(millis),
                    line,
                    fallback_model: None,
                },
            }
        }
        Outcome::Invalid(msg) => Record {
            id,
            custom_id,
            response: None,
            error: Some(ErrorJson {
                code: "invalid_request",
                message: msg.clone(),
                blame: Some("request"),
            }),
            keypool: Meta {
                key: None,
                attempts: 0,
                latency_ms: 0,
                queue_ms: None,
                line,
                fallback_model: None,
            },
        },
    };
    buf.clear();
    serde_json::to_writer(&mut *buf, &record).expect("records serialize");
    buf.push(b'\n');
}

/// Record ids: `batch_req_` and 24 hex digits, unique within a run and across runs
/// with overwhelming probability.
pub struct IdGen {
    prefix: u64,
    next: u32,
}

impl IdGen {
    /// A generator with a random prefix.
    pub fn new() -> IdGen {
        IdGen {
            prefix: fastrand::u64(..),
            next: fastrand::u32(..),
        }
    }

    /// The next id.
    pub fn next_id(&mut self) -> String {
        self.next = self.next.wrapping_add(1);
        format!("batch_req_{:016x}{:08x}", self.prefix, self.next)
    }
}

/// Writes records: each as one `write_all` of a complete line, straight to the file
/// (no user-space buffer), so an interruption never leaves a partial line behind.
pub struct RecordWriter {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    ids: IdGen,
    /// Masks the run's secrets in a record (a server may echo a key in a success
    /// body, which no error path masks); `None` when nothing was masked.
    mask: Option<Masker>,
}

/// Replaces secrets in a record: `Some` masked copy, or `None` when none occurs.
pub type Masker = Box<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send>;

impl RecordWriter {
    /// Wraps the output.
    pub fn new(out: Box<dyn Write + Send>) -> RecordWriter {
        RecordWriter {
            out,
            buf: Vec::with_capacity(4096),
            ids: IdGen::new(),
            mask: None,
        }
    }

    /// Passes every record through `mask` before it is written (`Pool::mask_secrets`).
    pub fn with_mask(mut self, mask: Masker) -> RecordWriter {
        self.mask = Some(mask);
        self
    }

    /// Writes one record.
    pub fn write(
        &mut self,
        custom_id: &str,
        line: u64,
        outcome: &Outcome,
        elapsed: Duration,
    ) -> std::io::Result<()> {
        let id = self.ids.next_id();
        encode(&mut self.buf, id, custom_id, line, outcome, elapsed);
        if let Some(masked) = self.mask.as_ref().and_then(|m| m(&self.buf)) {
            self.buf = masked;
        }
        self.out.write_all(&self.buf)?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_line_record_shape() {
        let mut buf = Vec::new();
        let o = Outcome::Invalid("line 3: not valid JSON".into());
        encode(
            &mut buf,
            "batch_req_1".into(),
            "line-3",
            3,
            &o,
            Duration::ZERO,
        );
        assert_eq!(buf.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["custom_id"], "line-3");
        assert_eq!(v["response"], Value::Null);
        assert_eq!(v["error"]["code"], "invalid_request");
        assert_eq!(v["error"]["blame"], "request");
        assert_eq!(v["keypool"]["line"], 3);
    }

    #[test]
    fn cancelled_is_not_written() {
        assert!(Outcome::Result(Err(keypool::Error::Cancelled)).is_cancelled());
        assert!(!Outcome::Invalid(String::new()).is_cancelled());
    }

    #[test]
    fn ids_are_distinct() {
        let mut g = IdGen::new();
        let (a, b) = (g.next_id(), g.next_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), "batch_req_".len() + 24);
    }
}
