//! Key admission (one state machine per key): probes under concurrency with probing
//! on, half-open after a cooldown, key faults that do not spend a request's attempts,
//! deadlines that hold while a request waits, a bounded retry backlog, and hostile
//! usage figures under `tpm` limits. Concurrency is measured where requests arrive (the
//! mock server, or a test transport standing in for one), never inferred.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keypool::{
    Config, Error, HttpResponse, KeyConfig, Pool, Request, RetryConfig, Strategy, TimeoutPhase,
    TransportError,
};
use keypool_mock::{KeyRule, MockConfig, MockServer};
use support::{factory, gate, ok};

fn chat(i: usize) -> Request {
    Request::chat("mock-model", [("user", &*format!("p{i}"))])
}

fn retry(max_attempts: u32) -> RetryConfig {
    {
        let mut r = RetryConfig::default();
        r.max_attempts = max_attempts;
        r.base_delay_ms = 5;
        r.max_delay_ms = 50;
        r
    }
}

/// Per-key in-flight accounting at the "server" (the test transport).
#[derive(Default)]
struct Accounting {
    calls: Mutex<BTreeMap<String, u64>>,
    in_flight: Mutex<BTreeMap<String, usize>>,
    max_in_flight: Mutex<BTreeMap<String, usize>>,
}

impl Accounting {
    /// Counts a call in; returns how many calls this key had before.
    fn enter(&self, key: &str) -> u64 {
        let mut c = self.calls.lock().unwrap();
        let n = c.entry(key.to_owned()).or_default();
        *n += 1;
        let before = *n - 1;
        drop(c);
        let mut f = self.in_flight.lock().unwrap();
        let cur = f.entry(key.to_owned()).or_default();
        *cur += 1;
        let cur = *cur;
        drop(f);
        let mut m = self.max_in_flight.lock().unwrap();
        let max = m.entry(key.to_owned()).or_default();
        *max = (*max).max(cur);
        before
    }

    fn leave(&self, key: &str) {
        *self.in_flight.lock().unwrap().get_mut(key).unwrap() -= 1;
    }
}

/// Each key's first call fails at once with a transport error; once past that, calls
/// wait at a gate while `hold` is set. With probing on, in every strategy, every key
/// must end up fully usable: the probe state was once set by the dispatcher *after*
/// the hand-off while the worker cleared it, and a key whose probe failed fast could
/// stay "probe out" forever (and round-robin then hung).
#[test]
fn failed_probes_never_strand_a_key() {
    const KEYS: usize = 16;
    const PER_KEY: usize = 2;
    for strategy in [
        Strategy::FirstAvailable,
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
    ] {
        for round in 0..100 {
            let acct = Arc::new(Accounting::default());
            let hold = Arc::new(AtomicUsize::new(0));
            let (g, mut ctl) = gate();
            let (g3, mut ctl3) = gate();
            let (a, h) = (acct.clone(), hold.clone());
            let f = factory(move |label, _| {
                let before = a.enter(label);
                let r = if before == 0 {
                    Err(TransportError::Failed(
                        "connection reset (first call)".into(),
                    ))
                } else {
                    match h.load(SeqCst) {
                        1 => g.pass(label),
                        2 => g3.pass(label),
                        _ => {}
                    }
                    Ok(ok())
                };
                a.leave(label);
                r
            });
            let mut b = Config::builder()
                .base_url("http://127.0.0.1:9/v1")
                .strategy(strategy)
                .retry(retry(KEYS as u32 + 2))
                .probe_keys(true)
                .deadline_ms(20_000);
            for k in 0..KEYS {
                b = b.key_config(KeyConfig::new(format!("sk-{k}")).max_concurrent(PER_KEY));
            }
            let pool = Pool::with_transport(b.build().unwrap(), f).unwrap();
            // Phase 1: every key's probe fails fast, concurrently with dispatching.
            let rs = pool.batch((0..KEYS * 4).map(chat));
            for (i, r) in rs.iter().enumerate() {
                assert!(r.is_ok(), "{strategy:?} round {round}: request {i}: {r:?}");
            }
            // Phase 2: a key whose probe failed admits one trial (never zero: that was
            // the stranded key); a proven key admits a request on every worker.
            let proven: Vec<bool> = {
                let calls = acct.calls.lock().unwrap();
                (0..KEYS)
                    .map(|k| calls.get(&format!("key-{k}")).copied().unwrap_or(0) >= 2)
                    .collect()
            };
            let expect = |k: usize| if proven[k] { PER_KEY } else { 1 };
            let total: usize = (0..KEYS).map(expect).sum();
            hold.store(1, SeqCst);
            let tickets: Vec<_> = (0..KEYS * PER_KEY)
                .map(|i| pool.submit(chat(i)).unwrap())
                .collect();
            let mut entered = BTreeMap::<String, usize>::new();
            for _ in 0..total {
                match ctl.entered.recv_timeout(Duration::from_secs(10)) {
                    Ok(label) => *entered.entry(label).or_default() += 1,
                    Err(_) => {
                        ctl.open();
                        panic!(
                            "{strategy:?} round {round}: a key never took its share: {entered:?}, proven {proven:?}"
                        );
                    }
                }
            }
            for k in 0..KEYS {
                let got = entered.get(&format!("key-{k}")).copied().unwrap_or(0);
                if got != expect(k) {
                    ctl.open();
                    panic!(
                        "{strategy:?} round {round}: key-{k} took {got}, expected {}",
                        expect(k)
                    );
                }
            }
            ctl.open();
            for t in tickets {
                assert!(t.wait().is_ok());
            }
            // Phase 3: the trials succeeded, so every key takes a request on every
            // worker.
            hold.store(2, SeqCst);
            let tickets: Vec<_> = (0..KEYS * PER_KEY)
                .map(|i| pool.submit(chat(i)).unwrap())
                .collect();
            let mut entered = BTreeMap::<String, usize>::new();
            for _ in 0..KEYS * PER_KEY {
                match ctl3.entered.recv_timeout(Duration::from_secs(10)) {
                    Ok(label) => *entered.entry(label).or_default() += 1,
                    Err(_) => {
                        ctl3.open();
                        panic!(
                            "{strategy:?} round {round}: trials never reopened their keys: {entered:?}"
                        );
                    }
                }
            }
            ctl3.open();
            assert!(entered.values().all(|&n| n == PER_KEY), "{entered:?}");
            for t in tickets {
                assert!(t.wait().is_ok());
            }
            for (k, m) in acct.max_in_flight.lock().unwrap().iter() {
                assert!(*m <= PER_KEY, "{k}: {m} in flight");
            }
            pool.close();
        }
    }
}

/// With `max_attempts` 1 and a revoked key first in the config, every request still
/// succeeds on the good key: the 401 is the key's fault, not the request's. With
/// probing on, the revoked key costs exactly one request (counted at the server).
#[test]
fn revoked_key_does_not_spend_attempts() {
    for strategy in [
        Strategy::FirstAvailable,
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
    ] {
        let server = MockServer::start(MockConfig::default()).unwrap();
        server.set_key_rule(
            "sk-revoked",
            KeyRule {
                always_status: Some(401),
                ..KeyRule::default()
            },
        );
        let config = Config::builder()
            .base_url(server.url())
            .strategy(strategy)
            .retry(retry(1))
            .key_config(
                KeyConfig::new("sk-revoked")
                    .label("revoked")
                    .max_concurrent(4),
            )
            .key_config(KeyConfig::new("sk-good").label("good").max_concurrent(4))
            .build()
            .unwrap();
        let pool = Pool::new(config).unwrap();
        let rs = pool.batch((0..40).map(chat));
        let mut moved = 0;
        for r in &rs {
            let resp = r.as_ref().unwrap_or_else(|e| panic!("{strategy:?}: {e}"));
            assert_eq!(resp.key_label(), "good");
            if resp.attempts() == 2 {
                moved += 1;
                assert_eq!(resp.keys_tried(), &[0, 1]);
            }
        }
        assert_eq!(
            moved, 1,
            "{strategy:?}: one request went to the revoked key first"
        );
        assert_eq!(server.key_stats("sk-revoked").unwrap().requests, 1);
        let stats = pool.stats();
        assert!(stats.keys[0].disabled_reason.is_some());
        pool.close();
    }
}

/// After a 429 cooldown a key reopens half-open: one request first, the others only
/// after it was answered — not every worker at once when the cooldown ends. Checked
/// on the server's own log.
#[test]
fn cooldown_ends_half_open() {
    for probe in [false, true] {
        let server = MockServer::start(MockConfig::default()).unwrap();
        server.set_key_rule(
            "sk-a",
            KeyRule {
                always_status: Some(429),
                retry_after_ms: Some(300),
                fail_first: 1,
                latency_ms: Some(40),
                ..KeyRule::default()
            },
        );
        let config = Config::builder()
            .base_url(server.url())
            .retry(retry(5))
            .probe_keys(probe)
            .key_config(KeyConfig::new("sk-a").max_concurrent(4))
            .build()
            .unwrap();
        let pool = Pool::new(config).unwrap();
        let rs = pool.batch((0..12).map(chat));
        assert!(rs.iter().all(|r| r.is_ok()), "{rs:?}");
        let log = server.key_stats("sk-a").unwrap().log;
        let limited = log.iter().find(|r| r.status == 429).expect("a 429");
        // A request may race the 429 (sent before the client has read it), so the
        // server's clock allows a short window; after it, nothing until the cooldown
        // (300 ms from when the client read the 429) ends.
        let race = limited.finished + Duration::from_millis(50);
        let cool_end = limited.finished + Duration::from_millis(250);
        assert!(
            !log.iter().any(|r| r.arrived > race && r.arrived < cool_end),
            "a request was sent during the cooldown: {log:?}"
        );
        let mut after: Vec<_> = log.iter().filter(|r| r.arrived >= cool_end).collect();
        after.sort_by_key(|r| r.arrived);
        assert!(after.len() >= 2, "{after:?}");
        let trial = after[0];
        for r in &after[1..] {
            assert!(
                r.arrived >= trial.finished,
                "probe={probe}: a request arrived before the trial was answered: {r:?} vs trial {trial:?}"
            );
        }
        pool.close();
    }
}

/// With every key cooling for a minute, queued requests are answered at their
/// deadline (tickets and callbacks alike), not when the cooldown ends.
#[test]
fn deadline_holds_while_every_key_cools() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    for k in ["sk-a", "sk-b"] {
        server.set_key_rule(
            k,
            KeyRule {
                always_status: Some(429),
                retry_after_ms: Some(60_000),
                ..KeyRule::default()
            },
        );
    }
    let config = Config::builder()
        .base_url(server.url())
        .retry(retry(10))
        .deadline_ms(700)
        .key_config(KeyConfig::new("sk-a").max_concurrent(2))
        .key_config(KeyConfig::new("sk-b").max_concurrent(2))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let t0 = Instant::now();
    let tickets: Vec<_> = (0..20).map(|i| pool.submit(chat(i)).unwrap()).collect();
    let (tx, rx) = crossbeam_channel::unbounded();
    for i in 0..20 {
        let tx = tx.clone();
        pool.submit_with(chat(100 + i), move |r| {
            let _ = tx.send((r, Instant::now()));
        })
        .unwrap();
    }
    for t in tickets {
        match t.wait() {
            Err(Error::Timeout {
                phase: TimeoutPhase::Deadline,
                ..
            }) => {}
            other => panic!("expected a deadline timeout, got {other:?}"),
        }
    }
    for _ in 0..20 {
        let (r, at) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(
            r,
            Err(Error::Timeout {
                phase: TimeoutPhase::Deadline,
                ..
            })
        ));
        assert!(
            at - t0 < Duration::from_secs(3),
            "answered after {:?}",
            at - t0
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // Each key got one request before it cooled; nothing more was sent.
    assert!(server.stats().total_requests <= 4);
    pool.close();
}

/// Behind a saturated pool (its one worker held), queued requests are answered at
/// their own deadline while the held request goes on.
#[test]
fn deadline_holds_behind_a_saturated_pool() {
    let (g, mut ctl) = gate();
    let f = factory(move |label, _| {
        g.pass(label);
        Ok(ok())
    });
    let config = Config::builder()
        .base_url("http://127.0.0.1:9/v1")
        .key_config(KeyConfig::new("sk-a").max_concurrent(1))
        .build()
        .unwrap();
    let pool = Pool::with_transport(config, f).unwrap();
    let held = pool.submit(chat(0)).unwrap();
    ctl.entered.recv_timeout(Duration::from_secs(5)).unwrap();
    let t0 = Instant::now();
    let queued: Vec<_> = (1..6)
        .map(|i| {
            pool.submit(chat(i).with_deadline(Duration::from_millis(200)))
                .unwrap()
        })
        .collect();
    for t in queued {
        let r = t.wait();
        assert!(
            matches!(
                r,
                Err(Error::Timeout {
                    phase: TimeoutPhase::Deadline,
                    attempts: 0,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    ctl.open();
    assert!(held.wait().is_ok());
    // The expired requests were never sent.
    let stats = pool.stats();
    assert_eq!(stats.keys[0].sent, 1);
    assert_eq!(stats.completed, 6);
    pool.close();
}

/// During a 5xx storm with long backoffs, retries count against `queue_capacity`:
/// requests accepted and not yet answered stay within the documented bound
/// (`2 × queue_capacity` + workers) instead of growing with everything submitted.
#[test]
fn retry_backlog_is_bounded() {
    let f = factory(|_, _| {
        Ok(HttpResponse {
            status: 500,
            headers: vec![],
            body: br#"{"error":{"message":"down"}}"#.to_vec(),
        })
    });
    const CAP: usize = 8;
    const WORKERS: usize = 4;
    let config = Config::builder()
        .base_url("http://127.0.0.1:9/v1")
        .queue_capacity(CAP)
        .retry({
            let mut r = RetryConfig::default();
            r.max_attempts = 50;
            r.base_delay_ms = 200;
            r.max_delay_ms = 200;
            r
        })
        .key_config(KeyConfig::new("sk-a").max_concurrent(WORKERS))
        .build()
        .unwrap();
    let pool = Pool::with_transport(config, f).unwrap();
    let accepted = AtomicU64::new(0);
    let t0 = Instant::now();
    let mut tickets = Vec::new();
    let mut max_outstanding = 0;
    while t0.elapsed() < Duration::from_millis(600) {
        match pool.try_submit(chat(0)) {
            Ok(t) => {
                accepted.fetch_add(1, SeqCst);
                tickets.push(t);
            }
            Err(e) if e.is_busy() => std::thread::yield_now(),
            Err(e) => panic!("{e}"),
        }
        let outstanding = accepted.load(SeqCst) - pool.stats().completed;
        max_outstanding = max_outstanding.max(outstanding);
    }
    assert!(
        max_outstanding <= (2 * CAP + WORKERS) as u64,
        "{max_outstanding} outstanding"
    );
    pool.close();
    // Every accepted request is answered (with its last error or Cancelled).
    for t in tickets {
        assert!(t.wait().is_err());
    }
}

/// A server reporting absurd usage (u64::MAX tokens) under a small `tpm` limit neither
/// wraps the budget nor kills the dispatcher: the key waits at most a minute, and a
/// request with a deadline is answered at that deadline.
#[test]
fn absurd_usage_under_tpm_is_bounded() {
    let f = Arc::new(factory(|_, _| {
        Ok(HttpResponse {
            status: 200,
            headers: vec![],
            body: format!(
                r#"{{"choices":[{{"message":{{"content":"x"}}}}],"usage":{{"prompt_tokens":{0},"completion_tokens":{0}}}}}"#,
                u64::MAX
            )
            .into_bytes(),
        })
    }));
    for tpm in [60, 119, 100_000] {
        let config = Config::builder()
            .base_url("http://127.0.0.1:9/v1")
            .key_config(KeyConfig::new("sk-a").max_concurrent(2).tpm(tpm))
            .build()
            .unwrap();
        let f = f.clone();
        let pool = Pool::with_transport(config, move |s| f(s)).unwrap();
        assert!(pool.submit(chat(0)).unwrap().wait().is_ok());
        let stats = pool.stats();
        // Bounded per response (see body.rs), never wrapped.
        assert_eq!(stats.keys[0].prompt_tokens, u64::from(u32::MAX));
        assert!(stats.keys[0].tpm_budget.unwrap() >= -(tpm as f64));
        let r = pool
            .submit(chat(1).with_deadline(Duration::from_millis(300)))
            .unwrap()
            .wait();
        assert!(
            matches!(
                r,
                Err(Error::Timeout {
                    phase: TimeoutPhase::Deadline,
                    ..
                })
            ),
            "tpm {tpm}: {r:?}"
        );
        // The dispatcher is alive: stats and a clean close.
        assert_eq!(pool.stats().completed, 2);
        pool.close();
    }
}

/// A thread that cannot start (here: the address-space limit leaves no room for the
/// workers' stacks) makes `Pool::new` fail with `Error::Spawn` in bounded time; it used
/// to hang forever. Run in a child process (this test binary, re-executed) under
/// `ulimit -v`, so the limit cannot disturb other tests.
#[test]
fn thread_spawn_failure_is_reported_not_hung() {
    if std::env::var_os("KEYPOOL_SPAWN_CHILD").is_some() {
        let mut b = Config::builder()
            .base_url("http://127.0.0.1:9/v1")
            .worker_stack_size(128 << 20);
        for k in 0..8 {
            b = b.key_config(KeyConfig::new(format!("sk-{k}")).max_concurrent(64));
        }
        let t0 = Instant::now();
        match Pool::new(b.build().unwrap()) {
            Err(e @ Error::Spawn { .. }) => {
                println!("CHILD-RESULT spawn-error {:?} :: {e}", t0.elapsed())
            }
            Err(e) => println!("CHILD-RESULT other-error {e}"),
            Ok(_) => println!("CHILD-RESULT built"),
        }
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let t0 = Instant::now();
    let out = std::process::Command::new("sh")
        .arg("-c")
        // 8 keys × 64 workers × 128 MiB of stack need 64 GiB: far over 8 GiB.
        .arg(r#"ulimit -v 8388608 && exec "$0" --exact thread_spawn_failure_is_reported_not_hung --nocapture --test-threads=1"#)
        .arg(&exe)
        .env("KEYPOOL_SPAWN_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("CHILD-RESULT"))
        .unwrap_or_else(|| {
            panic!(
                "no result from the child: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(line.contains("spawn-error"), "{line}");
    assert!(line.contains("keypool-key-"), "names the thread: {line}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}

/// CPU time of this process (user + system) so far.
fn process_cpu() -> Duration {
    // SAFETY: `getrusage` writes into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// A request waiting for a paused key while another's retry backoff ends must not make
/// the dispatcher spin: it waits without polling until the pause ends (found by a
/// hostile server: a transport error's retry came due during a 60 s pause and the
/// dispatcher burned a core until it ended).
#[test]
fn a_due_retry_does_not_spin_the_dispatcher_while_a_key_pauses() {
    let (calls_tx, calls_rx) = crossbeam_channel::unbounded::<()>();
    let f = factory(move |_, req| {
        let _ = calls_tx.send(());
        if req.body.windows(4).any(|w| w == b"fail") {
            return Err(TransportError::Failed("connection reset".into()));
        }
        let mut r = ok();
        r.headers = vec![
            ("x-ratelimit-remaining-requests".into(), "0".into()),
            ("x-ratelimit-reset-requests".into(), "2s".into()),
        ];
        Ok(r)
    });
    let config = Config::builder()
        .strategy(Strategy::RoundRobin)
        .retry(
            RetryConfig::default()
                .max_attempts(2)
                .probe_keys(false)
                .base_delay(Duration::from_millis(300)),
        )
        .key_config(KeyConfig::new("sk-a").max_concurrent(2))
        .build()
        .unwrap();
    let pool = Pool::with_transport(config, f).unwrap();
    let paused = pool
        .submit(Request::chat("m", [("user", "pause")]))
        .unwrap();
    let failing = pool.submit(Request::chat("m", [("user", "fail")])).unwrap();
    for _ in 0..2 {
        calls_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
    assert!(paused.wait().is_ok());
    // The key pauses 2 s; the failed request's retry comes due after ~300 ms while
    // this one waits in the dispatcher for the key.
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    let waiting = pool
        .submit(Request::chat("m", [("user", "later")]))
        .unwrap();
    assert!(waiting.wait().is_ok());
    let (wall, cpu) = (t0.elapsed(), process_cpu() - cpu0);
    // Normally a 2 s wait (the pause); a spinning dispatcher burns ~one core of it.
    // (Rarely the pause is over before this request arrives: a short wait, little CPU.)
    assert!(
        cpu < wall / 4 + Duration::from_millis(50),
        "{cpu:?} of CPU during a {wall:?} wait: the dispatcher polled"
    );
    assert!(matches!(failing.wait(), Err(Error::Transport { .. })));
}
