//! Integration tests of the mock server, observed by a plain HTTP client (ureq).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use keypool_mock::{KeyRule, MockConfig, MockServer};
use serde_json::{Value, json};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn post_with(
    agent: &ureq::Agent,
    url: &str,
    key: Option<&str>,
    body: &str,
) -> Result<Reply, ureq::Error> {
    let mut req = agent.post(url).content_type("application/json");
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut resp = req.send(body)?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = resp.body_mut().read_to_string()?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn chat(server: &MockServer, key: &str, body: Value) -> Result<Reply, ureq::Error> {
    post_with(
        &agent(),
        &format!("{}/chat/completions", server.url()),
        Some(key),
        &body.to_string(),
    )
}

fn with_mock(directive: Value) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "mock": directive})
}

fn start() -> MockServer {
    MockServer::start(MockConfig::default()).expect("start mock server")
}

#[test]
fn chat_success_has_openai_shape() {
    let server = start();
    assert!(server.url().starts_with("http://127.0.0.1:"));
    assert!(server.url().ends_with("/v1"));
    let r = chat(
        &server,
        "sk-a",
        json!({"model": "gpt-test", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello world, how are you?"}
        ]}),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let rid = r.header("x-request-id").unwrap();
    assert!(rid.starts_with("req-"), "{rid}");
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "gpt-test");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "echo: hello world, how are you?"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // "be brief" (8) + "hello world, how are you?" (25) = 33 chars -> 8 tokens.
    assert_eq!(v["usage"]["prompt_tokens"], 8);
    // "echo: hello world, how are you?" = 31 chars -> 7 tokens.
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], 15);

    // Model defaults to "mock-model"; tokens are at least 1.
    let v = chat(
        &server,
        "sk-a",
        json!({"messages": [{"role": "user", "content": ""}]}),
    )
    .unwrap()
    .json();
    assert_eq!(v["model"], "mock-model");
    assert_eq!(v["usage"]["prompt_tokens"], 1);

    let rec = server.key_stats("sk-a").unwrap();
    assert_eq!(rec.requests, 2);
    assert_eq!(rec.statuses.get(&200), Some(&2));
    assert_eq!(rec.log.len(), 2);
    assert!(
        rec.log
            .iter()
            .all(|l| l.status == 200 && l.finished >= l.arrived)
    );
    assert!(rec.first_request.unwrap() <= rec.last_request.unwrap());
    assert!(server.key_stats("nobody").is_none());
}

#[test]
fn routes_and_endpoints() {
    let server = start();
    let base = format!("http://{}", server.addr());
    let a = agent();
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}).to_string();
    for prefix in ["", "/v1", "/api/v1"] {
        let r = post_with(
            &a,
            &format!("{base}{prefix}/chat/completions"),
            Some("k"),
            &body,
        )
        .unwrap();
        assert_eq!(r.status, 200, "{prefix}");
        assert_eq!(r.json()["object"], "chat.completion");

        let r = post_with(
            &a,
            &format!("{base}{prefix}/completions"),
            Some("k"),
            r#"{"model":"m","prompt":"abc"}"#,
        )
        .unwrap();
        assert_eq!(r.status, 200, "{prefix}");
        let v = r.json();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "echo: abc");

        let r = post_with(
            &a,
            &format!("{base}{prefix}/embeddings"),
            Some("k"),
            r#"{"model":"emb","input":"some text here"}"#,
        )
        .unwrap();
        assert_eq!(r.status, 200, "{prefix}");
        let v = r.json();
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "emb");
        assert_eq!(v["data"][0]["object"], "embedding");
        assert_eq!(v["data"][0]["index"], 0);
        assert_eq!(v["data"][0]["embedding"], json!([0.1, 0.2, 0.3]));
        assert_eq!(v["usage"]["prompt_tokens"], 3);
        assert_eq!(v["usage"]["total_tokens"], 3);
    }

    let r = post_with(&a, &format!("{base}/v2/chat/completions"), Some("k"), &body).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], 404);

    let mut resp = a
        .get(format!("{base}/v1/chat/completions"))
        .header("Authorization", "Bearer k")
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let v: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(v["error"]["code"], 405);

    let r = post_with(
        &a,
        &format!("{base}/v1/chat/completions"),
        Some("k"),
        "{not json",
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], 400);

    let rec = server.key_stats("k").unwrap();
    assert_eq!(rec.requests, 12);
    assert_eq!(rec.statuses.get(&200), Some(&9));
    assert_eq!(rec.statuses.get(&404), Some(&1));
    assert_eq!(rec.statuses.get(&405), Some(&1));
    assert_eq!(rec.statuses.get(&400), Some(&1));
}

#[test]
fn missing_key_is_401_recorded_under_empty_key() {
    let server = start();
    let url = format!("{}/chat/completions", server.url());
    let body = json!({"messages": []}).to_string();
    let r = post_with(&agent(), &url, None, &body).unwrap();
    assert_eq!(r.status, 401);
    let v = r.json();
    assert_eq!(v["error"]["message"], "missing API key");
    assert_eq!(v["error"]["code"], 401);

    // An empty bearer token is missing too.
    let mut resp = agent()
        .post(&url)
        .header("Authorization", "Bearer ")
        .send(body.as_str())
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let _ = resp.body_mut().read_to_string();

    let rec = server.key_stats("").unwrap();
    assert_eq!(rec.requests, 2);
    assert_eq!(rec.statuses.get(&401), Some(&2));
}

#[test]
fn status_and_retry_directives() {
    let server = start();
    let r = chat(&server, "k", with_mock(json!({"status": 503}))).unwrap();
    assert_eq!(r.status, 503);
    let v = r.json();
    assert_eq!(v["error"]["message"], "mock 503");
    assert_eq!(v["error"]["type"], "mock_error");
    assert_eq!(v["error"]["code"], 503);
    assert_eq!(r.header("retry-after"), None);

    let r = chat(
        &server,
        "k",
        with_mock(json!({"status": 429, "retry_after_ms": 1500, "should_retry": true})),
    )
    .unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after-ms"), Some("1500"));
    assert_eq!(r.header("retry-after"), Some("2"));
    assert_eq!(r.header("x-should-retry"), Some("true"));

    let date = "Wed, 21 Oct 2015 07:28:00 GMT";
    let r = chat(
        &server,
        "k",
        with_mock(json!({"status": 429, "retry_after": date, "should_retry": false})),
    )
    .unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some(date));
    assert_eq!(r.header("retry-after-ms"), None);
    assert_eq!(r.header("x-should-retry"), Some("false"));

    let rec = server.key_stats("k").unwrap();
    assert_eq!(rec.statuses.get(&503), Some(&1));
    assert_eq!(rec.statuses.get(&429), Some(&2));
    let retry: Vec<_> = rec.log.iter().map(|l| l.retry_after_ms).collect();
    assert_eq!(retry, vec![None, Some(1500), None]);
}

#[test]
fn delay_drop_malformed_error_in_200_and_slow_body_directives() {
    let server = start();

    let t = Instant::now();
    let r = chat(&server, "k", with_mock(json!({"delay_ms": 200}))).unwrap();
    assert_eq!(r.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(200));

    let err = chat(&server, "k", with_mock(json!({"drop": true})))
        .expect_err("a dropped connection is an error");
    let msg = err.to_string().to_lowercase();
    assert!(
        matches!(err, ureq::Error::Io(_) | ureq::Error::Protocol(_))
            || msg.contains("closed")
            || msg.contains("eof"),
        "{err:?}"
    );

    let r = chat(&server, "k", with_mock(json!({"malformed": true}))).unwrap();
    assert_eq!(r.status, 200);
    assert!(
        serde_json::from_str::<Value>(&r.body).is_err(),
        "{}",
        r.body
    );

    let r = chat(&server, "k", with_mock(json!({"error_in_200": true}))).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"error": {"code": 502, "message": "upstream error"}})
    );
    let r = chat(
        &server,
        "k",
        with_mock(json!({"error_in_200": true, "error_code": 429})),
    )
    .unwrap();
    assert_eq!(r.json()["error"]["code"], 429);

    let t = Instant::now();
    let r = chat(
        &server,
        "k",
        with_mock(json!({"slow_body": true, "chunk_delay_ms": 60})),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "echo: hi");
    assert!(t.elapsed() >= Duration::from_millis(180));

    let rec = server.key_stats("k").unwrap();
    assert_eq!(rec.requests, 6);
    assert_eq!(rec.in_flight, 0);
    assert_eq!(rec.statuses.get(&0), Some(&1));
    assert_eq!(rec.statuses.get(&200), Some(&5));
    let statuses: Vec<u16> = rec.log.iter().map(|l| l.status).collect();
    assert_eq!(statuses, vec![200, 0, 200, 200, 200, 200]);
    assert!(rec.log[0].finished - rec.log[0].arrived >= Duration::from_millis(200));
    assert!(rec.log[5].finished - rec.log[5].arrived >= Duration::from_millis(180));
}

#[test]
fn in_flight_accounting_is_exact() {
    const N: usize = 20;
    let server = Arc::new(start());
    let barrier = Arc::new(Barrier::new(N));
    let threads: Vec<_> = (0..N)
        .map(|_| {
            let server = Arc::clone(&server);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let a = agent();
                let url = format!("{}/chat/completions", server.url());
                let body = with_mock(json!({"delay_ms": 400})).to_string();
                barrier.wait();
                post_with(&a, &url, Some("sk-conc"), &body).unwrap().status
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    let rec = server.key_stats("sk-conc").unwrap();
    assert_eq!(rec.requests, N as u64);
    assert_eq!(rec.max_in_flight, N);
    assert_eq!(rec.in_flight, 0);
    assert_eq!(rec.log.len(), N);
    let stats = server.stats();
    assert_eq!(stats.max_in_flight_total, N);
    assert_eq!(stats.in_flight_total, 0);
    assert_eq!(stats.total_requests, N as u64);

    // Sequential requests on one keep-alive connection never overlap.
    server.reset_stats();
    let a = agent();
    let url = format!("{}/chat/completions", server.url());
    for _ in 0..10 {
        post_with(&a, &url, Some("sk-seq"), r#"{"messages":[]}"#).unwrap();
    }
    let rec = server.key_stats("sk-seq").unwrap();
    assert_eq!((rec.requests, rec.max_in_flight, rec.in_flight), (10, 1, 0));
    assert!(server.key_stats("sk-conc").is_none());
}

/// `last_request` is the latest arrival, `first_request` the earliest, and the log is
/// in arrival order, also when requests of one key arrive at once on several connections
/// (a test may cut "requests after X" at `last_request`; an arrival stamped before the
/// accounting lock and recorded after a later one used to break all three).
#[test]
fn arrival_bookkeeping_is_ordered_under_concurrency() {
    const N: usize = 8;
    const ROUNDS: usize = 40;
    let server = Arc::new(start());
    for round in 0..ROUNDS {
        let key = format!("sk-order-{round}");
        let barrier = Arc::new(Barrier::new(N));
        let threads: Vec<_> = (0..N)
            .map(|_| {
                let (server, barrier, key) =
                    (Arc::clone(&server), Arc::clone(&barrier), key.clone());
                std::thread::spawn(move || {
                    let a = agent();
                    let url = format!("{}/chat/completions", server.url());
                    barrier.wait();
                    post_with(&a, &url, Some(&key), r#"{"messages":[]}"#)
                        .unwrap()
                        .status
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 200);
        }
        let rec = server.key_stats(&key).unwrap();
        let arrivals: Vec<Duration> = rec.log.iter().map(|r| r.arrived).collect();
        assert_eq!(arrivals.len(), N);
        assert!(
            arrivals.is_sorted(),
            "round {round}: log not in arrival order: {arrivals:?}"
        );
        assert_eq!(
            rec.last_request,
            arrivals.iter().max().copied(),
            "round {round}: {arrivals:?}"
        );
        assert_eq!(
            rec.first_request,
            arrivals.iter().min().copied(),
            "round {round}: {arrivals:?}"
        );
    }
}

#[test]
fn key_rules() {
    let server = start();
    server.set_key_rule(
        "revoked",
        KeyRule {
            always_status: Some(401),
            ..KeyRule::default()
        },
    );
    for _ in 0..3 {
        let r = chat(&server, "revoked", with_mock(json!({"status": 200}))).unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"]["code"], 401);
    }

    server.set_key_rule(
        "flaky",
        KeyRule {
            always_status: Some(429),
            retry_after_ms: Some(250),
            fail_first: 2,
            ..KeyRule::default()
        },
    );
    let statuses: Vec<u16> = (0..4)
        .map(|_| chat(&server, "flaky", with_mock(json!({}))).unwrap().status)
        .collect();
    assert_eq!(statuses, vec![429, 429, 200, 200]);
    let rec = server.key_stats("flaky").unwrap();
    assert_eq!(rec.log[0].retry_after_ms, Some(250));
    assert_eq!(rec.log[2].retry_after_ms, None);

    server.set_key_rule(
        "slow",
        KeyRule {
            latency_ms: Some(150),
            ..KeyRule::default()
        },
    );
    let t = Instant::now();
    assert_eq!(
        chat(&server, "slow", json!({"messages": []}))
            .unwrap()
            .status,
        200
    );
    assert!(t.elapsed() >= Duration::from_millis(150));

    // A default rule removes the override; other keys are unaffected.
    server.set_key_rule("revoked", KeyRule::default());
    assert_eq!(
        chat(&server, "revoked", json!({"messages": []}))
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        chat(&server, "other", json!({"messages": []}))
            .unwrap()
            .status,
        200
    );
}

#[test]
fn set_config_rates_of_one_apply_to_every_request() {
    let server = start();
    let body = json!({"messages": [{"role": "user", "content": "x"}]});
    let all = |cfg: MockConfig| -> Vec<Result<Reply, ureq::Error>> {
        server.set_config(cfg);
        (0..5).map(|_| chat(&server, "k", body.clone())).collect()
    };

    for r in all(MockConfig {
        fail_429_rate: 1.0,
        retry_after_ms: (1100, 1900),
        ..MockConfig::default()
    }) {
        let r = r.unwrap();
        assert_eq!(r.status, 429);
        let ms: u64 = r.header("retry-after-ms").unwrap().parse().unwrap();
        assert!((1100..=1900).contains(&ms), "{ms}");
        assert_eq!(r.header("retry-after"), Some("2"));
    }
    for (rate, status) in [(0, 500), (1, 502), (2, 503)] {
        let mut cfg = MockConfig::default();
        *[
            &mut cfg.fail_500_rate,
            &mut cfg.fail_502_rate,
            &mut cfg.fail_503_rate,
        ][rate] = 1.0;
        for r in all(cfg) {
            assert_eq!(r.unwrap().status, status);
        }
    }
    for r in all(MockConfig {
        drop_rate: 1.0,
        ..MockConfig::default()
    }) {
        assert!(r.is_err());
    }
    for r in all(MockConfig {
        malformed_rate: 1.0,
        ..MockConfig::default()
    }) {
        let r = r.unwrap();
        assert_eq!(r.status, 200);
        assert!(serde_json::from_str::<Value>(&r.body).is_err());
    }
    for r in all(MockConfig {
        error_in_200_rate: 1.0,
        ..MockConfig::default()
    }) {
        let r = r.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["error"]["code"], 502);
    }
    for r in all(MockConfig {
        slow_body_rate: 1.0,
        slow_ms: 40,
        ..MockConfig::default()
    }) {
        assert_eq!(r.unwrap().json()["object"], "chat.completion");
    }
    let t = Instant::now();
    for r in all(MockConfig {
        slow_rate: 1.0,
        slow_ms: 30,
        latency_ms: 10,
        ..MockConfig::default()
    }) {
        assert_eq!(r.unwrap().status, 200);
    }
    assert!(t.elapsed() >= Duration::from_millis(5 * 40));

    let rec = server.key_stats("k").unwrap();
    assert_eq!(rec.requests, 45);
    assert_eq!(rec.statuses.get(&429), Some(&5));
    assert_eq!(rec.statuses.get(&0), Some(&5));
    assert_eq!(rec.statuses.get(&200), Some(&20));
    assert_eq!(rec.in_flight, 0);

    // Back to defaults: everything succeeds.
    for r in all(MockConfig::default()) {
        assert_eq!(r.unwrap().status, 200);
    }
}

#[test]
fn seeded_rates_are_reproducible() {
    let run = || {
        let server = MockServer::start(MockConfig {
            fail_503_rate: 0.5,
            seed: Some(7),
            ..MockConfig::default()
        })
        .unwrap();
        let a = agent();
        let url = format!("{}/chat/completions", server.url());
        (0..20)
            .map(|_| post_with(&a, &url, Some("k"), "{}").unwrap().status)
            .collect::<Vec<_>>()
    };
    let first = run();
    assert_eq!(first, run());
    assert!(first.contains(&503) && first.contains(&200), "{first:?}");
}

#[test]
fn shutdown_does_not_hang_with_requests_in_flight() {
    let server = start();
    let url = format!("{}/chat/completions", server.url());
    let (tx, rx) = std::sync::mpsc::channel();
    let client = std::thread::spawn(move || {
        let body = with_mock(json!({"delay_ms": 30_000})).to_string();
        tx.send(()).unwrap();
        post_with(&agent(), &url, Some("k"), &body).map(|r| r.status)
    });
    rx.recv().unwrap();
    // Wait until the server has the request (no sleeping as synchronisation: poll
    // the server's own accounting, bounded).
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.stats().in_flight_total == 0 && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(server.stats().in_flight_total, 1);
    let t = Instant::now();
    server.shutdown();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(client.join().unwrap().is_err());
}

#[test]
fn reset_stats_clears_counters() {
    let server = start();
    chat(&server, "k", json!({})).unwrap();
    assert_eq!(server.stats().total_requests, 1);
    server.reset_stats();
    let s = server.stats();
    assert_eq!(s.total_requests, 0);
    assert_eq!(s.max_in_flight_total, 0);
    assert!(s.keys.is_empty());
    chat(&server, "k", json!({})).unwrap();
    assert_eq!(server.key_stats("k").unwrap().requests, 1);
}

#[test]
fn drop_inside_an_async_context_does_not_panic_or_hang() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let t = Instant::now();
    rt.block_on(async {
        let server = start();
        drop(server);
    });
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn request_budget_counts_per_key_window_and_answers_429_beyond() {
    // A long window, so the test's few requests fall in one.
    let server = MockServer::start(MockConfig {
        request_budget: Some((3, 60_000)),
        ..MockConfig::default()
    })
    .unwrap();
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let mut seen = Vec::new();
    for _ in 0..4 {
        let r = chat(&server, "sk-a", body.clone()).unwrap();
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        let reset = r.header("x-ratelimit-reset-requests").unwrap();
        let ms: u64 = reset.strip_suffix("ms").unwrap().parse().unwrap();
        assert!((1..=60_000).contains(&ms), "{reset}");
        seen.push((
            r.status,
            r.header("x-ratelimit-remaining-requests")
                .unwrap()
                .to_owned(),
        ));
    }
    assert_eq!(
        seen,
        [(200, "2"), (200, "1"), (200, "0"), (429, "0")]
            .map(|(s, r)| (s, r.to_owned()))
            .to_vec()
    );
    // Per key: another key has its own budget; a key's own replaces the global one.
    let r = chat(&server, "sk-b", body.clone()).unwrap();
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("2"));
    server.set_request_budget("sk-c", Some((1, 60_000)));
    assert_eq!(chat(&server, "sk-c", body.clone()).unwrap().status, 200);
    assert_eq!(chat(&server, "sk-c", body.clone()).unwrap().status, 429);
    server.set_request_budget("sk-d", None);
    for _ in 0..5 {
        let r = chat(&server, "sk-d", body.clone()).unwrap();
        assert_eq!(
            (r.status, r.header("x-ratelimit-limit-requests")),
            (200, None)
        );
    }
}

/// An agent that trusts exactly `ca_pem`.
fn tls_agent(ca_pem: &str) -> ureq::Agent {
    let ca = ureq::tls::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&[ca]))
                .build(),
        )
        .build()
        .into()
}

#[test]
fn tls_server_is_trusted_through_its_ca_and_counts_connections() {
    let server = MockServer::start_tls(MockConfig::default()).unwrap();
    assert!(
        server.url().starts_with("https://127.0.0.1:"),
        "{}",
        server.url()
    );
    let ca = server.ca_pem().unwrap().to_owned();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    let agent = tls_agent(&ca);
    let url = format!("{}/chat/completions", server.url());
    for _ in 0..3 {
        let r = post_with(&agent, &url, Some("k1"), &with_mock(json!({})).to_string()).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // localhost is in the certificate too.
    let local = url.replace("127.0.0.1", "localhost");
    let r = post_with(
        &agent,
        &local,
        Some("k2"),
        &with_mock(json!({})).to_string(),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let st = server.stats();
    assert_eq!(st.total_requests, 4);
    assert_eq!(st.tls_failures, 0);
    // One keep-alive connection for k1's three requests, another host name for k2.
    assert_eq!(st.keys["k1"].connections(), 1);
    assert_eq!(st.keys["k1"].requests, 3);
    assert_eq!(st.connections, 2);

    // Another generated CA is not trusted: the handshake fails, no request is seen.
    let other = keypool_mock::MockTls::generate().unwrap();
    let e = post_with(&tls_agent(other.ca_pem()), &url, Some("k3"), "{}").unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    // The server learns of the failure from the client's alert, a moment later.
    let until = Instant::now() + Duration::from_secs(10);
    while server.stats().tls_failures == 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    let st = server.stats();
    assert_eq!(st.total_requests, 4);
    assert_eq!(st.tls_failures, 1);
}

#[test]
fn tls_server_can_require_a_client_certificate() {
    let tls = keypool_mock::MockTls::generate().unwrap();
    let ca = tls.ca_pem().to_owned();
    let (cert, key) = tls.client_cert().unwrap().unwrap();
    let tls = tls.require_client_cert(&ca).unwrap();
    let server = MockServer::start_with(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        MockConfig::default(),
        Some(tls),
    )
    .unwrap();
    let url = format!("{}/chat/completions", server.url());
    let body = with_mock(json!({})).to_string();
    assert!(post_with(&tls_agent(&ca), &url, Some("k"), &body).is_err());
    assert_eq!(server.stats().total_requests, 0);
    let roots =
        ureq::tls::RootCerts::new_with_certs(&[
            ureq::tls::Certificate::from_pem(ca.as_bytes()).unwrap()
        ]);
    let client = ureq::tls::ClientCert::new_with_certs(
        &[ureq::tls::Certificate::from_pem(cert.as_bytes()).unwrap()],
        ureq::tls::PrivateKey::from_pem(key.as_bytes()).unwrap(),
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(roots)
                .client_cert(Some(client))
                .build(),
        )
        .build()
        .into();
    assert_eq!(
        post_with(&agent, &url, Some("k"), &body).unwrap().status,
        200
    );
}

/// `GET url` with the bearer `key`: (status, body as JSON).
fn get_json(url: &str, key: &str) -> (u16, Value) {
    let mut resp = agent()
        .get(url)
        .header("Authorization", format!("Bearer {key}"))
        .call()
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&body).unwrap())
}

#[test]
fn models_are_listed_and_a_revoked_key_is_refused_on_key_and_models() {
    let server = start();
    let base = format!("http://{}", server.addr());
    for prefix in ["", "/v1", "/api/v1"] {
        let (status, v) = get_json(&format!("{base}{prefix}/models"), "k");
        assert_eq!(status, 200, "{prefix}");
        assert_eq!(v["object"], "list");
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["mock-model", "mock-embedding"]);
        assert_eq!(v["data"][0]["object"], "model");
    }
    server.set_models(Some(vec!["a/b".into()]));
    assert_eq!(
        get_json(&format!("{base}/v1/models"), "k").1["data"][0]["id"],
        "a/b"
    );
    server.set_models(None);
    assert_eq!(get_json(&format!("{base}/v1/models"), "k").0, 404);
    // Neither route counts as a request.
    assert!(server.key_stats("k").is_none());

    // A key refused everywhere (401, 403) is refused on both routes, with its body.
    server.set_models(Some(vec!["m".into()]));
    server.set_key_rule(
        "revoked",
        KeyRule {
            always_status: Some(401),
            body: Some(r#"{"error":{"message":"User not found.","code":401}}"#.into()),
            ..KeyRule::default()
        },
    );
    for route in ["key", "models"] {
        let (status, v) = get_json(&format!("{base}/api/v1/{route}"), "revoked");
        assert_eq!(
            (status, &v["error"]["message"]),
            (401, &json!("User not found."))
        );
    }
    // Rules that are not a refusal of the key leave the routes alone: a 500, a 401
    // for one model only, a 403 for the first request only.
    for (key, rule) in [
        (
            "busy",
            KeyRule {
                always_status: Some(500),
                ..KeyRule::default()
            },
        ),
        (
            "one-model",
            KeyRule {
                always_status: Some(401),
                model: Some("m".into()),
                ..KeyRule::default()
            },
        ),
        (
            "first",
            KeyRule {
                always_status: Some(403),
                fail_first: 1,
                ..KeyRule::default()
            },
        ),
    ] {
        server.set_key_rule(key, rule);
        assert_eq!(get_json(&format!("{base}/v1/key"), key).0, 200, "{key}");
        assert_eq!(get_json(&format!("{base}/v1/models"), key).0, 200, "{key}");
    }
    // `first` still fails its first completion.
    assert_eq!(
        chat(&server, "first", with_mock(json!({}))).unwrap().status,
        403
    );
}
