//! Whose fault an answer is — the request's, the model's on this key, the key's, the
//! account's, or the server's — decided from the evidence the answer carries: its
//! status, the documented fields of its body (`error.code`/`type`, `metadata.reason`,
//! `limit_source`, `provider_name`, `reasons`/`flagged_input`) and its headers.
//!
//! [`judge`] is the one table. The worker (`worker::judge_response`) acts on its
//! [`Fault`] and on nothing else, so a request's fault (a flagged prompt, an oversized
//! `max_tokens`) never takes a key out, and a key's fault never spends the request's
//! attempts. The table, as documented for users in docs/faults.md ("Whose fault is it"):
//!
//! | answer | fault | what happens |
//! | --- | --- | --- |
//! | 400, 413, 422; other 4xx not below | request | final, no key touched |
//! | 403 moderation / guardrail (`metadata.reasons`, `flagged_input`, a message naming moderation or flagging) | request ([`Fault::Flagged`]) | final `Error::Flagged`, no key touched |
//! | 403 that does not say why | unknown ([`Fault::Forbidden`]) | once more on another key; the same there: the request's; a key is taken out only after two requests it refused were served elsewhere |
//! | 402 for this request's size (`weight_exceeds_budget`, "fewer max_tokens") | request | final, the 402 kept |
//! | 402 `in_flight_budget` (or "try again") | transient | retried after `Retry-After` or backoff, no key touched |
//! | 402 otherwise, 429 `insufficient_quota` | account (credits) | key parked (re-checked at its credits endpoint), request moves on uncharged |
//! | 401 | key | key disabled for good, request moves on uncharged |
//! | 404 model not found / no endpoints | model | `(base URL, model)` excluded for every key on that base URL; the request moves to another base URL uncharged, or ends with the 404 |
//! | 429 / 503 with upstream-provider metadata or naming the model | model | `(key, model)` cooled for `Retry-After` (or the default), the key keeps serving its other models |
//! | 429 `free-models-per-min`/`-per-day`, or a plain 429 for a `:free` model | model (the account's `:free` models) | every `:free` model cools on this key and on its group's keys until the reset, the paid models keep going |
//! | 429 otherwise | key | key cooled until `Retry-After`, else `X-RateLimit-Reset` / `x-ratelimit-reset-*`, else the default, at most `max_retry_after_ms` |
//! | 408, 409, 5xx, a 200 whose choice failed | server | retried after backoff (another key first) |

use std::time::Duration;

use serde_json::Value;

pub(crate) use crate::error::Blame;

/// What an error answer means, and so what is done about it (see the module's table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The request: final, no key touched.
    Request,
    /// A moderation or guardrail refusal of the request's content: final
    /// (`Error::Flagged`), no key touched.
    Flagged,
    /// A 403 that does not say why: once more on another key.
    Forbidden,
    /// Documented as transient (402 in-flight budget): retry after the hint, no key
    /// touched.
    Transient,
    /// The model is rate-limited or overloaded upstream on this key: cool the pair.
    ModelBusy,
    /// OpenRouter's free-model limit (`free-models-per-min`/`-per-day`, or any plain
    /// 429 for a `:free` model): the account's `:free` models cool, its paid models
    /// keep going.
    FreeModels,
    /// The model does not exist (or has no endpoint) at this key's base URL.
    ModelMissing,
    /// This key (its project or account) may not use the model (OpenAI's 403
    /// `model_not_found`, a 404 "… or you do not have access to it"): the pair is
    /// excluded, the key's other models and other keys are untouched.
    ModelDenied,
    /// The key is rejected (401).
    KeyRejected,
    /// The account's credits or quota are spent: park the key.
    NoCredit,
    /// The key (or its account) is rate-limited, without model detail: cool the key.
    RateLimited,
    /// The server: retry after backoff.
    Server,
}

impl Fault {
    /// The party a final error of this fault is blamed on.
    pub(crate) fn blame(&self) -> Blame {
        match self {
            Fault::Request | Fault::Flagged | Fault::Forbidden => Blame::Request,
            Fault::Transient | Fault::NoCredit => Blame::Account,
            Fault::ModelBusy | Fault::ModelMissing | Fault::ModelDenied | Fault::FreeModels => {
                Blame::Model
            }
            Fault::KeyRejected | Fault::RateLimited => Blame::Key,
            Fault::Server => Blame::Server,
        }
    }
}

/// The evidence an error body carries, read leniently from every common shape
/// (OpenAI's `{"error": {...}}`, OpenRouter's with `metadata`, vLLM's top-level
/// `message`/`type`/`code`, FastAPI's `detail`, plain text).
#[derive(Debug, Default)]
struct Evidence {
    /// `error.code` / `error.type` / top-level `code`/`type`, lowercased.
    codes: Vec<String>,
    /// The message(s), lowercased (bounded).
    text: String,
    /// `metadata.reason`, `metadata.limit_source` (and top-level copies), lowercased.
    reasons: Vec<String>,
    /// `metadata.reasons` or `metadata.flagged_input` present (OpenRouter moderation).
    moderation_fields: bool,
    /// `metadata.provider_name` present (OpenRouter: the answer came from upstream).
    provider: bool,
}

/// Longest message text examined, in bytes.
const TEXT_MAX: usize = 4096;

fn lower(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.chars().take(256).collect::<String>().to_lowercase()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Evidence {
    fn of(body: &[u8]) -> Evidence {
        let mut ev = Evidence::default();
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            // Plain text or HTML from a proxy: its words are all the evidence.
            let text = String::from_utf8_lossy(&body[..body.len().min(TEXT_MAX)]);
            ev.text = text.to_lowercase();
            return ev;
        };
        ev.read_object(&v);
        if let Some(e) = v.get("error") {
            match e {
                Value::String(s) => ev.push_text(s),
                e => ev.read_object(e),
            }
        }
        if let Some(d) = v.get("detail") {
            match d {
                Value::String(s) => ev.push_text(s),
                Value::Array(items) => {
                    for m in items.iter().take(8).filter_map(|i| i.get("msg")) {
                        if let Value::String(s) = m {
                            ev.push_text(s);
                        }
                    }
                }
                _ => {}
            }
        }
        ev
    }

    fn push_text(&mut self, s: &str) {
        if self.text.len() < TEXT_MAX {
            self.text.push(' ');
            let room = TEXT_MAX - self.text.len();
            let cut: String = s.chars().take(room).collect();
            self.text.push_str(&cut.to_lowercase());
        }
    }

    fn read_object(&mut self, o: &Value) {
        if !o.is_object() {
            return;
        }
        for k in ["code", "type"] {
            if let Some(c) = o.get(k).and_then(lower) {
                self.codes.push(c);
            }
        }
        if let Some(Value::String(m)) = o.get("message") {
            self.push_text(m);
        }
        for k in ["reason", "limit_source"] {
            if let Some(r) = o.get(k).and_then(lower) {
                self.reasons.push(r);
            }
        }
        if let Some(m) = o.get("metadata").filter(|m| m.is_object()) {
            for k in ["reason", "limit_source"] {
                if let Some(r) = m.get(k).and_then(lower) {
                    self.reasons.push(r);
                }
            }
            self.moderation_fields |= m.get("reasons").is_some_and(|r| !r.is_null())
                || m.get("flagged_input").is_some_and(|r| !r.is_null());
            self.provider |= m
                .get("provider_name")
                .is_some_and(|p| p.as_str().is_some_and(|s| !s.is_empty()));
            if let Some(Value::String(raw)) = m.get("raw") {
                self.push_text(raw);
            }
        }
    }

    fn code_is(&self, c: &str) -> bool {
        self.codes.iter().any(|x| x == c)
    }

    fn says(&self, words: &[&str]) -> bool {
        words.iter().any(|w| self.text.contains(w))
    }

    fn reason_has(&self, part: &str) -> bool {
        self.reasons.iter().any(|r| r.contains(part))
    }
}

/// Whose fault an error answer is (see the module's table). `model` is the request's
/// `"model"`, when known: a message naming it is evidence the model is at fault.
pub(crate) fn judge(status: u16, body: &[u8], model: Option<&str>) -> Fault {
    let ev = Evidence::of(body);
    let names_model = model.is_some_and(|m| m.len() >= 3 && ev.text.contains(&m.to_lowercase()));
    match status {
        401 => Fault::KeyRejected,
        403 if ev.code_is("model_not_found") => Fault::ModelDenied,
        403 => {
            if ev.moderation_fields
                || ev.code_is("content_filter")
                || ev.code_is("moderation")
                || ev.says(&["flagged", "moderation", "guardrail", "content policy"])
            {
                Fault::Flagged
            } else {
                Fault::Forbidden
            }
        }
        402 => {
            if ev.says(&["can only afford 0 ", "can only afford 0."]) {
                // Nothing left at all: the account's credit, whatever the request.
                Fault::NoCredit
            } else if ev.reason_has("weight_exceeds_budget")
                || ev.says(&["fewer max_tokens", "max_tokens"])
            {
                Fault::Request
            } else if ev.reason_has("in_flight") || ev.says(&["in-flight", "in flight"]) {
                Fault::Transient
            } else {
                Fault::NoCredit
            }
        }
        404 => {
            let model_word = ev.says(&["model"]) || names_model;
            let missing = ev.says(&["not found", "does not exist", "not exist"]);
            // OpenRouter's "No endpoints found that support tool use" (or "… the
            // provided 'tool_choice' value", "… matching your data policy", image
            // input…) is about what this request asks of the model: the request's.
            let for_request =
                ev.says(&["that support", "supporting", "matching", "that can handle"]);
            if for_request {
                Fault::Request
            } else if ev.says(&["do not have access", "does not have access"]) {
                // Access is per key (project, organisation): the pair only.
                Fault::ModelDenied
            } else if ev.code_is("model_not_found")
                || ev.says(&["no endpoints found", "no endpoints available"])
                || (model_word && missing)
            {
                Fault::ModelMissing
            } else {
                Fault::Request
            }
        }
        429 => {
            if ev.code_is("insufficient_quota") {
                Fault::NoCredit
            } else if ev.says(&["free-models-per"])
                || (model.is_some_and(|m| m.ends_with(":free")) && !ev.provider)
            {
                Fault::FreeModels
            } else if ev.provider || names_model || ev.says(&["upstream", "provider returned"]) {
                Fault::ModelBusy
            } else {
                Fault::RateLimited
            }
        }
        503 if ev.provider || names_model => Fault::ModelBusy,
        408 | 409 => Fault::Server,
        400..=499 => Fault::Request,
        _ => Fault::Server,
    }
}

/// Whose fault an error carried inside a 2xx body is (`{"error": …}`, or a failed
/// choice), its code taken as `code`. A 2xx means the server accepted the key and began
/// the work: the error is upstream's. Never the key's or the account's (a 401 or 402
/// code there must not disable or park a key), nor a model verdict for the key or base
/// URL: those become the server's (retried after backoff); a rate limit is the model's
/// at this key; a request's fault (a flagged prompt, a bad request) stays the request's.
pub(crate) fn judge_in_2xx(code: u16, body: &[u8], model: Option<&str>) -> Fault {
    match judge(code, body, model) {
        Fault::RateLimited | Fault::FreeModels | Fault::ModelBusy => Fault::ModelBusy,
        f @ (Fault::Request | Fault::Flagged | Fault::Server) => f,
        Fault::KeyRejected
        | Fault::NoCredit
        | Fault::Forbidden
        | Fault::Transient
        | Fault::ModelMissing
        | Fault::ModelDenied => Fault::Server,
    }
}

/// How long a key-wide 429 cools the key: `Retry-After` if given, else the reset the
/// rate-limit headers announce (OpenRouter's `X-RateLimit-Reset` in epoch ms, OpenAI's
/// `x-ratelimit-reset-requests`/`-tokens` durations), else `default`; never more than
/// `max`.
pub(crate) fn cooldown_429(
    retry_after: Option<Duration>,
    headers: &[(String, String)],
    default: Duration,
    max: Duration,
) -> Duration {
    reset_wait(retry_after, headers, max)
        .unwrap_or(default)
        .min(max)
}

/// How long until a 429's limit resets: `Retry-After` if given, else the rate-limit
/// headers' reset (see [`cooldown_429`]); values beyond `limit` saturate there.
pub(crate) fn reset_wait(
    retry_after: Option<Duration>,
    headers: &[(String, String)],
    limit: Duration,
) -> Option<Duration> {
    let max = limit;
    let reset = || {
        [
            "x-ratelimit-reset",
            "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens",
        ]
        .iter()
        .filter_map(|name| {
            let v = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))?
                .1
                .trim();
            crate::ratelimit::reset_secs(v)
        })
        .filter(|s| *s > 0.0)
        .map(|s| crate::admission::secs_saturating(s, max))
        .max()
    };
    retry_after.or_else(reset).map(|d| d.min(max))
}

/// The longest a key is taken out for a spent quota (`Fault::RateLimited` whose reset
/// lies beyond `max_retry_after_ms`): a day, the longest window providers document
/// (OpenRouter's free-model day). A reset announced further away is not believed: it
/// is treated as any 429's cooldown, clamped to `max_retry_after_ms`.
pub(crate) const MAX_EXHAUSTED: Duration = Duration::from_secs(24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    /// OpenRouter's documented moderation 403.
    const OR_MODERATION: &str = r#"{"error":{"code":403,"message":"openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for \"harassment\"","metadata":{"reasons":["harassment"],"flagged_input":"you are a ...","provider_name":"OpenAI","model_slug":"openai/gpt-4o"}}}"#;

    #[test]
    fn documented_answers() {
        let cases: &[(u16, &str, Fault)] = &[
            (403, OR_MODERATION, Fault::Flagged),
            (
                403,
                r#"{"error":{"code":403,"message":"Forbidden"}}"#,
                Fault::Forbidden,
            ),
            (
                403,
                "<html><title>403 Forbidden</title></html>",
                Fault::Forbidden,
            ),
            (
                402,
                r#"{"error":{"code":402,"message":"This request requires more credits, or fewer max_tokens. You requested up to 100000 tokens, but can only afford 1234.","metadata":{"reason":"weight_exceeds_budget"}}}"#,
                Fault::Request,
            ),
            (
                402,
                r#"{"error":{"code":402,"message":"Request exceeds your in-flight budget; retry shortly","metadata":{"limit_source":"openrouter_in_flight_budget"}}}"#,
                Fault::Transient,
            ),
            (
                402,
                r#"{"error":{"code":402,"message":"Insufficient credits. Add more using https://openrouter.ai/credits"}}"#,
                Fault::NoCredit,
            ),
            (
                429,
                r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
                Fault::NoCredit,
            ),
            (
                429,
                r#"{"error":{"code":429,"message":"Provider returned error","metadata":{"provider_name":"Acme","raw":"x is temporarily rate-limited upstream"}}}"#,
                Fault::ModelBusy,
            ),
            (
                429,
                r#"{"error":{"message":"Rate limit exceeded: free-models-per-min.","code":429}}"#,
                Fault::FreeModels,
            ),
            (
                429,
                r#"{"error":{"message":"Rate limit exceeded","code":429}}"#,
                Fault::RateLimited,
            ),
            (
                404,
                r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
                Fault::ModelDenied,
            ),
            (
                404,
                r#"{"error":{"message":"No endpoints found for acme/x.","code":404}}"#,
                Fault::ModelMissing,
            ),
            (404, r#"{"detail":"Not Found"}"#, Fault::Request),
            (
                404,
                r#"{"error":{"message":"No endpoints found that support tool use. To learn more about provider routing, visit: https://openrouter.ai/docs/provider-routing","code":404}}"#,
                Fault::Request,
            ),
            (
                404,
                r#"{"error":{"message":"The model `gpt-4o` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
                Fault::ModelDenied,
            ),
            (
                403,
                r#"{"error":{"message":"Project `proj_x` does not have access to model `gpt-4o`","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
                Fault::ModelDenied,
            ),
            (
                402,
                r#"{"error":{"code":402,"message":"This request requires more credits, or fewer max_tokens. You requested up to 4096 tokens, but can only afford 0. To increase, visit https://openrouter.ai/settings/credits"}}"#,
                Fault::NoCredit,
            ),
            (
                401,
                r#"{"error":{"message":"No auth credentials found","code":401}}"#,
                Fault::KeyRejected,
            ),
            (
                400,
                r#"{"object":"error","message":"bad","type":"BadRequestError","code":400}"#,
                Fault::Request,
            ),
            (413, "Request Entity Too Large", Fault::Request),
            (
                422,
                r#"{"detail":[{"msg":"field required"}]}"#,
                Fault::Request,
            ),
            (
                503,
                r#"{"error":{"message":"Service Unavailable"}}"#,
                Fault::Server,
            ),
            (
                503,
                r#"{"error":{"code":503,"message":"Provider returned error","metadata":{"provider_name":"Acme"}}}"#,
                Fault::ModelBusy,
            ),
            (500, "", Fault::Server),
            (408, "", Fault::Server),
        ];
        for (status, body, want) in cases {
            assert_eq!(
                &judge(*status, body.as_bytes(), None),
                want,
                "{status} {body}"
            );
        }
        assert_eq!(
            judge(
                429,
                br#"{"error":{"message":"Rate limit exceeded","code":429}}"#,
                Some("acme/x:free")
            ),
            Fault::FreeModels
        );
        // A message naming the request's model puts a 429 on the model.
        assert_eq!(
            judge(
                429,
                br#"{"error":{"message":"acme/x is overloaded"}}"#,
                Some("acme/x")
            ),
            Fault::ModelBusy
        );
    }

    #[test]
    fn errors_inside_a_2xx_never_blame_the_key() {
        for (code, body) in [
            (401, r#"{"message":"No auth credentials found"}"#),
            (402, r#"{"message":"Insufficient credits"}"#),
            (403, r#"{"message":"Forbidden"}"#),
            (404, r#"{"message":"No endpoints found for acme/x."}"#),
        ] {
            assert_eq!(
                judge_in_2xx(code, body.as_bytes(), Some("acme/x")),
                Fault::Server,
                "{code}"
            );
        }
        assert_eq!(judge_in_2xx(429, b"{}", None), Fault::ModelBusy);
        assert_eq!(judge_in_2xx(502, b"{}", None), Fault::Server);
        assert_eq!(
            judge_in_2xx(
                403,
                br#"{"message":"flagged","metadata":{"reasons":["x"]}}"#,
                None
            ),
            Fault::Flagged
        );
    }

    #[test]
    fn hostile_bodies_never_panic() {
        let big = "9".repeat(100_000);
        let deep = "[".repeat(10_000);
        for body in [
            big.as_str(),
            deep.as_str(),
            r#"{"error":{"metadata":"x"}}"#,
            r#"{"error":{"metadata":{"reasons":null,"provider_name":5}}}"#,
            r#"{"error":[1,2]}"#,
            "\u{0}\u{ffff}",
        ] {
            for s in [400, 402, 403, 404, 429, 503] {
                let _ = judge(s, body.as_bytes(), Some("é"));
            }
        }
    }

    #[test]
    fn cooldown_reads_the_reset_headers_within_bounds() {
        let d = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        let h = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let c = cooldown_429(
            None,
            &h("X-RateLimit-Reset", &(now_ms + 6_000).to_string()),
            d,
            max,
        );
        assert!(
            c > Duration::from_secs(5) && c <= Duration::from_secs(6),
            "{c:?}"
        );
        assert_eq!(
            cooldown_429(None, &h("x-ratelimit-reset-requests", "20s"), d, max),
            Duration::from_secs(20)
        );
        assert_eq!(
            cooldown_429(
                Some(Duration::from_secs(2)),
                &h("x-ratelimit-reset", "99999999999999"),
                d,
                max
            ),
            Duration::from_secs(2)
        );
        assert_eq!(
            cooldown_429(None, &h("x-ratelimit-reset", "1e300"), d, max),
            max
        );
        assert_eq!(cooldown_429(None, &h("x-ratelimit-reset", "-5"), d, max), d);
        assert_eq!(
            cooldown_429(None, &h("x-ratelimit-reset", "NaN"), d, max),
            d
        );
        assert_eq!(cooldown_429(None, &[], d, max), d);
    }
}
