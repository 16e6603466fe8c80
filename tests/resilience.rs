//! Resilience: retries, failover, key health (cooldowns, disabled and parked keys),
//! rate limits, deadlines and shutdown under faults — every claim measured at the mock
//! server (its per-key in-flight counters and request logs), not inferred in the client.
//!
//! Retry delays here are far shorter than the real defaults (500 ms base, 8 s ceiling),
//! which would make a fault soak take minutes: the policy is the same, only scaled.
//!
//! Timing assertions use the mock's log (arrival and finish times on the server's
//! monotonic clock, the same clock the pool uses) and only one-sided bounds with
//! generous margins, explained where they appear.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keypool::{Config, ConfigBuilder, Error, KeyConfig, Pool, Request, RetryConfig, Strategy};
use keypool_mock::{KeyRule, MockConfig, MockServer, RequestRecord};

/// A retry policy scaled for tests: same shape as the default, 25× faster.
fn fast_retry(max_attempts: u32) -> RetryConfig {
    RetryConfig {
        max_attempts,
        base_delay_ms: 20,
        max_delay_ms: 200,
        ..RetryConfig::default()
    }
}

fn chat(i: usize) -> Request {
    Request::chat("mock-model", [("user", &*format!("p{i}"))])
}

/// A chat request carrying a mock directive (repeated on every attempt: it is in the body).
fn directed(i: usize, mock: serde_json::Value) -> Request {
    Request::new(&serde_json::json!({
        "model": "mock-model",
        "messages": [{"role": "user", "content": format!("p{i}")}],
        "mock": mock,
    }))
}

/// A config with keys `sk-<name>` labelled `<name>`, `per_key` workers each.
fn builder(server: &MockServer, names: &[&str], per_key: usize) -> ConfigBuilder {
    let mut b = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::FirstAvailable)
        .queue_capacity(4096)
        .retry(fast_retry(3));
    for n in names {
        b = b.key_config(
            KeyConfig::new(format!("sk-{n}"))
                .label(*n)
                .max_concurrent(per_key),
        );
    }
    b
}

fn quiet_server() -> MockServer {
    MockServer::start(MockConfig::default()).unwrap()
}

fn log_of(server: &MockServer, key: &str) -> Vec<RequestRecord> {
    server.key_stats(key).map(|r| r.log).unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------
// 1. Fault soak
// ---------------------------------------------------------------------------------------

#[test]
fn fault_soak_every_request_answered_limits_and_cooldowns_held() {
    const N: usize = 10_000;
    const KEYS: usize = 8;
    const PER_KEY: usize = 8;
    const BAD_KEY: usize = 3;
    const ATTEMPT_TIMEOUT_MS: u64 = 400;
    let server = MockServer::start(MockConfig {
        fail_429_rate: 0.10,
        retry_after_ms: (0, 250),
        fail_500_rate: 0.025,
        fail_503_rate: 0.025,
        drop_rate: 0.02,
        // Slower than the attempt timeout: these attempts time out client-side.
        slow_rate: 0.01,
        slow_ms: 1500,
        seed: Some(0x5eed),
        threads: 2,
        ..MockConfig::default()
    })
    .unwrap();
    let bad = format!("sk-soak-{BAD_KEY}");
    server.set_key_rule(
        &bad,
        KeyRule {
            always_status: Some(401),
            ..KeyRule::default()
        },
    );
    let mut b = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::LeastLoaded)
        .queue_capacity(4096)
        .timeout_ms(ATTEMPT_TIMEOUT_MS)
        // Scaled-down backoff (see the file comment); 6 attempts make a request fail
        // only after six faults in a row (~0.18^6 ≈ 3e-5 per request).
        .retry(fast_retry(6));
    for i in 0..KEYS {
        b = b.key_config(
            KeyConfig::new(format!("sk-soak-{i}"))
                .label(format!("soak-{i}"))
                .max_concurrent(PER_KEY),
        );
    }
    let pool = Pool::new(b.build().unwrap()).unwrap();

    let t0 = Instant::now();
    let mut seen = vec![0u32; N];
    let mut ok = 0usize;
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut attempts_hist: BTreeMap<u32, usize> = BTreeMap::new();
    for (i, r) in pool.stream((0..N).map(chat), 0) {
        seen[i] += 1;
        match r {
            Ok(resp) => {
                ok += 1;
                assert_eq!(resp.status(), 200);
                assert_eq!(resp.content().unwrap(), format!("echo: p{i}"));
                assert_eq!(resp.keys_tried().len(), resp.attempts() as usize);
                assert_eq!(*resp.keys_tried().last().unwrap(), resp.key_index());
                *attempts_hist.entry(resp.attempts()).or_default() += 1;
            }
            Err(e) => *errors.entry(format!("{}: {e}", e.code())).or_default() += 1,
        }
    }
    let wall = t0.elapsed();

    // Every request exactly one result.
    let missing = seen.iter().filter(|&&c| c == 0).count();
    let doubled = seen.iter().filter(|&&c| c > 1).count();
    assert_eq!((missing, doubled), (0, 0), "missing / doubled results");
    let failed = N - ok;
    assert!(
        failed * 1000 <= N,
        "{failed} of {N} requests failed (> 0.1 %): {errors:#?}"
    );

    let stats = pool.stats();
    let mock = server.stats();
    let retries: u64 = stats.keys.iter().map(|k| k.retries).sum();
    let rate_limited: u64 = stats.keys.iter().map(|k| k.failures.rate_limited).sum();
    let timeouts: u64 = stats.keys.iter().map(|k| k.failures.timeout).sum();
    let transport: u64 = stats.keys.iter().map(|k| k.failures.transport).sum();

    // The revoked key: probed with a single request, then disabled for good.
    let bad_rec = server.key_stats(&bad).expect("the 401 key was probed");
    assert_eq!(bad_rec.requests, 1, "the 401 key got more than its probe");
    let bad_stats = &stats.keys[BAD_KEY];
    assert!(
        bad_stats
            .disabled_reason
            .as_deref()
            .is_some_and(|r| r.contains("401")),
        "{bad_stats:?}"
    );

    // Concurrency bound at the server, and the cooldown windows.
    //
    // A 429 record of key K finished at `f` with `retry-after-ms` r cools K until at
    // least f + r (the client starts the cooldown when it reads the answer, ≥ f). A
    // request of K may still *arrive* shortly after f: it was handed to a worker (or was
    // already on the wire) before the client had read the 429. That is inherent, so the
    // check allows TOLERANCE after f, and only checks windows long enough to mean
    // something (r > TOLERANCE + 20 ms). Anything arriving in (f + TOLERANCE, f + r) was
    // sent during a cooldown the client knew about.
    const TOLERANCE: Duration = Duration::from_millis(100);
    let mut max_in_flight = Vec::new();
    let mut windows_checked = 0usize;
    for i in 0..KEYS {
        let key = format!("sk-soak-{i}");
        let rec = server.key_stats(&key).expect("every key was used");
        max_in_flight.push(rec.max_in_flight);
        assert!(
            rec.max_in_flight <= PER_KEY,
            "key {i}: server saw {} in flight (limit {PER_KEY})",
            rec.max_in_flight
        );
        for c in rec.log.iter().filter(|r| r.status == 429) {
            let r = Duration::from_millis(c.retry_after_ms.unwrap_or(0));
            if r <= TOLERANCE + Duration::from_millis(20) {
                continue;
            }
            windows_checked += 1;
            let (from, to) = (c.finished + TOLERANCE, c.finished + r);
            if let Some(v) = rec.log.iter().find(|x| x.arrived > from && x.arrived < to) {
                panic!(
                    "key {i}: a request arrived at {:.1} ms, during the cooldown of a 429 \
                     that finished at {:.1} ms with retry-after-ms {}",
                    ms(v.arrived),
                    ms(c.finished),
                    r.as_millis()
                );
            }
        }
    }

    println!("fault soak: {N} requests over {KEYS} keys x {PER_KEY} workers");
    println!(
        "  wall {:.2} s, {:.0} requests/s",
        wall.as_secs_f64(),
        N as f64 / wall.as_secs_f64()
    );
    println!("  succeeded {ok}, failed {failed}: {errors:?}");
    println!(
        "  server saw {} attempts; client retries {retries} (429s {rate_limited}, \
         timeouts {timeouts}, transport {transport})",
        mock.total_requests
    );
    println!("  attempts per successful request: {attempts_hist:?}");
    println!("  server-side max in flight per key: {max_in_flight:?}");
    println!("  cooldown windows checked: {windows_checked}");
    assert!(windows_checked > 100, "too few cooldowns to mean anything");
    pool.close();
}

// ---------------------------------------------------------------------------------------
// Probing: a revoked key costs exactly one request
// ---------------------------------------------------------------------------------------

/// Regression: a failed probe (401) used to release the key's probe slot — and nudge
/// the dispatcher — before the verdict disabled the key, so an idle worker of the same
/// key could be handed a second request in between (seen in ~1 round in 8).
#[test]
fn revoked_key_gets_exactly_one_request_even_with_idle_workers() {
    for round in 0..25 {
        let server = quiet_server();
        server.set_key_rule(
            "sk-bad",
            KeyRule {
                always_status: Some(401),
                ..KeyRule::default()
            },
        );
        let pool = Pool::new(
            builder(&server, &["bad", "good"], 8)
                // Least-loaded puts the idle, unproven bad key first whenever it is free.
                .strategy(Strategy::LeastLoaded)
                .build()
                .unwrap(),
        )
        .unwrap();
        let results = pool.batch((0..100).map(chat));
        assert!(results.iter().all(Result::is_ok), "round {round}");
        let n = server.key_stats("sk-bad").unwrap().requests;
        assert_eq!(n, 1, "round {round}: the revoked key got {n} requests");
        let reason = pool.stats().keys[0].disabled_reason.clone();
        assert!(reason.is_some_and(|r| r.contains("401")), "round {round}");
    }
}
