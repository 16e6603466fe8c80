//! Fallback models (issue 24.2): a request whose model cannot be served — every key
//! serving it out (or cooling past its deadline), or the provider answering that the
//! model is not there (OpenRouter's 404 "No endpoints found") or overloaded (a 503
//! blamed on the model) — moves to the next fallback model on that model's keys;
//! the result says which model served. Counted at the mock.

use keypool::{Config, Error, KeyConfig, Pool, Request};
use keypool_mock::{KeyRule, MockConfig, MockServer};
use serde_json::json;

const OR_MODEL_404: &str = r#"{"error":{"message":"No endpoints found for acme/x.","code":404}}"#;

fn line(i: usize, model: &str) -> Request {
    Request::new(
        &json!({"model": model, "messages": [{"role": "user", "content": format!("q{i}")}]}),
    )
}

fn models_seen(server: &MockServer, key: &str) -> Vec<String> {
    server
        .key_stats(key)
        .map(|r| r.log.iter().filter_map(|l| l.model.clone()).collect())
        .unwrap_or_default()
}

#[test]
fn a_model_whose_keys_are_all_revoked_falls_back_per_request() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    server.set_key_rule(
        "sk-x",
        KeyRule {
            always_status: Some(401),
            ..KeyRule::default()
        },
    );
    let cfg = Config::builder()
        .base_url(server.url())
        .key_config(
            KeyConfig::new("sk-x")
                .label("x")
                .models(["acme/x"])
                .max_concurrent(2),
        )
        .key_config(
            KeyConfig::new("sk-y")
                .label("y")
                .models(["acme/y"])
                .max_concurrent(2),
        )
        .build()
        .unwrap();
    let pool = Pool::new(cfg).unwrap();
    let results = pool.batch((0..10).map(|i| line(i, "acme/x").with_fallback_models(["acme/y"])));
    for r in &results {
        let r = r.as_ref().expect("served by the fallback");
        assert_eq!(r.fallback_model(), Some("acme/y"));
        assert_eq!(r.key_label(), "y");
    }
    // The revoked key cost its trial; the fallback's key saw only the fallback model.
    assert_eq!(server.key_stats("sk-x").unwrap().requests, 1);
    assert!(models_seen(&server, "sk-y").iter().all(|m| m == "acme/y"));
    assert_eq!(models_seen(&server, "sk-y").len(), 10);
    // Without fallbacks the same request fails, saying why.
    let e = pool.submit(line(99, "acme/x")).unwrap().wait().unwrap_err();
    assert!(matches!(e, Error::NoUsableKey { .. }), "{e}");
}

#[test]
fn a_model_the_provider_does_not_have_falls_back_from_the_config() {
    let server = model_x_refused(404, OR_MODEL_404, &[]);
    let cfg = Config::builder()
        .base_url(server.url())
        .key("sk-a", 2)
        .key("sk-b", 2)
        .fallback_models("acme/x", ["acme/z", "acme/y"])
        .build()
        .unwrap();
    let pool = Pool::new(cfg).unwrap();
    let results = pool.batch((0..12).map(|i| line(i, "acme/x")));
    for r in &results {
        let r = r.as_ref().expect("served by a fallback");
        // acme/z is served by the mock too: the first fallback serves.
        assert_eq!(r.fallback_model(), Some("acme/z"));
        let body: serde_json::Value = r.json().unwrap();
        assert!(body.get("choices").is_some());
    }
    // The 404s of the requests already out when the first came back (at most the
    // pool's 2 keys x 2 workers, the keys proven at start); the verdict is shared,
    // then only the fallback goes out.
    let seen: Vec<String> = ["sk-a", "sk-b"]
        .iter()
        .flat_map(|k| models_seen(&server, k))
        .collect();
    let missing = seen.iter().filter(|m| *m == "acme/x").count();
    assert!((1..=4).contains(&missing), "{seen:?}");
    assert_eq!(seen.iter().filter(|m| *m == "acme/z").count(), 12);
    // A model with no fallback and no key is still refused at submit.
    let cfg = Config::builder()
        .base_url(server.url())
        .key_config(KeyConfig::new("sk-c").models(["acme/y"]).max_concurrent(1))
        .build()
        .unwrap();
    let pool = Pool::new(cfg).unwrap();
    assert!(matches!(
        pool.submit(line(0, "acme/q")),
        Err(Error::ModelNotServed { .. })
    ));
    // With a fallback, a model no key serves goes to the fallback's keys.
    let r = pool
        .submit(line(1, "acme/q").with_fallback_models(["acme/y"]))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(r.fallback_model(), Some("acme/y"));
}

/// OpenRouter's 503 when the model's upstream providers are overloaded, with the
/// provider named in `metadata` as its docs show: blamed on the model, not the key.
const OR_PROVIDER_503: &str = r#"{"error":{"code":503,"message":"Provider returned error","metadata":{"provider_name":"Acme","raw":"{\"error\":{\"message\":\"Overloaded\"}}"}}}"#;
/// OpenAI's documented 429 for one model's limit, naming the model.
const OPENAI_MODEL_429: &str = r#"{"error":{"message":"Rate limit reached for acme/x in organization org-1 on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;

/// Both keys answer `acme/x` with `status`/`body` (and `headers`); `acme/y` is served.
fn model_x_refused(status: u16, body: &str, headers: &[(&str, &str)]) -> MockServer {
    let server = MockServer::start(MockConfig::default()).unwrap();
    for k in ["sk-a", "sk-b"] {
        server.set_key_rule(
            k,
            KeyRule {
                model: Some("acme/x".into()),
                always_status: Some(status),
                body: Some(body.into()),
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
                ..KeyRule::default()
            },
        );
    }
    server
}

fn x_then_y(server: &MockServer, deadline_ms: u64) -> Pool {
    x_then_y_with(server, deadline_ms, keypool::RetryConfig::default())
}

fn x_then_y_with(server: &MockServer, deadline_ms: u64, retry: keypool::RetryConfig) -> Pool {
    let cfg = Config::builder()
        .base_url(server.url())
        .retry(retry)
        .key("sk-a", 2)
        .key("sk-b", 2)
        .deadline_ms(deadline_ms)
        .fallback_models("acme/x", ["acme/y"])
        .build()
        .unwrap();
    Pool::new(cfg).unwrap()
}

fn x_seen(server: &MockServer) -> usize {
    ["sk-a", "sk-b"]
        .iter()
        .flat_map(|k| models_seen(server, k))
        .filter(|m| m == "acme/x")
        .count()
}

#[test]
fn a_model_overloaded_upstream_falls_back_at_once() {
    // A 503 blamed on the model cools it at that key (for the default cooldown).
    // Without fallbacks the request would wait for it and retry; with one it moves
    // on at once: each request asks for acme/x at most once.
    let server = model_x_refused(503, OR_PROVIDER_503, &[]);
    let pool = x_then_y(&server, 0);
    let t0 = std::time::Instant::now();
    let results = pool.batch((0..10).map(|i| line(i, "acme/x")));
    for r in &results {
        let r = r.as_ref().expect("served by the fallback");
        assert_eq!(r.fallback_model(), Some("acme/y"));
    }
    let x = x_seen(&server);
    assert!((1..=10).contains(&x), "{x} requests for acme/x");
    // The 503 is the model's: with a fallback left it spends no attempt, so even a
    // single allowed attempt moves on.
    let server = model_x_refused(503, OR_PROVIDER_503, &[]);
    let mut one = keypool::RetryConfig::default();
    one.max_attempts = 1;
    let pool = x_then_y_with(&server, 0, one);
    let r = pool.submit(line(0, "acme/x")).unwrap().wait();
    assert_eq!(r.unwrap().fallback_model(), Some("acme/y"));
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn a_model_cooling_past_the_deadline_falls_back_and_within_it_is_waited_for() {
    // OpenAI's 429 for one model with a 20 s reset: the pair cools 20 s on each key.
    let server = model_x_refused(429, OPENAI_MODEL_429, &[("retry-after", "20")]);
    // A 5 s deadline cannot wait 20 s: after the 429s the request moves to acme/y.
    let pool = x_then_y(&server, 5_000);
    let results = pool.batch((0..6).map(|i| line(i, "acme/x")));
    for r in &results {
        let r = r
            .as_ref()
            .expect("served by the fallback before the deadline");
        assert_eq!(r.fallback_model(), Some("acme/y"));
    }
    assert!((1..=6).contains(&x_seen(&server)));
    // With a 1 s cooldown and no deadline the model is waited for, not replaced: the
    // request comes back to acme/x (still refused, so it ends with the 429).
    let server = model_x_refused(429, OPENAI_MODEL_429, &[("retry-after", "1")]);
    let pool = x_then_y(&server, 0);
    let r = pool.submit(line(0, "acme/x")).unwrap().wait();
    assert!(
        matches!(&r, Err(Error::Http { status: 429, .. })),
        "{:?}",
        r.as_ref().map(|r| r.fallback_model().map(str::to_owned))
    );
    assert!(x_seen(&server) >= 2, "waited for acme/x and asked again");
}

/// OpenAI's 404 for a model the key cannot see: per key, since access is per project.
const OPENAI_NO_ACCESS_404: &str = r#"{"error":{"message":"The model `gpt-typo` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;

#[test]
fn a_misspelt_model_costs_max_attempts_not_one_request_per_key() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    let mut b = Config::builder().base_url(server.url());
    for i in 0..6 {
        let k = format!("sk-{i}");
        server.set_key_rule(
            &k,
            KeyRule {
                model: Some("gpt-typo".into()),
                always_status: Some(404),
                body: Some(OPENAI_NO_ACCESS_404.into()),
                ..KeyRule::default()
            },
        );
        b = b.key(k.as_str(), 1);
    }
    let pool = Pool::new(b.build().unwrap()).unwrap();
    let r = pool.submit(line(0, "gpt-typo")).unwrap().wait();
    assert!(matches!(r, Err(Error::Http { status: 404, .. })), "{r:?}");
    // The first denial is not charged (it may be the key's), the next three are
    // (max_attempts 3): 4 requests, not one for each of the 6 keys.
    let asked: usize = (0..6)
        .map(|i| models_seen(&server, &format!("sk-{i}")).len())
        .sum();
    assert_eq!(asked, 4);
}

/// Breaking it: the overloaded model's 503 carries an absurd `Retry-After`, the
/// fallback's key first answers a truncated 200, keys are proven at start and have an
/// `rpm` budget. Every request still ends served by the fallback, once, within its
/// deadline, and no key appears in any result or in the stats.
#[test]
fn a_fallback_survives_hostile_answers_with_probing_and_rate_limits_on() {
    const SECRET_X: &str = "sk-or-v1-SECRETxxxxxxxxxxxxxxxxxxxx";
    const SECRET_Y: &str = "sk-or-v1-SECRETyyyyyyyyyyyyyyyyyyyy";
    let server = MockServer::start(MockConfig::default()).unwrap();
    server.set_key_rule(
        SECRET_X,
        KeyRule {
            always_status: Some(503),
            body: Some(OR_PROVIDER_503.into()),
            headers: vec![("retry-after".into(), "99999999999999999999999".into())],
            ..KeyRule::default()
        },
    );
    server.set_key_rule(
        SECRET_Y,
        KeyRule {
            always_status: Some(200),
            body: Some(r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"#.into()),
            fail_first: 1,
            ..KeyRule::default()
        },
    );
    let cfg = Config::builder()
        .base_url(server.url())
        .key_config(
            KeyConfig::new(SECRET_X)
                .models(["acme/x"])
                .max_concurrent(2)
                .rpm(600),
        )
        .key_config(
            KeyConfig::new(SECRET_Y)
                .models(["acme/y"])
                .max_concurrent(2)
                .rpm(600),
        )
        .deadline_ms(5_000)
        .fallback_models("acme/x", ["acme/y"])
        .build()
        .unwrap();
    let pool = Pool::new(cfg).unwrap();
    let t0 = std::time::Instant::now();
    let results = pool.batch((0..6).map(|i| line(i, "acme/x")));
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(results.len(), 6);
    for r in &results {
        let shown = format!("{r:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        let r = r.as_ref().expect("served by the fallback");
        assert_eq!(r.fallback_model(), Some("acme/y"));
    }
    let stats = format!("{:?} {}", pool.stats(), pool.stats().to_prometheus());
    assert!(!stats.contains("SECRET"), "{stats}");
    // The truncated 200 was retried once; each request was answered once.
    let y = server.key_stats(SECRET_Y).unwrap();
    assert_eq!(y.requests, 7, "{:?}", y.statuses);
}
