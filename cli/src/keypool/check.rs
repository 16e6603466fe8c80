//! `keypool check`: is each key usable? One line per key: accepted or rejected, its
//! credit left and limit (OpenRouter's `GET {base}/key`), the models it reaches
//! (`GET {base}/models`), and with `--probe` one minimal completion.
//!
//! Every answer is hostile input: bodies are read with a size limit, numbers are
//! believed only when finite, non-negative and plausible, server messages are cut
//! short, stripped of control characters and masked (no key is ever printed), and a
//! server that stalls meets the `--timeout-ms` deadline.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keypool::{
    Config, HttpRequest, HttpResponse, KeyConfig, TlsTrust, Transport, TransportError,
    TransportSettings, UreqTransport,
};
use serde_json::{Value, json};

use crate::args::CheckArgs;

/// Exit status when some key is unusable.
const EXIT_UNUSABLE: u8 = 1;

/// Largest `GET …/key` answer read.
const MAX_KEY_BODY: u64 = 64 * 1024;
/// Largest `GET …/models` answer read (OpenRouter lists hundreds of models with
/// descriptions).
const MAX_MODELS_BODY: u64 = 32 * 1024 * 1024;
/// The largest dollar amount believed (the engine's own bound).
const MAX_DOLLARS: f64 = 1e9;
/// Keys checked at once.
const PARALLEL: usize = 8;

/// What a key's check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The server accepted the key and nothing says it cannot be used.
    Ok,
    /// The server refused the key (401, 403).
    Rejected,
    /// The key has no credit left (402, or `limit_remaining` at 0).
    NoCredit,
    /// No answer said whether the key is accepted (errors, timeouts, no route).
    Unknown,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Rejected => "rejected",
            Verdict::NoCredit => "no-credit",
            Verdict::Unknown => "unknown",
        }
    }

    fn usable(self) -> bool {
        self == Verdict::Ok
    }
}

/// The credit a `GET …/key` answer reports, each number only when believable.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Credit {
    /// Dollars the key may spend in all (`None`: no limit, or unreadable).
    pub limit: Option<f64>,
    /// Whether `limit` was `null` (no cap).
    pub unlimited: bool,
    /// Dollars left.
    pub remaining: Option<f64>,
    /// Dollars used.
    pub usage: Option<f64>,
    /// OpenRouter's free tier.
    pub free_tier: Option<bool>,
    /// When the limit resets (`daily`, `monthly`, …), when a short plain word.
    pub reset: Option<String>,
    /// The (deprecated) rate limit: requests per interval.
    pub rate_limit: Option<(u64, String)>,
    /// Whether some field was present but not believable.
    pub garbled: bool,
}

/// One key's findings.
#[derive(Debug, Clone)]
pub struct KeyReport {
    label: String,
    verdict: Verdict,
    /// `GET …/key`: credit when answered, else what happened.
    credit: Option<Credit>,
    /// Human notes, in order (already masked and cut short).
    notes: Vec<String>,
    /// `GET …/models`: models listed, and how many of them this key serves when it
    /// has a `models` list.
    models: Option<(usize, Option<usize>)>,
    /// `--probe`: whether the completion succeeded, and its latency.
    probe: Option<(bool, u64)>,
    /// Routes the server does not have (404, 405 on `/key`, `/models`).
    missing_routes: u8,
}

impl KeyReport {
    fn new(label: String) -> KeyReport {
        KeyReport {
            label,
            verdict: Verdict::Unknown,
            credit: None,
            notes: Vec::new(),
            models: None,
            probe: None,
            missing_routes: 0,
        }
    }

    /// Moves the verdict: a refusal or no credit is final, `Ok` replaces `Unknown`.
    fn conclude(&mut self, v: Verdict) {
        self.verdict = match (self.verdict, v) {
            (Verdict::Rejected | Verdict::NoCredit, _) => self.verdict,
            (_, Verdict::Unknown) => self.verdict,
            (_, v) => v,
        };
    }

    /// A failed probe: the key is not known to work, whatever else said it was
    /// accepted (a refusal or no credit stays).
    fn probe_failed(&mut self, ms: u64) {
        self.probe = Some((false, ms));
        if !self.finished() {
            self.verdict = Verdict::Unknown;
        }
    }

    fn finished(&self) -> bool {
        matches!(self.verdict, Verdict::Rejected | Verdict::NoCredit)
    }
}

/// `$1.23`; small amounts with four decimals.
fn dollars(x: f64) -> String {
    if x != 0.0 && x < 0.01 {
        format!("${x:.4}")
    } else {
        format!("${x:.2}")
    }
}

/// A believable dollar amount.
fn amount(v: &Value) -> Option<f64> {
    v.as_f64()
        .filter(|x| x.is_finite() && (0.0..=MAX_DOLLARS).contains(x))
}

/// A short plain word from a hostile string (`monthly`), else `None`.
fn plain_word(v: &Value) -> Option<String> {
    let s = v.as_str()?;
    (!s.is_empty()
        && s.len() <= 24
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ' ')))
    .then(|| s.to_owned())
}

/// Reads OpenRouter's `{"data": {"limit", "limit_remaining", "usage", "is_free_tier",
/// "limit_reset", "rate_limit": {"requests", "interval"}}}`; `None` when the body is
/// not that object at all.
pub fn parse_credit(body: &[u8]) -> Option<Credit> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let d = v.get("data")?.as_object()?;
    let mut c = Credit::default();
    let number = |field: &str, garbled: &mut bool| -> Option<f64> {
        let v = d.get(field)?;
        if v.is_null() {
            return None;
        }
        let x = amount(v);
        *garbled |= x.is_none();
        x
    };
    let mut garbled = false;
    c.unlimited = d.get("limit").is_some_and(Value::is_null);
    c.limit = number("limit", &mut garbled);
    // Overspent keys report a little below zero: nothing left.
    c.remaining = match d.get("limit_remaining").and_then(Value::as_f64) {
        Some(x) if x.is_finite() && (-MAX_DOLLARS..0.0).contains(&x) => Some(0.0),
        _ => number("limit_remaining", &mut garbled),
    };
    c.usage = number("usage", &mut garbled);
    c.free_tier = d.get("is_free_tier").and_then(Value::as_bool);
    c.reset = d.get("limit_reset").and_then(plain_word);
    c.rate_limit = d.get("rate_limit").and_then(|r| {
        let n = r
            .get("requests")?
            .as_u64()
            .filter(|n| *n <= 1_000_000_000)?;
        Some((n, plain_word(r.get("interval")?)?))
    });
    c.garbled = garbled;
    Some(c)
}

impl Credit {
    /// Whether the key has nothing left to spend.
    fn spent(&self) -> bool {
        !self.unlimited && self.remaining.is_some_and(|r| r <= 0.0)
    }

    fn describe(&self) -> String {
        let mut s = match (self.unlimited, self.limit, self.remaining) {
            (true, _, _) => "no credit limit".to_owned(),
            (false, Some(l), Some(r)) => format!("credit {} left of {}", dollars(r), dollars(l)),
            (false, None, Some(r)) => format!("credit {} left", dollars(r)),
            (false, Some(l), None) => format!("credit limit {}", dollars(l)),
            (false, None, None) => "credit unknown".to_owned(),
        };
        let mut extra = Vec::new();
        if let Some(u) = self.usage {
            extra.push(format!("used {}", dollars(u)));
        }
        if let Some(r) = &self.reset {
            extra.push(format!("resets {r}"));
        }
        if !extra.is_empty() {
            s.push_str(&format!(" ({})", extra.join(", ")));
        }
        if self.free_tier == Some(true) {
            s.push_str(", free tier");
        }
        if self.garbled {
            s.push_str(", some figures unreadable");
        }
        s
    }

    fn to_json(&self) -> Value {
        json!({
            "limit": self.limit,
            "limit_remaining": self.remaining,
            "usage": self.usage,
            "unlimited": self.unlimited,
            "is_free_tier": self.free_tier,
            "limit_reset": self.reset,
            "rate_limit": self.rate_limit.as_ref().map(|(n, i)| json!({"requests": n, "interval": i})),
        })
    }
}

/// Masks every configured key in `text`, drops control characters and cuts it to
/// 160 characters.
fn clean(text: &str, secrets: &[String]) -> String {
    let mut t = text.to_owned();
    for s in secrets {
        if !s.is_empty() {
            t = t.replace(s.as_str(), "[REDACTED]");
        }
    }
    let t: String = t
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    match t.char_indices().nth(160) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t,
    }
}

/// The server's own words for an error answer: `error.message`, `message`, a string
/// `error` or `detail`, else a short plain-text body.
fn server_message(body: &[u8]) -> Option<String> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let pick = |v: &Value| v.as_str().map(str::to_owned);
        return v
            .get("error")
            .and_then(|e| e.get("message").and_then(pick).or_else(|| pick(e)))
            .or_else(|| v.get("message").and_then(pick))
            .or_else(|| v.get("detail").and_then(pick))
            .filter(|m| !m.trim().is_empty());
    }
    let text = std::str::from_utf8(body).ok()?.trim();
    (!text.is_empty() && text.len() <= 200 && !text.starts_with('<')).then(|| text.to_owned())
}

/// What one call got.
enum Answer {
    Http(HttpResponse),
    Failed(String),
}

fn transport_error(e: &TransportError) -> String {
    match e {
        TransportError::Timeout(p) => format!("timed out ({})", p.as_str()),
        TransportError::Failed(m) => m.clone(),
        TransportError::Tls(m) => format!("TLS: {m}"),
        TransportError::Proxy(m) => format!("proxy: {m}"),
        other => format!("{other:?}"),
    }
}

/// The checker of one key.
struct KeyCheck<'a> {
    key: &'a KeyConfig,
    base: String,
    headers: Vec<(String, String)>,
    transport: UreqTransport,
    timeout: Duration,
    secrets: &'a [String],
}

impl KeyCheck<'_> {
    fn get(&self, route: &str, max: u64) -> Answer {
        let url = format!("{}{route}", self.base);
        let req = HttpRequest {
            url: &url,
            key: &self.key.key,
            headers: &self.headers,
            body: b"",
            timeout: self.timeout,
        };
        match self.transport.get(&req, max) {
            Ok(r) => Answer::Http(r),
            Err(e) => Answer::Failed(transport_error(&e)),
        }
    }

    /// A note for an answer that is not a success: `GET /key: HTTP 500: message`.
    fn note(&self, what: &str, status: u16, body: &[u8]) -> String {
        match server_message(body) {
            Some(m) => format!("{what}: HTTP {status}: {}", clean(&m, self.secrets)),
            None => format!("{what}: HTTP {status}"),
        }
    }

    /// Judges a refusal common to every route; `true` when it settled the verdict.
    fn refusal(&self, r: &mut KeyReport, what: &str, resp: &HttpResponse) -> bool {
        let v = match resp.status {
            401 | 403 => Verdict::Rejected,
            402 => Verdict::NoCredit,
            _ => return false,
        };
        r.notes.push(self.note(what, resp.status, &resp.body));
        r.conclude(v);
        true
    }

    /// `GET /key`; `false` when the server could not be reached at all (refused, TLS,
    /// timed out): the other routes are not tried.
    fn key_info(&self, r: &mut KeyReport) -> bool {
        match self.get("/key", MAX_KEY_BODY) {
            Answer::Http(resp) if (200..300).contains(&resp.status) => {
                r.conclude(Verdict::Ok);
                match parse_credit(&resp.body) {
                    Some(c) => {
                        if c.spent() {
                            r.conclude(Verdict::NoCredit);
                        }
                        r.credit = Some(c);
                    }
                    None => r.notes.push("GET /key: unreadable answer".to_owned()),
                }
            }
            Answer::Http(resp) if self.refusal(r, "GET /key", &resp) => {}
            // A server without OpenRouter's route (OpenAI, vLLM, …): say nothing.
            Answer::Http(resp) if matches!(resp.status, 404 | 405) => r.missing_routes += 1,
            Answer::Http(resp) => r.notes.push(self.note("GET /key", resp.status, &resp.body)),
            Answer::Failed(m) => {
                r.notes
                    .push(format!("GET /key: {}", clean(&m, self.secrets)));
                return false;
            }
        }
        true
    }

    fn models(&self, r: &mut KeyReport) {
        // Only a server without `/key` (OpenAI, vLLM, …) is taken at its word that
        // listing models accepts the key: OpenRouter lists them to anyone, so there a
        // `/key` that failed leaves the key unconfirmed.
        let confirms = r.missing_routes == 1;
        match self.get("/models", MAX_MODELS_BODY) {
            Answer::Http(resp) if (200..300).contains(&resp.status) => {
                if confirms {
                    r.conclude(Verdict::Ok);
                }
                let ids = serde_json::from_slice::<Value>(&resp.body)
                    .ok()
                    .and_then(|v| match v {
                        Value::Object(mut o) => match o.remove("data") {
                            Some(Value::Array(a)) => Some(a),
                            _ => None,
                        },
                        Value::Array(a) => Some(a),
                        _ => None,
                    });
                match ids {
                    Some(list) => {
                        let served = self.key.models.as_ref().map(|_| {
                            list.iter()
                                .filter_map(|m| m.get("id").and_then(Value::as_str))
                                .filter(|id| self.key.serves(Some(id)))
                                .count()
                        });
                        r.models = Some((list.len(), served));
                    }
                    None => r.notes.push("GET /models: unreadable answer".to_owned()),
                }
            }
            Answer::Http(resp) if self.refusal(r, "GET /models", &resp) => {}
            Answer::Http(resp) if matches!(resp.status, 404 | 405) => {
                r.missing_routes += 1;
                r.notes.push("models: not listed by the server".to_owned());
            }
            Answer::Http(resp) => r
                .notes
                .push(self.note("GET /models", resp.status, &resp.body)),
            Answer::Failed(m) => r
                .notes
                .push(format!("GET /models: {}", clean(&m, self.secrets))),
        }
    }

    /// One minimal chat completion (`max_tokens: 1`) asking `model`.
    fn probe(&self, r: &mut KeyReport, model: &str) {
        let model = self.key.model_map.get(model).map_or(model, String::as_str);
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": "Reply with OK."}],
            "max_tokens": 1,
        })
        .to_string();
        let url = format!("{}{}", self.base, keypool::DEFAULT_PATH);
        // (The transport sends `content-type: application/json` itself.)
        let req = HttpRequest {
            url: &url,
            key: &self.key.key,
            headers: &self.headers,
            body: body.as_bytes(),
            timeout: self.timeout,
        };
        let start = Instant::now();
        let answer = match self.transport.send(&req) {
            Ok(resp) => Answer::Http(resp),
            Err(e) => Answer::Failed(transport_error(&e)),
        };
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let what = format!("probe ({model})");
        match answer {
            Answer::Http(resp) if (200..300).contains(&resp.status) => {
                let v = serde_json::from_slice::<Value>(&resp.body).ok();
                let error = v
                    .as_ref()
                    .and_then(|v| v.get("error"))
                    .filter(|e| !matches!(e, Value::Null | Value::Bool(false)));
                let choices = v
                    .as_ref()
                    .and_then(|v| v.get("choices"))
                    .is_some_and(Value::is_array);
                if error.is_none() && choices {
                    r.conclude(Verdict::Ok);
                    r.probe = Some((true, ms));
                } else {
                    r.probe_failed(ms);
                    let status = resp.status;
                    r.notes.push(match (error, server_message(&resp.body)) {
                        (Some(_), Some(m)) => format!(
                            "{what}: HTTP {status} with an error: {}",
                            clean(&m, self.secrets)
                        ),
                        (Some(_), None) => format!("{what}: HTTP {status} with an error"),
                        (None, _) => format!("{what}: HTTP {status} without a completion"),
                    });
                }
            }
            Answer::Http(resp) => {
                if !self.refusal(r, &what, &resp) {
                    r.notes.push(self.note(&what, resp.status, &resp.body));
                }
                r.probe_failed(ms);
            }
            Answer::Failed(m) => {
                r.probe_failed(ms);
                r.notes.push(format!("{what}: {}", clean(&m, self.secrets)));
            }
        }
    }
}

/// The model `--probe` asks a key for: `--model` when the key serves it, else the
/// key's first configured model without a wildcard. `Err` says why none.
fn probe_model<'a>(key: &'a KeyConfig, flag: Option<&'a str>) -> Result<&'a str, String> {
    if let Some(m) = flag {
        if key.serves(Some(m)) {
            return Ok(m);
        }
    }
    let first = key
        .models
        .as_ref()
        .and_then(|l| l.iter().find(|m| !m.contains('*')));
    match (first, flag) {
        (Some(m), _) => Ok(m),
        (None, Some(m)) => Err(format!("probe skipped: the key does not serve {m}")),
        (None, None) => Err("probe skipped: no model (pass --model)".to_owned()),
    }
}

/// Checks key `index` of `config`.
fn check_key(
    config: &Config,
    index: usize,
    args: &CheckArgs,
    tls: &TlsTrust,
    secrets: &[String],
) -> KeyReport {
    let key = &config.keys[index];
    let mut r = KeyReport::new(config.key_label(index));
    let timeout = Duration::from_millis(args.timeout_ms);
    let settings = TransportSettings {
        label: r.label.clone(),
        max_concurrent: 1,
        timeout,
        connect_timeout: timeout.min(Duration::from_millis(config.connect_timeout_ms.max(1))),
        max_response_bytes: MAX_MODELS_BODY,
        tls: tls.clone(),
    };
    // Pool headers, then the key's (later ones win), as the engine sends them.
    let mut headers: std::collections::BTreeMap<String, (String, String)> = Default::default();
    for (name, value) in config.headers.iter().chain(key.headers.iter()) {
        headers.insert(name.to_ascii_lowercase(), (name.clone(), value.clone()));
    }
    let c = KeyCheck {
        key,
        base: config.key_base_url(index).trim_end_matches('/').to_owned(),
        headers: headers.into_values().collect(),
        transport: UreqTransport::new(&settings),
        timeout,
        secrets,
    };
    let reachable = c.key_info(&mut r);
    if reachable && !r.finished() {
        c.models(&mut r);
    }
    if reachable && args.probe && !r.finished() {
        match probe_model(key, args.model.as_deref()) {
            Ok(m) => c.probe(&mut r, m),
            Err(why) => r.notes.push(why),
        }
    }
    if r.verdict == Verdict::Unknown && !args.probe && r.missing_routes == 2 {
        r.notes
            .push("nothing confirmed the key: pass --probe to send one completion".to_owned());
    }
    r
}

/// One text line: `label  verdict  details`.
fn text_line(r: &KeyReport, width: usize) -> String {
    let mut parts = Vec::new();
    if let Some(c) = &r.credit {
        parts.push(c.describe());
    }
    if let Some((n, served)) = r.models {
        parts.push(match served {
            Some(s) => format!("{n} models listed, {s} of them served by this key"),
            None => format!("{n} models listed"),
        });
    }
    if let Some((ok, ms)) = r.probe {
        if ok {
            parts.push(format!("probe ok in {ms} ms"));
        }
    }
    parts.extend(r.notes.iter().cloned());
    format!(
        "{:<width$}  {:<9}  {}",
        r.label,
        r.verdict.as_str(),
        parts.join("; ")
    )
    .trim_end()
    .to_owned()
}

/// One `--json` line (fields in this order).
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    key: &'a str,
    status: &'static str,
    usable: bool,
    credit: Option<Value>,
    models: Option<usize>,
    models_served: Option<usize>,
    probe: Option<Value>,
    notes: &'a [String],
}

fn json_line(r: &KeyReport) -> String {
    let line = JsonLine {
        key: &r.label,
        status: r.verdict.as_str(),
        usable: r.verdict.usable(),
        credit: r.credit.as_ref().map(Credit::to_json),
        models: r.models.map(|(n, _)| n),
        models_served: r.models.and_then(|(_, s)| s),
        probe: r.probe.map(|(ok, ms)| json!({"ok": ok, "latency_ms": ms})),
        notes: &r.notes,
    };
    serde_json::to_string(&line).unwrap_or_default()
}

/// `keypool check`.
pub fn run(args: &CheckArgs) -> Result<ExitCode, String> {
    if args.timeout_ms == 0 {
        return Err("--timeout-ms must be at least 1".into());
    }
    let config = crate::settings::build_config(&args.pool_flags(), |k| std::env::var(k).ok())?;
    let tls = TlsTrust::load(&config.tls).map_err(|e| e.to_string())?;
    if args.probe && args.model.is_none() {
        if let Some(i) =
            (0..config.keys.len()).find(|&i| probe_model(&config.keys[i], None).is_err())
        {
            return Err(format!(
                "--probe needs --model (the model its one completion asks for): key {} has no \
                 configured model",
                config.key_label(i)
            ));
        }
    }
    let secrets: Vec<String> = config
        .keys
        .iter()
        .map(|k| k.key.expose().to_owned())
        .collect();
    let n = config.keys.len();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let reports: Vec<std::sync::Mutex<Option<KeyReport>>> =
        (0..n).map(|_| std::sync::Mutex::new(None)).collect();
    let config = Arc::new(config);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(n) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        check_key(&config, i, args, &tls, &secrets)
                    }))
                    .unwrap_or_else(|_| {
                        let mut r = KeyReport::new(config.key_label(i));
                        r.notes
                            .push("internal error while checking this key".to_owned());
                        r
                    });
                    if let Ok(mut slot) = reports[i].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    let reports: Vec<KeyReport> = reports
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.into_inner().ok().flatten().unwrap_or_else(|| {
                let mut r = KeyReport::new(config.key_label(i));
                r.notes
                    .push("internal error while checking this key".to_owned());
                r
            })
        })
        .collect();
    let width = reports
        .iter()
        .map(|r| r.label.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for r in &reports {
        let line = if args.json {
            json_line(r)
        } else {
            text_line(r, width)
        };
        // The last guard: whatever a server echoed, no key leaves this process.
        let line = clean_line(&line, &secrets);
        writeln!(out, "{line}").map_err(|e| format!("writing to stdout: {e}"))?;
    }
    out.flush().map_err(|e| format!("writing to stdout: {e}"))?;
    let unusable = reports.iter().filter(|r| !r.verdict.usable()).count();
    if !args.quiet {
        eprintln!(
            "keypool check: {} of {n} key{} usable",
            n - unusable,
            if n == 1 { "" } else { "s" }
        );
    }
    Ok(if unusable == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_UNUSABLE)
    })
}

/// Replaces any key left in an output line.
fn clean_line(line: &str, secrets: &[String]) -> String {
    let mut t = line.to_owned();
    for s in secrets {
        if !s.is_empty() && t.contains(s.as_str()) {
            t = t.replace(s.as_str(), "[REDACTED]");
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_of_openrouters_documented_answer() {
        let body = br#"{"data":{"label":"sk-or-v1-au7...890","limit":100,"limit_remaining":74.5,
            "limit_reset":"monthly","usage":25.5,"is_free_tier":false,
            "rate_limit":{"requests":1000,"interval":"1h","note":"deprecated"}}}"#;
        let c = parse_credit(body).unwrap();
        assert_eq!(
            (c.limit, c.remaining, c.usage, c.unlimited),
            (Some(100.0), Some(74.5), Some(25.5), false)
        );
        assert_eq!(c.rate_limit, Some((1000, "1h".to_owned())));
        assert_eq!(
            c.describe(),
            "credit $74.50 left of $100.00 (used $25.50, resets monthly)"
        );
        assert!(!c.spent());
        let c = parse_credit(
            br#"{"data":{"limit":null,"limit_remaining":null,"usage":0.001,"is_free_tier":true}}"#,
        )
        .unwrap();
        assert_eq!(c.describe(), "no credit limit (used $0.0010), free tier");
        let c = parse_credit(br#"{"data":{"limit":5,"limit_remaining":0,"usage":5}}"#).unwrap();
        assert!(c.spent());
        // Overspent: a little below zero is nothing left.
        let c =
            parse_credit(br#"{"data":{"limit":5,"limit_remaining":-0.02,"usage":5.02}}"#).unwrap();
        assert!(c.spent() && !c.garbled);
        assert_eq!(c.describe(), "credit $0.00 left of $5.00 (used $5.02)");
        let c = parse_credit(br#"{"data":{"limit":5,"limit_remaining":-1e12}}"#).unwrap();
        assert!(!c.spent() && c.garbled);
    }

    #[test]
    fn hostile_key_answers_never_panic_nor_mislead() {
        for body in [
            &b"not json"[..],
            b"",
            b"[]",
            b"{\"data\":7}",
            b"{\"data\":{\"limit\":1e400}}",
        ] {
            assert!(
                parse_credit(body).is_none(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let c = parse_credit(
            br#"{"data":{"limit":1e300,"limit_remaining":"5","usage":"lots","limit_reset":"\u001b[31mred","rate_limit":{"requests":-1}}}"#,
        )
        .unwrap();
        assert_eq!((c.limit, c.remaining, c.usage), (None, None, None));
        assert!(c.garbled && !c.spent());
        assert_eq!((c.reset.as_ref(), c.rate_limit.as_ref()), (None, None));
        assert_eq!(c.describe(), "credit unknown, some figures unreadable");
    }

    #[test]
    fn server_messages_are_masked_and_cut() {
        let secrets = vec!["sk-secret-1".to_owned()];
        let m =
            server_message(br#"{"error":{"message":"bad key sk-secret-1\n\u001b[2J"}}"#).unwrap();
        assert_eq!(clean(&m, &secrets), "bad key [REDACTED] [2J");
        let long = "x".repeat(500);
        assert_eq!(clean(&long, &secrets).chars().count(), 161);
        assert_eq!(server_message(b"<html>502</html>"), None);
        assert_eq!(
            server_message(br#"{"detail":"Not authenticated"}"#).as_deref(),
            Some("Not authenticated")
        );
    }
}
