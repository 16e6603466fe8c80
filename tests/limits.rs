//! Spend cap (`max_cost`, `prices`) and daily quotas (`rpd`), proven at the mock
//! server: what it received per key, not what the client believes it sent.

use std::time::{Duration, Instant};

use keypool::{Config, Error, GroupConfig, KeyConfig, Pool, Request, RetryConfig, Strategy};
use keypool_mock::{MockConfig, MockServer};

fn server(cost: f64) -> MockServer {
    MockServer::start(MockConfig {
        threads: 2,
        cost_per_request: cost,
        ..MockConfig::default()
    })
    .unwrap()
}

fn chats(n: usize) -> impl Iterator<Item = Request> {
    (0..n).map(|i| Request::chat("m", [("user", &*format!("p{i}"))]))
}

fn requests(server: &MockServer, key: &str) -> u64 {
    server.key_stats(key).map_or(0, |r| r.requests)
}

fn is_budget_exhausted(r: &keypool::RequestResult) -> bool {
    matches!(r, Err(Error::BudgetExhausted { .. }))
}

#[test]
fn a_spend_cap_stops_sending_and_answers_the_rest() {
    // 0.05 of cap at 0.01 a request: five responses reach it; what was in flight
    // then (at most one per worker: 3 keys x 2) may still finish.
    let server = server(0.01);
    let mut b = Config::builder()
        .base_url(server.url())
        .max_cost(0.05)
        .queue_capacity(64);
    for k in ["sk-a", "sk-b", "sk-c"] {
        b = b.key_config(KeyConfig::new(k).max_concurrent(2));
    }
    let pool = Pool::new(b.build().unwrap()).unwrap();
    let results = pool.batch(chats(60));
    assert_eq!(results.len(), 60, "every request has exactly one result");
    let sent: u64 = ["sk-a", "sk-b", "sk-c"]
        .iter()
        .map(|k| requests(&server, k))
        .sum();
    let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
    let refused = results.iter().filter(|r| is_budget_exhausted(r)).count() as u64;
    assert!((5..=5 + 6).contains(&sent), "server saw {sent} requests");
    assert_eq!(ok, sent, "every request sent succeeded");
    assert_eq!(ok + refused, 60, "the rest end budget_exhausted");
    // Later submits are refused, and nothing more reaches the server.
    match pool.submit(chats(1).next().unwrap()) {
        Err(e @ Error::BudgetExhausted { .. }) => {
            assert_eq!(e.code(), "budget_exhausted");
            assert!(e.to_string().contains("max_cost"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let again = pool.batch(chats(5));
    assert!(again.iter().all(is_budget_exhausted));
    let after: u64 = ["sk-a", "sk-b", "sk-c"]
        .iter()
        .map(|k| requests(&server, k))
        .sum();
    assert_eq!(after, sent);
}

#[test]
fn one_worker_overshoots_by_nothing() {
    // One key, one worker: the cap is known before the next request is taken.
    let server = server(0.01);
    let config = Config::builder()
        .base_url(server.url())
        .max_cost(0.05)
        .key("sk-one", 1)
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let results = pool.batch(chats(20));
    assert_eq!(requests(&server, "sk-one"), 5);
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 5);
    assert_eq!(
        results.iter().filter(|r| is_budget_exhausted(r)).count(),
        15
    );
}

#[test]
fn a_retry_waiting_out_its_backoff_ends_when_the_cap_is_reached() {
    let server = server(0.01);
    let config = Config::builder()
        .base_url(server.url())
        .max_cost(0.01)
        .retry(
            RetryConfig::default()
                .max_attempts(5)
                .base_delay(Duration::from_secs(20))
                .max_delay(Duration::from_secs(20)),
        )
        .key("sk-a", 2)
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let failing = Request::from_json(
        keypool::DEFAULT_PATH,
        r#"{"model":"m","messages":[],"mock":{"status":500}}"#,
    )
    .unwrap();
    let start = Instant::now();
    let t = pool.submit(failing).unwrap();
    // Let it fail once and wait out its (20 s) backoff.
    while requests(&server, "sk-a") < 1 {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(pool.batch(chats(1))[0].is_ok(), "this one spends the cap");
    let r = t.wait();
    assert!(is_budget_exhausted(&r), "{r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "not after its backoff"
    );
    assert_eq!(requests(&server, "sk-a"), 2, "the retry was never sent");
}

#[test]
fn streams_report_their_cost_in_the_last_chunk() {
    let server = server(0.01);
    let config = Config::builder()
        .base_url(server.url())
        .max_cost(0.03)
        .key("sk-s", 1)
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let mut ok = 0;
    let mut refused = 0;
    for req in chats(6) {
        match pool.submit_stream(req) {
            Ok(s) => match s.wait() {
                Ok(_) => ok += 1,
                Err(Error::BudgetExhausted { .. }) => refused += 1,
                Err(e) => panic!("{e}"),
            },
            Err(Error::BudgetExhausted { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, refused), (3, 3));
    assert_eq!(requests(&server, "sk-s"), 3);
}

#[test]
fn without_a_reported_cost_prices_estimate_it() {
    // The mock reports no `usage.cost` here: one request's tokens priced at 1 cent
    // each give its cost; a cap of three such requests lets exactly three through.
    let server = server(0.0);
    let probe = Pool::new(
        Config::builder()
            .base_url(server.url())
            .key("sk-probe", 1)
            .build()
            .unwrap(),
    )
    .unwrap();
    let usage = probe.batch(chats(1)).remove(0).unwrap().usage().unwrap();
    let tokens = usage.prompt_tokens + usage.completion_tokens;
    assert!(tokens > 0);
    let one = tokens as f64 * 0.01;
    let config = Config::builder()
        .base_url(server.url())
        .max_cost(one * 3.0 - one / 2.0) // reached by the third
        .price("m", 10_000.0, 10_000.0) // dollars per million tokens: a cent a token
        .key("sk-est", 1)
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let results = pool.batch(chats(10));
    assert_eq!(requests(&server, "sk-est"), 3);
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    assert_eq!(results.iter().filter(|r| is_budget_exhausted(r)).count(), 7);
    // A model without a price costs nothing known: no cap is reached.
    let unpriced = Pool::new(
        Config::builder()
            .base_url(server.url())
            .max_cost(0.000_001)
            .price("other", 10_000.0, 10_000.0)
            .key("sk-free", 1)
            .build()
            .unwrap(),
    )
    .unwrap();
    assert!(unpriced.batch(chats(5)).iter().all(Result::is_ok));
}

#[test]
fn config_json_reads_and_checks_the_new_fields() {
    let c = Config::from_json(
        r#"{"max_cost": 2.5, "prices": {"m": {"prompt": 0.15, "completion": 0.6}},
            "keys": [{"key": "sk-1", "rpd": 50}],
            "groups": [{"name": "g", "rpd": 1000}]}"#,
    )
    .unwrap();
    assert_eq!(c.max_cost, Some(2.5));
    assert_eq!(c.prices["m"].completion, 0.6);
    assert_eq!(c.keys[0].rpd, Some(50));
    assert_eq!(c.groups[0].rpd, Some(1000));
    for (json, field) in [
        (r#"{"max_cost": -1, "keys": [{"key": "sk-1"}]}"#, "max_cost"),
        (
            r#"{"prices": {"m": {"prompt": -1}}, "keys": [{"key": "sk-1"}]}"#,
            "prices",
        ),
        (r#"{"keys": [{"key": "sk-1", "rpd": 0}]}"#, "keys[0].rpd"),
        (
            r#"{"groups": [{"name": "g", "rpd": 0}], "keys": [{"key": "sk-1", "group": "g"}]}"#,
            "groups[0].rpd",
        ),
    ] {
        match Config::from_json(json) {
            Err(Error::Config { field: f, .. }) => assert_eq!(f, field, "{json}"),
            other => panic!("{json}: {other:?}"),
        }
    }
}

#[test]
fn a_key_at_its_daily_quota_gets_no_more_and_others_take_the_rest() {
    let server = server(0.0);
    let config = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::FirstAvailable)
        .key_config(
            KeyConfig::new("sk-daily")
                .label("daily")
                .max_concurrent(2)
                .rpd(3),
        )
        .key_config(KeyConfig::new("sk-other").label("other").max_concurrent(2))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let results = pool.batch(chats(30));
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(requests(&server, "sk-daily"), 3, "exactly its quota");
    assert_eq!(requests(&server, "sk-other"), 27);
    let s = pool.stats();
    let reason = s.keys[0].disabled_reason.clone().unwrap_or_default();
    assert!(reason.contains("exhausted until"), "{reason}");
    assert!(reason.contains("rpd"), "{reason}");
    assert_eq!(s.keys[1].disabled_reason, None);
}

#[test]
fn a_pool_whose_only_key_spent_its_quota_answers_at_once() {
    let server = server(0.0);
    let config = Config::builder()
        .base_url(server.url())
        .key_config(
            KeyConfig::new("sk-only")
                .label("only")
                .max_concurrent(2)
                .rpd(2),
        )
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let start = Instant::now();
    let results = pool.batch(chats(6));
    assert!(start.elapsed() < Duration::from_secs(5), "no hang");
    assert_eq!(requests(&server, "sk-only"), 2);
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
    for r in results.iter().filter(|r| r.is_err()) {
        match r {
            Err(e @ Error::NoUsableKey { detail, .. }) => {
                assert!(detail.contains("daily quota"), "{e}");
                assert!(detail.contains("exhausted until"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_group_at_its_daily_quota_takes_all_its_keys_out() {
    let server = server(0.0);
    let config = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::RoundRobin)
        .group(GroupConfig::new("acct").rpd(4))
        .key_config(KeyConfig::new("sk-g1").label("g1").group("acct"))
        .key_config(KeyConfig::new("sk-g2").label("g2").group("acct"))
        .key_config(KeyConfig::new("sk-free").label("free"))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let results = pool.batch(chats(20));
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(
        requests(&server, "sk-g1") + requests(&server, "sk-g2"),
        4,
        "the group's quota over both keys"
    );
    assert_eq!(requests(&server, "sk-free"), 16);
    let s = pool.stats();
    for k in &s.keys[..2] {
        let reason = k.disabled_reason.clone().unwrap_or_default();
        assert!(
            reason.contains("group acct") && reason.contains("exhausted until"),
            "{reason}"
        );
    }
}
