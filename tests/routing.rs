//! Routing by model, weights and account groups, proven at the mock server.

use std::collections::BTreeMap;

use keypool::{Config, Error, GroupConfig, KeyConfig, Pool, Request, Strategy};
use keypool_mock::{KeyRule, MockConfig, MockServer};

fn server(latency_ms: u64) -> MockServer {
    MockServer::start(MockConfig {
        latency_ms,
        threads: 2,
        ..MockConfig::default()
    })
    .unwrap()
}

fn chat(model: &str, i: usize) -> Request {
    Request::chat(model, [("user", &*format!("p{i}"))])
}

/// The most requests of `keys` in flight at once at the server, from its request logs
/// (each request from arrival to the end of its answer).
fn max_concurrent_over(server: &MockServer, keys: &[&str]) -> usize {
    let mut events = Vec::new();
    for k in keys {
        if let Some(rec) = server.key_stats(k) {
            for r in rec.log {
                events.push((r.arrived, 1i64));
                events.push((r.finished, -1i64));
            }
        }
    }
    // At equal instants, ends first: an answer handed over before the next arrival.
    events.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut max) = (0i64, 0i64);
    for (_, d) in events {
        now += d;
        max = max.max(now);
    }
    max as usize
}

fn models_at(server: &MockServer, key: &str) -> Vec<Option<String>> {
    server
        .key_stats(key)
        .map(|r| r.log.into_iter().map(|e| e.model).collect())
        .unwrap_or_default()
}

#[test]
fn requests_go_only_to_keys_that_serve_their_model() {
    let server = server(5);
    for strategy in [
        Strategy::FirstAvailable,
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
    ] {
        server.reset_stats();
        let config = Config::builder()
            .base_url(server.url())
            .strategy(strategy)
            .key_config(
                KeyConfig::new("sk-openai")
                    .max_concurrent(4)
                    .models(["openai/*"]),
            )
            .key_config(
                KeyConfig::new("sk-anthropic")
                    .max_concurrent(4)
                    .models(["anthropic/*"]),
            )
            .key_config(KeyConfig::new("sk-any").max_concurrent(2))
            .build()
            .unwrap();
        let pool = Pool::new(config).unwrap();
        let reqs = (0..90).map(|i| {
            let m = ["openai/gpt-4o", "anthropic/claude", "other/x"][i % 3];
            chat(m, i)
        });
        let results = pool.batch(reqs);
        assert!(results.iter().all(Result::is_ok), "{strategy:?}");
        for m in models_at(&server, "sk-openai") {
            assert!(m.as_deref().unwrap().starts_with("openai/"), "{m:?}");
        }
        for m in models_at(&server, "sk-anthropic") {
            assert!(m.as_deref().unwrap().starts_with("anthropic/"), "{m:?}");
        }
        // `other/x` is served only by the unrestricted key.
        let any = models_at(&server, "sk-any");
        assert_eq!(
            any.iter()
                .filter(|m| m.as_deref() == Some("other/x"))
                .count(),
            30,
            "{strategy:?}"
        );
    }
}

#[test]
fn retries_stay_on_keys_that_serve_the_model() {
    let server = server(0);
    // The only key serving the model fails its first requests with 500; the other key
    // is idle the whole time and must never be tried.
    server.set_key_rule(
        "sk-a",
        KeyRule {
            always_status: Some(500),
            fail_first: 2,
            ..KeyRule::default()
        },
    );
    let retry = {
        let mut r = keypool::RetryConfig::default();
        r.base_delay_ms = 1;
        r.max_attempts = 4;
        r
    };
    let config = Config::builder()
        .base_url(server.url())
        .retry(retry)
        .key_config(KeyConfig::new("sk-a").max_concurrent(1).models(["m/*"]))
        .key_config(KeyConfig::new("sk-b").max_concurrent(4).models(["n/*"]))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let r = pool.submit(chat("m/1", 0)).unwrap().wait().unwrap();
    assert_eq!(r.attempts(), 3);
    assert!(
        server.key_stats("sk-b").is_none(),
        "a key that does not serve m/1 was tried"
    );
}

#[test]
fn a_model_no_key_serves_fails_at_submit_naming_it() {
    let server = server(0);
    let config = Config::builder()
        .base_url(server.url())
        .key_config(KeyConfig::new("sk-a").models(["openai/*"]))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    match pool.submit(chat("mistral/large", 0)) {
        Err(Error::ModelNotServed { model }) => assert_eq!(model.as_deref(), Some("mistral/large")),
        other => panic!("expected ModelNotServed, got {:?}", other.map(|_| ())),
    }
    let e = pool
        .batch([chat("mistral/large", 1)])
        .pop()
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("mistral/large"), "{e}");
    assert_eq!(e.code(), "model_not_served");
    // No round trip was made.
    assert_eq!(server.stats().total_requests, 0);
}

#[test]
fn mapped_models_are_rewritten_for_that_key_only() {
    let server = server(0);
    let config = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::RoundRobin)
        .key_config(
            KeyConfig::new("sk-or")
                .models(["fast"])
                .map_model("fast", "openai/gpt-4o-mini"),
        )
        .key_config(KeyConfig::new("sk-direct").models(["fast"]))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    // Five rounds of one request per key (round-robin over keys that both admit).
    for round in 0..5 {
        let results = pool.batch((0..2).map(|i| chat("fast", round * 2 + i)));
        assert!(results.iter().all(Result::is_ok));
    }
    let or = models_at(&server, "sk-or");
    let direct = models_at(&server, "sk-direct");
    assert_eq!((or.len(), direct.len()), (5, 5));
    assert!(
        or.iter()
            .all(|m| m.as_deref() == Some("openai/gpt-4o-mini"))
    );
    assert!(direct.iter().all(|m| m.as_deref() == Some("fast")));
}

#[test]
fn weighted_round_robin_counts_follow_weights() {
    let server = server(2);
    let weights = [1u32, 2, 5];
    // Weights hold over any stretch in which every key can admit when its turn comes
    // (a busy key is skipped, not waited for): waves of 8, the weights' sum, on keys
    // with twice that many workers, so one still on its way back to idle never makes a
    // key busy; no probe, so no key is on trial.
    let mut b = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::RoundRobin)
        .probe_keys(false);
    for (i, w) in weights.iter().enumerate() {
        b = b.key_config(
            KeyConfig::new(format!("sk-w{i}"))
                .max_concurrent(16)
                .weight(*w),
        );
    }
    let pool = Pool::new(b.build().unwrap()).unwrap();
    let n = 8 * 12 + 5; // twelve cycles and a partial one
    let mut results = Vec::new();
    let mut next = 0;
    while next < n {
        let wave = (n - next).min(8);
        results.extend(pool.batch((next..next + wave).map(|i| chat("m", i))));
        next += wave;
    }
    assert!(results.iter().all(Result::is_ok));
    let total: u32 = weights.iter().sum();
    let mut counts = BTreeMap::new();
    for (i, w) in weights.iter().enumerate() {
        let got = server.key_stats(&format!("sk-w{i}")).unwrap().requests as f64;
        let share = n as f64 * *w as f64 / total as f64;
        counts.insert(i, got);
        assert!(
            (got - share).abs() <= 1.0,
            "key {i}: {got} vs share {share}"
        );
    }
    // Smooth: the heaviest key never takes more than its share of any window of 8.
    let order: Vec<usize> = results
        .iter()
        .map(|r| r.as_ref().unwrap().key_index())
        .collect();
    for w in order.windows(8) {
        let heavy = w.iter().filter(|&&k| k == 2).count();
        assert!((4..=6).contains(&heavy), "{w:?}");
    }
}

fn group_pool(server: &MockServer, strategy: Strategy, group_max: usize) -> Pool {
    let config = Config::builder()
        .base_url(server.url())
        .strategy(strategy)
        .queue_capacity(4096)
        .group(GroupConfig::new("acct-1").max_concurrent(group_max))
        .key_config(KeyConfig::new("sk-g0").max_concurrent(4).group("acct-1"))
        .key_config(KeyConfig::new("sk-g1").max_concurrent(4).group("acct-1"))
        .key_config(KeyConfig::new("sk-g2").max_concurrent(4).group("acct-1"))
        .key_config(KeyConfig::new("sk-solo").max_concurrent(2))
        .build()
        .unwrap();
    Pool::new(config).unwrap()
}

#[test]
fn group_in_flight_never_exceeds_its_limit_under_every_strategy() {
    let server = server(15);
    for strategy in [
        Strategy::FirstAvailable,
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
    ] {
        server.reset_stats();
        let pool = group_pool(&server, strategy, 5);
        let results = pool.batch((0..200).map(|i| chat("m", i)));
        assert!(results.iter().all(Result::is_ok), "{strategy:?}");
        let group = max_concurrent_over(&server, &["sk-g0", "sk-g1", "sk-g2"]);
        assert!(
            group <= 5,
            "{strategy:?}: group reached {group} in flight at the server"
        );
        assert!(
            group >= 4,
            "{strategy:?}: the group was never used near its limit ({group})"
        );
        for k in ["sk-g0", "sk-g1", "sk-g2"] {
            assert!(server.key_stats(k).map_or(0, |r| r.max_in_flight) <= 4);
        }
        assert!(server.key_stats("sk-solo").unwrap().max_in_flight <= 2);
        let s = pool.stats();
        assert_eq!(s.groups[0].name, "acct-1");
        assert!(s.groups[0].max_in_flight <= 5);
        assert_eq!(s.groups[0].in_flight, 0);
        assert_eq!(s.keys[0].group.as_deref(), Some("acct-1"));
    }
}

#[test]
fn group_limit_holds_with_retries_and_cooldowns() {
    let server = server(10);
    // One member key 429s its first requests (cooling it); every key 500s at random.
    server.set_config(MockConfig {
        latency_ms: 10,
        fail_500_rate: 0.2,
        seed: Some(7),
        ..MockConfig::default()
    });
    server.set_key_rule(
        "sk-g1",
        KeyRule {
            always_status: Some(429),
            retry_after_ms: Some(50),
            fail_first: 5,
            ..KeyRule::default()
        },
    );
    let retry = {
        let mut r = keypool::RetryConfig::default();
        r.base_delay_ms = 1;
        r.max_attempts = 10;
        r
    };
    let config = Config::builder()
        .base_url(server.url())
        .retry(retry)
        .group(GroupConfig::new("acct-1").max_concurrent(3))
        .key_config(KeyConfig::new("sk-g0").max_concurrent(4).group("acct-1"))
        .key_config(KeyConfig::new("sk-g1").max_concurrent(4).group("acct-1"))
        .key_config(KeyConfig::new("sk-g2").max_concurrent(4).group("acct-1"))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let results = pool.batch((0..150).map(|i| chat("m", i)));
    assert!(results.iter().filter(|r| r.is_ok()).count() >= 140);
    let group = max_concurrent_over(&server, &["sk-g0", "sk-g1", "sk-g2"]);
    assert!(group <= 3, "group reached {group} in flight at the server");
    assert!(server.stats().total_requests > 150, "retries happened");
}

#[test]
fn an_account_429_cools_the_whole_group() {
    let server = server(0);
    // sk-g0's first answer is a 429 whose body names the account.
    let config = Config::builder()
        .base_url(server.url())
        .max_attempts(1)
        .group(
            GroupConfig::new("acct-1")
                .account_429("mock 429")
                .max_concurrent(8),
        )
        .key_config(KeyConfig::new("sk-g0").max_concurrent(1).group("acct-1"))
        .key_config(KeyConfig::new("sk-g1").max_concurrent(1).group("acct-1"))
        .key_config(KeyConfig::new("sk-other").max_concurrent(1))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let r = pool
        .submit(
            Request::from_json(
                "/chat/completions",
                r#"{"model":"m","messages":[],"mock":{"status":429,"retry_after_ms":5000}}"#,
            )
            .unwrap(),
        )
        .unwrap()
        .wait();
    // One attempt (max_attempts 1), on the first key: a 429 naming the account.
    assert_eq!(r.unwrap_err().response().unwrap().key_index(), 0);
    let s = pool.stats();
    assert!(s.groups[0].cooldown_remaining_ms > 0, "the account cools");
    assert!(s.keys[1].cooldown_remaining_ms > 0, "so does its other key");
    // While the account cools, requests go to the other account only.
    server.reset_stats();
    let results = pool.batch((0..6).map(|i| chat("m", i)));
    assert!(results.iter().all(Result::is_ok));
    assert!(server.key_stats("sk-g0").is_none() && server.key_stats("sk-g1").is_none());
    assert_eq!(server.key_stats("sk-other").unwrap().requests, 6);
}

#[test]
fn config_fields_from_json() {
    let c = Config::from_json(
        r#"{"keys": [
              {"key": "sk-1", "group": "a", "models": ["openai/*"], "weight": 3, "adaptive": true,
               "model_map": {"fast": "openai/gpt-4o-mini"}},
              {"key": "sk-2", "group": "a"}],
            "groups": [{"name": "a", "max_concurrent": 4, "rpm": 100, "tpm": 1000,
                        "account_429": "*"}]}"#,
    )
    .unwrap();
    assert_eq!(c.keys[0].weight, Some(3));
    assert!(c.keys[0].adaptive);
    assert_eq!(c.groups[0].max_concurrent, Some(4));
    for (bad, field) in [
        (
            r#"{"keys":[{"key":"sk-1","group":"nope"}]}"#,
            "keys[0].group",
        ),
        (r#"{"keys":[{"key":"sk-1","weight":0}]}"#, "keys[0].weight"),
        (
            r#"{"keys":[{"key":"sk-1"}],"groups":[{"name":"a","max_concurrent":0}]}"#,
            "groups[0].max_concurrent",
        ),
        (
            r#"{"keys":[{"key":"sk-1"}],"groups":[{"name":"a"},{"name":"a"}]}"#,
            "groups[1].name",
        ),
        (
            r#"{"keys":[{"key":"sk-1","models":[""]}]}"#,
            "keys[0].models",
        ),
    ] {
        match Config::from_json(bad) {
            Err(Error::Config { field: f, .. }) => assert_eq!(f, field, "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

/// The first JSON block of docs/routing.md, the routing guide's worked example.
fn routing_guide_example() -> String {
    let guide = include_str!("../docs/routing.md");
    let start = guide.find("```json\n").expect("a JSON block") + "```json\n".len();
    let len = guide[start..].find("```").expect("the block ends");
    guide[start..start + len].to_owned()
}

#[test]
fn routing_guide_example_parses_and_routes_at_the_mock() {
    let mut config = Config::from_json(&routing_guide_example()).unwrap();
    // Three keys on two accounts (one group, one key on its own), one key limited to
    // one model family.
    assert_eq!(config.keys.len(), 3);
    assert_eq!(config.groups.len(), 1);
    assert_eq!(config.strategy, Strategy::RoundRobin);
    let grouped: Vec<_> = config.keys.iter().map(|k| k.group.as_deref()).collect();
    assert_eq!(grouped, [Some("team-a"), Some("team-a"), None]);
    assert!(config.keys[2].models.is_some() && config.keys[2].adaptive);
    // Run it against the mock (the keys are placeholders, the URL is loopback).
    let server = server(0);
    config.base_url = server.url();
    let pool = Pool::new(config).unwrap();
    // Another family: never the openai-only key. Its own family: its share, mapped.
    let models = ["anthropic/claude-3.5-sonnet", "openai/gpt-4o", "fast"];
    let results = pool.batch((0..24).map(|i| chat(models[i % 3], i)));
    for (i, r) in results.into_iter().enumerate() {
        let label = r.unwrap().key_label().to_owned();
        if i % 3 == 0 {
            assert_ne!(label, "openai", "request {i}");
        }
    }
    let oa = server
        .key_stats("sk-oa")
        .expect("the openai key served its family");
    for rec in &oa.log {
        let m = rec.model.as_deref();
        assert!(m == Some("gpt-4o") || m == Some("gpt-4o-mini"), "{m:?}");
    }
    let or: u64 = ["sk-or-1", "sk-or-2"]
        .iter()
        .map(|k| server.key_stats(k).map_or(0, |r| r.requests))
        .sum();
    assert_eq!(or + oa.requests, 24);
    assert!(server.key_stats("sk-or-1").is_some_and(|r| {
        r.log
            .iter()
            .all(|l| l.model.as_deref() != Some("gpt-4o-mini"))
    }));
}
