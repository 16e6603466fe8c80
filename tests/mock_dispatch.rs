//! Strategies and the concurrency bound, proven server-side against the mock.

use std::collections::BTreeMap;

use keypool::{Config, KeyConfig, Pool, Request, Strategy};
use keypool_mock::{MockConfig, MockServer};

fn pool(server: &MockServer, keys: usize, per_key: usize, strategy: Strategy) -> Pool {
    let mut b = Config::builder()
        .base_url(server.url())
        .strategy(strategy)
        .queue_capacity(4096);
    for i in 0..keys {
        b = b.key_config(
            KeyConfig::new(format!("sk-test-{i}"))
                .label(format!("acct-{i}"))
                .max_concurrent(per_key),
        );
    }
    Pool::new(b.build().unwrap()).unwrap()
}

fn prompts(n: usize) -> impl Iterator<Item = Request> {
    (0..n).map(|i| Request::chat("mock-model", [("user", &*format!("p{i}"))]))
}

fn server(latency_ms: u64, jitter_ms: u64) -> MockServer {
    MockServer::start(MockConfig {
        latency_ms,
        jitter_ms,
        threads: 2,
        ..MockConfig::default()
    })
    .unwrap()
}

#[test]
fn first_available_saturates_every_key_exactly_to_its_limit() {
    let (k, c) = (4, 8);
    let server = server(40, 0);
    let pool = pool(&server, k, c, Strategy::FirstAvailable);
    let results = pool.batch(prompts(10 * k * c));
    assert!(results.iter().all(Result::is_ok));
    for i in 0..k {
        let rec = server
            .key_stats(&format!("sk-test-{i}"))
            .expect("key seen by server");
        assert_eq!(rec.max_in_flight, c, "server-side max in flight of key {i}");
        assert_eq!(rec.in_flight, 0);
    }
    let stats = server.stats();
    assert_eq!(stats.total_requests, (10 * k * c) as u64);
    assert!(stats.max_in_flight_total <= k * c);
    // Client-side figures agree.
    let s = pool.stats();
    assert!(
        s.keys
            .iter()
            .all(|ks| ks.max_in_flight == c && ks.in_flight == 0)
    );
    assert_eq!(
        s.keys.iter().map(|ks| ks.succeeded).sum::<u64>(),
        (10 * k * c) as u64
    );
}

#[test]
fn first_available_with_spare_capacity_uses_the_first_key_only() {
    let server = server(0, 0);
    let pool = pool(&server, 3, 4, Strategy::FirstAvailable);
    for r in prompts(30) {
        pool.submit(r).unwrap().wait().unwrap();
    }
    assert_eq!(server.key_stats("sk-test-0").unwrap().requests, 30);
    assert!(server.key_stats("sk-test-1").is_none());
}

/// Round-robin over keys that can all take a request when their turn comes: counts
/// differ by at most one. Waves of 4 (one request per key, each key has 3 workers,
/// so a worker still on its way back to idle never makes a key busy) keep every key
/// able to admit; under saturation a busy key is skipped rather than waited for
/// (tests/head_of_line.rs).
#[test]
fn round_robin_counts_differ_by_at_most_one() {
    let server = server(2, 3);
    let pool = pool(&server, 4, 3, Strategy::RoundRobin);
    let mut results = Vec::new();
    let mut left = 402;
    while left > 0 {
        let wave = left.min(4);
        results.extend(pool.batch(prompts(wave)));
        left -= wave;
    }
    assert!(results.iter().all(Result::is_ok));
    let counts: Vec<u64> = (0..4)
        .map(|i| server.key_stats(&format!("sk-test-{i}")).unwrap().requests)
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 402);
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(max - min <= 1, "{counts:?}");
    for i in 0..4 {
        assert!(
            server
                .key_stats(&format!("sk-test-{i}"))
                .unwrap()
                .max_in_flight
                <= 3
        );
    }
}

#[test]
fn least_loaded_spreads_evenly() {
    let server = server(5, 5);
    let pool = pool(&server, 4, 4, Strategy::LeastLoaded);
    let n = 800;
    let results = pool.batch(prompts(n));
    assert!(results.iter().all(Result::is_ok));
    let counts: Vec<u64> = (0..4)
        .map(|i| server.key_stats(&format!("sk-test-{i}")).unwrap().requests)
        .collect();
    let mean = n as f64 / 4.0;
    for (i, &c) in counts.iter().enumerate() {
        assert!(
            (c as f64 - mean).abs() < 0.25 * mean,
            "key {i} got {c} of {n}: {counts:?}"
        );
        assert!(
            server
                .key_stats(&format!("sk-test-{i}"))
                .unwrap()
                .max_in_flight
                <= 4
        );
    }
}

#[test]
fn batch_keeps_input_order_with_mixed_failures() {
    let server = server(1, 4);
    let config = Config::builder()
        .base_url(server.url())
        .key("sk-test-a", 4)
        .key("sk-test-b", 4)
        .max_attempts(1)
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let statuses = [200, 500, 200, 404, 200, 503, 400, 200];
    let reqs = (0..400).map(|i| {
        let status = statuses[i % statuses.len()];
        let mut body =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": format!("p{i}")}]});
        if status != 200 {
            body["mock"] = serde_json::json!({"status": status});
        }
        Request::new(&body)
    });
    let results = pool.batch(reqs);
    assert_eq!(results.len(), 400);
    let mut by_status = BTreeMap::new();
    for (i, r) in results.iter().enumerate() {
        let want = statuses[i % statuses.len()];
        match r {
            Ok(resp) => {
                assert_eq!(want, 200, "result {i}");
                assert_eq!(
                    resp.content().unwrap(),
                    format!("echo: p{i}"),
                    "result {i} out of order"
                );
                *by_status.entry(200).or_insert(0) += 1;
            }
            Err(e) => {
                assert_eq!(e.http_status(), Some(want), "result {i}: {e}");
                assert_eq!(e.attempts(), 1);
                *by_status.entry(want).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(by_status[&200], 200);
    assert_eq!(by_status[&500], 50);
}

#[test]
fn http_error_results_keep_status_headers_and_body() {
    let server = server(0, 0);
    let config = Config::builder()
        .base_url(server.url())
        .key("sk-test-a", 1)
        .max_attempts(1)
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let body = serde_json::json!({"model": "m", "messages": [], "mock": {"status": 429, "retry_after_ms": 1500}});
    let e = pool
        .submit(Request::new(&body))
        .unwrap()
        .wait()
        .unwrap_err();
    let resp = e.response().expect("an HTTP error keeps its response");
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.header("retry-after-ms"), Some("1500"));
    assert_eq!(
        e.retry_after(),
        Some(std::time::Duration::from_millis(1500))
    );
    assert!(resp.json::<serde_json::Value>().unwrap()["error"]["message"].is_string());
    assert_eq!(resp.key_label(), "key-0");
    assert!(e.to_string().contains("HTTP 429 from key key-0"), "{e}");
}

#[test]
fn other_paths_are_posted_under_the_base_url() {
    let server = server(0, 0);
    let pool = pool(&server, 1, 1, Strategy::FirstAvailable);
    let r = Request::from_json("/embeddings", r#"{"model":"m","input":"hello"}"#).unwrap();
    let resp = pool.submit(r).unwrap().wait().unwrap();
    assert_eq!(resp.json::<serde_json::Value>().unwrap()["object"], "list");
    assert!(resp.request_id().is_some());
    let s = pool.stats();
    assert_eq!(s.keys[0].succeeded, 1);
    assert!(s.keys[0].prompt_tokens > 0);
}
