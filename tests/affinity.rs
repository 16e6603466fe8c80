//! Affinity (issue 24.5): requests that share an affinity — `Request::with_affinity`, or
//! the OpenAI `"user"` field with `affinity_from_user` — stay on one key while it can
//! admit them, and move, consistently, only when it cannot. Counted at the mock.

use std::collections::{BTreeMap, HashMap};

use keypool::{Config, KeyConfig, Pool, Request, Strategy};
use keypool_mock::{KeyRule, MockConfig, MockServer};
use serde_json::json;

const KEYS: usize = 8;

fn pool(server: &MockServer, strategy: Strategy, from_user: bool) -> Pool {
    let mut b = Config::builder()
        .base_url(server.url())
        .strategy(strategy)
        .queue_capacity(2048)
        .affinity_from_user(from_user);
    for i in 0..KEYS {
        b = b.key_config(
            KeyConfig::new(format!("sk-aff-{i}"))
                .label(format!("k{i}"))
                .max_concurrent(4),
        );
    }
    Pool::new(b.build().unwrap()).unwrap()
}

fn session_req(s: usize, n: usize) -> Request {
    Request::new(
        &json!({"model": "m", "messages": [{"role": "user", "content": format!("s{s} turn {n}")}]}),
    )
    .with_affinity(format!("session-{s}"))
}

/// Per session, the share of its requests served by its most used key.
fn stickiness(sessions: &[usize], labels: &[String]) -> BTreeMap<usize, f64> {
    let mut per: HashMap<usize, HashMap<&str, usize>> = HashMap::new();
    for (s, l) in sessions.iter().zip(labels) {
        *per.entry(*s).or_default().entry(l.as_str()).or_default() += 1;
    }
    per.into_iter()
        .map(|(s, keys)| {
            let total: usize = keys.values().sum();
            let top = keys.values().max().copied().unwrap_or(0);
            (s, top as f64 / total as f64)
        })
        .collect()
}

#[test]
fn a_thousand_requests_from_fifty_sessions_stay_on_their_keys() {
    for strategy in [
        Strategy::FirstAvailable,
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
    ] {
        let server = MockServer::start(MockConfig {
            latency_ms: 5,
            ..MockConfig::default()
        })
        .unwrap();
        let p = pool(&server, strategy, false);
        let sessions: Vec<usize> = (0..1000).map(|i| i % 50).collect();
        let results = p.batch(sessions.iter().enumerate().map(|(n, &s)| session_req(s, n)));
        let labels: Vec<String> = results
            .iter()
            .map(|r| {
                r.as_ref()
                    .expect("every request succeeds")
                    .key_label()
                    .to_owned()
            })
            .collect();
        let worst = stickiness(&sessions, &labels)
            .into_values()
            .fold(1.0f64, f64::min);
        assert!(
            worst >= 0.95,
            "{strategy:?}: a session had only {worst:.2} on one key"
        );
        // Spread: the sessions use most keys, and the server saw every request once.
        let used = labels
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        assert!(used >= KEYS - 2, "{strategy:?}: only {used} keys used");
        assert_eq!(server.stats().total_requests, 1000);
        for i in 0..KEYS {
            if let Some(r) = server.key_stats(&format!("sk-aff-{i}")) {
                assert!(r.max_in_flight <= 4);
            }
        }
    }
}

#[test]
fn a_session_whose_key_is_revoked_moves_once_and_stays() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    // Find session 7's key, then revoke it before the run.
    let probe = pool(&server, Strategy::FirstAvailable, false);
    let home = probe.submit(session_req(7, 0)).unwrap().wait().unwrap();
    let home_label = home.key_label().to_owned();
    drop(probe);
    let home_secret = format!("sk-aff-{}", &home_label[1..]);
    server.set_key_rule(
        &home_secret,
        KeyRule {
            always_status: Some(401),
            ..KeyRule::default()
        },
    );
    server.reset_stats();
    let p = pool(&server, Strategy::FirstAvailable, false);
    let labels: Vec<String> = p
        .batch((1..=40).map(|n| session_req(7, n)))
        .into_iter()
        .map(|r| r.unwrap().key_label().to_owned())
        .collect();
    assert!(labels.iter().all(|l| *l != home_label));
    let first = &labels[0];
    assert!(
        labels.iter().all(|l| l == first),
        "the session moved to one next key, not around: {labels:?}"
    );
    // The revoked key cost one request (its trial), not one per session request.
    assert_eq!(server.key_stats(&home_secret).unwrap().requests, 1);
}

#[test]
fn the_user_field_is_the_affinity_when_configured() {
    let server = MockServer::start(MockConfig {
        latency_ms: 5,
        ..MockConfig::default()
    })
    .unwrap();
    let users: Vec<usize> = (0..200).map(|i| i % 10).collect();
    let worst_share = |from_user: bool| {
        let p = pool(&server, Strategy::RoundRobin, from_user);
        let results = p.batch(users.iter().map(|u| {
            Request::new(&json!({"model": "m", "user": format!("user-{u}"), "messages": [{"role": "user", "content": "hi"}]}))
        }));
        let labels: Vec<String> = results
            .iter()
            .map(|r| r.as_ref().unwrap().key_label().to_owned())
            .collect();
        stickiness(&users, &labels)
            .into_values()
            .fold(1.0f64, f64::min)
    };
    let worst = worst_share(true);
    assert!(worst >= 0.95, "{worst}");
    // Off: round-robin spreads one user's requests over the keys.
    let worst = worst_share(false);
    assert!(
        worst < 0.95,
        "without affinity the user field binds nothing: {worst}"
    );
}
