//! Cancellation (`Ticket::cancel`, `CancelHandle`, dropping or cancelling a
//! `ResponseStream`), proven at the mock: what the server received, when, and on which
//! key.

use std::time::{Duration, Instant};

use keypool::{Config, Error, KeyConfig, Pool, Request, StreamEvent};
use keypool_mock::{KeyRule, MockConfig, MockServer};

fn server() -> MockServer {
    MockServer::start(MockConfig {
        threads: 2,
        ..MockConfig::default()
    })
    .unwrap()
}

/// One key, `per_key` workers.
fn pool(server: &MockServer, per_key: usize) -> Pool {
    Pool::new(
        Config::builder()
            .base_url(server.url())
            .key_config(
                KeyConfig::new("sk-a")
                    .label("acct-a")
                    .max_concurrent(per_key),
            )
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// A chat request the mock answers after `delay_ms`.
fn slow(delay_ms: u64) -> Request {
    Request::from_json(
        "/chat/completions",
        &format!(
            r#"{{"model": "m", "messages": [{{"role": "user", "content": "hi"}}], "mock": {{"delay_ms": {delay_ms}}}}}"#
        ),
    )
    .unwrap()
}

fn quick() -> Request {
    Request::chat("m", [("user", "hi")])
}

/// Waits until the mock has `n` requests of key `sk-a` in flight.
fn wait_in_flight(server: &MockServer, n: usize) {
    let start = Instant::now();
    while server.key_stats("sk-a").map_or(0, |k| k.in_flight) < n {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never {n} in flight"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn requests(server: &MockServer) -> u64 {
    server.key_stats("sk-a").map_or(0, |k| k.requests)
}

#[test]
fn a_queued_request_cancelled_is_answered_at_once_and_never_sent() {
    let server = server();
    let pool = pool(&server, 1);
    let first = pool.submit(slow(600)).unwrap();
    wait_in_flight(&server, 1);
    // The only worker is busy: these wait in the queue (or with the dispatcher).
    let queued = pool.submit(quick()).unwrap();
    let stream = pool.submit_stream(quick()).unwrap();
    let other = pool.submit(quick()).unwrap();
    let t = Instant::now();
    assert!(queued.cancel());
    assert!(!queued.cancel(), "a second cancel is a no-op");
    assert!(matches!(queued.wait(), Err(Error::Cancelled)));
    drop(stream); // a stream dropped before its end is cancelled too
    assert!(t.elapsed() < Duration::from_millis(300), "answered at once");
    assert!(first.wait().is_ok());
    assert!(other.wait().is_ok());
    // The server saw the first and the last request only.
    assert_eq!(requests(&server), 2);
    let s = pool.stats();
    assert_eq!((s.submitted, s.completed), (4, 4));
}

#[test]
fn a_request_waiting_for_its_retry_is_cancelled_unsent() {
    let server = server();
    let pool = pool(&server, 1);
    // The first request meets a 429 asking for 1.5 s: it waits in the dispatcher.
    server.set_key_rule(
        "sk-a",
        KeyRule {
            always_status: Some(429),
            retry_after_ms: Some(1500),
            fail_first: 1,
            ..KeyRule::default()
        },
    );
    let ticket = pool.submit(quick()).unwrap();
    let start = Instant::now();
    while requests(&server) < 1 || server.key_stats("sk-a").unwrap().in_flight > 0 {
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    assert!(ticket.cancel());
    assert!(matches!(ticket.wait(), Err(Error::Cancelled)));
    assert!(t.elapsed() < Duration::from_millis(300));
    // Past the cooldown, nothing more was sent for it; the key serves the next one.
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(requests(&server), 1);
    assert!(pool.submit(quick()).unwrap().wait().is_ok());
    assert_eq!(requests(&server), 2);
}

#[test]
fn an_in_flight_request_cancelled_frees_its_slot_at_once_and_blames_no_key() {
    let server = server();
    let pool = pool(&server, 1);
    let ticket = pool.submit(slow(20_000)).unwrap();
    let handle = ticket.cancel_handle();
    wait_in_flight(&server, 1);
    // Cancelled from another thread while this one waits on the ticket.
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        assert!(handle.cancel());
        Instant::now()
    });
    let result = ticket.wait();
    let cancelled_at = canceller.join().unwrap();
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    // The key's only worker is free: the next request is sent and answered well
    // before the first one's 20 s.
    let next = pool.submit(quick()).unwrap().wait().unwrap();
    assert_eq!(next.status(), 200);
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(3),
        "the slot was not freed at once"
    );
    let rec = server.key_stats("sk-a").unwrap();
    assert_eq!(rec.requests, 2);
    let second = rec
        .log
        .iter()
        .find(|r| r.status == 200)
        .expect("second request logged");
    assert!(
        second.arrived < Duration::from_secs(10),
        "{:?}",
        second.arrived
    );
    // No key was blamed: no cooldown, not disabled, no failure counted against it.
    let ks = &pool.stats().keys[0];
    assert_eq!(ks.cooldown_remaining_ms, 0);
    assert!(ks.disabled_reason.is_none());
    assert_eq!((ks.in_flight, ks.failed), (0, 0), "{ks:?}");
}

#[test]
fn a_stream_cancelled_or_dropped_mid_way_closes_its_connection() {
    let server = server();
    let pool = pool(&server, 1);
    // The mock sends one chunk, then nothing while keeping the connection open.
    let stalled = || {
        Request::from_json(
            "/chat/completions",
            r#"{"model": "m", "messages": [], "mock": {"stream_fault": "stall", "fault_after": 1}}"#,
        )
        .unwrap()
    };
    let mut stream = pool.submit_stream(stalled()).unwrap();
    assert!(matches!(stream.next(), Some(StreamEvent::Chunk(_))));
    let t = Instant::now();
    assert!(stream.cancel());
    let mut done = None;
    for e in stream.by_ref() {
        if let StreamEvent::Done(r) = e {
            done = Some(r);
        }
    }
    assert!(matches!(done, Some(Err(Error::Cancelled))), "{done:?}");
    assert!(pool.submit(quick()).unwrap().wait().is_ok());
    assert!(t.elapsed() < Duration::from_secs(3));

    // Dropped after its first chunk: the worker is freed the same way.
    let mut stream = pool.submit_stream(stalled()).unwrap();
    assert!(matches!(stream.next(), Some(StreamEvent::Chunk(_))));
    let t = Instant::now();
    drop(stream);
    assert!(pool.submit(quick()).unwrap().wait().is_ok());
    assert!(t.elapsed() < Duration::from_secs(3));
    let ks = &pool.stats().keys[0];
    assert_eq!((ks.cooldown_remaining_ms, ks.failed), (0, 0), "{ks:?}");
    assert_eq!(requests(&server), 4);
}

#[test]
fn cancel_racing_completion_gives_exactly_one_result() {
    let server = MockServer::start(MockConfig {
        threads: 2,
        latency_ms: 2,
        jitter_ms: 2,
        ..MockConfig::default()
    })
    .unwrap();
    let pool = pool(&server, 4);
    let (mut won, mut lost) = (0, 0);
    for i in 0..300u64 {
        let ticket = pool.submit(quick()).unwrap();
        std::thread::sleep(Duration::from_micros((i * 37) % 6000));
        let cancelled = ticket.cancel();
        match ticket.wait() {
            Err(Error::Cancelled) => {
                assert!(
                    cancelled,
                    "answered Cancelled, but the cancel says it came late"
                );
                won += 1;
            }
            Ok(r) => {
                assert!(!cancelled, "the cancel ended it, yet a response came");
                assert_eq!(r.status(), 200);
                lost += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(!cancel_after_the_end(&pool));
    }
    let s = pool.stats();
    assert_eq!((s.submitted, s.completed), (600, 600)); // with the helper's
    assert!(
        won > 0 && lost > 0,
        "the race was not exercised: {won} won, {lost} lost"
    );
    // Every worker is back: a full round of requests goes through.
    let results = pool.batch((0..8).map(|_| quick()));
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(pool.stats().keys[0].cooldown_remaining_ms, 0);
}

/// A cancel after the result was delivered is a no-op.
fn cancel_after_the_end(pool: &Pool) -> bool {
    let mut t = pool.submit(quick()).unwrap();
    let r = t.wait_timeout(Duration::from_secs(10));
    assert!(r.is_ok());
    t.cancel()
}

#[test]
fn an_in_flight_request_over_https_is_cut_too() {
    let server = MockServer::start_tls(MockConfig::default()).unwrap();
    let ca = std::env::temp_dir().join(format!("keypool-cancel-{}-ca.pem", std::process::id()));
    std::fs::write(&ca, server.ca_pem().unwrap()).unwrap();
    let pool = Pool::new(
        Config::builder()
            .base_url(server.url())
            .tls(keypool::TlsConfig::default().ca_file(ca.display().to_string()))
            .key_config(KeyConfig::new("sk-a").max_concurrent(1))
            .build()
            .unwrap(),
    )
    .unwrap();
    // A first request opens the connection the slow one reuses.
    assert!(pool.submit(quick()).unwrap().wait().is_ok());
    let ticket = pool.submit(slow(20_000)).unwrap();
    wait_in_flight(&server, 1);
    let t = Instant::now();
    assert!(ticket.cancel());
    assert!(matches!(ticket.wait(), Err(Error::Cancelled)));
    assert!(pool.submit(quick()).unwrap().wait().is_ok());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(requests(&server), 3);
    let _ = std::fs::remove_file(ca);
}

#[test]
fn a_cancelled_request_with_a_deadline_is_answered_once() {
    let server = server();
    let pool = pool(&server, 1);
    // The deadline registry shares the ticket's slot: whichever answers first wins.
    let mut ticket = pool
        .submit(slow(20_000).with_deadline(Duration::from_millis(800)))
        .unwrap();
    wait_in_flight(&server, 1);
    assert!(ticket.cancel());
    assert!(matches!(
        ticket.wait_timeout(Duration::from_secs(5)),
        Err(Error::Cancelled)
    ));
    // Past the deadline: no second answer, nothing more sent, the worker serves on.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(ticket.try_wait().is_none());
    assert!(pool.submit(quick()).unwrap().wait().is_ok());
    assert_eq!(requests(&server), 2);
    let s = pool.stats();
    assert_eq!((s.submitted, s.completed), (2, 2));
}
