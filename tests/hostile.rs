//! Hostile servers and hostile configs: nothing a server sends may panic a worker, wrap
//! a counter, pass for a success when it is not one, or leak a key; nothing in a config
//! error may echo a key. Servers here are custom transports (every byte chosen by the
//! test) or the mock (`keypool-mock`) driven by per-request directives.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use keypool::{
    Config, Error, HttpResponse, KeyConfig, Pool, Request, RetryConfig, Strategy, TransportError,
};
use keypool_mock::{MockConfig, MockServer};
use support::{OK_BODY, factory};

/// Fast retries, short clamps: the policy's shape, scaled for tests.
fn fast_retry(max_attempts: u32) -> RetryConfig {
    {
        let mut r = RetryConfig::default();
        r.max_attempts = max_attempts;
        r.base_delay_ms = 5;
        r.max_delay_ms = 20;
        r.max_retry_after_ms = 50;
        r.default_cooldown_ms = 20;
        r
    }
}

fn config(keys: &[(&str, &str)], max_attempts: u32) -> Config {
    let mut b = Config::builder()
        .base_url("http://127.0.0.1:9/v1")
        .strategy(Strategy::FirstAvailable)
        .retry(fast_retry(max_attempts));
    for (key, label) in keys {
        b = b.key_config(KeyConfig::new(*key).label(*label).max_concurrent(1));
    }
    b.build().unwrap()
}

fn chat() -> Request {
    Request::chat("m", [("user", "hi")])
}

fn resp(status: u16, headers: &[(&str, &str)], body: &str) -> HttpResponse {
    HttpResponse {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.as_bytes().to_vec(),
    }
}

// ---------------------------------------------------------------------------------
// A. Retry-After
// ---------------------------------------------------------------------------------

/// Before the fix, `Duration::from_secs_f64` panicked on these inside the worker and
/// the request came back `Cancelled`.
const HOSTILE_RETRY_AFTER: &[(&str, &str)] = &[
    ("retry-after", "111111111111111111111"),
    ("retry-after-ms", "1e300"),
];

#[test]
fn hostile_retry_after_fails_over_and_the_worker_survives() {
    // Key `a` answers its first two attempts 429 with absurd hints; `b` always succeeds.
    let a_calls = Arc::new(AtomicUsize::new(0));
    let calls = a_calls.clone();
    let pool = Pool::with_transport(
        config(&[("sk-hostile-a", "a"), ("sk-hostile-b", "b")], 3),
        factory(move |label, _| {
            if label == "a" && calls.fetch_add(1, Ordering::SeqCst) < 2 {
                return Ok(resp(
                    429,
                    HOSTILE_RETRY_AFTER,
                    r#"{"error":{"message":"slow down"}}"#,
                ));
            }
            Ok(support::ok())
        }),
    )
    .unwrap();
    let r = pool.submit(chat()).unwrap().wait().unwrap();
    assert_eq!((r.attempts(), r.keys_tried()), (2, &[0usize, 1][..]));
    // The cooldown was clamped to max_retry_after_ms (50 ms), not 7 days or a panic.
    let s = pool.stats();
    assert!(s.keys[0].cooldown_remaining_ms <= 50, "{:?}", s.keys[0]);
    assert_eq!(s.keys[0].failures.rate_limited, 1);

    // A single-key pool: the same hints on every retry, then success. Every retry waits
    // at most the clamp; the same worker thread answers all three attempts.
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let pool = Pool::with_transport(
        config(&[("sk-hostile-c", "c")], 3),
        factory(move |_, _| {
            if c.fetch_add(1, Ordering::SeqCst) < 2 {
                return Ok(resp(429, HOSTILE_RETRY_AFTER, ""));
            }
            Ok(support::ok())
        }),
    )
    .unwrap();
    let t0 = Instant::now();
    let r = pool.submit(chat()).unwrap().wait().unwrap();
    assert_eq!(r.attempts(), 3);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    // The pool keeps serving.
    for _ in 0..3 {
        assert!(pool.submit(chat()).unwrap().wait().is_ok());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

#[test]
fn hostile_retry_after_from_the_mock_ends_in_a_429_not_cancelled() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    let pool = Pool::new(
        Config::builder()
            .base_url(server.url())
            .key("sk-mock-hostile", 1)
            .retry(fast_retry(2))
            .build()
            .unwrap(),
    )
    .unwrap();
    let far_date =
        httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(200 * 365 * 24 * 3600));
    for hint in [
        "111111111111111111111",
        "1e300",
        far_date.as_str(),
        "-5",
        "NaN",
    ] {
        let req = Request::new(&serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "x"}],
            "mock": {"status": 429, "retry_after": hint},
        }));
        let e = pool.submit(req).unwrap().wait().unwrap_err();
        assert_eq!(
            (e.http_status(), e.attempts()),
            (Some(429), 2),
            "{hint}: {e}"
        );
        let ra = e.retry_after();
        assert!(
            ra.is_none_or(|d| d <= Duration::from_secs(7 * 24 * 3600)),
            "{hint}: {ra:?}"
        );
    }
    // The worker survived every one of them.
    assert!(pool.submit(chat()).unwrap().wait().is_ok());
}

// ---------------------------------------------------------------------------------
// B. Usage
// ---------------------------------------------------------------------------------

#[test]
fn huge_or_garbage_usage_never_panics_or_wraps() {
    const MAX: u64 = u32::MAX as u64;
    let body = r#"{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":1e300}}"#;
    let pool = Pool::with_transport(
        config(&[("sk-usage", "u")], 1),
        factory(move |_, _| Ok(resp(200, &[], body))),
    )
    .unwrap();
    for _ in 0..3 {
        let r = pool.submit(chat()).unwrap().wait().unwrap();
        let u = r.usage().unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (MAX, MAX));
    }
    let s = pool.stats();
    // Three responses of u64::MAX used to wrap the counter.
    assert_eq!(s.keys[0].prompt_tokens, 3 * MAX);
    assert_eq!(s.keys[0].completion_tokens, 3 * MAX);

    // With a tpm limit the pool sums the counts: u64::MAX + 1e300 must not overflow.
    let garbage = [
        r#"{"choices":[],"usage":{"prompt_tokens":-7,"completion_tokens":"12"}}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551615}}"#,
    ];
    for (i, body) in garbage.into_iter().enumerate() {
        let pool = Pool::with_transport(
            Config::builder()
                .base_url("http://127.0.0.1:9/v1")
                .key_config(KeyConfig::new("sk-tpm").tpm(1_000_000))
                .max_attempts(1)
                .build()
                .unwrap(),
            factory(move |_, _| Ok(resp(200, &[], body))),
        )
        .unwrap();
        let r = pool.submit(chat()).unwrap().wait();
        let r = r.unwrap_or_else(|e| panic!("case {i}: {e}"));
        if i == 0 {
            let u = r.usage().unwrap();
            assert_eq!((u.prompt_tokens, u.completion_tokens), (0, 12));
        }
    }
}

// ---------------------------------------------------------------------------------
// C. A 2xx is not always a success
// ---------------------------------------------------------------------------------

#[test]
fn invalid_2xx_bodies_are_retried_then_reported_as_invalid_response() {
    let cases = [
        (
            "truncated JSON",
            r#"{"id":"x","choices":[{"index":0,"message":"#,
        ),
        (
            "HTML",
            "<html><head><title>Just a moment...</title></head><body>cf</body></html>",
        ),
        ("empty object", "{}"),
        ("empty body", ""),
        ("choices not an array", r#"{"choices":"nope"}"#),
        ("trailing comma", r#"{"choices":[],}"#),
        ("a second value after the JSON", r#"{"choices":[]} {"#),
        (
            "control character in a string",
            "{\"choices\":[],\"x\":\"a\u{1}b\"}",
        ),
        ("bad escape", r#"{"choices":[],"x":"\q"}"#),
    ];
    // Deep nesting that never closes: refused without recursion (no stack overflow on
    // a worker thread).
    let deep = format!(r#"{{"choices":[],"x":{}"#, "[".repeat(200_000));
    let deep: &'static str = Box::leak(deep.into_boxed_str());
    for (what, body) in cases
        .into_iter()
        .chain([("200,000 unclosed brackets", deep)])
    {
        let pool = Pool::with_transport(
            config(&[("sk-inv-a", "a"), ("sk-inv-b", "b")], 3),
            factory(move |_, _| Ok(resp(200, &[("content-type", "text/html")], body))),
        )
        .unwrap();
        let e = pool.submit(chat()).unwrap().wait().unwrap_err();
        assert!(matches!(e, Error::InvalidResponse { .. }), "{what}: {e:?}");
        assert_eq!(e.code(), "invalid_response", "{what}");
        assert_eq!(
            (e.http_status(), e.attempts()),
            (Some(200), 3),
            "{what}: {e}"
        );
        assert_eq!(e.response().unwrap().body(), body.as_bytes(), "{what}");
        assert!(e.to_string().contains("invalid response (HTTP 200)"), "{e}");
        let s = pool.stats();
        let failed: u64 = s.keys.iter().map(|k| k.failures.server_error).sum();
        let retries: u64 = s.keys.iter().map(|k| k.retries).sum();
        assert_eq!((failed, retries), (3, 2), "{what}");
        // Retried on the other key first, like a 5xx.
        assert_eq!(e.response().unwrap().keys_tried()[..2], [0, 1], "{what}");
    }
    let pool = Pool::with_transport(
        config(&[("sk-inv-c", "c")], 3),
        factory(|_, _| Ok(resp(200, &[], "<html><body>oops</body></html>"))),
    )
    .unwrap();
    let e = pool.submit(chat()).unwrap().wait().unwrap_err();
    assert!(e.to_string().contains("body: oops"), "{e}");
}

/// A body nested 200,000 levels deep is read without recursion (the validator keeps
/// its own stack, sized by the body, not the worker's) and is no success: a success
/// nests at most 100 levels, so every JSON reader holds it (serde_json stops at 128).
/// 100 levels are a success.
#[test]
fn a_deeply_nested_2xx_is_an_invalid_response_and_100_levels_a_success() {
    let nested = |n: usize| -> &'static str {
        let body = format!(
            r#"{{"x":{}{},"choices":[],"usage":{{"prompt_tokens":5,"completion_tokens":2}}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        );
        Box::leak(body.into_boxed_str())
    };
    let (deep, ok) = (nested(200_000), nested(99));
    let pool = Pool::with_transport(
        config(&[("sk-deep", "d")], 1),
        factory(move |_, req| {
            let shallow = req.body.windows(6).any(|w| w == b"longer");
            Ok(resp(200, &[], if shallow { ok } else { deep }))
        }),
    )
    .unwrap();
    let e = pool.submit(chat()).unwrap().wait().unwrap_err();
    assert!(matches!(e, Error::InvalidResponse { .. }), "{e:?}");
    assert!(
        e.to_string().contains("nested deeper than 100 levels"),
        "{e}"
    );
    let long = Request::chat("m", [("user", "a longer prompt to get the shallow answer")]);
    let r = pool.submit(long).unwrap().wait().unwrap();
    assert_eq!(r.body().len(), ok.len());
    assert!(r.json::<keypool::Value>().is_ok());
    let s = pool.stats();
    assert_eq!(
        (s.keys[0].prompt_tokens, s.keys[0].completion_tokens),
        (5, 2)
    );
}

#[test]
fn an_invalid_2xx_fails_over_to_a_good_key() {
    let pool = Pool::with_transport(
        config(&[("sk-fo-a", "a"), ("sk-fo-b", "b")], 3),
        factory(|label, _| {
            Ok(if label == "a" {
                resp(200, &[], "<html>gateway</html>")
            } else {
                support::ok()
            })
        }),
    )
    .unwrap();
    let r = pool.submit(chat()).unwrap().wait().unwrap();
    assert_eq!((r.attempts(), r.key_label()), (2, "b"));
}

#[test]
fn valid_shapes_pass_and_other_endpoints_need_only_json() {
    let pool = Pool::with_transport(
        config(&[("sk-shape", "s")], 1),
        factory(|_, req| {
            let body = match req.url.rsplit('/').next().unwrap() {
                // An empty choices array is a well-formed answer: a success.
                "completions" if req.url.ends_with("/chat/completions") => r#"{"choices":[]}"#,
                "embeddings" => "{}",
                "completions" => "[1, 2]",
                "moderations" => "not json",
                "stream" => "data: {}\n\ndata: [DONE]\n\n",
                _ => OK_BODY,
            };
            let ct = if req.url.ends_with("/stream") {
                "text/event-stream"
            } else {
                "application/json"
            };
            Ok(resp(200, &[("content-type", ct)], body))
        }),
    )
    .unwrap();
    let send = |path: &str| {
        pool.submit(Request::from_json(path, "{}").unwrap())
            .unwrap()
            .wait()
    };
    let r = send("/chat/completions").unwrap();
    assert_eq!(r.content(), None);
    assert!(send("/embeddings").is_ok());
    assert!(send("/completions").is_ok());
    assert!(send("/stream").is_ok());
    let e = send("/moderations").unwrap_err();
    assert_eq!(e.code(), "invalid_response", "{e}");
}

#[test]
fn the_mocks_malformed_200_is_an_invalid_response_after_every_attempt() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    let pool = Pool::new(
        Config::builder()
            .base_url(server.url())
            .key("sk-malformed", 1)
            .retry(fast_retry(3))
            .build()
            .unwrap(),
    )
    .unwrap();
    let req = Request::new(&serde_json::json!({
        "model": "m", "messages": [{"role": "user", "content": "x"}],
        "mock": {"malformed": true},
    }));
    let e = pool.submit(req).unwrap().wait().unwrap_err();
    assert_eq!((e.code(), e.attempts()), ("invalid_response", 3), "{e}");
    let stats = server.key_stats("sk-malformed").unwrap();
    assert_eq!(stats.statuses.get(&200), Some(&3));
}

// ---------------------------------------------------------------------------------
// D. Error shapes
// ---------------------------------------------------------------------------------

#[test]
fn error_messages_come_from_every_common_shape() {
    let cases: &[(u16, &str, &str)] = &[
        (
            400,
            r#"{"error":{"message":"Invalid model","type":"invalid_request_error","code":"model_not_found"}}"#,
            "Invalid model",
        ),
        (
            200,
            r#"{"error":{"code":400,"message":"Provider returned error","metadata":{"provider_name":"Acme","raw":"bad prompt"}}}"#,
            "Provider returned error (provider Acme: bad prompt)",
        ),
        (
            404,
            r#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}"#,
            "The model `x` does not exist.",
        ),
        (422, r#"{"detail":"Unprocessable"}"#, "Unprocessable"),
        (
            422,
            r#"{"detail":[{"loc":["body","messages"],"msg":"Field required","type":"missing"}]}"#,
            "body.messages: Field required",
        ),
        (400, r#"{"message":"bad things"}"#, "bad things"),
        (404, r#"{"error":"no such model"}"#, "no such model"),
        (400, "plain\ttext\n\n error", "plain text error"),
        (
            400,
            "<html><head><title>400 Bad Request</title></head><body><h1>400</h1></body></html>",
            "400 Bad Request",
        ),
    ];
    for &(status, body, want) in cases {
        let pool = Pool::with_transport(
            config(&[("sk-shape-x", "x")], 1),
            factory(move |_, _| Ok(resp(status, &[], body))),
        )
        .unwrap();
        let e = pool.submit(chat()).unwrap().wait().unwrap_err();
        match &e {
            Error::Http { message, .. } => assert_eq!(message, want, "{body}"),
            other => panic!("{body}: {other:?}"),
        }
        assert!(e.to_string().contains(want), "{e}");
    }
}

// ---------------------------------------------------------------------------------
// E. Secrets in server-provided text
// ---------------------------------------------------------------------------------

const KEY_A: &str = "sk-echo-AAAAAAAAAAAAAAAAAAAA";
const KEY_B: &str = "sk-echo-BBBBBBBBBBBBBBBBBBBB";
const URL_PASSWORD: &str = "pw-CCCCCCCCCCCC";

fn assert_no_secret(what: &str, text: &str) {
    for s in [
        KEY_A,
        KEY_B,
        URL_PASSWORD,
        "AAAAAAAA",
        "BBBBBBBB",
        "CCCCCCCC",
    ] {
        assert!(!text.contains(s), "{what} leaks {s}: {text}");
    }
}

#[test]
fn a_server_echoing_keys_never_leaks_them() {
    // The server echoes the Authorization header (and the pool's other key, and the
    // URL password) in bodies and kept headers, for every kind of failure.
    let pool = Pool::with_transport(
        Config::builder()
            .base_url(format!("http://user:{URL_PASSWORD}@127.0.0.1:9/v1"))
            .key_config(KeyConfig::new(KEY_A).label("acct-a").max_concurrent(1))
            .key_config(KeyConfig::new(KEY_B).label("acct-b").max_concurrent(1))
            .strategy(Strategy::FirstAvailable)
            .retry(fast_retry(1).probe_keys(false))
            .build()
            .unwrap(),
        factory(|_, req| {
            let key = req.key.expose();
            let auth = format!("Bearer {key}");
            let body = req.body;
            let kind: serde_json::Value = serde_json::from_slice(body).unwrap();
            let kind = kind["kind"].as_str().unwrap_or("").to_owned();
            let echo = format!(
                r#"Incorrect API key provided: {auth}. Other: {KEY_B} {KEY_A}. url {}"#,
                req.url
            );
            let json_echo =
                serde_json::json!({"error": {"message": echo, "metadata": {"raw": echo}}});
            let headers = vec![
                ("x-request-id".to_owned(), auth.clone()),
                ("x-ratelimit-remaining-requests".to_owned(), key.to_owned()),
            ];
            let (status, body) = match kind.as_str() {
                "401" => (401, json_echo.to_string()),
                "500" => (500, format!("<html><title>{echo}</title></html>")),
                "in200" => (200, json_echo.to_string()),
                "invalid" => (200, format!("not json {echo}")),
                _ => (500, echo.clone()),
            };
            Ok(HttpResponse {
                status,
                headers,
                body: body.into_bytes(),
            })
        }),
    )
    .unwrap();
    for kind in ["500", "in200", "invalid", "401"] {
        let req = Request::new(&serde_json::json!({"model": "m", "messages": [], "kind": kind}));
        let e = pool.submit(req).unwrap().wait().unwrap_err();
        if kind == "401" {
            // The only key is revoked: the request is not charged for the key's fault
            // and ends with no usable key, its detail free of the echoed key.
            assert!(matches!(e, Error::NoUsableKey { .. }), "{e:?}");
            assert_no_secret(kind, &format!("{e} {e:?}"));
            continue;
        }
        let r = e.response().expect("an HTTP response");
        assert_no_secret(kind, &format!("{e}"));
        assert_no_secret(kind, &format!("{e:?}"));
        assert_no_secret(kind, &r.text());
        assert_no_secret(kind, &format!("{:?}", r.headers()));
        if let Error::Http { message, .. } | Error::InvalidResponse { message, .. } = &e {
            assert_no_secret(kind, message);
            assert!(message.contains("[REDACTED:acct-"), "{kind}: {message}");
        }
        assert!(
            r.text().contains("[REDACTED:acct-a]"),
            "{kind}: {}",
            r.text()
        );
        assert!(
            r.text().contains("[REDACTED:acct-b]"),
            "{kind}: {}",
            r.text()
        );
        assert!(r.text().contains("[REDACTED]@"), "{kind}: {}", r.text());
        assert!(
            r.header("x-request-id")
                .unwrap()
                .starts_with("Bearer [REDACTED:")
        );
    }
}

// ---------------------------------------------------------------------------------
// F. Config secrets
// ---------------------------------------------------------------------------------

fn config_error(json: &str) -> (String, String) {
    match Config::from_json(json) {
        Err(Error::Config { field, message }) => (field, message),
        other => panic!("expected a config error for {json}, got {other:?}"),
    }
}

#[test]
fn config_errors_never_echo_a_key() {
    // An escaped quote inside a value used to end the redaction early.
    let (field, m) = config_error(
        r#"{"keys": [{"key": "sk-a", "max_concurrent": "sk-x\"TAILSECRET\\\"MORESECRET"}]}"#,
    );
    assert_eq!(field, "keys[0].max_concurrent");
    assert!(!m.contains("SECRET"), "{m}");
    // A label containing its own key, or another configured key.
    let (field, m) =
        config_error(r#"{"keys": [{"key": "sk-own-secret-1", "label": "acct sk-own-secret-1"}]}"#);
    assert_eq!(field, "keys[0].label");
    assert!(!m.contains("secret"), "{m}");
    let (field, m) = config_error(
        r#"{"keys": [{"key": "sk-one"}, {"key": "sk-two-secret-2", "label": "my sk-one"}]}"#,
    );
    assert_eq!(field, "keys[1].label");
    assert!(m.contains("keys[0]") && !m.contains("sk-one"), "{m}");
    // A key pasted as a field name.
    let (field, m) = config_error(r#"{"keys": [{"key": "sk-a", "sk-pasted-9": 1}]}"#);
    assert!(
        !field.contains("pasted") && !m.contains("pasted"),
        "{field}: {m}"
    );
    // A plain typo is still named.
    let (field, _) = config_error(r#"{"keys": [{"key": "sk-a", "lable": "x"}]}"#);
    assert_eq!(field, "keys[0].lable");
    // A base URL's password is not echoed with it.
    let (field, m) = config_error(
        r#"{"base_url": "https://u:hunter2secret@h.example/v1?x=1", "keys": [{"key": "sk-a"}]}"#,
    );
    assert_eq!(field, "base_url");
    assert!(!m.contains("hunter2") && m.contains("[REDACTED]"), "{m}");
    // A key in an invalid header name is masked.
    let mut cfg = Config::default();
    cfg.headers = [("Bearer sk-head-secret".to_owned(), "v".to_owned())].into();
    cfg.keys = vec![KeyConfig::new("sk-head-secret")];
    let e = cfg.validate().unwrap_err();
    assert!(!format!("{e} {e:?}").contains("sk-head-secret"), "{e}");
}

#[test]
fn echoed_config_values_are_capped() {
    let url = format!("ftp://{}", "x".repeat(1 << 20));
    let (field, m) = config_error(&format!(
        r#"{{"base_url": "{url}", "keys": [{{"key": "sk-a"}}]}}"#
    ));
    assert_eq!(field, "base_url");
    assert!(m.len() < 300, "{} bytes", m.len());
    assert!(m.contains('…'), "{m}");
    let name = "Bad Header".repeat(100_000);
    let mut c = config(&[("sk-a", "a")], 1);
    c.headers.insert(name, "v".into());
    let e = c.validate().unwrap_err();
    assert!(e.to_string().len() < 400, "{} bytes", e.to_string().len());
}

#[test]
fn trailing_garbage_after_the_config_is_rejected() {
    let good = r#"{"keys": [{"key": "sk-a"}]}"#;
    assert!(Config::from_json(&format!("{good} \n\t")).is_ok());
    for tail in [" x", "}", " {}", ",", " // comment", "\0"] {
        let (field, _) = config_error(&format!("{good}{tail}"));
        assert_eq!(field, "config", "{tail:?}");
    }
}

/// A custom transport's error text that quotes the key is masked like server text.
#[test]
fn custom_transport_errors_are_masked() {
    let pool = Pool::with_transport(
        config(&[("sk-transport-secret-1", "t")], 1),
        factory(|_, req| {
            Err(TransportError::Failed(format!(
                "connect failed for Bearer {}",
                req.key.expose()
            )))
        }),
    )
    .unwrap();
    let e = pool.submit(chat()).unwrap().wait().unwrap_err();
    let shown = format!("{e} {e:?}");
    assert!(matches!(e, Error::Transport { .. }), "{shown}");
    assert!(!shown.contains("sk-transport-secret-1"), "{shown}");
    assert!(shown.contains("REDACTED"), "{shown}");
}
