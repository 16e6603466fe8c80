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
