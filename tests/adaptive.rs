//! Learned concurrency and rate-limit headers, proven at the mock server.

use std::time::Instant;

use keypool::{Config, KeyConfig, Pool, Request};
use keypool_mock::{MockConfig, MockServer};

#[test]
fn adaptive_limit_converges_to_a_hidden_capacity() {
    let (capacity, latency) = (6usize, 20u64);
    let server = MockServer::start(MockConfig {
        latency_ms: latency,
        key_capacity: Some(capacity),
        threads: 2,
        ..MockConfig::default()
    })
    .unwrap();
    let config = Config::builder()
        .base_url(server.url())
        .queue_capacity(4096)
        .key_config(KeyConfig::new("sk-learn").max_concurrent(32).adaptive(true))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    assert_eq!(pool.stats().keys[0].learned_limit, Some(1), "starts low");
    // Warm-up: let it learn.
    let warm = pool.batch((0..400).map(|i| Request::chat("m", [("user", &*format!("w{i}"))])));
    assert!(warm.iter().all(Result::is_ok));
    let learned = pool.stats().keys[0].learned_limit.unwrap();
    assert!(
        (capacity * 7 / 10..=capacity + 1).contains(&learned),
        "learned {learned} for a hidden capacity of {capacity}"
    );
    // Steady state: throughput against the ideal, and the 429 share.
    server.reset_stats();
    let n = 600;
    let t0 = Instant::now();
    let results = pool.batch((0..n).map(|i| Request::chat("m", [("user", &*format!("p{i}"))])));
    let elapsed = t0.elapsed();
    assert!(results.iter().all(Result::is_ok));
    let rec = server.key_stats("sk-learn").unwrap();
    let rejected = rec.statuses.get(&429).copied().unwrap_or(0);
    assert!(
        (rejected as f64) < 0.02 * rec.requests as f64,
        "{rejected} of {} attempts got 429",
        rec.requests
    );
    assert!(rec.max_in_flight <= capacity + 1);
    let ideal = capacity as f64 / (latency as f64 / 1000.0);
    let got = n as f64 / elapsed.as_secs_f64();
    // The ideal ignores every overhead of a loaded 2-core machine; the bound here is
    // loose on purpose (benches/adaptive.rs prints the real figure).
    assert!(got >= 0.6 * ideal, "{got:.0} req/s vs ideal {ideal:.0}");
}

#[test]
fn a_spent_rate_limit_pauses_the_key_before_a_429() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    let config = Config::builder()
        .base_url(server.url())
        .probe_keys(false)
        .key_config(KeyConfig::new("sk-a").max_concurrent(1))
        .key_config(KeyConfig::new("sk-b").max_concurrent(1))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let spent = Request::from_json(
        "/chat/completions",
        r#"{"model":"m","messages":[],"mock":{"ratelimit":{"remaining_requests":0,"reset_requests":"6m0s","remaining_tokens":100,"reset_tokens":"1s"}}}"#,
    )
    .unwrap();
    let r = pool.submit(spent).unwrap().wait().unwrap();
    assert_eq!(r.key_index(), 0);
    let s = pool.stats();
    // Paused until the reset, clamped to retry.max_retry_after_ms (60 s).
    assert!(
        (50_000..=60_000).contains(&s.keys[0].cooldown_remaining_ms),
        "{}",
        s.keys[0].cooldown_remaining_ms
    );
    server.reset_stats();
    let results = pool.batch((0..5).map(|i| Request::chat("m", [("user", &*format!("p{i}"))])));
    assert!(results.iter().all(Result::is_ok));
    assert!(
        server.key_stats("sk-a").is_none(),
        "the paused key was used"
    );
    assert_eq!(server.key_stats("sk-b").unwrap().requests, 5);
}
