//! Metrics and key events (issue 24.6): `Stats::to_prometheus` at the mock, and the
//! events a key's state changes produce, in order, without the key.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keypool::{Config, KeyConfig, KeyEvent, KeyEventKind, Pool, Request};
use keypool_mock::{KeyRule, MockConfig, MockServer};

const SECRET_A: &str = "sk-test-SECRETaaaaaaaaaaaaaaaa";
const SECRET_B: &str = "sk-test-SECRETbbbbbbbbbbbbbbbb";

fn collect(pool: &Pool) -> Arc<Mutex<Vec<KeyEvent>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    pool.set_event_handler(move |e| s.lock().unwrap().push(e.clone()));
    seen
}

fn req(i: usize) -> Request {
    Request::chat("m", [("user", format!("q{i}"))])
}

#[test]
fn a_429_cools_then_reopens_in_order() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    server.set_key_rule(
        SECRET_A,
        KeyRule {
            always_status: Some(429),
            retry_after_ms: Some(200),
            fail_first: 1,
            ..KeyRule::default()
        },
    );
    let config = Config::builder()
        .base_url(server.url())
        .key_config(KeyConfig::new(SECRET_A).label("acct-a").max_concurrent(2))
        .max_attempts(3)
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    // A handler may read the pool's stats (every gate's lock): it never runs under one.
    // It holds a clone of the pool; `close` drops the handler.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (p2, seen2) = (pool.clone(), seen.clone());
    struct Dropped(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let guard = Dropped(released.clone());
    pool.set_event_handler(move |e| {
        let _ = &guard;
        let _ = p2.stats().to_prometheus();
        seen2.lock().unwrap().push(e.clone());
    });
    let t0 = Instant::now();
    let r = pool.submit(req(0)).unwrap().wait();
    assert!(r.is_ok(), "{r:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(190),
        "waited out the cooldown"
    );
    let mid = pool.stats().to_prometheus();
    assert!(
        mid.contains("keypool_requests_total{key=\"acct-a\",outcome=\"rate_limited\"} 1\n"),
        "{mid}"
    );
    assert!(mid.contains("keypool_key_up{key=\"acct-a\"} 1\n"), "{mid}");
    pool.close(); // every event is delivered before close returns
    assert!(
        released.load(std::sync::atomic::Ordering::SeqCst),
        "close drops the handler (and the pool clone it holds)"
    );
    let events = seen.lock().unwrap().clone();
    let kinds: Vec<KeyEventKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [KeyEventKind::Cooled, KeyEventKind::Reopened],
        "{events:?}"
    );
    let cooled = &events[0];
    assert_eq!(cooled.label, "acct-a");
    assert_eq!(cooled.index, 0);
    assert!(
        (150..=1000).contains(&cooled.duration_ms.unwrap()),
        "{cooled:?}"
    );
    assert!(events[1].at_unix_ms >= cooled.at_unix_ms);
    assert!(
        events[1].at_unix_ms - cooled.at_unix_ms >= 150,
        "{events:?}"
    );
}

#[test]
fn a_401_disables_and_no_secret_leaks() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    server.set_key_rule(
        SECRET_B,
        KeyRule {
            always_status: Some(401),
            // A hostile server echoing the key back.
            body: Some(format!(
                r#"{{"error": {{"message": "bad key {SECRET_B}", "code": 401}}}}"#
            )),
            ..KeyRule::default()
        },
    );
    let config = Config::builder()
        .base_url(server.url())
        .key_config(
            KeyConfig::new(SECRET_A)
                .label("a \"quoted\" \\ label")
                .max_concurrent(2),
        )
        .key_config(KeyConfig::new(SECRET_B).label("acct-b").max_concurrent(2))
        .strategy(keypool::Strategy::RoundRobin)
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let seen = collect(&pool);
    for r in pool.batch((0..8).map(req)) {
        assert!(r.is_ok(), "{r:?}");
    }
    let text = pool.stats().to_prometheus();
    pool.close();
    let events = seen.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (e.kind, e.label.as_str(), e.index),
        (KeyEventKind::Disabled, "acct-b", 1)
    );
    assert!(e.reason.as_deref().unwrap().contains("401"), "{e:?}");
    let all = format!("{events:?} {e} {}", serde_json::to_string(&events).unwrap());
    for s in [SECRET_A, SECRET_B, "SECRET"] {
        assert!(!all.contains(s), "an event leaks a key: {all}");
        assert!(!text.contains(s), "the metrics leak a key: {text}");
    }
    // Escaped label values, and the key's state.
    assert!(
        text.contains("keypool_in_flight{key=\"a \\\"quoted\\\" \\\\ label\"} 0\n"),
        "{text}"
    );
    assert!(text.contains("keypool_key_state{key=\"acct-b\",state=\"disabled\"} 1\n"));
    assert!(text.contains("keypool_key_state{key=\"acct-b\",state=\"ok\"} 0\n"));
    assert!(text.contains("keypool_key_up{key=\"acct-b\"} 0\n"));
    check_exposition(&text);
}

#[test]
fn exposition_is_well_formed_and_counts_match() {
    let server = MockServer::start(MockConfig {
        latency_ms: 20,
        ..MockConfig::default()
    })
    .unwrap();
    let config = Config::builder()
        .base_url(server.url())
        .key_config(KeyConfig::new(SECRET_A).label("a").max_concurrent(2))
        .key_config(KeyConfig::new(SECRET_B).label("b").max_concurrent(2))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    for r in pool.batch((0..12).map(req)) {
        assert!(r.is_ok(), "{r:?}");
    }
    let stats = pool.stats();
    let text = stats.to_prometheus();
    check_exposition(&text);
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    let served: u64 = server.stats().total_requests;
    let ok_a = value("keypool_requests_total{key=\"a\",outcome=\"success\"} ");
    let ok_b = value("keypool_requests_total{key=\"b\",outcome=\"success\"} ");
    assert_eq!(ok_a + ok_b, 12.0);
    assert_eq!(served, 12, "the mock saw every attempt");
    assert_eq!(value("keypool_submitted_total "), 12.0);
    assert_eq!(value("keypool_queue_depth "), 0.0);
    let count_a = value("keypool_request_duration_seconds_count{key=\"a\"} ");
    assert_eq!(count_a, ok_a);
    // Every attempt took at least the mock's 20 ms: none in the 5 and 10 ms buckets.
    assert_eq!(
        value("keypool_request_duration_seconds_bucket{key=\"a\",le=\"0.01\"} "),
        0.0
    );
    assert_eq!(
        value("keypool_request_duration_seconds_bucket{key=\"a\",le=\"+Inf\"} "),
        count_a
    );
    assert!(value("keypool_request_duration_seconds_sum{key=\"a\"} ") >= 0.02 * count_a);
    assert_eq!(value("keypool_queue_duration_seconds_count "), 12.0);
    let prompt = value("keypool_prompt_tokens_total{key=\"a\"} ")
        + value("keypool_prompt_tokens_total{key=\"b\"} ");
    assert_eq!(prompt as u64, stats.totals().prompt_tokens);
    assert!(prompt > 0.0);
}

/// Checks the text against the exposition format's rules: every sample's family
/// announced once (`# HELP` then `# TYPE`) before its samples, families contiguous,
/// label syntax, numeric values, histogram buckets cumulative and ending at `+Inf` =
/// `_count`, the last line ending with a line feed.
fn check_exposition(text: &str) {
    assert!(text.ends_with('\n'));
    let mut families: Vec<(String, String)> = Vec::new();
    let mut last_bucket: Option<(String, f64)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(
                families.iter().all(|(n, _)| n != name),
                "{name} announced twice"
            );
            families.push((name.to_owned(), String::new()));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            let last = families.last_mut().unwrap();
            assert_eq!(last.0, name, "TYPE follows its HELP");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            last.1 = kind.to_owned();
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect(line);
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && name.starts_with("keypool_"),
            "{line}"
        );
        let (family, kind) = families.last().expect("a sample before any TYPE");
        match kind.as_str() {
            "histogram" => {
                let suffix = name.strip_prefix(family.as_str()).expect(line);
                assert!(["_bucket", "_sum", "_count"].contains(&suffix), "{line}");
                let labels = series.split_once('{').map(|x| x.1).unwrap_or("");
                let base: String = labels.split(",le=").next().unwrap().to_owned();
                if suffix == "_bucket" {
                    if let Some((b, prev)) = &last_bucket {
                        if *b == base {
                            assert!(v >= *prev, "buckets are cumulative: {line}");
                        }
                    }
                    last_bucket = Some((base, v));
                } else if suffix == "_count" {
                    let (_, inf) = last_bucket.take().expect("buckets before _count");
                    assert_eq!(inf, v, "+Inf bucket equals _count: {line}");
                }
            }
            "counter" => {
                assert_eq!(name, family, "{line}");
                assert!(name.ends_with("_total"), "{line}");
                assert!(v >= 0.0, "{line}");
            }
            _ => assert_eq!(name, family, "{line}"),
        }
        if let Some((_, labels)) = series.split_once('{') {
            let labels = labels.strip_suffix('}').expect(line);
            // name="value" pairs, values with only \\ \" \n escapes.
            let mut rest = labels;
            while !rest.is_empty() {
                let (k, after) = rest.split_once("=\"").expect(line);
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next().expect(line) {
                        (_, '\\') => {
                            let (_, c) = chars.next().expect(line);
                            assert!(['\\', '"', 'n'].contains(&c), "{line}");
                        }
                        (i, '"') => break i,
                        (_, '\n') => panic!("raw newline: {line}"),
                        _ => {}
                    }
                };
                rest = &after[end + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
        }
    }
}

/// A key at its credit floor is parked while `Pool::new` runs, before any handler can
/// be set: the first handler still gets that event, then `rejoined` once a re-check
/// finds credit. The metrics show the key parked meanwhile.
#[test]
fn parked_at_start_then_rejoined() {
    let server = MockServer::start(MockConfig {
        latency_ms: 40,
        ..MockConfig::default()
    })
    .unwrap();
    server.set_credit(SECRET_A, Some(0.0));
    let config = Config::builder()
        .base_url(server.url())
        .strategy(keypool::Strategy::FirstAvailable)
        .key_config(KeyConfig::new(SECRET_A).label("a").max_concurrent(1))
        .key_config(KeyConfig::new(SECRET_B).label("b").max_concurrent(1))
        .credits(keypool::CreditsConfig::with_floor(0.0).recheck_ms(200))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let text = pool.stats().to_prometheus();
    assert!(
        text.contains("keypool_key_state{key=\"a\",state=\"parked\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("keypool_key_credit_remaining_dollars{key=\"a\"} 0\n"),
        "{text}"
    );
    let seen = collect(&pool);
    let tickets: Vec<_> = (0..40).map(|i| pool.submit(req(i)).unwrap()).collect();
    server.set_credit(SECRET_A, Some(100.0));
    for t in tickets {
        t.wait().unwrap();
    }
    pool.close();
    let events = seen.lock().unwrap().clone();
    let kinds: Vec<_> = events.iter().map(|e| (e.kind, e.label.as_str())).collect();
    assert_eq!(
        kinds,
        [(KeyEventKind::Parked, "a"), (KeyEventKind::Rejoined, "a")],
        "{events:?}"
    );
    assert!(
        events[0].reason.as_deref().unwrap().contains("floor"),
        "{events:?}"
    );
}

/// A 429 whose reset lies beyond `max_retry_after_ms` takes the key out until then:
/// `exhausted` with the time to the reset, then `rejoined` once it has passed.
#[test]
fn exhausted_then_rejoined() {
    let server = MockServer::start(MockConfig {
        latency_ms: 20,
        ..MockConfig::default()
    })
    .unwrap();
    server.set_key_rule(
        SECRET_A,
        KeyRule {
            always_status: Some(429),
            body: Some(r#"{"error":{"message":"Rate limit exceeded","code":429}}"#.to_owned()),
            fail_first: 1,
            retry_after_ms: Some(1_000),
            ..KeyRule::default()
        },
    );
    let mut retry = keypool::RetryConfig::default();
    retry.max_attempts = 3;
    retry.max_retry_after_ms = 300;
    let config = Config::builder()
        .base_url(server.url())
        .strategy(keypool::Strategy::FirstAvailable)
        .key_config(KeyConfig::new(SECRET_A).label("a").max_concurrent(1))
        .key_config(KeyConfig::new(SECRET_B).label("b").max_concurrent(1))
        .retry(retry)
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let seen = collect(&pool);
    pool.submit(req(0)).unwrap().wait().unwrap();
    let text = pool.stats().to_prometheus();
    assert!(
        text.contains("keypool_key_state{key=\"a\",state=\"exhausted\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("keypool_key_up{key=\"a\"} 0\n"), "{text}");
    std::thread::sleep(Duration::from_millis(1_100));
    for r in pool.batch((1..6).map(req)) {
        r.unwrap();
    }
    pool.close();
    let events = seen.lock().unwrap().clone();
    let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [KeyEventKind::Exhausted, KeyEventKind::Rejoined],
        "{events:?}"
    );
    let d = events[0].duration_ms.unwrap();
    assert!((900..=1_100).contains(&d), "{events:?}");
    assert!(
        events[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("exhausted until")
    );
}

#[test]
fn a_spent_daily_quota_is_an_exhausted_event() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    let config = Config::builder()
        .base_url(server.url())
        .key_config(KeyConfig::new(SECRET_A).label("a").rpd(2))
        .key_config(KeyConfig::new(SECRET_B).label("b"))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let seen = collect(&pool);
    // One at a time: `first_available` then gives `a` (first in order) every request
    // while it has quota. (A batch raced the two keys' first requests: when `b`'s
    // returned first, `b` took the rest and `a` served one.)
    for i in 0..6 {
        pool.submit(req(i)).unwrap().wait().unwrap();
    }
    assert_eq!(server.key_stats(SECRET_A).unwrap().requests, 2);
    pool.close();
    let events = seen.lock().unwrap().clone();
    let a: Vec<_> = events.iter().filter(|e| e.label == "a").collect();
    assert_eq!(a.len(), 1, "{events:?}");
    assert_eq!(a[0].kind, KeyEventKind::Exhausted);
    let reason = a[0].reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("rpd") && !reason.contains(SECRET_A),
        "{reason}"
    );
    // Until the next UTC midnight: at most a day.
    assert!(a[0].duration_ms.is_some_and(|d| d <= 86_400_000), "{a:?}");
}
