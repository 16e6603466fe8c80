//! Credit checks (`GET {base_url}/key`) and `usage.cost`, proven at the mock server.

use keypool::{Config, CreditsConfig, KeyConfig, Pool, Request, Strategy};
use keypool_mock::MockServer;

mod support;
use support::{chats, requests, server};

/// A round-robin pool on `keys` (`(key, max_concurrent)`, labelled by the key without
/// `sk-`) with the credit checks `credits`.
fn round_robin_pool(server: &MockServer, keys: &[(&str, usize)], credits: CreditsConfig) -> Pool {
    let mut b = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::RoundRobin);
    for (key, max) in keys {
        let label = key.strip_prefix("sk-").unwrap();
        b = b.key_config(KeyConfig::new(*key).label(label).max_concurrent(*max));
    }
    Pool::new(b.credits(credits).build().unwrap()).unwrap()
}

/// The key `k` is parked for being at or below its credit floor.
fn assert_parked_at_floor(k: &keypool::KeyStats) {
    assert!(
        k.disabled_reason
            .as_deref()
            .is_some_and(|r| r.contains("at or below floor")),
        "{:?}",
        k.disabled_reason
    );
}

#[test]
fn a_key_at_its_floor_at_start_gets_no_request() {
    let server = server(0.01);
    server.set_credit("sk-low", Some(0.5));
    server.set_credit("sk-rich", Some(100.0));
    let pool = round_robin_pool(
        &server,
        &[("sk-low", 4), ("sk-rich", 4)],
        CreditsConfig::with_floor(0.5),
    );
    let s = pool.stats();
    assert_eq!(s.keys[0].credit_remaining, Some(0.5));
    assert_parked_at_floor(&s.keys[0]);
    assert_eq!(s.keys[1].credit_remaining, Some(100.0));
    assert_eq!(s.keys[1].disabled_reason, None);
    assert!(pool.batch(chats(20)).iter().all(Result::is_ok));
    assert_eq!(requests(&server, "sk-low"), 0, "a parked key sends nothing");
    assert_eq!(requests(&server, "sk-rich"), 20);
    assert_eq!(server.credit("sk-low").unwrap().checks, 1);
    // Cost summed per key equals the mock's recorded spend.
    let s = pool.stats();
    let spent = server.credit("sk-rich").unwrap().spent;
    assert!(
        (s.keys[1].cost - spent).abs() < 1e-9,
        "{} vs {spent}",
        s.keys[1].cost
    );
    assert!((spent - 0.2).abs() < 1e-9);
    assert_eq!(s.keys[0].cost, 0.0);
}

#[test]
fn a_key_that_runs_out_is_parked_after_a_recheck() {
    // Binary-exact amounts: eight requests at 0.125 spend exactly 1.00.
    let server = server(0.125);
    server.set_credit("sk-a", Some(1.0));
    let pool = round_robin_pool(
        &server,
        &[("sk-a", 1), ("sk-b", 2)],
        CreditsConfig::with_floor(0.0),
    );
    assert_eq!(pool.stats().keys[0].credit_remaining, Some(1.0));
    assert_eq!(pool.stats().keys[1].credit_remaining, None, "no cap");
    let results = pool.batch(chats(60));
    assert!(results.iter().all(Result::is_ok), "every request served");
    let a = server.key_stats("sk-a").unwrap();
    // Eight successes drain 1.00; the next request gets the one 402.
    assert_eq!(a.statuses.get(&200).copied(), Some(8));
    assert_eq!(a.statuses.get(&402).copied(), Some(1));
    assert_eq!(a.requests, 9);
    assert_eq!(requests(&server, "sk-b"), 52);
    let s = pool.stats();
    assert!(s.keys[0].disabled_reason.is_some());
    // The re-check after the 402 saw the empty balance.
    assert_eq!(server.credit("sk-a").unwrap().checks, 2);
    assert_eq!(s.keys[0].credit_remaining, Some(0.0));
    for (i, k) in ["sk-a", "sk-b"].iter().enumerate() {
        let spent = server.credit(k).unwrap().spent;
        assert!(
            (s.keys[i].cost - spent).abs() < 1e-9,
            "{k}: {} vs {spent}",
            s.keys[i].cost
        );
    }
}

#[test]
fn recheck_by_spend_parks_before_a_402() {
    let server = server(0.125);
    server.set_credit("sk-a", Some(1.0));
    let pool = round_robin_pool(
        &server,
        &[("sk-a", 1), ("sk-b", 2)],
        CreditsConfig::with_floor(0.25).recheck_cost(0.25),
    );
    assert!(pool.batch(chats(40)).iter().all(Result::is_ok));
    let a = server.key_stats("sk-a").unwrap();
    // Checks after every 0.25 spent: at 0.25 left (after 6) the key is parked.
    assert_eq!(a.statuses.get(&402), None, "parked before it failed");
    assert_eq!(
        server.credit("sk-a").unwrap().checks,
        4,
        "start, then every 0.25"
    );
    assert_eq!(a.requests, 6);
    let s = pool.stats();
    assert_parked_at_floor(&s.keys[0]);
    let left = s.keys[0].credit_remaining.unwrap();
    assert_eq!(left, 0.25);
}

#[test]
fn hostile_key_bodies_never_park_or_panic() {
    let server = server(0.0);
    let bodies = [
        "not json".to_owned(),
        "[]".to_owned(),
        r#"{"data":null}"#.to_owned(),
        r#"{"data":{"limit":10}}"#.to_owned(),
        r#"{"data":{"limit":10,"limit_remaining":-5}}"#.to_owned(),
        r#"{"data":{"limit":10,"limit_remaining":1e308}}"#.to_owned(),
        r#"{"data":{"limit":10,"limit_remaining":1e400}}"#.to_owned(),
        r#"{"data":{"limit":10,"limit_remaining":"0"}}"#.to_owned(),
        r#"{"data":{"limit":{},"limit_remaining":0}}"#.to_owned(),
        format!(
            r#"{{"data":{{"limit":10,"limit_remaining":0,"pad":"{}"}}}}"#,
            "x".repeat(200_000)
        ),
    ];
    let mut b = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::RoundRobin)
        .credits(CreditsConfig::with_floor(1.0));
    for (i, body) in bodies.iter().enumerate() {
        let key = format!("sk-h{i}");
        server.set_key_body(&key, Some(body.clone()));
        b = b.key_config(KeyConfig::new(key).max_concurrent(2));
    }
    let pool = Pool::new(b.build().unwrap()).unwrap();
    // Three rounds, one request per key each (round-robin over keys that can all
    // admit: exactly three each).
    for _ in 0..3 {
        assert!(pool.batch(chats(bodies.len())).iter().all(Result::is_ok));
    }
    let s = pool.stats();
    for (i, k) in s.keys.iter().enumerate() {
        assert_eq!(k.disabled_reason, None, "body {i}");
        assert_eq!(k.credit_remaining, None, "body {i}");
        assert_eq!(requests(&server, &format!("sk-h{i}")), 3, "body {i}");
        assert_eq!(server.credit(&format!("sk-h{i}")).unwrap().checks, 1);
    }
}

#[test]
fn credits_config_from_json_and_validation() {
    let c = Config::from_json(
        r#"{"keys":[{"key":"sk-x"}],"credits":{"check":true,"floor":0.5,"recheck_cost":2}}"#,
    )
    .unwrap();
    assert!(c.credits.check);
    assert_eq!((c.credits.floor, c.credits.recheck_cost), (0.5, 2.0));
    let e = Config::from_json(r#"{"keys":[{"key":"sk-x"}],"credits":{"floor":-1}}"#).unwrap_err();
    assert!(e.to_string().contains("credits.floor"), "{e}");
    assert!(Config::from_json(r#"{"keys":[{"key":"sk-x"}],"credits":{"flor":1}}"#).is_err());
}

#[test]
fn streamed_costs_are_summed_and_recheck_parks_before_a_402() {
    // The mock reports `usage.cost` in a stream's usage chunk (OpenRouter's place).
    let server = server(0.125);
    server.set_credit("sk-a", Some(1.0));
    let pool = round_robin_pool(
        &server,
        &[("sk-a", 1), ("sk-b", 1)],
        CreditsConfig::with_floor(0.25).recheck_cost(0.25),
    );
    for req in chats(30) {
        let r = pool.submit_stream(req).unwrap().wait();
        assert!(r.is_ok(), "{r:?}");
    }
    // A stream without a usage chunk reports no cost (and the mock charges none).
    let no_usage = Request::from_json(
        "/chat/completions",
        r#"{"model":"m","messages":[],"stream_options":{"include_usage":false}}"#,
    )
    .unwrap();
    assert!(pool.submit_stream(no_usage).unwrap().wait().is_ok());
    let a = server.key_stats("sk-a").unwrap();
    // Re-checked after every 0.25 of streamed cost: parked at 0.25 left, before a 402.
    assert_eq!(a.statuses.get(&402), None, "parked before it failed");
    assert_eq!(a.requests, 6);
    let s = pool.stats();
    assert!(s.keys[0].disabled_reason.is_some());
    assert_eq!(s.keys[0].credit_remaining, Some(0.25));
    for (i, k) in ["sk-a", "sk-b"].iter().enumerate() {
        let spent = server.credit(k).unwrap().spent;
        assert!(spent > 0.0, "{k}: the mock charged streams");
        assert!(
            (s.keys[i].cost - spent).abs() < 1e-9,
            "{k}: summed {} vs charged {spent}",
            s.keys[i].cost
        );
    }
}
