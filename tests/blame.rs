//! Whose fault is it (`src/blame.rs`): answers shaped as OpenRouter and OpenAI document
//! them, judged at the mock server from its own request counts. A request's fault
//! never takes a key out; a key's (or a model's) fault moves the request without
//! spending its attempts, and only as far as the evidence goes.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keypool::{
    Blame, Config, ConfigBuilder, CreditsConfig, Error, KeyConfig, Pool, Request, RetryConfig,
    Strategy,
};
use keypool_mock::{KeyRule, MockConfig, MockServer, RequestRecord};
use serde_json::json;

/// OpenRouter's moderation refusal (403 with `metadata.reasons` / `flagged_input`).
const OR_MODERATION: &str = r#"{"error":{"code":403,"message":"openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for \"harassment\"","metadata":{"reasons":["harassment"],"flagged_input":"you are a ...","provider_name":"OpenAI","model_slug":"openai/gpt-4o"}}}"#;
/// OpenRouter's 402 for a request its budget cannot cover.
const OR_WEIGHT_402: &str = r#"{"error":{"code":402,"message":"This request requires more credits, or fewer max_tokens. You requested up to 100000 tokens, but can only afford 1234. To increase, visit https://openrouter.ai/settings/credits","metadata":{"reason":"weight_exceeds_budget"}}}"#;
/// OpenRouter's transient 402 (the account's in-flight budget).
const OR_IN_FLIGHT_402: &str = r#"{"error":{"code":402,"message":"Request exceeds the in-flight budget of your account; retry shortly","metadata":{"limit_source":"openrouter_in_flight_budget"}}}"#;
/// OpenRouter's upstream rate limit for one model.
const OR_UPSTREAM_429: &str = r#"{"error":{"code":429,"message":"Provider returned error","metadata":{"provider_name":"Acme","raw":"acme/x is temporarily rate-limited upstream. Please retry shortly."}}}"#;
/// OpenRouter's free-model rate limit (the account's).
const OR_FREE_429: &str = r#"{"error":{"message":"Rate limit exceeded: free-models-per-min. ","code":429,"metadata":{"headers":{"X-RateLimit-Limit":"20","X-RateLimit-Remaining":"0"},"provider_name":null}}}"#;
/// A key-wide rate limit (no model or provider detail).
const OR_KEY_429: &str = r#"{"error":{"message":"Rate limit exceeded","code":429}}"#;
/// OpenAI's spent quota.
const OPENAI_QUOTA_429: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
/// OpenRouter's unknown model (no provider serves it at this base URL).
const OR_MODEL_404: &str = r#"{"error":{"message":"No endpoints found for acme/x.","code":404}}"#;
/// A 200 whose only choice failed (OpenRouter documents `choices[].error`).
const FAILED_CHOICE_200: &str = r#"{"id":"gen-1","object":"chat.completion","choices":[{"index":0,"finish_reason":"error","message":{"role":"assistant","content":""},"error":{"code":502,"message":"Upstream provider disconnected"}}]}"#;

fn retry(max_attempts: u32) -> RetryConfig {
    let mut r = RetryConfig::default();
    r.max_attempts = max_attempts;
    r.base_delay_ms = 20;
    r.max_delay_ms = 200;
    r
}

fn builder(base: &str, names: &[&str], per_key: usize) -> ConfigBuilder {
    let mut b = Config::builder()
        .base_url(base)
        .strategy(Strategy::RoundRobin)
        .queue_capacity(1024)
        .retry(retry(3));
    for n in names {
        b = b.key_config(
            KeyConfig::new(format!("sk-{n}"))
                .label(*n)
                .max_concurrent(per_key),
        );
    }
    b
}

fn new_pool(b: ConfigBuilder) -> Pool {
    Pool::new(b.build().unwrap()).unwrap()
}

fn start() -> MockServer {
    MockServer::start(MockConfig::default()).unwrap()
}

fn line(i: usize, model: &str) -> Request {
    Request::chat(model, [("user", &*format!("line {i}"))])
}

/// A line whose every answer is `status` with `body` (and these headers).
fn scripted(i: usize, model: &str, status: u16, body: &str, headers: serde_json::Value) -> Request {
    Request::new(&json!({
        "model": model,
        "messages": [{"role": "user", "content": format!("line {i}")}],
        "mock": {"status": status, "body": body, "headers": headers},
    }))
}

fn rule(status: u16, body: &str) -> KeyRule {
    KeyRule {
        always_status: Some(status),
        body: Some(body.to_owned()),
        ..KeyRule::default()
    }
}

fn all_logs(server: &MockServer) -> Vec<RequestRecord> {
    server
        .stats()
        .keys
        .into_values()
        .flat_map(|k| k.log)
        .collect()
}

fn count_status(server: &MockServer, status: u16) -> usize {
    all_logs(server)
        .iter()
        .filter(|r| r.status == status)
        .count()
}

fn no_key_out(pool: &Pool) {
    for k in pool.stats().keys {
        assert_eq!(k.disabled_reason, None, "key {} was taken out", k.label);
        assert_eq!(k.cooldown_remaining_ms, 0, "key {} cools", k.label);
    }
}

#[test]
fn a_flagged_prompt_is_the_requests_fault_and_every_key_stays() {
    let server = start();
    let pool = new_pool(builder(&server.url(), &["a", "b", "c", "d"], 2));
    let flagged = [7, 30, 51];
    let reqs = (0..60).map(|i| {
        if flagged.contains(&i) {
            scripted(i, "openai/gpt-4o", 403, OR_MODERATION, json!({}))
        } else {
            line(i, "openai/gpt-4o")
        }
    });
    let results = pool.batch(reqs);
    let mut ok = 0;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(flagged.contains(&i), "line {i}: {e}");
                assert!(matches!(e, Error::Flagged { .. }), "{e:?}");
                assert_eq!(e.code(), "flagged");
                assert_eq!(e.blame(), Some(Blame::Request));
                assert_eq!(e.http_status(), Some(403));
                assert_eq!(e.attempts(), 1);
                assert!(e.to_string().contains("flagged"), "{e}");
            }
        }
    }
    assert_eq!(ok, 57);
    // Each flagged prompt was sent once; every key stayed in rotation and served.
    assert_eq!(count_status(&server, 403), 3);
    assert_eq!(server.stats().total_requests, 60);
    no_key_out(&pool);
    for k in ["sk-a", "sk-b", "sk-c", "sk-d"] {
        assert!(
            server
                .key_stats(k)
                .unwrap()
                .statuses
                .get(&200)
                .copied()
                .unwrap_or(0)
                >= 1,
            "{k} served nothing"
        );
    }
}

#[test]
fn an_oversized_request_fails_alone_with_its_402() {
    let server = start();
    let pool = new_pool(builder(&server.url(), &["a", "b", "c", "d"], 2));
    let reqs = (0..60).map(|i| {
        if i == 12 {
            scripted(i, "m", 402, OR_WEIGHT_402, json!({}))
        } else {
            line(i, "m")
        }
    });
    let results = pool.batch(reqs);
    for (i, r) in results.iter().enumerate() {
        if i == 12 {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.http_status(), Some(402), "{e}");
            assert_eq!(e.blame(), Some(Blame::Request));
            // The server's advice reaches the user: message and body kept.
            assert!(e.to_string().contains("fewer max_tokens"), "{e}");
            let body = e.response().unwrap().text();
            assert!(body.contains("weight_exceeds_budget"), "{body}");
        } else {
            assert!(r.is_ok(), "line {i}: {:?}", r.as_ref().err());
        }
    }
    assert_eq!(
        count_status(&server, 402),
        1,
        "the oversized line was sent once"
    );
    no_key_out(&pool);
}

#[test]
fn a_transient_402_waits_and_retries_without_parking() {
    let server = start();
    for k in ["sk-a", "sk-b", "sk-c"] {
        server.set_key_rule(
            k,
            KeyRule {
                fail_first: 1,
                retry_after_ms: Some(300),
                ..rule(402, OR_IN_FLIGHT_402)
            },
        );
    }
    let pool = new_pool(builder(&server.url(), &["a", "b", "c"], 2));
    let results = pool.batch((0..60).map(|i| line(i, "m")));
    assert!(
        results.iter().all(Result::is_ok),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    assert_eq!(count_status(&server, 402), 3);
    for k in pool.stats().keys {
        assert_eq!(k.disabled_reason, None, "key {} parked", k.label);
    }
}

#[test]
fn an_unexplained_403_on_one_prompt_costs_two_sends_and_no_key() {
    let server = start();
    let pool = new_pool(builder(&server.url(), &["a", "b", "c"], 2));
    let forbidden = r#"{"error":{"code":403,"message":"Forbidden"}}"#;
    let reqs = (0..30).map(|i| {
        if i == 4 {
            scripted(i, "m", 403, forbidden, json!({}))
        } else {
            line(i, "m")
        }
    });
    let results = pool.batch(reqs);
    let e = results[4].as_ref().unwrap_err();
    assert_eq!(e.http_status(), Some(403));
    assert_eq!(e.blame(), Some(Blame::Request));
    assert!(results.iter().enumerate().all(|(i, r)| i == 4 || r.is_ok()));
    let sends = count_status(&server, 403);
    assert_eq!(sends, 2, "one send, then once more on another key");
    // Both 403s came from different keys.
    assert_eq!(e.response().unwrap().keys_tried().len(), 2);
    no_key_out(&pool);
}

#[test]
fn a_key_that_refuses_everything_with_403_is_out_after_at_most_three() {
    let server = MockServer::start(MockConfig {
        latency_ms: 20,
        ..MockConfig::default()
    })
    .unwrap();
    server.set_key_rule(
        "sk-a",
        rule(403, r#"{"error":{"code":403,"message":"Forbidden"}}"#),
    );
    // After each unexplained 403 the key pauses 200 ms; 60 lines × 20 ms on two keys
    // of two workers keep the run going for 300 ms and more.
    let mut r = retry(3);
    r.default_cooldown_ms = 200;
    let pool = new_pool(builder(&server.url(), &["a", "b", "c"], 2).retry(r));
    let results = pool.batch((0..60).map(|i| line(i, "m")));
    assert!(
        results.iter().all(Result::is_ok),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    let a = server.key_stats("sk-a").unwrap().requests;
    assert!((2..=3).contains(&a), "key a got {a} requests");
    let stats = pool.stats();
    let reason = stats.keys[0].disabled_reason.clone().expect("key a is out");
    assert!(reason.contains("403"), "{reason}");
    assert!(stats.keys[1..].iter().all(|k| k.disabled_reason.is_none()));
    // The refused requests were not charged: each still succeeded with attempts to spare.
    for r in results.iter().flatten() {
        assert!(r.attempts() <= 2);
    }
}

#[test]
fn a_models_upstream_limit_does_not_stall_other_models_on_the_key() {
    let server = start();
    let pool = new_pool(builder(&server.url(), &["a"], 2));
    let x = pool
        .submit(scripted(
            0,
            "acme/x",
            429,
            OR_UPSTREAM_429,
            json!({"retry-after": "20"}),
        ))
        .unwrap();
    // The x line's 429 arrives first.
    let start = Instant::now();
    while count_status(&server, 429) == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "no 429 yet");
        std::thread::yield_now();
    }
    let answered = Instant::now();
    let ys: Vec<_> = (1..=10)
        .map(|i| pool.submit(line(i, "acme/y")).unwrap())
        .collect();
    for t in ys {
        t.wait().unwrap();
    }
    let took = answered.elapsed();
    assert!(took < Duration::from_secs(1), "the y lines took {took:?}");
    // Server-side: every y line arrived within 1 s of the x line's 429.
    let log = server.key_stats("sk-a").unwrap().log;
    let x429 = log.iter().find(|r| r.status == 429).unwrap().finished;
    for r in log.iter().filter(|r| r.model.as_deref() == Some("acme/y")) {
        assert!(r.arrived < x429 + Duration::from_secs(1), "{r:?}");
    }
    // The key itself never cooled; only (a, acme/x) did.
    assert_eq!(pool.stats().keys[0].cooldown_remaining_ms, 0);
    // Closing answers the x line (it waits out its model's cooldown) with its 429.
    pool.close();
    let e = x.wait().unwrap_err();
    assert_eq!(e.blame(), Some(Blame::Model), "{e}");
}

#[test]
fn openrouters_rate_limit_reset_cools_each_key_once() {
    let server = start();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let reset = (now_ms + 2_200).to_string();
    for k in ["sk-a", "sk-b", "sk-c"] {
        server.set_key_rule(
            k,
            KeyRule {
                fail_for_ms: Some(2_000),
                headers: vec![
                    ("X-RateLimit-Limit".into(), "20".into()),
                    ("X-RateLimit-Remaining".into(), "0".into()),
                    ("X-RateLimit-Reset".into(), reset.clone()),
                ],
                ..rule(429, OR_KEY_429)
            },
        );
    }
    let pool = new_pool(builder(&server.url(), &["a", "b", "c"], 2));
    let results = pool.batch((0..30).map(|i| line(i, "m")));
    assert!(
        results.iter().all(Result::is_ok),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    // No key knocks again once it knows the reset: every 429 a key got was sent
    // before its first 429 came back (a key proven at start — `retry.prove_keys` —
    // sends its first wave together, at most `max_concurrent` = 2). The server's
    // clock says when it wrote the first 429, not when the client read it: a wave's
    // second request, sent before that, may arrive a little after on a loaded
    // machine (1.4 ms was seen), hence 200 ms of slack. A knock once the reset was
    // known would be a third 429 for the key (the count), or, within a wave of one,
    // arrive after the slack unless it was immediate — which the count catches too,
    // since every key is proven at start and sends a first wave of two.
    let slack = std::time::Duration::from_millis(200);
    for k in ["sk-a", "sk-b", "sk-c"] {
        let s = server.key_stats(k).unwrap();
        let refused: Vec<_> = s.log.iter().filter(|r| r.status == 429).collect();
        let known = refused.iter().map(|r| r.finished).min();
        assert!(refused.len() <= 2, "{k}: {:?}", s.statuses);
        assert!(
            refused
                .iter()
                .all(|r| known.is_some_and(|t| r.arrived <= t + slack)),
            "{k} knocked again after its reset was known: {:?}",
            s.log
        );
    }
}

#[test]
fn the_free_model_limit_cools_free_models_only() {
    let server = start();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    server.set_key_rule(
        "sk-a",
        KeyRule {
            model: Some("acme/x:free".into()),
            fail_for_ms: Some(1_000),
            headers: vec![("X-RateLimit-Reset".into(), (now_ms + 1_200).to_string())],
            ..rule(429, OR_FREE_429)
        },
    );
    let pool = new_pool(builder(&server.url(), &["a"], 2));
    let free = pool.submit(line(0, "acme/x:free")).unwrap();
    let start = Instant::now();
    while count_status(&server, 429) == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "no 429 yet");
        std::thread::yield_now();
    }
    // Paid lines go at once; the free line waits for the reset, then succeeds.
    let t = Instant::now();
    let paid = pool.batch((1..=10).map(|i| line(i, "acme/y")));
    assert!(paid.iter().all(Result::is_ok));
    assert!(
        t.elapsed() < Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    let r = free.wait().unwrap();
    assert_eq!(r.attempts(), 2);
    let s = server.key_stats("sk-a").unwrap();
    assert_eq!(s.statuses.get(&429).copied(), Some(1), "{:?}", s.statuses);
    assert_eq!(pool.stats().keys[0].cooldown_remaining_ms, 0);
}

#[test]
fn an_insufficient_quota_key_is_asked_once_and_parked() {
    let server = start();
    server.set_key_rule("sk-a", rule(429, OPENAI_QUOTA_429));
    let pool = new_pool(builder(&server.url(), &["a", "b"], 2).strategy(Strategy::FirstAvailable));
    let results = pool.batch((0..10).map(|i| line(i, "m")));
    assert!(results.iter().all(Result::is_ok));
    // Its trial — or, when its proof (`GET /models` accepts a key out of quota) opened
    // it first, its first wave of `max_concurrent` = 2 — and never again.
    assert!(server.key_stats("sk-a").unwrap().requests <= 2);
    let reason = pool.stats().keys[0].disabled_reason.clone().unwrap();
    assert!(
        reason.contains("insufficient_quota") || reason.contains("credit"),
        "{reason}"
    );

    // Alone, the dead key costs its first wave at most, not three per line.
    let server = start();
    server.set_key_rule("sk-a", rule(429, OPENAI_QUOTA_429));
    let pool = new_pool(builder(&server.url(), &["a"], 2));
    let t = Instant::now();
    let results = pool.batch((0..10).map(|i| line(i, "m")));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(server.key_stats("sk-a").unwrap().requests <= 2);
    for r in &results {
        let e = r.as_ref().unwrap_err();
        assert!(
            matches!(
                e,
                Error::NoUsableKey { .. } | Error::Http { status: 429, .. }
            ),
            "{e}"
        );
        assert!(
            matches!(e.blame(), Some(Blame::Key | Blame::Account)),
            "{e}"
        );
    }
}

#[test]
fn a_200_whose_choice_failed_is_retried() {
    let server = start();
    server.set_key_rule("sk-a", rule(200, FAILED_CHOICE_200));
    let pool = new_pool(builder(&server.url(), &["a", "b"], 1));
    let results = pool.batch((0..10).map(|i| line(i, "m")));
    for r in &results {
        let r = r.as_ref().unwrap();
        assert_eq!(r.key_label(), "b");
        assert!(r.content().is_some_and(|c| !c.is_empty()));
    }
    assert!(server.key_stats("sk-a").unwrap().requests >= 1);

    // Alone: the failure is an error that says what failed, never an empty success.
    let server = start();
    server.set_key_rule("sk-a", rule(200, FAILED_CHOICE_200));
    let pool = new_pool(builder(&server.url(), &["a"], 1).retry(retry(2)));
    let e = pool.submit(line(0, "m")).unwrap().wait().unwrap_err();
    assert!(matches!(e, Error::Http { status: 502, .. }), "{e:?}");
    assert_eq!(e.http_status(), Some(200), "the answer's own status");
    assert_eq!(e.attempts(), 2);
    assert!(
        e.to_string().contains("Upstream provider disconnected"),
        "{e}"
    );
    assert_eq!(e.blame(), Some(Blame::Server));
}

#[test]
fn a_model_missing_at_one_base_url_is_served_by_another() {
    let a = start();
    let b = start();
    for k in ["sk-a1", "sk-a2"] {
        a.set_key_rule(
            k,
            KeyRule {
                model: Some("acme/x".into()),
                ..rule(404, OR_MODEL_404)
            },
        );
    }
    let cfg = Config::builder()
        .base_url(a.url())
        .strategy(Strategy::FirstAvailable)
        .retry(retry(3))
        .key_config(KeyConfig::new("sk-a1").label("a1").max_concurrent(2))
        .key_config(KeyConfig::new("sk-a2").label("a2").max_concurrent(2))
        .key_config(
            KeyConfig::new("sk-b")
                .label("b")
                .max_concurrent(2)
                .base_url(b.url()),
        );
    let pool = new_pool(cfg);
    let first = pool.submit(line(0, "acme/x")).unwrap().wait().unwrap();
    assert_eq!(first.key_label(), "b");
    assert_eq!(first.attempts(), 2);
    let results = pool.batch((1..10).map(|i| line(i, "acme/x")));
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|r| r.key_label() == "b"))
    );
    // One 404 at base URL A; its other key shares the verdict and was never asked.
    assert_eq!(count_status(&a, 404), 1);
    // Both A keys keep serving their other models.
    let others = pool.batch((0..8).map(|i| line(i, "acme/y")));
    assert!(others.iter().all(Result::is_ok));
    assert!(others.iter().flatten().any(|r| r.key_label() != "b"));
    no_key_out(&pool);

    // Missing everywhere: the request ends with the 404, blamed on the model.
    let pool2 = new_pool(builder(&a.url(), &["a1", "a2"], 2));
    let e = pool2.submit(line(0, "acme/x")).unwrap().wait().unwrap_err();
    assert_eq!(e.http_status(), Some(404), "{e}");
    assert_eq!(e.blame(), Some(Blame::Model));
}

#[test]
fn a_parked_key_whose_credit_returns_serves_again_in_the_same_run() {
    let server = MockServer::start(MockConfig {
        latency_ms: 40,
        ..MockConfig::default()
    })
    .unwrap();
    server.set_credit("sk-a", Some(0.0)); // at its floor: parked at start
    let cfg = builder(&server.url(), &["a", "b"], 1)
        .strategy(Strategy::FirstAvailable)
        .credits(CreditsConfig::with_floor(0.0).recheck_ms(200));
    let pool = new_pool(cfg);
    assert!(
        pool.stats().keys[0].disabled_reason.is_some(),
        "parked at start"
    );
    let tickets: Vec<_> = (0..40)
        .map(|i| pool.submit(line(i, "m")).unwrap())
        .collect();
    // Topped up while the run goes on (40 lines × 40 ms on one key: 1.6 s of work).
    server.set_credit("sk-a", Some(100.0));
    for t in tickets {
        t.wait().unwrap();
    }
    let a = server.key_stats("sk-a").map_or(0, |s| s.requests);
    assert!(a >= 5, "key a served {a} after its credit returned");
    let s = &pool.stats().keys[0];
    assert_eq!(s.rejoined, 1);
    assert_eq!(s.disabled_reason, None);
}

#[test]
fn a_revoked_key_stays_out() {
    let server = MockServer::start(MockConfig {
        latency_ms: 20,
        ..MockConfig::default()
    })
    .unwrap();
    server.set_key_rule(
        "sk-a",
        rule(401, r#"{"error":{"message":"User not found.","code":401}}"#),
    );
    let cfg = builder(&server.url(), &["a", "b"], 1)
        .strategy(Strategy::FirstAvailable)
        .credits(CreditsConfig::with_floor(0.0).recheck_ms(100));
    let pool = new_pool(cfg);
    // 20 lines × 20 ms on key b: work waits through several re-check intervals.
    let results = pool.batch((0..20).map(|i| line(i, "m")));
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(server.key_stats("sk-a").unwrap().requests, 1);
    let s = &pool.stats().keys[0];
    assert_eq!(s.rejoined, 0);
    assert!(s.disabled_reason.as_deref().unwrap().contains("401"));
}

/// A spent daily quota (issue 24.3): a 429 whose reset lies beyond
/// `max_retry_after_ms` takes the key out until that instant ("exhausted until …")
/// instead of knocking every cooldown; the request moves on uncharged and the key comes
/// back on its own once the reset has passed.
#[test]
fn a_spent_quota_takes_the_key_out_until_its_reset() {
    let server = MockServer::start(MockConfig {
        latency_ms: 20,
        ..MockConfig::default()
    })
    .unwrap();
    server.set_key_rule(
        "sk-a",
        KeyRule {
            fail_first: 1,
            retry_after_ms: Some(1_500),
            ..rule(429, OR_KEY_429)
        },
    );
    let mut r = retry(3);
    r.max_retry_after_ms = 500;
    let pool = new_pool(
        builder(&server.url(), &["a", "b"], 1)
            .strategy(Strategy::FirstAvailable)
            .retry(r),
    );
    let first = pool.submit(line(0, "m")).unwrap().wait().unwrap();
    assert_eq!(first.key_label(), "b");
    assert_eq!(first.attempts(), 2);
    let s = &pool.stats().keys[0];
    let reason = s.disabled_reason.clone().expect("key a out");
    assert!(reason.contains("exhausted until"), "{reason}");
    assert!(!s.parked);
    // While out, every line goes to b; a is not asked.
    let t = Instant::now();
    let results = pool.batch((1..=5).map(|i| line(i, "m")));
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|r| r.key_label() == "b"))
    );
    assert_eq!(server.key_stats("sk-a").unwrap().requests, 1);
    // After the reset, a serves again.
    std::thread::sleep(Duration::from_millis(1_600).saturating_sub(t.elapsed()));
    let results = pool.batch((6..=11).map(|i| line(i, "m")));
    assert!(results.iter().all(Result::is_ok));
    assert!(server.key_stats("sk-a").unwrap().requests >= 2);
    assert_eq!(pool.stats().keys[0].disabled_reason, None);
}
