//! Learned concurrency and rate-limit headers, proven at the mock server.

use std::time::Instant;

use keypool::{Config, ConfigBuilder, KeyConfig, Pool, Request};
use keypool_mock::{MockConfig, MockServer};

/// `n` chat requests with the prompts `{tag}0`, `{tag}1`, ….
fn chats(n: usize, tag: &str) -> impl Iterator<Item = Request> + '_ {
    (0..n).map(move |i| Request::chat("m", [("user", &*format!("{tag}{i}"))]))
}

/// A pool built from `b`.
fn build(b: ConfigBuilder) -> Pool {
    Pool::new(b.build().unwrap()).unwrap()
}

/// A mock (2 ms latency) whose every key allows `limit` requests per `window_ms` and
/// says so in rate-limit headers.
fn budget_server(limit: u64, window_ms: u64) -> MockServer {
    MockServer::start(MockConfig {
        latency_ms: 2,
        request_budget: Some((limit, window_ms)),
        ..MockConfig::default()
    })
    .unwrap()
}

/// No window of `window_ms` (the mock's) held more than `limit` + 1 arrivals on `rec`.
fn assert_within_budget(rec: &keypool_mock::KeyRecord, limit: u64, window_ms: u64) {
    for (w, count) in per_window(rec, window_ms) {
        assert!(count <= limit + 1, "window {w}: {count} requests");
    }
}

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
    let pool = build(
        Config::builder()
            .base_url(server.url())
            .queue_capacity(4096)
            .key_config(KeyConfig::new("sk-learn").max_concurrent(32).adaptive(true)),
    );
    assert_eq!(pool.stats().keys[0].learned_limit, Some(1), "starts low");
    // Warm-up: let it learn.
    let warm = pool.batch(chats(400, "w"));
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
    let results = pool.batch(chats(n, "p"));
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
    let pool = build(
        Config::builder()
            .base_url(server.url())
            .probe_keys(false)
            .key_config(KeyConfig::new("sk-a").max_concurrent(1))
            .key_config(KeyConfig::new("sk-b").max_concurrent(1)),
    );
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
    let results = pool.batch(chats(5, "p"));
    assert!(results.iter().all(Result::is_ok));
    assert!(
        server.key_stats("sk-a").is_none(),
        "the paused key was used"
    );
    assert_eq!(server.key_stats("sk-b").unwrap().requests, 5);
}

/// Arrivals per fixed window of `window_ms` (the mock's windows, from its start).
fn per_window(
    rec: &keypool_mock::KeyRecord,
    window_ms: u64,
) -> std::collections::BTreeMap<u128, u64> {
    let mut counts = std::collections::BTreeMap::new();
    for r in &rec.log {
        *counts
            .entry(r.arrived.as_millis() / u128::from(window_ms))
            .or_insert(0) += 1;
    }
    counts
}

#[test]
fn a_key_learns_its_request_budget_from_headers_and_paces_itself() {
    let (limit, window_ms) = (10u64, 400u64);
    let server = budget_server(limit, window_ms);
    // No configured rpm: the budget is the server's, learned from its headers.
    let pool = build(
        Config::builder()
            .base_url(server.url())
            .key_config(KeyConfig::new("sk-paced").max_concurrent(4)),
    );
    assert_eq!(pool.stats().keys[0].learned_rpm, None);
    let n = 50;
    let results = pool.batch(chats(n, "p"));
    assert!(results.iter().all(Result::is_ok));
    let rec = server.key_stats("sk-paced").unwrap();
    let rejected = rec.statuses.get(&429).copied().unwrap_or(0);
    // Only the first responses can be beaten to the budget (the probe teaches it).
    assert!(rejected <= 1, "{rejected} 429s: {:?}", rec.statuses);
    assert_within_budget(&rec, limit, window_ms);
    // Spaced, not bursting to 0 and pausing: in the windows after the first, the
    // requests spread over most of the window.
    let mut spans = std::collections::BTreeMap::<u128, (u128, u128)>::new();
    for r in rec.log.iter().filter(|r| r.status == 200) {
        let t = r.arrived.as_millis();
        let e = spans.entry(t / u128::from(window_ms)).or_insert((t, t));
        e.0 = e.0.min(t);
        e.1 = e.1.max(t);
    }
    let full: Vec<u128> = spans
        .iter()
        .skip(1)
        .take(spans.len().saturating_sub(2))
        .map(|(_, (a, b))| b - a)
        .collect();
    assert!(!full.is_empty());
    for span in &full {
        assert!(
            *span >= u128::from(window_ms) / 2,
            "a window's requests came in a burst of {span} ms: {full:?}"
        );
    }
    let s = pool.stats();
    let rpm = s.keys[0].learned_rpm.expect("a learned request budget");
    // 10 per 400 ms is 1500 a minute; the window is learned from below (the longest
    // reset seen), so at most a little faster.
    assert!((1500.0..=1700.0).contains(&rpm), "learned {rpm} rpm");
    assert!(s.keys[0].rpm_budget.is_some());
    assert!(s.to_json().contains("\"learned_rpm\":"));
    assert_eq!(s.keys[0].learned_tpm, None, "no token headers");
}

#[test]
fn learning_can_be_switched_off() {
    let (limit, window_ms) = (10u64, 400u64);
    let server = budget_server(limit, window_ms);
    let json = format!(
        r#"{{"base_url": "{}", "retry": {{"learn_rate_limits": false}},
            "keys": [{{"key": "sk-paced", "max_concurrent": 4}}]}}"#,
        server.url()
    );
    let config = Config::from_json(&json).unwrap();
    assert!(!config.retry.learn_rate_limits);
    let pool = Pool::new(config).unwrap();
    let results = pool.batch(chats(50, "p"));
    assert_eq!(results.len(), 50);
    let s = pool.stats();
    assert_eq!(s.keys[0].learned_rpm, None, "nothing learned");
    assert_eq!(s.keys[0].rpm_budget, None, "no budget paces the key");
    // Without a learned budget the key bursts to the server's limit: requests already
    // in flight when a response says `remaining: 0` are rejected (the same run with
    // learning on sees at most one 429).
    let rec = server.key_stats("sk-paced").unwrap();
    let rejected = rec.statuses.get(&429).copied().unwrap_or(0);
    assert!(rejected >= 1, "{:?}", rec.statuses);
}

#[test]
fn a_key_without_headers_is_not_slowed_by_a_learned_one() {
    let (limit, window_ms) = (5u64, 500u64);
    let server = MockServer::start(MockConfig {
        latency_ms: 2,
        ..MockConfig::default()
    })
    .unwrap();
    server.set_request_budget("sk-paced", Some((limit, window_ms)));
    let pool = build(
        Config::builder()
            .base_url(server.url())
            .key_config(KeyConfig::new("sk-paced").max_concurrent(2))
            .key_config(KeyConfig::new("sk-free").max_concurrent(2)),
    );
    let n = 300;
    let t0 = Instant::now();
    let results = pool.batch(chats(n, "p"));
    let elapsed = t0.elapsed();
    assert!(results.iter().all(Result::is_ok));
    let paced = server.key_stats("sk-paced").unwrap();
    let free = server.key_stats("sk-free").unwrap();
    assert!(paced.statuses.get(&429).copied().unwrap_or(0) <= 1);
    assert_within_budget(&paced, limit, window_ms);
    // The paced key alone would need 300 / 5 × 0.5 s = 30 s.
    assert!(
        elapsed.as_secs_f64() < 10.0,
        "{elapsed:?}: {} paced, {} free",
        paced.requests,
        free.requests
    );
    assert!(free.requests as f64 >= 0.8 * n as f64, "{}", free.requests);
    let s = pool.stats();
    assert!(s.keys[0].learned_rpm.is_some());
    assert_eq!(s.keys[1].learned_rpm, None);
    assert_eq!(s.keys[1].rpm_budget, None);
}

/// A server that stops announcing its budget (a proxy swapped in front of it) no longer
/// paces the key: after 100 successes in a row without any rate-limit header the
/// learned budget is forgotten; one header-bearing answer restarts the count.
#[test]
fn a_learned_budget_is_forgotten_when_the_headers_stop() {
    let server = MockServer::start(MockConfig {
        latency_ms: 0,
        ..MockConfig::default()
    })
    .unwrap();
    // Generous, so nothing is paced: 6,000 requests per minute.
    server.set_request_budget("sk-quiet", Some((6_000, 60_000)));
    let config = Config::builder()
        .base_url(server.url())
        .key_config(KeyConfig::new("sk-quiet").max_concurrent(1))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let run = |n: usize| {
        let results = pool.batch((0..n).map(|i| Request::chat("m", [("user", &*format!("q{i}"))])));
        assert!(results.iter().all(Result::is_ok));
    };
    let learned = || pool.stats().keys[0].learned_rpm;
    run(3);
    assert!(
        learned().is_some_and(|r| (5_000.0..=7_000.0).contains(&r)),
        "{:?}",
        learned()
    );
    // Headers stop: 99 quiet successes keep the budget...
    server.set_request_budget("sk-quiet", None);
    run(99);
    assert!(learned().is_some(), "forgotten too early");
    // ...one header-bearing answer restarts the count...
    server.set_request_budget("sk-quiet", Some((6_000, 60_000)));
    run(1);
    server.set_request_budget("sk-quiet", None);
    run(99);
    assert!(learned().is_some(), "the count did not restart");
    // ...and the 100th in a row forgets it.
    run(1);
    assert_eq!(learned(), None);
    assert_eq!(
        pool.stats().keys[0].rpm_budget,
        None,
        "nothing paces the key"
    );
}
