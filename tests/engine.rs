//! Engine behaviour with in-process transports (no network): dispatch order,
//! backpressure, panics, tickets, callbacks, streams and shutdown.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keypool::{Config, Error, KeyConfig, Pool, Request, Strategy, TimeoutPhase};
use parking_lot::Mutex;
use support::{factory, gate, gated_ok, keypool_threads, ok};

fn config(keys: usize, per_key: usize, strategy: Strategy) -> Config {
    // Probing off: these tests hold requests in flight and count on every worker
    // being usable from the start.
    let mut b = Config::builder()
        .base_url("http://127.0.0.1:9/v1")
        .strategy(strategy)
        .queue_capacity(64)
        .probe_keys(false);
    for i in 0..keys {
        b = b.key(format!("sk-test-{i}"), per_key);
    }
    b.build().unwrap()
}

fn req(i: usize) -> Request {
    Request::chat("m", [("user", &*format!("prompt {i}"))])
}

#[test]
fn first_available_prefers_the_first_idle_key() {
    let pool = Pool::with_transport(
        config(3, 2, Strategy::FirstAvailable),
        factory(|_, _| Ok(ok())),
    )
    .unwrap();
    for i in 0..20 {
        // One request at a time: key-0 always has an idle worker.
        let r = pool.submit(req(i)).unwrap().wait().unwrap();
        assert_eq!(r.key_label(), "key-0");
        assert_eq!(r.key_index(), 0);
        assert_eq!(r.attempts(), 1);
    }
    let s = pool.stats();
    assert_eq!(s.keys[0].succeeded, 20);
    assert_eq!(s.keys[1].sent + s.keys[2].sent, 0);
}

#[test]
fn round_robin_rotates_strictly() {
    let pool =
        Pool::with_transport(config(3, 2, Strategy::RoundRobin), factory(|_, _| Ok(ok()))).unwrap();
    let labels: Vec<String> = (0..9)
        .map(|i| {
            pool.submit(req(i))
                .unwrap()
                .wait()
                .unwrap()
                .key_label()
                .to_owned()
        })
        .collect();
    let want: Vec<String> = (0..9).map(|i| format!("key-{}", i % 3)).collect();
    assert_eq!(labels, want);
}

#[test]
fn in_flight_never_exceeds_max_concurrent() {
    // Client-side check with a transport that counts concurrent calls per key; the
    // server-side proof against the mock is in tests/mock_dispatch.rs.
    let current: Arc<Mutex<BTreeMap<String, (usize, usize)>>> = Arc::default();
    let c2 = current.clone();
    let (g, mut ctl) = gate();
    let f = factory(move |label, _| {
        {
            let mut m = c2.lock();
            let e = m.entry(label.to_owned()).or_default();
            e.0 += 1;
            e.1 = e.1.max(e.0);
        }
        g.pass(label);
        c2.lock().get_mut(label).unwrap().0 -= 1;
        Ok(ok())
    });
    let mut cfg = config(3, 4, Strategy::FirstAvailable);
    cfg.queue_capacity = 200;
    let pool = Pool::with_transport(cfg, f).unwrap();
    let tickets: Vec<_> = (0..120)
        .map(|i| pool.submit(req(i)).unwrap())
        .collect::<Vec<_>>();
    // Every worker (3 keys × 4) is now blocked inside the transport.
    for _ in 0..12 {
        ctl.entered.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    assert!(
        ctl.entered.try_recv().is_err(),
        "a 13th request got in while 12 slots were busy"
    );
    let s = pool.stats();
    assert!(s.keys.iter().all(|k| k.in_flight == 4), "{s:?}");
    ctl.open();
    for t in tickets {
        t.wait().unwrap();
    }
    let m = current.lock();
    assert_eq!(m.len(), 3);
    for (label, (_, max)) in m.iter() {
        assert_eq!(*max, 4, "key {label}");
    }
    assert!(
        pool.stats()
            .keys
            .iter()
            .all(|k| k.max_in_flight == 4 && k.in_flight == 0)
    );
}

/// Submits with `try_submit` until the pool answers `Busy` (workers, dispatcher and
/// queue all full): the tickets of what it took.
fn fill(pool: &Pool) -> Vec<keypool::Ticket> {
    let mut tickets = Vec::new();
    loop {
        match pool.try_submit(req(tickets.len())) {
            Ok(t) => tickets.push(t),
            Err(e) if e.is_busy() => return tickets,
            Err(e) => panic!("{e}"),
        }
        assert!(tickets.len() < 10_000, "never busy");
    }
}

#[test]
fn try_submit_reports_busy_and_submit_timeout_times_out() {
    let (f, mut ctl) = gated_ok();
    let cfg = Config::builder()
        .base_url("http://127.0.0.1:9")
        .key("sk-test-a", 2)
        .queue_capacity(4)
        .probe_keys(false)
        .build()
        .unwrap();
    let pool = Pool::with_transport(cfg, f).unwrap();
    let mut tickets = fill(&pool);
    assert!(
        tickets.len() <= 2 + 1 + 4,
        "accepted more than workers + dispatcher + queue"
    );
    assert!(
        tickets.len() >= 4,
        "Busy before the queue was full: {}",
        tickets.len()
    );
    let e = pool.submit_timeout(req(99), Duration::from_millis(20));
    // The dispatcher may have taken one more off the queue meanwhile; then it fits.
    match e {
        Err(Error::Timeout {
            phase: TimeoutPhase::Submit,
            ..
        }) => {}
        Ok(t) => tickets.push(t),
        Err(e) => panic!("{e}"),
    }
    ctl.open();
    let n = tickets.len();
    let ok_count = tickets
        .into_iter()
        .filter(|_| true)
        .map(|t| t.wait())
        .filter(Result::is_ok)
        .count();
    assert_eq!(ok_count, n);
}

#[test]
fn a_panicking_transport_gives_an_error_and_the_worker_survives() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let f = factory(move |_, r| {
        c.fetch_add(1, Ordering::SeqCst);
        if std::str::from_utf8(r.body).unwrap().contains("boom") {
            panic!("transport exploded");
        }
        Ok(ok())
    });
    let pool = Pool::with_transport(config(1, 1, Strategy::FirstAvailable), f).unwrap();
    let boom = Request::chat("m", [("user", "boom")]);
    match pool.submit(boom).unwrap().wait() {
        Err(Error::Panic(m)) => assert!(m.contains("transport exploded"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The one and only worker is still alive.
    for i in 0..5 {
        pool.submit(req(i)).unwrap().wait().unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6, "a panic is not retried");
    assert_eq!(pool.stats().keys[0].failures.other, 1);
}

#[test]
fn ticket_wait_timeout_try_wait_and_callbacks() {
    let (f, mut ctl) = gated_ok();
    let pool = Pool::with_transport(config(1, 2, Strategy::FirstAvailable), f).unwrap();
    let mut t = pool.submit(req(0)).unwrap();
    ctl.entered.recv().unwrap();
    assert!(t.try_wait().is_none());
    assert!(matches!(
        t.wait_timeout(Duration::from_millis(10)),
        Err(Error::Timeout {
            phase: TimeoutPhase::Wait,
            ..
        })
    ));
    let (tx, rx) = crossbeam_channel::unbounded();
    pool.submit_with(req(1), move |r| tx.send(r.map(|r| r.status())).unwrap())
        .unwrap();
    ctl.open();
    assert_eq!(
        t.wait_timeout(Duration::from_secs(10)).unwrap().status(),
        200
    );
    assert!(t.is_taken());
    assert!(matches!(
        t.wait_timeout(Duration::from_millis(1)),
        Err(Error::ResultTaken)
    ));
    assert!(t.try_wait().is_none());
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(),
        200
    );
    // Exactly once: the callback's sender is gone after its one call.
    assert!(rx.recv_timeout(Duration::from_secs(1)).is_err());
}

#[test]
fn stream_yields_every_index_once_within_the_window() {
    let live = Arc::new(AtomicUsize::new(0));
    let max_live = Arc::new(AtomicUsize::new(0));
    let (l2, m2) = (live.clone(), max_live.clone());
    let f = factory(move |_, _| {
        let n = l2.fetch_add(1, Ordering::SeqCst) + 1;
        m2.fetch_max(n, Ordering::SeqCst);
        l2.fetch_sub(1, Ordering::SeqCst);
        Ok(ok())
    });
    let pool = Pool::with_transport(config(4, 4, Strategy::LeastLoaded), f).unwrap();
    let mut seen = HashSet::new();
    let stream = pool.stream((0..2000).map(req), 8);
    for (i, r) in stream {
        assert!(r.is_ok());
        assert!(seen.insert(i), "index {i} twice");
    }
    assert_eq!(seen.len(), 2000);
    assert!(max_live.load(Ordering::SeqCst) <= 8, "window exceeded");
}

#[test]
fn batch_keeps_input_order_with_failures() {
    let f = factory(|_, r| {
        let body = std::str::from_utf8(r.body).unwrap();
        if body.contains("fail") {
            Ok(keypool::HttpResponse {
                status: 400,
                headers: vec![],
                body: br#"{"error":{"message":"bad"}}"#.to_vec(),
            })
        } else {
            // A chat completion (a 2xx without `choices` is an invalid response)
            // that echoes the request, so the test can check the order.
            let mut echo = br#"{"choices":[],"echo":"#.to_vec();
            echo.extend_from_slice(r.body);
            echo.push(b'}');
            Ok(keypool::HttpResponse {
                status: 200,
                headers: vec![],
                body: echo,
            })
        }
    });
    let pool = Pool::with_transport(config(3, 3, Strategy::FirstAvailable), f).unwrap();
    let reqs: Vec<Request> = (0..300)
        .map(|i| {
            Request::chat(
                "m",
                [(
                    "user",
                    &*if i % 7 == 0 {
                        format!("fail {i}")
                    } else {
                        format!("p{i}")
                    },
                )],
            )
        })
        .collect();
    let results = pool.batch(reqs);
    assert_eq!(results.len(), 300);
    for (i, r) in results.iter().enumerate() {
        if i % 7 == 0 {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.http_status(), Some(400), "{e}");
            assert_eq!(e.attempts(), 1, "400 is never retried");
            assert!(e.to_string().contains("bad"), "{e}");
        } else {
            let body = r.as_ref().unwrap().text();
            assert!(
                body.contains(&format!("\"p{i}\"")),
                "result {i} out of order: {body}"
            );
        }
    }
}

/// `batch` waits for results whenever the queue is full (here at every request:
/// queue capacity 1) and answers out-of-order completions in input order; on a closed
/// pool every element is `Closed` at once.
#[test]
fn batch_keeps_input_order_through_a_full_queue() {
    let f = factory(|_, r| {
        let body = std::str::from_utf8(r.body).unwrap().to_owned();
        // Uneven latencies, so completions come back out of order.
        std::thread::sleep(Duration::from_micros((body.len() as u64 * 37) % 900));
        let mut echo = br#"{"choices":[],"echo":"#.to_vec();
        echo.extend_from_slice(body.as_bytes());
        echo.push(b'}');
        Ok(keypool::HttpResponse {
            status: 200,
            headers: vec![],
            body: echo,
        })
    });
    let mut cfg = config(2, 3, Strategy::FirstAvailable);
    cfg.queue_capacity = 1;
    let pool = Pool::with_transport(cfg, f).unwrap();
    let n = 400;
    let results = pool.batch(
        (0..n).map(|i| Request::chat("m", [("user", format!("{}q{i}", "x".repeat(i % 23)))])),
    );
    assert_eq!(results.len(), n);
    for (i, r) in results.iter().enumerate() {
        let body = r.as_ref().unwrap().text();
        assert!(
            body.contains(&format!("q{i}\"")),
            "result {i} out of order: {body}"
        );
    }
    pool.close();
    let closed = pool.batch((0..3).map(req));
    assert_eq!(closed.len(), 3);
    assert!(
        closed.iter().all(|r| matches!(r, Err(Error::Closed))),
        "{closed:?}"
    );
}

#[test]
fn close_with_thousands_queued_answers_every_ticket_and_joins_threads() {
    let (f, mut ctl) = gated_ok();
    let cfg = Config::builder()
        .base_url("http://127.0.0.1:9")
        .key_config(KeyConfig::new("sk-test-a").label("cq-a").max_concurrent(2))
        .key_config(KeyConfig::new("sk-test-b").label("cq-b").max_concurrent(2))
        .queue_capacity(10_000)
        .probe_keys(false)
        .build()
        .unwrap();
    let pool = Pool::with_transport(cfg, f).unwrap();
    let tickets: Vec<_> = (0..5000).map(|i| pool.submit(req(i)).unwrap()).collect();
    for _ in 0..4 {
        ctl.entered.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    // All four workers are running (each is inside the transport), plus the dispatcher.
    // (Thread names are cut to 15 bytes: "keypool-cq-a-0".)
    let ours = || {
        keypool_threads()
            .into_iter()
            .filter(|n| n.starts_with("keypool-cq-"))
            .count()
    };
    assert_eq!(ours(), 4);
    // Workers are stuck in flight: a bounded close must time out, and intake stops.
    assert!(matches!(
        pool.close_timeout(Duration::from_millis(50)),
        Err(Error::Timeout {
            phase: TimeoutPhase::Shutdown,
            ..
        })
    ));
    assert!(matches!(pool.submit(req(0)), Err(Error::Closed)));
    ctl.open();
    pool.close();
    let mut ok_n = 0;
    let mut cancelled = 0;
    for t in tickets {
        match t.wait() {
            Ok(_) => ok_n += 1,
            Err(Error::Cancelled) => cancelled += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok_n, 4, "exactly the in-flight requests finish");
    assert_eq!(cancelled, 4996);
    let s = pool.stats();
    assert_eq!(s.submitted, 5000);
    assert_eq!(s.completed, 5000);
    assert_eq!(
        ours(),
        0,
        "worker threads left after close: {:?}",
        keypool_threads()
    );
}

#[test]
fn dropping_the_last_clone_shuts_down_and_answers() {
    let (f, mut ctl) = gated_ok();
    let pool = Pool::with_transport(config(1, 1, Strategy::FirstAvailable), f).unwrap();
    let clone = pool.clone();
    let tickets: Vec<_> = (0..50).map(|i| pool.submit(req(i)).unwrap()).collect();
    ctl.entered.recv().unwrap();
    drop(pool);
    assert!(!clone.is_closed(), "one clone left: still open");
    let closer = std::thread::spawn(move || drop(clone));
    ctl.open();
    closer.join().unwrap();
    let results: Vec<_> = tickets.into_iter().map(|t| t.wait()).collect();
    assert!(results[0].is_ok());
    assert!(
        results[1..]
            .iter()
            .all(|r| matches!(r, Err(Error::Cancelled) | Ok(_)))
    );
    assert_eq!(results.len(), 50);
}

#[test]
fn requests_validate_paths_bodies_and_headers() {
    assert!(matches!(
        Request::from_json("/chat/completions", "{nope"),
        Err(Error::InvalidRequest(_))
    ));
    assert!(Request::from_json("embeddings", "{}").is_err());
    assert!(Request::from_json("/a b", "{}").is_err());
    let r = Request::from_json("/embeddings", r#"{"input":"abcdefgh","max_tokens":10}"#).unwrap();
    assert_eq!(r.path(), "/embeddings");
    assert_eq!(r.estimated_tokens(), 2 + 10);
    assert!(r.clone().with_header("Authorization", "x").is_err());
    assert!(r.clone().with_header("X-Ok", "yes").is_ok());
    assert!(r.with_header("X-Bad", "a\nb").is_err());
}

#[test]
fn least_loaded_picks_the_lowest_relative_load_ties_by_order() {
    let (f, mut ctl) = gated_ok();
    let cfg = Config::builder()
        .base_url("http://127.0.0.1:9")
        .strategy(Strategy::LeastLoaded)
        .key("sk-test-a", 4)
        .key("sk-test-b", 2)
        .key("sk-test-c", 2)
        .probe_keys(false)
        .build()
        .unwrap();
    let pool = Pool::with_transport(cfg, f).unwrap();
    let mut order = Vec::new();
    let mut tickets = Vec::new();
    // Each request is held in flight before the next is submitted, so the loads the
    // dispatcher sees are exact: a 0/4 b 0/2 c 0/2 → a; a 1/4 b 0 c 0 → b; → c;
    // a 1/4 < b 1/2 = c 1/2 → a; a 2/4 = b 1/2 = c 1/2 → a (order); a 3/4 → b; → c; → a.
    for i in 0..8 {
        tickets.push(pool.submit(req(i)).unwrap());
        order.push(ctl.entered.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    assert_eq!(
        order,
        [
            "key-0", "key-1", "key-2", "key-0", "key-0", "key-1", "key-2", "key-0"
        ]
    );
    ctl.open();
    for t in tickets {
        t.wait().unwrap();
    }
}

/// This thread's voluntary context switches so far (Linux).
#[cfg(target_os = "linux")]
fn my_voluntary_switches() -> u64 {
    std::fs::read_to_string("/proc/thread-self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// A program submitting in a loop on a full queue sleeps until an eighth of the queue
/// is free again, not at every freed slot (`queue_space.rs`): its thread wakes about
/// once per `queue_capacity / 8` requests. Before, crossbeam's blocking `send` woke it
/// once per request (≈1,900 voluntary switches here).
#[cfg(target_os = "linux")]
#[test]
fn a_blocking_submitter_wakes_once_per_eighth_of_the_queue() {
    const N: usize = 2_000;
    // Each request takes a moment, so the queue stays full and the submitter waits.
    let f = factory(|_, _| {
        std::thread::sleep(Duration::from_micros(200));
        Ok(ok())
    });
    let pool = Pool::with_transport(config(1, 2, Strategy::FirstAvailable), f).unwrap();
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let before = my_voluntary_switches();
    for i in 0..N {
        let tx = done_tx.clone();
        pool.submit_with(req(i), move |r| {
            let _ = tx.send(r.is_ok());
        })
        .unwrap();
    }
    let switches = my_voluntary_switches() - before;
    eprintln!("submitter voluntary switches: {switches}");
    let ok = done_rx.iter().take(N).filter(|&ok| ok).count();
    assert_eq!(ok, N, "every request answered, successfully");
    // Queue 64: about (N - 64) / 8 = 242 waits; one per request would be ~1,900.
    assert!(
        switches < (N / 3) as u64,
        "the submitter slept {switches} times for {N} requests"
    );
}

/// This thread's id, and whether thread `tid` of this process is asleep (Linux).
#[cfg(target_os = "linux")]
fn my_tid() -> String {
    std::fs::read_link("/proc/thread-self")
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[cfg(target_os = "linux")]
fn is_asleep(tid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('S')))
        .unwrap_or(false)
}

/// A submitter asleep on a full queue when the pool closes gets an answer (its
/// request cancelled, or refused as closed): nothing hangs, nothing is lost.
#[cfg(target_os = "linux")]
#[test]
fn a_submitter_blocked_on_a_full_queue_is_answered_at_close() {
    let (f, mut ctl) = gated_ok();
    let cfg = Config::builder()
        .base_url("http://127.0.0.1:9")
        .key("sk-test-a", 1)
        .queue_capacity(4)
        .probe_keys(false)
        .build()
        .unwrap();
    let pool = Pool::with_transport(cfg, f).unwrap();
    // A worker holds a request in flight (the gate says so), then the queue is full
    // again: before, the test could fill the queue before the dispatcher had handed
    // anything to the worker, and the close it expects to time out did not.
    let mut tickets = fill(&pool);
    ctl.entered
        .recv_timeout(Duration::from_secs(10))
        .expect("a worker holds a request");
    tickets.extend(fill(&pool));
    let (tid_tx, tid_rx) = crossbeam_channel::bounded(1);
    let (out_tx, out_rx) = crossbeam_channel::bounded(1);
    let p = pool.clone();
    let submitter = std::thread::spawn(move || {
        tid_tx.send(my_tid()).unwrap();
        let outcome = match p.submit(req(999)) {
            Ok(t) => t.wait().map(|_| ()),
            Err(e) => Err(e),
        };
        out_tx.send(outcome).unwrap();
    });
    let tid = tid_rx.recv().unwrap();
    // Its only way to sleep is waiting for queue space.
    while !is_asleep(&tid) && !submitter.is_finished() {
        std::thread::yield_now();
    }
    assert!(
        out_rx.try_recv().is_err(),
        "the submit went through a full queue"
    );
    // Workers are held in flight: a bounded close times out, but intake stops and the
    // queued requests (the blocked one too, once it gets in) are cancelled.
    assert!(pool.close_timeout(Duration::from_millis(50)).is_err());
    match out_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Err(Error::Cancelled | Error::Closed)) => {}
        other => panic!("the blocked submitter got {other:?}"),
    }
    submitter.join().unwrap();
    ctl.open();
    pool.close();
    // The earlier ones: the one in flight succeeded, the queued ones were cancelled.
    for t in tickets {
        match t.wait() {
            Ok(_) | Err(Error::Cancelled) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
}

/// `submit_timeout` takes the first free slot within its timeout (no hysteresis: with
/// one slot free it must not time out waiting for an eighth of the queue).
#[cfg(target_os = "linux")]
#[test]
fn submit_timeout_takes_the_first_free_slot() {
    let (permit_tx, permit_rx) = crossbeam_channel::unbounded::<()>();
    let (entered_tx, entered_rx) = crossbeam_channel::unbounded::<()>();
    let f = factory(move |_, _| {
        let _ = entered_tx.send(());
        // Bounded, so a failing run ends instead of hanging the pool's shutdown.
        let _ = permit_rx.recv_timeout(Duration::from_secs(10));
        Ok(ok())
    });
    let cfg = Config::builder()
        .base_url("http://127.0.0.1:9")
        .key("sk-test-a", 1)
        .queue_capacity(16)
        .probe_keys(false)
        .build()
        .unwrap();
    let pool = Pool::with_transport(cfg, f).unwrap();
    // The worker holds the first request; then the queue fills (16).
    let mut tickets = vec![pool.submit(req(0)).unwrap()];
    entered_rx.recv().unwrap();
    tickets.extend(fill(&pool));
    assert_eq!(pool.stats().queued, 16);
    let (tid_tx, tid_rx) = crossbeam_channel::bounded(1);
    let p = pool.clone();
    let submitter = std::thread::spawn(move || {
        tid_tx.send(my_tid()).unwrap();
        p.submit_timeout(req(999), Duration::from_secs(5))
    });
    // Once it waits on the full queue, one request finishes: exactly one slot frees
    // (the worker takes the dispatcher's job, the dispatcher one from the queue).
    let tid = tid_rx.recv().unwrap();
    // (Rarely the dispatcher took its job off the queue just after `fill` saw it
    // full: then the submit finds room at once.)
    while !is_asleep(&tid) && !submitter.is_finished() {
        std::thread::yield_now();
    }
    permit_tx.send(()).unwrap();
    let t0 = std::time::Instant::now();
    let t = submitter
        .join()
        .unwrap()
        .expect("a slot freed within the timeout");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "it waited for more room"
    );
    tickets.push(t);
    for _ in 0..tickets.len() {
        permit_tx.send(()).unwrap();
    }
    assert!(tickets.into_iter().all(|t| t.wait().is_ok()));
}

/// A refused submit never runs its callback, deadline or not (issue 21): a request with
/// a deadline already due, refused `Busy` on a full queue, must not be answered by the
/// deadline registry. Before, about 2,000 of 300,000 refused requests ran their callback.
#[test]
fn a_refused_submit_with_a_deadline_never_runs_its_callback() {
    let (f, mut ctl) = gated_ok();
    let cfg = Config::builder()
        .base_url("http://127.0.0.1:9")
        .key("sk-test-a", 1)
        .queue_capacity(2)
        .probe_keys(false)
        .build()
        .unwrap();
    let pool = Pool::with_transport(cfg, f).unwrap();
    let mut held = fill(&pool);
    let ran = Arc::new(AtomicUsize::new(0));
    let (mut accepted, mut refused) = (0usize, 0usize);
    for i in 0..50_000 {
        let r = ran.clone();
        match pool.try_submit_with(req(i).with_deadline(Duration::from_nanos(1)), move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        }) {
            Ok(()) => accepted += 1,
            Err(e) => {
                assert!(matches!(e.error, Error::Busy), "{}", e.error);
                refused += 1;
            }
        }
    }
    assert!(
        refused > 40_000,
        "the queue was not full: {refused} refused"
    );
    ctl.open();
    for t in held.drain(..) {
        let _ = t.wait();
    }
    pool.close();
    assert_eq!(ran.load(Ordering::SeqCst), accepted, "{refused} refused");
}

/// Blocking submitters are served in arrival order, and none starves behind
/// `try_submit` callers (issue 21.3): while a submitter waits in line for queue space,
/// `try_submit` says `Busy` instead of taking the slot it is owed. Before, a thread
/// spinning on `try_submit` took nearly every freed slot.
#[test]
fn a_blocking_submitter_is_not_starved_by_try_submit_callers() {
    let f = factory(|_, _| {
        std::thread::sleep(Duration::from_millis(1));
        Ok(ok())
    });
    let cfg = Config::builder()
        .base_url("http://127.0.0.1:9")
        .key("sk-test-a", 1)
        .queue_capacity(64)
        .probe_keys(false)
        .build()
        .unwrap();
    let pool = Pool::with_transport(cfg, f).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let spammer = {
        let (pool, stop) = (pool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut taken = Vec::new();
            let mut i = 1_000;
            while !stop.load(Ordering::SeqCst) {
                if let Ok(t) = pool.try_submit(req(i)) {
                    taken.push(t);
                    i += 1;
                }
            }
            taken
        })
    };
    // The spammer has filled the queue. A waiting submitter sleeps until an eighth of
    // it (8 slots) is free; the spammer refills each slot as it frees.
    while pool.stats().queued < 64 {
        std::thread::yield_now();
    }
    let t = Instant::now();
    let mut mine = Vec::new();
    for i in 0..40 {
        mine.push(pool.submit(req(i)).unwrap());
    }
    let took = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    let theirs = spammer.join().unwrap();
    for t in mine.into_iter().chain(theirs) {
        t.wait().unwrap();
    }
    // 40 submits at ~1 ms per request, behind a queue of 64 of the spammer's: about
    // 100 ms. Starved, the submitter never saw the queue drain to its mark.
    assert!(
        took < Duration::from_millis(1_500),
        "40 blocking submits took {took:?}"
    );
}
