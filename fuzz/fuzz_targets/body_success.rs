//! 2xx bodies and usage: token counts never exceed `MAX_USAGE_TOKENS` (so their sum
//! cannot overflow), embedded error codes are plausible HTTP statuses, the streaming
//! and lenient paths agree, a chat completion is accepted only with a `choices`
//! array, and the one-pass JSON validator accepts exactly what serde_json accepts (a
//! success: what it reads as a `Value`, nested at most 100 levels).
//!
//! Input: the first byte picks the request path and content type; the rest is the body.
#![no_main]

use keypool::__fuzz::{MAX_USAGE_TOKENS, Rejected, inspect_success, parse_usage};
use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 4] = [
    "/chat/completions",
    "/v1/chat/completions?x=1",
    "/embeddings",
    "/completions",
];
const TYPES: [Option<&str>; 5] = [
    None,
    Some("application/json"),
    Some("text/event-stream"),
    Some(" TEXT/EVENT-STREAM; charset=utf-8"),
    Some("text/event-strea"),
];

fn bounded(u: &keypool::Usage) {
    assert!(u.prompt_tokens <= MAX_USAGE_TOKENS, "{u:?}");
    assert!(u.completion_tokens <= MAX_USAGE_TOKENS, "{u:?}");
    assert!(u.prompt_tokens.checked_add(u.completion_tokens).is_some());
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let path = PATHS[(sel as usize) % PATHS.len()];
    let ctype = TYPES[(sel as usize / PATHS.len()) % TYPES.len()];
    let stream = matches!((sel as usize / PATHS.len()) % TYPES.len(), 2 | 3);

    let lenient = parse_usage(body);
    if let Some(u) = &lenient {
        bounded(u);
    }
    let judged = inspect_success(body, path, ctype);
    if stream {
        assert_eq!(judged, Ok(None), "a stream is passed through");
        return;
    }
    let value = serde_json::from_slice::<serde_json::Value>(body).ok();
    match &judged {
        Ok(usage) => {
            assert!(
                std::str::from_utf8(body).is_ok(),
                "accepted a body that is not UTF-8"
            );
            // A success is what serde_json's `Value` reads (no lone surrogate, no
            // number beyond f64), nested at most 100 levels: every reader parses it.
            let Some(v) = value.as_ref() else {
                panic!("accepted a body serde_json::Value refuses");
            };
            if let Some(u) = usage {
                bounded(u);
                assert_eq!(lenient.as_ref(), Some(u), "the two usage readers disagree");
            }
            if path.contains("/chat/completions") {
                assert!(
                    v.get("choices").is_some_and(|c| c.is_array()),
                    "accepted a chat completion without a choices array"
                );
            }
            assert!(
                v.get("error")
                    .is_none_or(|e| e.is_null() || e == &serde_json::Value::Bool(false)),
                "accepted a body with an error"
            );
        }
        Err(Rejected::Embedded(code)) => {
            assert!(code.is_none_or(|c| (100..600).contains(&c)), "{code:?}");
            serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .expect("an embedded error in a non-JSON body");
            // (`Value` refuses numbers beyond f64 anywhere in the body.)
            if let Some(v) = value.as_ref() {
                assert!(v.get("error").is_some());
            }
        }
        Err(Rejected::ChoiceFailed(code)) => {
            assert!(code.is_none_or(|c| (100..600).contains(&c)), "{code:?}");
            serde_json::from_slice::<serde::de::IgnoredAny>(body)
                .expect("a failed choice in a non-JSON body");
            if let Some(v) = value.as_ref() {
                let failed = v.get("choices").and_then(|c| c.as_array()).is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.get("error")
                            .is_some_and(|e| !e.is_null() && e != &serde_json::Value::Bool(false))
                            || c.get("finish_reason").and_then(|f| f.as_str()) == Some("error")
                    })
                });
                assert!(failed, "a failed choice where none failed");
            }
        }
        Err(Rejected::Invalid(why)) => {
            assert!(!why.is_empty());
            // The one-pass validator refuses as "not JSON" only what serde_json
            // refuses too.
            if why.starts_with("body is not valid JSON") {
                assert!(
                    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err(),
                    "refused valid JSON: {why}"
                );
            }
            // Refused as past the reader limits: JSON, but not a `Value` (or one
            // nested deeper than 100 levels).
            if why.starts_with("body is JSON past common reader limits") {
                assert!(
                    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
                        && (value.is_none() || why.contains("nested")),
                    "refused as past the limits: {why}"
                );
            }
        }
    }
});
