//! No request waits behind another (issue 21): a job waits only for keys that could
//! serve it. Judged at the mock server from per-key request times.

use std::time::{Duration, Instant};

use keypool::{Config, KeyConfig, Pool, Request, RetryConfig, Strategy};
use keypool_mock::{KeyRule, MockConfig, MockServer};

fn line(i: usize, model: &str) -> Request {
    Request::chat(model, [("user", &*format!("line {i}"))])
}

fn start(latency_ms: u64) -> MockServer {
    MockServer::start(MockConfig {
        latency_ms,
        ..MockConfig::default()
    })
    .unwrap()
}

/// Waits (bounded) until `cond` holds.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Round-robin, keys A, B, C × 2 workers, A and C answer in 100 ms. B answers its first
/// request 429 (`Retry-After: 1`), then its server holds B's trial request for 20 s.
/// Before, strict rotation waited for B: between 2 s and 20 s no key got a request and
/// the 60 lines took 21 s. Now B is skipped while it cannot admit.
#[test]
fn round_robin_skips_a_key_that_cannot_take_a_request() {
    let server = start(100);
    server.set_key_rule(
        "sk-b",
        KeyRule {
            always_status: Some(429),
            retry_after_ms: Some(1_000),
            fail_first: 1,
            latency_ms: Some(0),
            ..KeyRule::default()
        },
    );
    let mut retry = RetryConfig::default();
    retry.max_attempts = 5;
    let mut b = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::RoundRobin)
        .timeout_ms(2_000)
        .retry(retry);
    for k in ["a", "b", "c"] {
        b = b.key_config(KeyConfig::new(format!("sk-{k}")).label(k).max_concurrent(2));
    }
    let pool = Pool::new(b.build().unwrap()).unwrap();
    let t0 = Instant::now();
    let (tx, rx) = crossbeam_channel::unbounded();
    for i in 0..60 {
        let tx = tx.clone();
        pool.submit_with(line(i, "m"), move |r| {
            let _ = tx.send((r.is_ok(), t0.elapsed()));
        })
        .unwrap();
    }
    drop(tx);
    // B's 429 came back: from now on its server holds B's requests for 20 s.
    wait_until("B's 429", Duration::from_secs(5), || {
        server
            .key_stats("sk-b")
            .is_some_and(|s| s.statuses.contains_key(&429))
    });
    server.set_key_rule(
        "sk-b",
        KeyRule {
            latency_ms: Some(20_000),
            ..KeyRule::default()
        },
    );
    // Completion times, as each request completed.
    let mut done: Vec<Duration> = rx
        .iter()
        .map(|(ok, at)| {
            assert!(ok);
            at
        })
        .collect();
    assert_eq!(done.len(), 60);
    done.sort();
    // 60 lines on two keys of two workers at 100 ms: about 1.5 s; the one held at B
    // ends at its 2 s attempt timeout and is served elsewhere.
    assert!(
        done[58] < Duration::from_secs(3),
        "59th line done at {:?}",
        done[58]
    );
    // Server-side: A and C served everything but (at most) the held line.
    let served: usize = ["sk-a", "sk-c"]
        .iter()
        .map(|k| {
            server
                .key_stats(k)
                .unwrap()
                .statuses
                .get(&200)
                .copied()
                .unwrap_or(0) as usize
        })
        .sum();
    assert!(served >= 59, "A and C served {served}");
    let b_requests = server.key_stats("sk-b").unwrap().requests;
    assert!(b_requests <= 3, "B got {b_requests}");
}

/// Key A serves model `x` (one worker, 600 ms per answer), key B serves `y`. Input x, x,
/// y, y, y: before, the three `y` lines reached B only with the second `x`, a whole
/// answer later, under every strategy. Now the second `x` waits aside.
#[test]
fn a_job_for_one_model_does_not_block_jobs_for_another() {
    for strategy in [
        Strategy::FirstAvailable,
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
    ] {
        let server = start(20);
        server.set_key_rule(
            "sk-a",
            KeyRule {
                latency_ms: Some(600),
                ..KeyRule::default()
            },
        );
        let cfg = Config::builder()
            .base_url(server.url())
            .strategy(strategy)
            .key_config(
                KeyConfig::new("sk-a")
                    .label("a")
                    .max_concurrent(1)
                    .models(["x"]),
            )
            .key_config(
                KeyConfig::new("sk-b")
                    .label("b")
                    .max_concurrent(2)
                    .models(["y"]),
            )
            .build()
            .unwrap();
        let pool = Pool::new(cfg).unwrap();
        // Both keys proven first (their trials), so the run below starts from open keys.
        pool.batch([line(0, "x"), line(0, "y")])
            .into_iter()
            .for_each(|r| drop(r.unwrap()));
        server.reset_stats();
        let models = ["x", "x", "y", "y", "y"];
        let results = pool.batch(models.iter().enumerate().map(|(i, m)| line(i, m)));
        assert!(results.iter().all(Result::is_ok), "{strategy:?}");
        let x = server.key_stats("sk-a").unwrap().log;
        let y = server.key_stats("sk-b").unwrap().log;
        assert_eq!((x.len(), y.len()), (2, 3), "{strategy:?}");
        let first_x = x.iter().map(|r| r.arrived).min().unwrap();
        for r in &y {
            assert!(
                r.arrived < first_x + Duration::from_millis(300),
                "{strategy:?}: a y line reached B at {:?}, the first x at {first_x:?}",
                r.arrived
            );
        }
        // The key's cap held: A never had two in flight.
        assert_eq!(server.key_stats("sk-a").unwrap().max_in_flight, 1);
        // Queue time is visible (issue 21.6): the second x waited a whole answer for A
        // before its first send; latency starts where queue time ends.
        let second_x = results[1].as_ref().unwrap();
        assert!(
            second_x.queue_time() >= Duration::from_millis(500),
            "{strategy:?}: {:?}",
            second_x.queue_time()
        );
        assert!(second_x.latency() < Duration::from_millis(1_000));
        for r in &results[2..] {
            let q = r.as_ref().unwrap().queue_time();
            assert!(
                q < Duration::from_millis(300),
                "{strategy:?}: y queued {q:?}"
            );
        }
        let stats = pool.stats();
        assert!(stats.queue_p99_ms >= 500.0, "{}", stats.queue_p99_ms);
        assert!(stats.keys[0].queue_p99_ms >= 500.0);
    }
}
