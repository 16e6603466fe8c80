//! What a completion callback may call. A callback runs on a keypool thread; a call
//! there that waits for the pool (a blocking submit on a full queue, `batch`,
//! `Ticket::wait`, waiting for shutdown) deadlocks once every worker is in such a
//! callback, so it must return `Error::WouldDeadlock` at once — while the non-blocking
//! forms keep working and every request still gets its result.
//!
//! One key with one worker: the callback occupies the only worker, so nothing can drain
//! the queue while it runs. Synchronisation is by channels only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use keypool::{Config, Error, Pool, Request, RequestResult, Ticket};
use keypool_mock::{MockConfig, MockServer};
use parking_lot::Mutex;

/// Long enough for a loaded CI machine, short enough that a deadlock fails the test.
const PATIENCE: Duration = Duration::from_secs(20);

fn req(i: usize) -> Request {
    Request::chat("mock-model", [("user", &*format!("p{i}"))])
}

fn one_worker_pool(server: &MockServer) -> Pool {
    let config = Config::builder()
        .base_url(server.url())
        .key("sk-test-a", 1)
        .queue_capacity(2)
        .build()
        .unwrap();
    Pool::new(config).unwrap()
}

fn is_would_deadlock<T>(r: &Result<T, Error>) -> bool {
    matches!(r, Err(Error::WouldDeadlock(_)))
}

/// What the callback saw, sent back to the test thread.
struct Seen {
    first: RequestResult,
    wait_timeout: RequestResult,
    wait_timeout_took: Duration,
    still_pending: bool,
    wait: RequestResult,
    submit: Result<Ticket, Error>,
    submit_with: Result<(), Error>,
    submit_timeout: Result<Ticket, Error>,
    try_submit: Result<Ticket, Error>,
    batch: Vec<RequestResult>,
    refused_took: Duration,
    submitted_in_stats: u64,
    pending: Ticket,
}

#[test]
fn blocking_calls_in_a_callback_return_would_deadlock_and_everything_completes() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    let pool = one_worker_pool(&server);
    let (entered_tx, entered_rx) = bounded::<()>(1);
    let (full_tx, full_rx) = bounded::<()>(1);
    let (seen_tx, seen_rx) = bounded::<Seen>(1);
    let (late_tx, late_rx) = bounded::<RequestResult>(1);
    let p = pool.clone();
    pool.submit_with(req(0), move |first| {
        // The queue has room: a blocking submit is fine from a callback.
        let mut pending = p.submit(req(1)).expect("submit with room in the queue");
        let extra = p.submit(req(2)).ok();
        // The only worker is this one, so these results cannot come: no waiting.
        let t = Instant::now();
        let wait_timeout = pending.wait_timeout(Duration::from_secs(3600));
        let wait_timeout_took = t.elapsed();
        let still_pending = pending.try_wait().is_none() && !pending.is_taken();
        let wait = match extra {
            Some(t) => t.wait(),
            None => Err(Error::WouldDeadlock("(queue was already full)")),
        };
        entered_tx.send(()).unwrap();
        full_rx.recv().unwrap(); // the test thread filled the queue
        let t = Instant::now();
        let submit = p.submit(req(3));
        let submit_with = p.submit_with(req(4), move |r| {
            let _ = late_tx.send(r); // must never run: the submit was refused
        });
        let submit_timeout = p.submit_timeout(req(5), Duration::from_secs(3600));
        let try_submit = p.try_submit(req(6)).map_err(Error::from);
        let batch = p.batch([req(7), req(8)]);
        let refused_took = t.elapsed();
        let submitted_in_stats = p.stats().submitted;
        seen_tx
            .send(Seen {
                first,
                wait_timeout,
                wait_timeout_took,
                still_pending,
                wait,
                submit,
                submit_with,
                submit_timeout,
                try_submit,
                batch,
                refused_took,
                submitted_in_stats,
                pending,
            })
            .unwrap();
    })
    .unwrap();

    entered_rx
        .recv_timeout(PATIENCE)
        .expect("Ticket::wait_timeout blocked inside the callback");
    // Fill the queue from this thread: the worker is in the callback, so it stays full.
    let mut fillers = Vec::new();
    loop {
        match pool.try_submit(req(100 + fillers.len())) {
            Ok(t) => fillers.push(t),
            Err(e) if e.is_busy() => break,
            Err(e) => panic!("try_submit: {e}"),
        }
        assert!(fillers.len() <= 3, "the queue never filled up");
    }
    full_tx.send(()).unwrap();
    let seen = seen_rx
        .recv_timeout(PATIENCE)
        .expect("a blocking call inside the callback deadlocked the pool");

    assert_eq!(seen.first.unwrap().status(), 200);
    assert!(
        is_would_deadlock(&seen.wait_timeout),
        "{:?}",
        seen.wait_timeout
    );
    assert!(seen.wait_timeout_took < Duration::from_secs(5));
    assert!(
        seen.still_pending,
        "WouldDeadlock must leave the ticket valid"
    );
    assert!(is_would_deadlock(&seen.wait), "{:?}", seen.wait);
    assert!(is_would_deadlock(&seen.submit), "{:?}", seen.submit);
    assert!(
        is_would_deadlock(&seen.submit_with),
        "{:?}",
        seen.submit_with
    );
    assert!(
        is_would_deadlock(&seen.submit_timeout),
        "{:?}",
        seen.submit_timeout
    );
    assert!(
        matches!(seen.try_submit, Err(Error::Busy)),
        "{:?}",
        seen.try_submit
    );
    assert_eq!(seen.batch.len(), 2);
    assert!(seen.batch.iter().all(is_would_deadlock), "{:?}", seen.batch);
    assert!(
        seen.refused_took < Duration::from_secs(5),
        "{:?}",
        seen.refused_took
    );
    assert!(
        seen.submit.unwrap_err().to_string().contains("callback"),
        "the message says why"
    );

    // Everything accepted completes once the callback returns.
    assert_eq!(seen.pending.wait().unwrap().status(), 200);
    for t in fillers {
        assert_eq!(t.wait().unwrap().status(), 200);
    }
    pool.close();
    let stats = pool.stats();
    assert_eq!(stats.submitted, stats.completed);
    assert_eq!(
        stats.submitted, seen.submitted_in_stats,
        "refused calls queued nothing"
    );
    assert!(
        late_rx.try_recv().is_err(),
        "a refused submit_with ran its callback"
    );
}

#[test]
fn a_callback_may_take_a_ready_result_and_close_without_waiting() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    let pool = one_worker_pool(&server);
    // One worker, FIFO: request 0 is answered before request 1's callback runs.
    let ready: Arc<Mutex<Option<Ticket>>> = Arc::new(Mutex::new(None));
    let (tx, rx) = bounded(1);
    let (go_tx, go_rx) = bounded::<()>(1);
    *ready.lock() = Some(pool.submit(req(0)).unwrap());
    let (p, r) = (pool.clone(), ready.clone());
    pool.submit_with(req(1), move |_| {
        go_rx.recv().unwrap();
        let ticket = r.lock().take().unwrap();
        let answered = ticket.wait().map(|resp| resp.status());
        let t = Instant::now();
        let close = p.close_timeout(Duration::from_secs(3600));
        p.close(); // starts the shutdown (already started) and returns
        let took = t.elapsed();
        tx.send((answered, close, p.is_closed(), took)).unwrap();
    })
    .unwrap();
    go_tx.send(()).unwrap();
    let (answered, close, closed, took) = rx
        .recv_timeout(PATIENCE)
        .expect("close from a callback blocked");
    assert_eq!(answered.unwrap(), 200, "a ready result is allowed");
    assert!(is_would_deadlock(&close), "{close:?}");
    assert!(close.unwrap_err().to_string().contains("shutdown"));
    assert!(closed, "the shutdown was started");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(matches!(pool.submit(req(2)), Err(Error::Closed)));
    // Joining from the test thread works.
    pool.close_timeout(PATIENCE).unwrap();
}

#[test]
fn blocking_calls_off_keypool_threads_still_block() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    let pool = one_worker_pool(&server);
    let results = pool.batch((0..5).map(req));
    assert!(results.iter().all(|r| r.as_ref().unwrap().status() == 200));
    let t = pool.submit(req(9)).unwrap();
    assert_eq!(t.wait().unwrap().status(), 200);
}
