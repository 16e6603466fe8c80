//! Regressions found reviewing the blame table and the dispatcher (each failed before
//! its fix): errors inside a 200 never blame the key, a request-shaped 404 never
//! excludes a model, a parked key is re-checked whichever worker parked it, a poor
//! key's 402 parks it, per-key model access stays per key, and nothing spins while
//! jobs wait aside.

use std::time::Duration;

use keypool::{Config, CreditsConfig, KeyConfig, Pool, Request, Strategy};
use keypool_mock::{KeyRule, MockConfig, MockServer};
use serde_json::json;

fn two_keys(server: &MockServer, strategy: Strategy, per_key: usize) -> Pool {
    let b = Config::builder()
        .base_url(server.url())
        .strategy(strategy)
        .key_config(KeyConfig::new("sk-a").label("a").max_concurrent(per_key))
        .key_config(KeyConfig::new("sk-b").label("b").max_concurrent(per_key));
    Pool::new(b.build().unwrap()).unwrap()
}

fn scripted(model: &str, status: u16, body: &str, tools: bool) -> Request {
    let mut v = json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "mock": {"status": status, "body": body, "headers": {}},
    });
    if tools {
        v["tools"] =
            json!([{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]);
    }
    Request::new(&v)
}

/// OpenRouter answers 404 "No endpoints found that support tool use" for a request
/// with `tools` to a model none of whose providers does tool calls. The request's
/// shape is at fault; the model serves plain requests fine.
#[test]
fn f1_a_tools_404_takes_the_model_out_of_the_pool_for_good() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    let pool = two_keys(&server, Strategy::FirstAvailable, 2);
    let body = r#"{"error":{"message":"No endpoints found that support tool use. To learn more about provider routing, visit: https://openrouter.ai/docs/provider-routing","code":404}}"#;
    let e = pool
        .submit(scripted("deepseek/deepseek-r1:free", 404, body, true))
        .unwrap()
        .wait()
        .unwrap_err();
    eprintln!("tools request: {e} (blame {:?})", e.blame());
    // A plain request for the same model, no tools: the mock would serve it.
    let plain = pool
        .submit(Request::chat(
            "deepseek/deepseek-r1:free",
            [("user", "hello")],
        ))
        .unwrap()
        .wait();
    let sent: u64 = server.stats().keys.values().map(|k| k.requests).sum();
    assert!(
        plain.is_ok(),
        "plain request refused without being sent ({sent} requests reached the mock): {:?}",
        plain.err().map(|e| e.to_string())
    );
}

/// A 200 whose choice failed with an upstream code 401 (the generation started, so our
/// key was accepted): the key is disabled for good.
#[test]
fn f2_a_choice_error_code_401_in_a_200_disables_the_key() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    let pool = two_keys(&server, Strategy::FirstAvailable, 1);
    let body = r#"{"id":"gen-1","object":"chat.completion","choices":[{"index":0,"finish_reason":"error","message":{"role":"assistant","content":""},"error":{"code":401,"message":"Upstream provider: invalid credentials"}}]}"#;
    let r = pool.submit(scripted("m", 200, body, false)).unwrap().wait();
    eprintln!(
        "result: {:?}",
        r.as_ref().map(|_| ()).map_err(|e| e.to_string())
    );
    for k in pool.stats().keys {
        assert_eq!(k.disabled_reason, None, "key {} taken out", k.label);
    }
}

/// OpenRouter's "requires more credits, or fewer max_tokens ... can only afford N" is
/// about this key's balance: another key with credit would serve the same request.
#[test]
fn f3_a_poor_keys_402_fails_a_request_another_key_would_serve() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    server.set_key_rule(
        "sk-a",
        KeyRule {
            always_status: Some(402),
            body: Some(r#"{"error":{"message":"This request requires more credits, or fewer max_tokens. You requested up to 4096 tokens, but can only afford 0. To increase, visit https://openrouter.ai/settings/credits and upgrade to a paid account","code":402,"metadata":{"provider_name":null}}}"#.to_owned()),
            ..KeyRule::default()
        },
    );
    let pool = two_keys(&server, Strategy::RoundRobin, 2);
    let results = pool.batch((0..10).map(|i| Request::chat("m", [("user", &*format!("l{i}"))])));
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| {
            r.as_ref()
                .err()
                .map(|e| format!("{e} blame={:?}", e.blame()))
        })
        .collect();
    let a = server.key_stats("sk-a").map_or(0, |k| k.requests);
    assert!(
        failed.is_empty(),
        "{} of 10 failed though key b serves everything (key a got {a}): {:?}",
        failed.len(),
        failed.first()
    );
}

/// A key parked for credit by one of its workers while its first worker sits idle in
/// `rx.recv()`: nothing ever wakes the first worker, so the key is never re-checked.
#[test]
fn f4_a_key_parked_by_a_sibling_worker_is_never_rechecked() {
    f4(4);
}

/// Control: with one worker (always the first) the same run rejoins.
#[test]
fn f4_control_one_worker_rejoins() {
    f4(1);
}

fn f4(workers: usize) {
    let mut stuck = 0;
    for round in 0..4 {
        let server = MockServer::start(MockConfig {
            latency_ms: 30,
            ..MockConfig::default()
        })
        .unwrap();
        server.set_credit("sk-a", Some(100.0));
        let b = Config::builder()
            .base_url(server.url())
            .strategy(Strategy::FirstAvailable)
            .key_config(KeyConfig::new("sk-a").label("a").max_concurrent(workers))
            .key_config(KeyConfig::new("sk-b").label("b").max_concurrent(1))
            .credits(CreditsConfig::with_floor(0.0).recheck_ms(100));
        let pool = Pool::new(b.build().unwrap()).unwrap();
        // Key a's account runs dry: its next answer is a 402, the check after it parks.
        server.set_credit("sk-a", Some(0.0));
        server.set_key_rule(
            "sk-a",
            KeyRule {
                always_status: Some(402),
                fail_first: 1,
                body: Some(r#"{"error":{"code":402,"message":"Insufficient credits. Add more using https://openrouter.ai/credits"}}"#.to_owned()),
                ..KeyRule::default()
            },
        );
        pool.submit(Request::chat("m", [("user", "x")]))
            .unwrap()
            .wait()
            .unwrap();
        assert!(pool.stats().keys[0].disabled_reason.is_some(), "parked");
        // Topped up; 40 lines × 30 ms on key b alone is > 1 s of waiting work.
        server.set_credit("sk-a", Some(100.0));
        let results =
            pool.batch((0..40).map(|i| Request::chat("m", [("user", &*format!("l{i}"))])));
        assert!(results.iter().all(Result::is_ok));
        let s = &pool.stats().keys[0];
        eprintln!(
            "round {round}: rejoined {} disabled {:?} checks {}",
            s.rejoined,
            s.disabled_reason,
            server.credit("sk-a").unwrap().checks
        );
        if s.rejoined == 0 {
            stuck += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        stuck, 0,
        "{stuck} of 4 pools never re-checked their parked key"
    );
}

/// OpenAI's documented 403 for a project without access to one model (code
/// `model_not_found`): a (key, model) fact. Two such requests served elsewhere take the
/// key out for good, for every model.
#[test]
fn f5_a_model_access_403_takes_the_whole_key_out() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    server.set_key_rule(
        "sk-a",
        KeyRule {
            always_status: Some(403),
            body: Some(r#"{"error":{"message":"Project `proj_abc` does not have access to model `gpt-4o`","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#.to_owned()),
            ..KeyRule::default()
        },
    );
    let pool = two_keys(&server, Strategy::FirstAvailable, 1);
    for i in 0..4 {
        let _ = pool
            .submit(Request::chat("gpt-4o", [("user", &*format!("l{i}"))]))
            .unwrap()
            .wait();
        std::thread::sleep(Duration::from_millis(1100)); // past the 403 pause
    }
    let s = &pool.stats().keys[0];
    assert_eq!(
        s.disabled_reason, None,
        "key a (fine for its other models) taken out"
    );
}

/// OpenAI's documented 404 "does not exist or you do not have access to it": access is
/// the key's project/org. Excluding the model for every key on the base URL refuses a
/// request key b (another org, with access) would serve.
#[test]
fn f6_one_orgs_model_404_excludes_the_model_for_every_key_on_the_base_url() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    server.set_key_rule(
        "sk-a",
        KeyRule {
            always_status: Some(404),
            body: Some(r#"{"error":{"message":"The model `gpt-4o` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#.to_owned()),
            ..KeyRule::default()
        },
    );
    let pool = two_keys(&server, Strategy::FirstAvailable, 1);
    let r = pool
        .submit(Request::chat("gpt-4o", [("user", "x")]))
        .unwrap()
        .wait();
    let b = server.key_stats("sk-b").map_or(0, |k| k.requests);
    assert!(
        r.is_ok(),
        "key b (has access) never asked ({b} requests): {:?}",
        r.err().map(|e| e.to_string())
    );
}

fn cpu_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// No spin while a job waits aside: (i) for its only key, busy; (ii) a retry whose
/// model cools at its only key while another key stands idle.
#[test]
fn f7_no_spin_while_jobs_wait_aside() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    let b = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::FirstAvailable)
        .key_config(
            KeyConfig::new("sk-a")
                .label("a")
                .max_concurrent(1)
                .models(["acme/*"]),
        )
        .key_config(
            KeyConfig::new("sk-b")
                .label("b")
                .max_concurrent(1)
                .models(["other/*"]),
        );
    let pool = Pool::new(b.build().unwrap()).unwrap();
    // (i) a long request holds key a; a second acme job waits aside (b idle).
    let slow = Request::new(
        &json!({"model":"acme/x","messages":[{"role":"user","content":"s"}],"mock":{"delay_ms":2000}}),
    );
    let t1 = pool.submit(slow).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t2 = pool
        .submit(Request::chat("acme/x", [("user", "y")]))
        .unwrap();
    let c0 = cpu_ticks();
    std::thread::sleep(Duration::from_millis(1500));
    let busy = cpu_ticks() - c0;
    t1.wait().unwrap();
    t2.wait().unwrap();
    // (ii) an upstream 429 for acme/x at key a with Retry-After 2 s: the retry waits.
    server.set_key_rule(
        "sk-a",
        KeyRule {
            always_status: Some(429),
            fail_first: 1,
            retry_after_ms: Some(2000),
            body: Some(r#"{"error":{"code":429,"message":"Provider returned error","metadata":{"provider_name":"Acme","raw":"acme/x is temporarily rate-limited upstream"}}}"#.to_owned()),
            ..KeyRule::default()
        },
    );
    let t3 = pool
        .submit(Request::chat("acme/x", [("user", "z")]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let c1 = cpu_ticks();
    std::thread::sleep(Duration::from_millis(1500));
    let cooling = cpu_ticks() - c1;
    let r = t3.wait();
    eprintln!(
        "cpu ticks over 1.5 s: aside-on-busy {busy}, aside-retry-cooling {cooling}; t3 {:?}",
        r.as_ref().map(|_| ()).map_err(|e| e.to_string())
    );
    assert!(busy < 30 && cooling < 30, "spin: {busy} / {cooling} ticks");
}
