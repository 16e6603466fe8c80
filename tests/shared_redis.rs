//! Shared limits across processes through Redis (`Config::shared`, the `redis` feature).
//!
//! Every test starts its own `redis-server` on a free loopback port (`--save ''
//! --appendonly no`) and stops it. Without the binary the tests are skipped with a
//! message — except in CI (`CI=true`), where a missing `redis-server` fails them.
//! Concurrency, cooldowns and rates are measured at the mock server, never inferred.
//! Some "processes" are pools on threads of this process (separate `Pool`s share
//! nothing in memory); `concurrency_is_shared_across_processes` and
//! `crashed_process_leases_expire` run real child processes (this test binary re-run
//! as `child_pool`).
#![cfg(feature = "redis")]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keypool::{Config, Error, Pool, Request};
use keypool_mock::{KeyRule, MockConfig, MockServer, RequestRecord};

struct RedisServer {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts `redis-server` on a free port, or `None` (skip) if it is not installed
    /// outside CI.
    fn start() -> Option<RedisServer> {
        RedisServer::start_on(free_port())
    }

    fn start_on(port: u16) -> Option<RedisServer> {
        RedisServer::start_with(port, &[])
    }

    /// `start_on` with more `redis-server` arguments.
    fn start_with(port: u16, extra: &[&str]) -> Option<RedisServer> {
        let spawned = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("redis-server is not installed, and CI=true: install redis-server");
                }
                eprintln!("SKIPPED: redis-server not found (apt-get install redis-server)");
                return None;
            }
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        // Ready when it says so on stdout; keep draining its output afterwards.
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.contains("Ready to accept connections") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("redis-server did not become ready");
        Some(RedisServer { child, port })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chat(i: usize) -> Request {
    Request::chat("mock-model", [("user", &*format!("p{i}"))])
}

fn mock(latency_ms: u64) -> MockServer {
    MockServer::start(MockConfig {
        latency_ms,
        threads: 4,
        ..MockConfig::default()
    })
    .unwrap()
}

/// A pool on the config JSON `json`.
fn new_pool(json: &str) -> Pool {
    Pool::new(Config::from_json(json).unwrap()).unwrap()
}

/// `n` pools on the config JSON `json`, sharing nothing in memory.
fn new_pools(json: &str, n: usize) -> Vec<Pool> {
    (0..n).map(|_| new_pool(json)).collect()
}

/// Runs `n` chat requests on `pool`; every result must be a success.
fn run_ok(pool: &Pool, n: usize) {
    let results = pool.batch((0..n).map(chat));
    assert!(results.iter().all(|r| r.is_ok()));
}

/// Makes the mock answer `key` after `ms` (a rule with nothing else in it).
fn set_latency(server: &MockServer, key: &str, ms: u64) {
    server.set_key_rule(
        key,
        KeyRule {
            latency_ms: Some(ms),
            ..KeyRule::default()
        },
    );
}

/// Makes the mock's first request on `key` a 429 with `Retry-After` 1.5 s.
fn first_request_429(server: &MockServer, key: &str) {
    server.set_key_rule(
        key,
        KeyRule {
            always_status: Some(429),
            retry_after_ms: Some(1_500),
            fail_first: 1,
            ..KeyRule::default()
        },
    );
}

/// A shared pool's config JSON around `keys` (the members of its `keys` array):
/// `top_extra` more top-level fields, `shared_extra` more `shared` fields; quick
/// retries and no key probing, so only the shared limits pace the requests.
fn pool_json(
    mock_url: &str,
    redis_url: &str,
    keys: &str,
    top_extra: &str,
    shared_extra: &str,
) -> String {
    format!(
        r#"{{"base_url": "{mock_url}", "keys": [{keys}]{top_extra},
            "retry": {{"probe_keys": false, "max_attempts": 5, "base_delay_ms": 5, "max_delay_ms": 50}},
            "shared": {{"redis_url": "{redis_url}", "namespace": "test", "lease_ms": 1500{shared_extra}}}}}"#
    )
}

/// A config JSON: `keys` keys of `max_concurrent` with extra per-key fields, shared.
fn config_json(
    mock_url: &str,
    redis_url: &str,
    keys: usize,
    max_concurrent: usize,
    key_extra: &str,
    shared_extra: &str,
) -> String {
    let keys = (0..keys)
        .map(|i| {
            format!(r#"{{"key": "sk-shared-{i}", "max_concurrent": {max_concurrent}{key_extra}}}"#)
        })
        .collect::<Vec<_>>()
        .join(",");
    pool_json(mock_url, redis_url, &keys, "", shared_extra)
}

/// Most requests in flight at once among `log` (server-side arrival/finish times).
fn max_overlap(log: &[&RequestRecord]) -> usize {
    let mut ev: Vec<(Duration, i32)> = Vec::new();
    for r in log {
        ev.push((r.arrived, 1));
        ev.push((r.finished, -1));
    }
    ev.sort();
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in ev {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

/// Each of the four keys `sk-shared-{i}` had at most 8 requests in flight at once at
/// the server (its `max_concurrent`), and at least 4.
fn assert_each_key_used_within_8(stats: &keypool_mock::MockStats) {
    for i in 0..4 {
        let k = &stats.keys[&format!("sk-shared-{i}")];
        assert!(
            k.max_in_flight <= 8,
            "key {i}: {} in flight",
            k.max_in_flight
        );
        assert!(
            k.max_in_flight >= 4,
            "key {i} barely used: {}",
            k.max_in_flight
        );
    }
}

/// After a child holding `what` was killed at `killed` (server clock), the first of
/// `ours` arrived no sooner than 700 ms after (the dead leases were renewed until the
/// kill) and no later than `latest_ms` after (they expired).
fn assert_first_after_expiry(
    ours: &[&RequestRecord],
    killed: Duration,
    latest_ms: u64,
    what: &str,
) {
    let first = ours.iter().map(|r| r.arrived).min().unwrap();
    assert!(
        first >= killed + Duration::from_millis(700),
        "sent {:?} after the kill, while the dead process's {what} were live",
        first - killed
    );
    assert!(
        first <= killed + Duration::from_millis(latest_ms),
        "waited {:?} for dead {what}",
        first - killed
    );
}

/// The one 429 in `log` (asserted alone) and the inside of its 1.5 s cooldown: from
/// 100 ms after it finished to 1.4 s after.
fn cooldown_window(log: &[RequestRecord]) -> (Duration, Duration) {
    let limited: Vec<&RequestRecord> = log.iter().filter(|r| r.status == 429).collect();
    assert_eq!(limited.len(), 1);
    let at = limited[0].finished;
    (
        at + Duration::from_millis(100),
        at + Duration::from_millis(1_400),
    )
}

/// How many of `log` arrived strictly inside `window`.
fn arrivals_within(log: &[RequestRecord], window: (Duration, Duration)) -> usize {
    log.iter()
        .filter(|r| r.arrived > window.0 && r.arrived < window.1)
        .count()
}

/// Entry point of the child processes (`child_pool`): runs the config in
/// `KEYPOOL_CHILD_CONFIG` for `KEYPOOL_CHILD_REQUESTS` requests and prints how many
/// succeeded. Without the variables (a normal test run) it does nothing.
#[test]
fn child_pool() {
    let Ok(json) = std::env::var("KEYPOOL_CHILD_CONFIG") else {
        return;
    };
    let n: usize = std::env::var("KEYPOOL_CHILD_REQUESTS")
        .unwrap()
        .parse()
        .unwrap();
    let pool = new_pool(&json);
    let results = pool.batch((0..n).map(chat));
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!("CHILD-OK {ok}");
    pool.close();
}

fn spawn_child(json: &str, requests: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child_pool", "--exact", "--nocapture", "--test-threads=1"])
        .env("KEYPOOL_CHILD_CONFIG", json)
        .env("KEYPOOL_CHILD_REQUESTS", requests.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

#[test]
fn concurrency_is_shared_across_pools() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(15);
    let json = config_json(&server.url(), &redis.url(), 4, 8, "", "");
    let pools = new_pools(&json, 3);
    run_pools(&pools, 240);
    let stats = server.stats();
    // Three pools of 8 workers each on a key: 24 could be in flight unshared.
    assert_each_key_used_within_8(&stats);
    assert_eq!(stats.total_requests, 720);
    // Every lease came back: released at once (a release whose Redis call failed under
    // load leaves its lease to expire), so none is live after at most `lease_ms`.
    let mut con = redis.conn();
    let live = live_leases;
    let at_end = live(&mut con);
    let deadline = Instant::now() + Duration::from_millis(1500 + 1000);
    let mut left = at_end;
    while left > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = live(&mut con);
    }
    assert_eq!(
        left, 0,
        "leases still live after lease_ms ({at_end} at the end)"
    );
}

#[test]
fn concurrency_is_shared_across_processes() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(15);
    let json = config_json(&server.url(), &redis.url(), 4, 8, "", "");
    let children: Vec<Child> = (0..3).map(|_| spawn_child(&json, 200)).collect();
    for mut c in children {
        let mut out = String::new();
        std::io::Read::read_to_string(c.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(c.wait().unwrap().success(), "child failed: {out}");
        assert!(out.contains("CHILD-OK 200"), "child output: {out}");
    }
    let stats = server.stats();
    assert_eq!(stats.total_requests, 600);
    assert_each_key_used_within_8(&stats);
}

#[test]
fn crashed_process_leases_expire() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(0);
    let key = "sk-shared-0";
    // The child's requests hang at the server; it holds all 4 leases when killed.
    set_latency(&server, key, 5_000);
    let json = config_json(&server.url(), &redis.url(), 1, 4, "", "");
    let mut child = spawn_child(&json, 4);
    let t0 = Instant::now();
    while server.key_stats(key).map_or(0, |k| k.in_flight) < 4 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "child never got going"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // On the server's clock, the kill comes just after the child's last arrival.
    let killed = server.key_stats(key).unwrap().last_request.unwrap();
    child.kill().unwrap(); // SIGKILL: no cleanup, leases stay in Redis
    child.wait().unwrap();
    set_latency(&server, key, 20);
    let pool = new_pool(&json);
    let started = Instant::now();
    run_ok(&pool, 12);
    let took = started.elapsed();
    let stats = server.key_stats(key).unwrap();
    let ours: Vec<&RequestRecord> = stats.log.iter().filter(|r| r.arrived > killed).collect();
    assert_eq!(ours.len(), 12);
    // Renewed every 500 ms, the crashed leases outlive the kill by at least ~1 s, and
    // no longer than lease_ms (1.5 s), plus the recheck interval.
    assert_first_after_expiry(&ours, killed, 2_500, "leases");
    assert!(max_overlap(&ours) <= 4);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn cooldown_is_shared() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(20);
    let key = "sk-shared-0";
    first_request_429(&server, key);
    let json = config_json(&server.url(), &redis.url(), 1, 4, "", "");
    let pools = new_pools(&json, 2);
    run_pools(&pools, 30);
    let stats = server.key_stats(key).unwrap();
    let window = cooldown_window(&stats.log);
    let inside = arrivals_within(&stats.log, window);
    assert!(
        inside == 0,
        "{inside} request(s) arrived during the shared cooldown"
    );
    assert_eq!(stats.requests, 61);
}

#[test]
fn disabled_key_is_shared() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(5);
    server.set_key_rule(
        "sk-shared-0",
        KeyRule {
            always_status: Some(401),
            ..KeyRule::default()
        },
    );
    let json = config_json(&server.url(), &redis.url(), 2, 2, "", "");
    let a = new_pool(&json);
    let b = new_pool(&json);
    // A meets the revoked key first and moves on to the other.
    assert!(a.batch([chat(0)])[0].is_ok());
    assert_eq!(server.key_stats("sk-shared-0").unwrap().requests, 1);
    // B never sends to it: A's verdict holds everywhere.
    run_ok(&b, 10);
    assert_eq!(server.key_stats("sk-shared-0").unwrap().requests, 1);
    let st = b.stats();
    let reason = st.keys[0].disabled_reason.clone().expect("disabled in B");
    assert!(reason.contains("shared"), "{reason}");
    assert!(!reason.contains("sk-shared"), "{reason}");
}

#[test]
fn rpm_is_shared_exactly() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(5);
    // 240 rpm = one request per 250 ms across three pools.
    let json = config_json(&server.url(), &redis.url(), 1, 4, r#", "rpm": 240"#, "");
    let pools = new_pools(&json, 3);
    run_pools(&pools, 6);
    let stats = server.key_stats("sk-shared-0").unwrap();
    let mut arrivals: Vec<Duration> = stats.log.iter().map(|r| r.arrived).collect();
    assert_paced_at_240_rpm(&mut arrivals);
    // Keys are named by a hash, never the key itself.
    let all = redis_keys(&redis);
    assert!(!all.is_empty());
    assert_named_by_hash(&all, &["sk-shared"]);
}

#[test]
fn redis_down_fail_is_a_typed_error() {
    let server = mock(0);
    let port = free_port(); // nothing listens there
    let url = format!("redis://:hunter2@127.0.0.1:{port}/0");
    let json = config_json(
        &server.url(),
        &url,
        1,
        2,
        "",
        r#", "on_unavailable": "fail", "timeout_ms": 200"#,
    );
    let pool = new_pool(&json);
    let t0 = Instant::now();
    let r = pool.batch([chat(0)]);
    assert!(t0.elapsed() < Duration::from_secs(3));
    let e = r[0].as_ref().unwrap_err();
    assert!(matches!(e, Error::SharedUnavailable { .. }), "{e:?}");
    assert_eq!(e.code(), "shared_unavailable");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert!(!format!("{:?}", pool.config()).contains("hunter2"));
    assert_eq!(server.stats().total_requests, 0);
}

#[test]
fn redis_down_falls_back_to_a_local_share_then_recovers() {
    let server = mock(20);
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let json = config_json(
        &server.url(),
        &url,
        1,
        8,
        "",
        r#", "on_unavailable": "local", "local_share_percent": 50, "timeout_ms": 200"#,
    );
    let pool = new_pool(&json);
    let t0 = Instant::now();
    run_ok(&pool, 40);
    assert!(t0.elapsed() < Duration::from_secs(10));
    let k = server.key_stats("sk-shared-0").unwrap();
    assert!(k.max_in_flight <= 4, "half of 8: {}", k.max_in_flight);
    assert!(k.max_in_flight >= 2);
    // Redis comes up: the pool uses it again (it retries the connection after 1 s).
    let Some(redis) = RedisServer::start_on(port) else {
        return;
    };
    until_admitted_through_redis(&pool, &redis);
}

/// The `keypool` binary built with the `redis` feature: `$KEYPOOL_BIN`, else
/// `<target>/debug/keypool` beside this test binary (build it with
/// `cargo build -p keypool-cli --features redis`; `.ci/run` does). `None`: skip,
/// except in CI.
fn keypool_bin() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("KEYPOOL_BIN")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.join("keypool"))
        })
        .filter(|p| p.exists())
        // Built with the feature? (`keypool --version` names it.)
        .filter(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("redis"))
        });
    if found.is_none() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "no keypool binary built with the redis feature, and CI=true"
        );
        eprintln!("skipped: build `cargo build -p keypool-cli --features redis` first");
    }
    found
}

/// Two `keypool run --shared` processes on one key of `max_concurrent` 4: the server
/// never sees more than 4 of their requests at once.
#[test]
fn cli_runs_split_one_key_set() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let Some(bin) = keypool_bin() else {
        return;
    };
    let server = mock(20);
    let dir = std::env::temp_dir().join(format!("keypool-shared-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.jsonl");
    let lines: String = (0..40)
        .map(|i| {
            format!(
                "{{\"custom_id\": \"r{i}\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": {{\"model\": \"m\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}}}\n"
            )
        })
        .collect();
    std::fs::write(&input, lines).unwrap();
    let runs: Vec<(Child, std::path::PathBuf)> = (0..2)
        .map(|n| {
            let out = dir.join(format!("out{n}.jsonl"));
            let child = Command::new(&bin)
                .args(["run", "--quiet", "--per-key", "4", "--shared", &redis.url()])
                .arg("--base-url")
                .arg(server.url())
                .arg("-i")
                .arg(&input)
                .arg("-o")
                .arg(&out)
                .arg("--overwrite")
                .env("KEYPOOL_API_KEYS", "sk-shared-0")
                .env_remove("OPENROUTER_API_KEY")
                .env_remove("OPENAI_API_KEY")
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    for (mut child, out) in runs {
        assert!(child.wait().unwrap().success());
        let text = std::fs::read_to_string(out).unwrap();
        assert_eq!(text.lines().count(), 40);
    }
    let k = server.key_stats("sk-shared-0").unwrap();
    assert_eq!(k.requests, 80);
    assert!(k.max_in_flight <= 4, "{} in flight", k.max_in_flight);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Live (unexpired) leases of every key in namespace `test`, counted by Redis.
fn live_leases(con: &mut redis::Connection) -> usize {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(con).unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("kp:{test}:*:leases")
        .query(con)
        .unwrap();
    keys.iter()
        .map(|k| {
            redis::cmd("ZCOUNT")
                .arg(k)
                .arg(format!("({now_ms}"))
                .arg("+inf")
                .query::<usize>(con)
                .unwrap()
        })
        .sum()
}

/// Every key in Redis (`KEYS *`).
fn redis_keys(redis: &RedisServer) -> Vec<String> {
    redis::cmd("KEYS")
        .arg("*")
        .query(&mut redis.conn())
        .unwrap()
}

/// Each Redis key is named by a 32-hex-digit hash (its third `:` field) and contains
/// none of `names`.
fn assert_named_by_hash(all: &[String], names: &[&str]) {
    for k in all {
        assert!(!names.iter().any(|n| k.contains(n)), "{k}");
        let hash = k.split(':').nth(2).unwrap();
        assert!(
            hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{k}"
        );
    }
}

/// Exactly one rate budget (`…:rate` key) among the Redis keys `all`.
fn assert_one_rate_budget(all: &[String]) {
    assert_eq!(
        all.iter().filter(|k| k.ends_with(":rate")).count(),
        1,
        "{all:?}"
    );
}

/// Sends one request at a time on `pool` (each must succeed) until Redis has run an
/// admission script, i.e. the pool uses Redis again; fails after 5 s.
fn until_admitted_through_redis(pool: &Pool, redis: &RedisServer) {
    let mut con = redis.conn();
    let t1 = Instant::now();
    loop {
        assert!(pool.batch([chat(0)])[0].is_ok());
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut con)
            .unwrap();
        if info.contains("cmdstat_eval") {
            break; // an admission script ran
        }
        assert!(t1.elapsed() < Duration::from_secs(5), "never reconnected");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (polling an observable outside the code under test) until `f` holds.
fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What a feeder saw: requests submitted and each one's single result.
#[derive(Debug, Default)]
struct Fed {
    submitted: usize,
    ok: usize,
    unavailable: usize,
    other: Vec<String>,
}

/// Keeps up to 8 requests outstanding on `pool` until `stop`, then waits for every
/// result. `errors` counts `SharedUnavailable` results as they come.
fn feeder(
    pool: Pool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    errors: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> std::thread::JoinHandle<Fed> {
    use std::sync::atomic::Ordering::SeqCst;
    std::thread::spawn(move || {
        let mut fed = Fed::default();
        let mut out = std::collections::VecDeque::new();
        let take = |r: keypool::RequestResult, fed: &mut Fed| match r {
            Ok(_) => fed.ok += 1,
            Err(Error::SharedUnavailable { .. }) => {
                fed.unavailable += 1;
                errors.fetch_add(1, SeqCst);
            }
            Err(e) => fed.other.push(format!("{e:?}")),
        };
        while !stop.load(SeqCst) {
            while out.len() < 8 {
                out.push_back(pool.submit(chat(fed.submitted)).unwrap());
                fed.submitted += 1;
            }
            let t = out.pop_front().unwrap();
            take(t.wait(), &mut fed);
        }
        for t in out {
            take(t.wait(), &mut fed);
        }
        pool.close();
        fed
    })
}

/// `kill -9` of Redis while a pool holds leases with requests in flight, then Redis
/// started again (empty) on the same port. `local`: the run goes on with local limits
/// during the outage and returns to shared mode (leases in Redis again); `fail`: the
/// requests of the outage end with `SharedUnavailable` and none reaches the server.
/// Both: every request ends in exactly one result, nothing hangs, the key's
/// `max_concurrent` never exceeded at the server and fully usable again afterwards.
fn redis_restarted_mid_run(mode: &str) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    let port = free_port();
    let Some(mut redis) = RedisServer::start_on(port) else {
        return;
    };
    let server = mock(0);
    let key = "sk-shared-0";
    set_latency(&server, key, 40);
    let json = config_json(
        &server.url(),
        &redis.url(),
        1,
        4,
        "",
        &format!(r#", "on_unavailable": "{mode}", "timeout_ms": 200"#),
    );
    let started = Instant::now();
    let pool = new_pool(&json);
    let (stop, errors) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let feed = feeder(pool, stop.clone(), errors.clone());
    let requests = || server.key_stats(key).map_or(0, |k| k.requests);
    // Leases held, requests in flight.
    let mut con = redis.conn();
    wait_for("4 in flight", Duration::from_secs(10), || {
        server.key_stats(key).is_some_and(|k| k.in_flight == 4) && requests() >= 12
    });
    assert_eq!(live_leases(&mut con), 4);
    redis.child.kill().unwrap(); // SIGKILL
    redis.child.wait().unwrap();
    drop(con);
    if mode == "local" {
        // The run goes on at the server on local limits.
        let before = requests();
        wait_for(
            "progress during the outage",
            Duration::from_secs(10),
            || requests() >= before + 40,
        );
    } else {
        wait_for("typed errors", Duration::from_secs(10), || {
            errors.load(SeqCst) >= 1
        });
        // What was admitted before the kill drains; then nothing reaches the server.
        wait_for("drain", Duration::from_secs(5), || {
            server.key_stats(key).is_some_and(|k| k.in_flight == 0)
        });
        let before = requests();
        let e0 = errors.load(SeqCst);
        wait_for("more typed errors", Duration::from_secs(10), || {
            errors.load(SeqCst) >= e0 + 20
        });
        assert_eq!(
            requests(),
            before,
            "a request reached the server while Redis was down"
        );
    }
    // Redis is back, empty.
    let redis = RedisServer::start_on(port).expect("restart redis-server");
    let mut con = redis.conn();
    // Back in shared mode: running requests hold leases in Redis again.
    wait_for("leases in the new Redis", Duration::from_secs(5), || {
        live_leases(&mut con) > 0
    });
    let back = requests() as usize;
    wait_for(
        "60 requests after recovery",
        Duration::from_secs(10),
        || requests() as usize >= back + 60,
    );
    stop.store(true, SeqCst);
    let fed = feed.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(40));
    // Exactly one result per request, each a response or the typed error.
    assert_eq!(fed.ok + fed.unavailable + fed.other.len(), fed.submitted);
    assert!(fed.other.is_empty(), "{:?}", fed.other);
    if mode == "local" {
        assert_eq!(fed.unavailable, 0);
    } else {
        assert!(fed.unavailable >= 21);
    }
    let stats = server.key_stats(key).unwrap();
    assert_eq!(stats.log.len(), fed.ok, "one server request per success");
    assert!(
        stats.max_in_flight <= 4,
        "{} in flight",
        stats.max_in_flight
    );
    // After recovery the full max_concurrent is usable again: no slot stays leased.
    let after: Vec<&RequestRecord> = stats.log[back..].iter().collect();
    assert_eq!(max_overlap(&after), 4, "after recovery");
    // And every lease was given back.
    wait_for("leases released", Duration::from_millis(1_000), || {
        live_leases(&mut con) == 0
    });
}

#[test]
fn redis_restarted_mid_run_local() {
    redis_restarted_mid_run("local");
}

#[test]
fn redis_restarted_mid_run_fail() {
    redis_restarted_mid_run("fail");
}

/// A loopback TCP proxy in front of Redis that can be cut (every connection closed,
/// new ones dropped) and restored, with Redis's data intact — or muted: Redis gets
/// every command and runs it, its replies are dropped (a Redis that loses packets).
struct Proxy {
    port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mute: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mute = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (d, m, c) = (down.clone(), mute.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if d.load(SeqCst) {
                    continue; // dropped: the connection closes at once
                }
                let Ok(up) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let mut list = c.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(up.try_clone().unwrap());
                for (mut from, mut to, mute) in [
                    (client.try_clone().unwrap(), up.try_clone().unwrap(), None),
                    (up, client, Some(m.clone())),
                ] {
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if mute.as_ref().is_some_and(|m| m.load(SeqCst)) {
                                continue; // a reply lost
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            port,
            down,
            mute,
            conns,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Drops (`true`) or passes Redis's replies from now on.
    fn set_mute(&self, mute: bool) {
        self.mute.store(mute, std::sync::atomic::Ordering::SeqCst);
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            for s in self.conns.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// A release whose Redis call fails (Redis unreachable when the request ends, its data
/// intact) does not hold the slot until `lease_ms` (20 s here): it is queued and
/// replayed when Redis answers again, with no new request needed, and another pool then
/// gets the key's full `max_concurrent` at once.
#[test]
fn failed_release_is_replayed_not_held_until_lease_ms() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(redis.port);
    let server = mock(0);
    let key = "sk-shared-0";
    set_latency(&server, key, 300);
    let extra = r#", "timeout_ms": 200, "on_unavailable": "fail""#;
    let json_a = config_json(&server.url(), &proxy.url(), 1, 2, "", extra)
        .replace(r#""lease_ms": 1500"#, r#""lease_ms": 20000"#);
    let a = new_pool(&json_a);
    let tickets: Vec<_> = (0..2).map(|i| a.submit(chat(i)).unwrap()).collect();
    wait_for("2 in flight", Duration::from_secs(10), || {
        server.key_stats(key).is_some_and(|k| k.in_flight == 2)
    });
    cut_then_replay(&proxy, &redis, tickets, 2);
    // Another pool gets both slots at once.
    let json_b = config_json(&server.url(), &redis.url(), 1, 2, "", extra);
    let b = new_pool(&json_b);
    set_latency(&server, key, 100);
    let t = Instant::now();
    run_ok(&b, 4);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let stats = server.key_stats(key).unwrap();
    let ours: Vec<&RequestRecord> = stats.log[2..].iter().collect();
    assert_eq!(ours.len(), 4);
    assert_eq!(max_overlap(&ours), 2);
    assert!(stats.max_in_flight <= 2);
    drop(a);
}

/// The same for a key of a group with `max_concurrent` 2: the queued releases carry the
/// group's leases too, and are replayed when Redis answers again — so another pool gets
/// the group's 2 slots at once, not after `lease_ms` (20 s). Each key allows 4, so only
/// the group's leases could hold it back.
#[test]
fn failed_group_release_is_replayed_not_held_until_lease_ms() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(redis.port);
    let server = mock(0);
    set_group_latency(&server, 300);
    let shared = r#""lease_ms": 1500}"#;
    let json_a = group_json(&server.url(), &proxy.url(), r#", "max_concurrent": 2"#).replace(
        shared,
        r#""lease_ms": 20000, "timeout_ms": 200, "on_unavailable": "fail"}"#,
    );
    assert!(json_a.contains("20000"));
    let a = new_pool(&json_a);
    let tickets: Vec<_> = (0..2).map(|i| a.submit(chat(i)).unwrap()).collect();
    wait_for("2 in flight", Duration::from_secs(10), || {
        server.stats().in_flight_total == 2
    });
    // Two key leases and the same two in the group's set.
    cut_then_replay(&proxy, &redis, tickets, 4);
    // Another pool gets both of the group's slots at once.
    let json_b = group_json(&server.url(), &redis.url(), r#", "max_concurrent": 2"#).replace(
        shared,
        r#""lease_ms": 1500, "timeout_ms": 200, "on_unavailable": "fail"}"#,
    );
    let b = new_pool(&json_b);
    set_group_latency(&server, 100);
    let seen = group_log(&server).len();
    assert_eq!(seen, 2);
    let t = Instant::now();
    run_ok(&b, 4);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let mut log = group_log(&server);
    log.sort_by_key(|r| r.arrived);
    let ours: Vec<&RequestRecord> = log[seen..].iter().collect();
    assert_eq!(ours.len(), 4);
    assert_eq!(max_overlap(&ours), 2);
    drop(a);
}

/// `tpm` shared by three pools on one key: every request costs exactly its estimate
/// (40 prompt characters + `max_tokens` 11 = 21 tokens, the mock's usage too), and
/// `tpm` 1260 is 21 tokens a second with a one-second (21-token) burst. At the server,
/// any window of W seconds holds at most tpm·W/60 + 21 tokens (the GCRA's bound: the
/// burst is one request's tokens here), and the 6 requests take at least 5 s (one pool
/// alone would be allowed that much; three unshared would finish in about 2 s).
#[test]
fn tpm_is_shared_exactly() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(5);
    let json = config_json(&server.url(), &redis.url(), 1, 4, r#", "tpm": 1260"#, "");
    let pools = new_pools(&json, 3);
    run_21_token_requests(&pools);
    let stats = server.key_stats("sk-shared-0").unwrap();
    let mut arrivals: Vec<Duration> = stats.log.iter().map(|r| r.arrived).collect();
    assert_paced_at_1260_tpm(&mut arrivals);
}

/// A request of exactly 21 tokens (40 prompt characters + `max_tokens` 11), estimated
/// and counted by the mock alike.
fn req_21_tokens(i: usize) -> Request {
    let prompt = format!("{i:0>40}");
    Request::new(&serde_json::json!({
        "model": "mock-model",
        "max_tokens": 11,
        "messages": [{"role": "user", "content": prompt}],
    }))
}

/// Two 21-token requests on each of three pools at once; all must succeed with the
/// mock's usage equal to the estimate.
fn run_21_token_requests(pools: &[Pool]) {
    assert_eq!(req_21_tokens(0).estimated_tokens(), 21);
    let used = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for pool in pools {
            let used = &used;
            s.spawn(move || {
                for r in pool.batch((0..2).map(req_21_tokens)) {
                    let u = r.unwrap().usage().unwrap();
                    let total = u.prompt_tokens + u.completion_tokens;
                    assert_eq!(total, 21, "the mock's count is the estimate");
                    used.fetch_add(total, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    assert_eq!(used.into_inner(), pools.len() as u64 * 2 * 21);
}

/// 6 arrivals of 21 tokens under a `tpm` of 1260 (21 a second, one-second burst): any
/// window of W seconds holds at most tpm·W/60 + 21 tokens, and the 6 span at least 5 s.
fn assert_paced_at_1260_tpm(arrivals: &mut [Duration]) {
    arrivals.sort();
    assert_eq!(arrivals.len(), 6);
    for w in [1_000u64, 2_000, 3_000] {
        let allowed = 1260 * w / 60_000 + 21;
        for (i, a) in arrivals.iter().enumerate() {
            let n = arrivals[i..]
                .iter()
                .take_while(|b| **b < *a + Duration::from_millis(w))
                .count() as u64;
            assert!(
                n * 21 <= allowed,
                "{} tokens within {w} ms of arrival {i} (allowed {allowed})",
                n * 21
            );
        }
    }
    let span = arrivals[5] - arrivals[0];
    assert!(span >= Duration::from_millis(5 * 1000 - 100), "{span:?}");
}

/// A group's (account's) `tpm` shared by three pools over its three keys (which have no
/// `tpm` of their own): the same bound as `tpm_is_shared_exactly`, at the server, summed
/// over the group's keys.
#[test]
fn group_tpm_is_shared_exactly() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(5);
    let json = group_json(&server.url(), &redis.url(), r#", "tpm": 1260"#);
    let pools = new_pools(&json, 3);
    run_21_token_requests(&pools);
    let log = group_log(&server);
    let mut arrivals: Vec<Duration> = log.iter().map(|r| r.arrived).collect();
    assert_paced_at_1260_tpm(&mut arrivals);
    // Spread over the keys or not, the one budget is the group's.
    assert_one_rate_budget(&redis_keys(&redis));
}

/// A credit check that finds a key at its floor in one pool parks the key in every
/// pool: B, which checks no credits itself, never sends to it.
#[test]
fn credit_floor_park_is_shared() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(5);
    server.set_credit("sk-shared-0", Some(0.5));
    server.set_credit("sk-shared-1", Some(100.0));
    let json = config_json(&server.url(), &redis.url(), 2, 2, "", "");
    let with_credits = json.replacen(
        r#""keys":"#,
        r#""credits": {"check": true, "floor": 0.5}, "keys":"#,
        1,
    );
    let a = new_pool(&with_credits);
    wait_for("A parks the key", Duration::from_secs(5), || {
        a.stats().keys[0].disabled_reason.is_some()
    });
    assert_eq!(server.credit("sk-shared-0").unwrap().checks, 1);
    let b = new_pool(&json);
    run_ok(&b, 20);
    assert_eq!(server.key_stats("sk-shared-0").map_or(0, |k| k.requests), 0);
    assert_eq!(server.key_stats("sk-shared-1").unwrap().requests, 20);
    // B checked no credit itself: the park came through Redis.
    assert_eq!(server.credit("sk-shared-0").unwrap().checks, 1);
    let reason = b.stats().keys[0]
        .disabled_reason
        .clone()
        .expect("parked in B");
    assert!(
        reason.contains("floor") && reason.contains("shared"),
        "{reason}"
    );
}

/// The learned limit of an `adaptive` key is shared, and moved in Lua: three pools
/// learning together never have more in flight at the mock than the one shared limit
/// allows (each pool's own limit would let three times as many through), the shared
/// limit grows with their successes, and a 429 seen by any of them cuts it for all.
#[test]
fn learned_limit_is_shared() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(20);
    let json = config_json(
        &server.url(),
        &redis.url(),
        1,
        32,
        r#", "adaptive": true"#,
        "",
    )
    .replace(r#""max_attempts": 5"#, r#""max_attempts": 20"#);
    let pools = new_pools(&json, 3);
    let run = |n: usize| run_pools(&pools, n);
    let mut con = redis.conn();
    let learned = |con: &mut redis::Connection| -> (f64, u64) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("kp:{test}:*:aimd")
            .query(con)
            .unwrap();
        assert_eq!(keys.len(), 1);
        let (l, c): (Option<f64>, Option<u64>) = redis::cmd("HMGET")
            .arg(&keys[0])
            .arg("limit")
            .arg("cuts")
            .query(con)
            .unwrap();
        (l.unwrap_or(1.0), c.unwrap_or(0))
    };
    // No 429s: the shared limit only grows, so its final value bounds every moment.
    run(40);
    let (limit, cuts) = learned(&mut con);
    assert_eq!(cuts, 0);
    let k = server.key_stats("sk-shared-0").unwrap();
    assert_eq!(k.requests, 120);
    assert!(limit >= 3.0, "the shared limit grew only to {limit}");
    assert!(limit < 32.0, "{limit}");
    assert!(
        k.max_in_flight <= limit.floor() as usize,
        "{} in flight, shared limit {limit}",
        k.max_in_flight
    );
    assert!(k.max_in_flight >= 3, "{}", k.max_in_flight);
    // A hidden capacity of 2: the 429s (bare, so no cooldown) cut the shared limit.
    server.set_config(MockConfig {
        latency_ms: 20,
        key_capacity: Some(2),
        threads: 4,
        ..MockConfig::default()
    });
    run(20);
    let (after, cuts) = learned(&mut con);
    let k = server.key_stats("sk-shared-0").unwrap();
    let limited = k.statuses.get(&429).copied().unwrap_or(0);
    assert!(limited >= 1);
    assert!(
        cuts >= 1 && cuts <= limited,
        "{cuts} cuts for {limited} 429s"
    );
    assert!(after < limit, "{after} after the 429s, {limit} before");
}

// ---- groups (accounts) shared across processes ----

/// The key names of the group tests.
const GROUP_KEYS: [&str; 3] = ["sk-shared-0", "sk-shared-1", "sk-shared-2"];

/// A config JSON: the three `GROUP_KEYS` (per-key `max_concurrent` 4) in one group
/// `acct-shared` with the given group fields, shared through `redis_url`.
fn group_json(mock_url: &str, redis_url: &str, group_fields: &str) -> String {
    let keys = GROUP_KEYS
        .iter()
        .map(|k| format!(r#"{{"key": "{k}", "max_concurrent": 4, "group": "acct-shared"}}"#))
        .collect::<Vec<_>>()
        .join(",");
    let groups = format!(r#", "groups": [{{"name": "acct-shared"{group_fields}}}]"#);
    pool_json(mock_url, redis_url, &keys, &groups, "")
}

/// Every request the mock saw on the group's keys (server-side records).
fn group_log(server: &MockServer) -> Vec<RequestRecord> {
    GROUP_KEYS
        .iter()
        .filter_map(|k| server.key_stats(k))
        .flat_map(|s| s.log)
        .collect()
}

/// Makes the mock answer every key of the group after `ms`.
fn set_group_latency(server: &MockServer, ms: u64) {
    for k in GROUP_KEYS {
        set_latency(server, k, ms);
    }
}

/// Runs `per_pool` requests on each of `pools` at once; every result must be a success.
fn run_pools(pools: &[Pool], per_pool: usize) {
    std::thread::scope(|s| {
        for pool in pools {
            s.spawn(move || run_ok(pool, per_pool));
        }
    });
}

#[test]
fn group_concurrency_is_shared_across_pools() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(15);
    let json = group_json(&server.url(), &redis.url(), r#", "max_concurrent": 4"#);
    let pools = new_pools(&json, 3);
    run_pools(&pools, 60);
    let log = group_log(&server);
    assert_eq!(log.len(), 180);
    // Three pools, each holding its group to 4: 12 could be in flight unshared.
    let group = max_overlap(&log.iter().collect::<Vec<_>>());
    assert!(group <= 4, "the group had {group} in flight at the server");
    assert_eq!(group, 4, "the group never used its 4 slots");
    // Every group lease came back too (released, or expired within lease_ms).
    let mut con = redis.conn();
    wait_for("no live lease", Duration::from_millis(1500 + 1000), || {
        live_leases(&mut con) == 0
    });
}

#[test]
fn group_cooldown_is_shared() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(20);
    // The first request on sk-shared-0 is a 429 that the group attributes to the
    // account ("*"): the whole account cools for 1.5 s, in every pool.
    first_request_429(&server, "sk-shared-0");
    let json = group_json(
        &server.url(),
        &redis.url(),
        r#", "max_concurrent": 6, "account_429": "*""#,
    );
    let pools = new_pools(&json, 3);
    run_pools(&pools, 30);
    let log = group_log(&server);
    let window = cooldown_window(&log);
    // No pool sent anything to any key of the account while it cooled.
    let inside = arrivals_within(&log, window);
    assert_eq!(
        inside, 0,
        "requests arrived during the shared group cooldown"
    );
    assert_eq!(log.len(), 91);
    // The pools did run before the 429 and after the cooldown.
    assert!(log.iter().any(|r| r.arrived >= window.1));
}

#[test]
fn group_rpm_is_shared_exactly() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(5);
    // 240 rpm on the account = one request per 250 ms across its keys and three pools.
    let json = group_json(&server.url(), &redis.url(), r#", "rpm": 240"#);
    let pools = new_pools(&json, 3);
    run_pools(&pools, 6);
    let mut arrivals: Vec<Duration> = group_log(&server).iter().map(|r| r.arrived).collect();
    assert_paced_at_240_rpm(&mut arrivals);
    // The group is named by a hash in Redis, in the keys' scheme.
    let all = redis_keys(&redis);
    // The keys have no rpm of their own: the one rate budget is the group's.
    assert_one_rate_budget(&all);
    assert_named_by_hash(&all, &["acct", "sk-shared"]);
}

#[test]
fn group_slot_freed_elsewhere_wakes_a_waiting_pool() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(0);
    let json = group_json(&server.url(), &redis.url(), r#", "max_concurrent": 1"#);
    let a = new_pool(&json);
    let b = new_pool(&json);
    let slow = || {
        Request::from_json(
            "/chat/completions",
            r#"{"model":"m","messages":[],"mock":{"delay_ms":300}}"#,
        )
        .unwrap()
    };
    // A holds the group's only slot for 300 ms; B asks meanwhile and must wait. When A
    // releases, the notification wakes B at once: its request arrives within a few ms
    // of A's finishing. (The 200 ms fallback recheck alone would put it ~100 ms later.)
    for round in 0..3 {
        let seen = server.stats().total_requests;
        let ta = a.submit(slow()).unwrap();
        wait_for("A's request at the server", Duration::from_secs(5), || {
            server.stats().total_requests > seen
        });
        let tb = b.submit(chat(round)).unwrap();
        assert!(ta.wait().is_ok());
        assert!(tb.wait().is_ok());
        let mut log = group_log(&server);
        log.sort_by_key(|r| r.arrived);
        let [.., first, second] = &log[..] else {
            panic!("{log:?}")
        };
        assert!(second.arrived >= first.finished, "B overlapped A: {log:?}");
        let gap = second.arrived - first.finished;
        assert!(
            gap < Duration::from_millis(50),
            "round {round}: B started {gap:?} after A released"
        );
    }
}

#[test]
fn crashed_process_group_slots_come_back() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(0);
    // The child's requests hang at the server: it holds both of the group's slots.
    set_group_latency(&server, 6_000);
    let json = group_json(&server.url(), &redis.url(), r#", "max_concurrent": 2"#);
    let mut child = spawn_child(&json, 2);
    wait_for("the child's two requests", Duration::from_secs(20), || {
        server.stats().in_flight_total == 2
    });
    // Held past lease_ms (1.5 s): only renewal keeps the group's leases live now.
    std::thread::sleep(Duration::from_millis(2_000));
    // On the server's clock, the kill comes (just) after this.
    let last = GROUP_KEYS
        .iter()
        .filter_map(|k| server.key_stats(k)?.last_request)
        .max()
        .unwrap();
    let killed = last + Duration::from_millis(2_000);
    child.kill().unwrap(); // SIGKILL: no cleanup, leases stay in Redis
    child.wait().unwrap();
    set_group_latency(&server, 20);
    let pool = new_pool(&json);
    run_ok(&pool, 8);
    let log = group_log(&server);
    let ours: Vec<&RequestRecord> = log.iter().filter(|r| r.arrived > last).collect();
    assert_eq!(ours.len(), 8, "arrived after {last:?}: {ours:?}");
    // The per-key slots were free (a key holds 4): only the group's leases held us back,
    // renewed until the kill, then expired within lease_ms (plus the recheck interval).
    assert_first_after_expiry(&ours, killed, 2_700, "group leases");
    assert!(max_overlap(&ours) <= 2);
}

/// 18 arrivals under a 240 rpm budget (one request per 250 ms, burst 4): any 2.5 s
/// window (a 2.5 s "minute" of 10 requests) holds at most 10 + 1, and the 18 span at
/// least 17 × 250 ms (less 200 ms of rounding).
fn assert_paced_at_240_rpm(arrivals: &mut [Duration]) {
    arrivals.sort();
    assert_eq!(arrivals.len(), 18);
    for (i, a) in arrivals.iter().enumerate() {
        let n = arrivals[i..]
            .iter()
            .take_while(|b| **b < *a + Duration::from_millis(2_500))
            .count();
        assert!(n <= 11, "{n} requests within 2.5 s of arrival {i}");
    }
    let span = arrivals[17] - arrivals[0];
    assert!(span >= Duration::from_millis(17 * 250 - 200), "{span:?}");
}

/// Redis unreachable from the start with `on_unavailable: local`: each of two pools
/// holds the group (`max_concurrent` 4) to its 50 % share, 2, so together they never
/// have more than the account's 4 in flight at the server — and do reach 4. (Unscaled,
/// each pool would hold the group to 4: 8 together. The keys' own scaled limits, 2 of
/// 4 each, would allow 6 per pool.)
#[test]
fn redis_down_scales_group_limits_to_the_local_share() {
    let server = mock(40);
    let port = free_port(); // nothing listens there (yet)
    let url = format!("redis://127.0.0.1:{port}/0");
    let json = group_json(&server.url(), &url, r#", "max_concurrent": 4"#).replace(
        r#""lease_ms": 1500}"#,
        r#""lease_ms": 1500, "on_unavailable": "local", "local_share_percent": 50, "timeout_ms": 200}"#,
    );
    assert!(json.contains("local_share_percent"));
    let pools = new_pools(&json, 2);
    let t0 = Instant::now();
    run_pools(&pools, 30);
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    let log = group_log(&server);
    assert_eq!(log.len(), 60);
    let group = max_overlap(&log.iter().collect::<Vec<_>>());
    assert!(group <= 4, "the group had {group} in flight at the server");
    assert_eq!(
        group, 4,
        "the pools never used the group's 4 slots together"
    );
    // Redis comes up: the share is lifted, and one pool alone gets all 4 of the
    // group's (shared) slots.
    let Some(redis) = RedisServer::start_on(port) else {
        return;
    };
    until_admitted_through_redis(&pools[0], &redis);
    let seen = group_log(&server).len();
    run_pools(&pools[..1], 30);
    let mut log = group_log(&server);
    log.sort_by_key(|r| r.arrived);
    let ours: Vec<&RequestRecord> = log[seen..].iter().collect();
    assert_eq!(ours.len(), 30);
    assert_eq!(
        max_overlap(&ours),
        4,
        "one pool on Redis: the group's full 4"
    );
}

/// Cuts the pool off Redis (through `proxy`) while `tickets` finish, checks their
/// releases could not reach Redis (`leases` still live there), restores the link and
/// waits for the queued releases to be replayed: with no request through the pool, its
/// renewer reconnects and replays them within 4 s, long before the leases would
/// expire.
fn cut_then_replay(
    proxy: &Proxy,
    redis: &RedisServer,
    tickets: Vec<keypool::Ticket>,
    leases: usize,
) {
    let mut con = redis.conn();
    assert_eq!(live_leases(&mut con), leases);
    proxy.set_down(true);
    for t in tickets {
        assert!(t.wait().is_ok());
    }
    assert_eq!(live_leases(&mut con), leases, "releases kept out of Redis");
    let cut_at = Instant::now();
    proxy.set_down(false);
    wait_for("the queued releases", Duration::from_secs(4), || {
        live_leases(&mut con) == 0
    });
    assert!(cut_at.elapsed() < Duration::from_secs(4));
}

// ---- issue 23: fallback slots, resurrected leases, reconnection off the locks ----

/// Issue 23.1: Redis is down when a pool starts (`on_unavailable: local`, a share of
/// 100 %): its two requests run on fallback slots. Redis comes up: within about a
/// second, with no new request through that pool, both slots are leases in Redis — so
/// a second pool on the same key waits for them, and the server never sees more than
/// the key's `max_concurrent` 2 (the old code registered them only at its next renewal,
/// `lease_ms / 3` = 10 s away, or its next admission: 4 in flight).
#[test]
fn fallback_slots_are_registered_when_redis_returns() {
    let server = mock(0);
    let key = "sk-shared-0";
    set_latency(&server, key, 3_000);
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let extra = r#", "on_unavailable": "local", "local_share_percent": 100, "timeout_ms": 200"#;
    let json = config_json(&server.url(), &url, 1, 2, "", extra)
        .replace(r#""lease_ms": 1500"#, r#""lease_ms": 30000"#);
    let a = new_pool(&json);
    let tickets: Vec<_> = (0..2).map(|i| a.submit(chat(i)).unwrap()).collect();
    wait_for("2 in flight", Duration::from_secs(5), || {
        server.key_stats(key).is_some_and(|k| k.in_flight == 2)
    });
    let Some(redis) = RedisServer::start_on(port) else {
        return;
    };
    let mut con = redis.conn();
    wait_for(
        "the fallback slots as leases in Redis",
        Duration::from_millis(2_000),
        || live_leases(&mut con) == 2,
    );
    // A second process on the key: its requests wait for the first one's.
    set_latency(&server, key, 100);
    let b = new_pool(&json);
    let more: Vec<_> = (0..2).map(|i| b.submit(chat(10 + i)).unwrap()).collect();
    for t in tickets.into_iter().chain(more) {
        assert!(t.wait().is_ok());
    }
    let k = server.key_stats(key).unwrap();
    assert_eq!(k.requests, 4);
    assert!(k.max_in_flight <= 2, "{} in flight", k.max_in_flight);
    wait_for("leases released", Duration::from_secs(1), || {
        live_leases(&mut con) == 0
    });
}

/// Issue 23.3: Redis runs every command but its replies are lost (a muted proxy), with
/// `on_unavailable: local` and `timeout_ms` 1000. Admissions take fallback slots at once:
/// reconnecting — which waits `timeout_ms` for an answer that never comes — happens on
/// the renewer thread, never on the dispatcher under a key's lock. The old code
/// reconnected on the first admission after each retry instant (once a second) and
/// then waited `timeout_ms` for its script, holding that request (and every placement
/// behind it) up.
#[test]
fn reconnection_never_holds_admissions_up() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(redis.port);
    proxy.set_mute(true);
    let server = mock(5);
    let extra = r#", "on_unavailable": "local", "timeout_ms": 1000"#;
    let pool = new_pool(&config_json(&server.url(), &proxy.url(), 1, 4, "", extra));
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while t0.elapsed() < Duration::from_millis(2_500) {
        let t = Instant::now();
        assert!(pool.batch([chat(n)])[0].is_ok());
        slowest = slowest.max(t.elapsed());
        n += 1;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request took {slowest:?} ({n} requests)"
    );
    // Replies come through again: the renewer reconnects, and admissions go through
    // Redis.
    proxy.set_mute(false);
    until_admitted_through_redis(&pool, &redis);
}

/// Issue 23.2: a renewal never brings a released lease back. Three pools on four keys
/// run many short requests while their renewers renew every 300 ms (`lease_ms` 900):
/// a renewal copies a key's lease ids, and a release landing before its RENEW used to
/// be undone — the lease back in the key's set for `lease_ms`, in every process. Once
/// every request has ended, no lease is left in Redis.
#[test]
fn renewal_never_resurrects_a_released_lease() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(0);
    for i in 0..4 {
        set_latency(&server, &format!("sk-shared-{i}"), 2);
    }
    let json = config_json(&server.url(), &redis.url(), 4, 4, "", "")
        .replace(r#""lease_ms": 1500"#, r#""lease_ms": 900"#);
    let pools = new_pools(&json, 3);
    let mut con = redis.conn();
    let t0 = Instant::now();
    let mut rounds = 0;
    while t0.elapsed() < Duration::from_millis(2_000) {
        run_pools(&pools, 48);
        rounds += 1;
        // Every request has ended: every lease was given back.
        let left = live_leases(&mut con);
        assert_eq!(left, 0, "{left} leases resurrected (round {rounds})");
    }
}

/// Issue 23.4: Redis runs an ACQUIRE but its reply is lost (a muted proxy). With
/// `on_unavailable: fail` the request ends with the typed error and its lease id is
/// released as soon as Redis answers again — with the `rpm` budget it was charged (6 rpm:
/// 10 s) — and with `local` the fallback slot takes the same id, so registering it renews
/// that lease instead of adding a second one. Either way no orphan lease holds a slot
/// for `lease_ms` (20 s here).
#[test]
fn lost_acquire_reply_leaves_no_orphan_lease() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(redis.port);
    let server = mock(0);
    let key = "sk-shared-0";
    let mut con = redis.conn();
    // Redis has the scripts (a first EVALSHA would only answer NOSCRIPT): one request
    // through a pool of another namespace.
    let warm = config_json(&server.url(), &redis.url(), 1, 2, "", "")
        .replace(r#""namespace": "test""#, r#""namespace": "warm""#);
    run_ok(&new_pool(&warm), 1);
    for mode in ["fail", "local"] {
        let extra = format!(r#", "on_unavailable": "{mode}", "timeout_ms": 300"#);
        let rpm = if mode == "fail" { r#", "rpm": 6"# } else { "" };
        let json = config_json(&server.url(), &proxy.url(), 1, 2, rpm, &extra)
            .replace(r#""lease_ms": 1500"#, r#""lease_ms": 20000"#);
        let pool = new_pool(&json);
        set_latency(&server, key, 2_000);
        proxy.set_mute(true);
        let ticket = pool.submit(chat(0)).unwrap();
        // Redis ran the ACQUIRE: its lease is there.
        wait_for(
            "the lease of the lost reply",
            Duration::from_secs(2),
            || live_leases(&mut con) == 1,
        );
        if mode == "fail" {
            let r = ticket.wait();
            assert!(matches!(r, Err(Error::SharedUnavailable { .. })), "{r:?}");
            proxy.set_mute(false);
            let rate: Vec<String> = redis::cmd("KEYS")
                .arg("kp:{test}:*:rate")
                .query(&mut con)
                .unwrap();
            let mut tat = || -> f64 {
                let t: String = redis::cmd("HGET")
                    .arg(&rate[0])
                    .arg("r")
                    .query(&mut con)
                    .unwrap();
                t.parse().unwrap()
            };
            let charged = tat();
            wait_for(
                "the orphan's budget given back",
                Duration::from_secs(3),
                || tat() < charged - 9_000.0,
            );
            wait_for("the orphan lease released", Duration::from_secs(1), || {
                live_leases(&mut con) == 0
            });
        } else {
            wait_for("the fallback request", Duration::from_secs(2), || {
                server.key_stats(key).is_some_and(|k| k.in_flight == 1)
            });
            proxy.set_mute(false);
            // Registered by the renewer: the same lease, renewed, not a second one.
            let until = Instant::now() + Duration::from_millis(1_500);
            while Instant::now() < until {
                assert!(
                    live_leases(&mut con) <= 1,
                    "an orphan lease beside the slot's"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(ticket.wait().is_ok());
            wait_for("the lease released", Duration::from_secs(1), || {
                live_leases(&mut con) == 0
            });
        }
        drop(pool);
    }
}

/// A local Redis Cluster of three masters (no replicas) on free ports, built with
/// `redis-cli --cluster create`; `None` (skip) without `redis-server` or `redis-cli`,
/// except in CI.
struct Cluster {
    nodes: Vec<RedisServer>,
    dir: std::path::PathBuf,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        if Command::new("redis-cli").arg("--version").output().is_err() {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "redis-cli is not installed, and CI=true: install redis-tools"
            );
            eprintln!("SKIPPED: redis-cli not found (apt-get install redis-tools)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("keypool-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = Vec::new();
        while nodes.len() < 3 {
            // The cluster bus listens on port + 10000.
            let port = free_port();
            if port > 55_000 || TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            let conf = dir.join(format!("nodes-{port}.conf"));
            let node = RedisServer::start_with(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    conf.to_str().unwrap(),
                    "--cluster-node-timeout",
                    "2000",
                    "--dir",
                    dir.to_str().unwrap(),
                ],
            )?;
            nodes.push(node);
        }
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            let mut con = n.conn();
            wait_for("the cluster", Duration::from_secs(10), || {
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query::<String>(&mut con)
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            });
        }
        Some(Cluster { nodes, dir })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Issue 23: shared limits on a Redis Cluster of three masters. Every key of a
/// namespace carries the hash tag `{ns}`, so each script's keys share one slot; three
/// pools, each configured with a different node (at least two of them are redirected
/// with MOVED to the node that serves the slot), share one key of `max_concurrent` 2
/// with `on_unavailable: fail` — every request succeeds and the server never sees more
/// than 2 at once. (The old key names had no hash tag: every script failed with
/// CROSSSLOT or MOVED.)
#[test]
fn shared_limits_work_on_redis_cluster() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let server = mock(0);
    let key = "sk-shared-0";
    set_latency(&server, key, 50);
    let extra = r#", "on_unavailable": "fail""#;
    let pools: Vec<Pool> = (cluster.nodes.iter())
        .map(|n| new_pool(&config_json(&server.url(), &n.url(), 1, 2, "", extra)))
        .collect();
    run_pools(&pools, 6);
    let k = server.key_stats(key).unwrap();
    assert_eq!(k.requests, 18);
    assert_eq!(k.max_in_flight, 2, "{} in flight", k.max_in_flight);
    // The namespace's keys live on one node, all with the tag.
    let mut holders = 0;
    for n in &cluster.nodes {
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut n.conn()).unwrap();
        assert!(keys.iter().all(|k| k.starts_with("kp:{test}:")), "{keys:?}");
        holders += usize::from(!keys.is_empty());
    }
    assert_eq!(holders, 1);
}

/// Issue 23, done when: three pools share one key of `max_concurrent` 3 (a local share
/// of 33 %: 1 each while Redis is down), Redis is `kill -9`'d and restarted empty mid
/// run. Once every pool has reconnected — each one's running requests are leases in
/// the new Redis (lease ids carry a per-pool prefix) — and the requests admitted before
/// that have ended (a pool back on Redis first could not see the others' fallback
/// slots: 150 ms of the server's clock, the mock answering in 60 ms), the server never
/// sees more than 3 in flight, and the run goes on.
#[test]
fn three_pools_across_a_redis_restart_hold_max_concurrent() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    let port = free_port();
    let Some(mut redis) = RedisServer::start_on(port) else {
        return;
    };
    let server = mock(0);
    let key = "sk-shared-0";
    set_latency(&server, key, 60);
    let extra = r#", "on_unavailable": "local", "local_share_percent": 33, "timeout_ms": 200"#;
    let json = config_json(&server.url(), &redis.url(), 1, 3, "", extra);
    let stop = Arc::new(AtomicBool::new(false));
    let feeds: Vec<_> = new_pools(&json, 3)
        .into_iter()
        .map(|p| feeder(p, stop.clone(), Arc::new(AtomicUsize::new(0))))
        .collect();
    let requests = || server.key_stats(key).map_or(0, |k| k.requests);
    wait_for("a start", Duration::from_secs(10), || requests() >= 20);
    redis.child.kill().unwrap();
    redis.child.wait().unwrap();
    let before = requests();
    wait_for(
        "progress during the outage",
        Duration::from_secs(10),
        || requests() >= before + 20,
    );
    let redis = RedisServer::start_on(port).expect("restart redis-server");
    let mut con = redis.conn();
    // Every pool's running requests are leases again: all three have reconnected.
    wait_for("every pool reconnected", Duration::from_secs(5), || {
        let ids: Vec<String> = redis::cmd("KEYS")
            .arg("kp:{test}:*:leases")
            .query::<Vec<String>>(&mut con)
            .unwrap()
            .iter()
            .flat_map(|k| {
                redis::cmd("ZRANGE")
                    .arg(k)
                    .arg(0)
                    .arg(-1)
                    .query::<Vec<String>>(&mut con)
                    .unwrap()
            })
            .collect();
        let pools: std::collections::HashSet<&str> =
            ids.iter().filter_map(|id| id.split(':').next()).collect();
        pools.len() == 3
    });
    // From 150 ms after the next arrival on (the server's clock), at most 3 in flight.
    let seen = server.key_stats(key).unwrap().log.len();
    wait_for("an arrival", Duration::from_secs(5), || {
        server.key_stats(key).unwrap().log.len() > seen
    });
    let since = server.key_stats(key).unwrap().log[seen].arrived + Duration::from_millis(150);
    let back = requests();
    wait_for("40 requests after", Duration::from_secs(10), || {
        requests() >= back + 40
    });
    stop.store(true, SeqCst);
    for f in feeds {
        let fed = f.join().unwrap();
        assert!(fed.other.is_empty() && fed.unavailable == 0, "{fed:?}");
    }
    let log = server.key_stats(key).unwrap().log;
    let mut peak = 0;
    for t in log.iter().map(|r| r.arrived).filter(|&t| t >= since) {
        let live = log
            .iter()
            .filter(|r| r.arrived <= t && t < r.finished)
            .count();
        peak = peak.max(live);
    }
    assert!(peak <= 3, "{peak} in flight after every pool reconnected");
    assert_eq!(peak, 3, "the key's max_concurrent is used");
}

/// OpenRouter's upstream rate limit for model `x` (a model verdict, not the key's).
const OR_UPSTREAM_429_X: &str = r#"{"error":{"code":429,"message":"Provider returned error","metadata":{"provider_name":"Acme","raw":"x is temporarily rate-limited upstream"}}}"#;

fn chat_model(model: &str, i: usize) -> Request {
    Request::chat(model, [("user", &*format!("p{i}"))])
}

/// Makes the mock's first request for model `x` on `key` OpenRouter's upstream 429
/// with `Retry-After` of `ms`.
fn first_x_upstream_429(server: &MockServer, key: &str, ms: u64) {
    server.set_key_rule(
        key,
        KeyRule {
            always_status: Some(429),
            body: Some(OR_UPSTREAM_429_X.into()),
            model: Some("x".into()),
            fail_first: 1,
            retry_after_ms: Some(ms),
            ..KeyRule::default()
        },
    );
}

/// Issue 28: a `(key, model)` cooldown one process records is seen by every process
/// sharing the key — one running (pub/sub) and one started while it is live (loaded at
/// start) — and binds that model only.
#[test]
fn model_cooldown_is_shared() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(5);
    let key = "sk-shared-0";
    first_x_upstream_429(&server, key, 2_000);
    let json = config_json(&server.url(), &redis.url(), 1, 4, "", "");
    let a = new_pool(&json);
    let b = new_pool(&json);
    // A's `x` meets the upstream 429; its retry waits out the model's cooldown.
    let a_x = a.submit(chat_model("x", 0)).unwrap();
    wait_for("the shared model cooldown", Duration::from_secs(5), || {
        redis_keys(&redis).iter().any(|k| k.ends_with(":models"))
    });
    // The message reaches B's subscriber.
    std::thread::sleep(Duration::from_millis(100));
    let b_x = b.submit(chat_model("x", 1)).unwrap();
    let t0 = Instant::now();
    let b_y = b.submit(chat_model("y", 2)).unwrap();
    assert!(b_y.wait().is_ok());
    assert!(
        t0.elapsed() < Duration::from_millis(800),
        "y waited {:?}: only x cools",
        t0.elapsed()
    );
    // A process started while the cooldown is live learns it at start.
    let c = new_pool(&json);
    let c_x = c.submit(chat_model("x", 3)).unwrap();
    for t in [a_x, b_x, c_x] {
        assert!(t.wait().is_ok());
    }
    let log = server.key_stats(key).unwrap().log;
    let limited: Vec<&RequestRecord> = log.iter().filter(|r| r.status == 429).collect();
    assert_eq!(limited.len(), 1, "{log:?}");
    let end = limited[0].finished + Duration::from_millis(1_900);
    let x: Vec<&RequestRecord> = log
        .iter()
        .filter(|r| r.model.as_deref() == Some("x") && r.status == 200)
        .collect();
    assert_eq!(x.len(), 3, "{log:?}");
    for r in &x {
        assert!(
            r.arrived >= end,
            "an x request arrived {:?} after the 429, inside its 2 s cooldown",
            r.arrived - limited[0].finished
        );
    }
    let y: Vec<&RequestRecord> = log
        .iter()
        .filter(|r| r.model.as_deref() == Some("y"))
        .collect();
    assert_eq!(y.len(), 1);
    assert!(y[0].arrived < limited[0].finished + Duration::from_millis(1_000));
    // Named by the key's hash, never the key.
    assert_named_by_hash(&redis_keys(&redis), &["sk-shared"]);
}

/// A model verdict recorded while Redis is down fails nothing: it holds in this
/// process (the retry waits out the cooldown), and other models go at once.
#[test]
fn model_cooldown_with_redis_down_holds_locally() {
    let server = mock(5);
    let key = "sk-shared-0";
    first_x_upstream_429(&server, key, 1_000);
    let url = format!("redis://127.0.0.1:{}/0", free_port()); // nothing listens there
    let json = config_json(&server.url(), &url, 1, 4, "", r#", "timeout_ms": 200"#);
    let pool = new_pool(&json);
    let x = pool.submit(chat_model("x", 0)).unwrap();
    wait_for("the 429", Duration::from_secs(5), || {
        server
            .key_stats(key)
            .is_some_and(|k| k.log.iter().any(|r| r.status == 429))
    });
    let y = pool.submit(chat_model("y", 1)).unwrap();
    assert!(y.wait().is_ok());
    assert!(x.wait().is_ok());
    let log = server.key_stats(key).unwrap().log;
    let limited = log.iter().find(|r| r.status == 429).unwrap();
    let retry = log
        .iter()
        .find(|r| r.model.as_deref() == Some("x") && r.status == 200)
        .unwrap();
    assert!(retry.arrived >= limited.finished + Duration::from_millis(900));
    let y = log
        .iter()
        .find(|r| r.model.as_deref() == Some("y"))
        .unwrap();
    assert!(y.arrived < limited.finished + Duration::from_millis(900));
}

/// Issue 28: OpenRouter's free-model limit seen by one pool on one key of a group cools
/// every `:free` model of every key of the group in the other pools too, for the same
/// time; a paid model goes at once.
#[test]
fn free_model_limit_is_shared_across_the_group() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(5);
    const OR_FREE_429: &str = r#"{"error":{"message":"Rate limit exceeded: free-models-per-min. ","code":429,"metadata":{"headers":{"X-RateLimit-Limit":"20","X-RateLimit-Remaining":"0"},"provider_name":null}}}"#;
    for k in GROUP_KEYS {
        server.set_key_rule(
            k,
            KeyRule {
                always_status: Some(429),
                body: Some(OR_FREE_429.into()),
                model: Some("a:free".into()),
                retry_after_ms: Some(2_000),
                fail_for_ms: Some(1_000),
                ..KeyRule::default()
            },
        );
    }
    let json = group_json(&server.url(), &redis.url(), "");
    let a = new_pool(&json);
    let b = new_pool(&json);
    let a_free = a.submit(chat_model("a:free", 0)).unwrap();
    wait_for("the shared model cooldown", Duration::from_secs(5), || {
        redis_keys(&redis).iter().any(|k| k.ends_with(":models"))
    });
    std::thread::sleep(Duration::from_millis(100));
    let b_free = b.submit(chat_model("b:free", 1)).unwrap();
    let b_paid = b.submit(chat_model("y", 2)).unwrap();
    assert!(b_paid.wait().is_ok());
    assert!(a_free.wait().is_ok());
    assert!(b_free.wait().is_ok());
    let log = group_log(&server);
    let limited: Vec<&RequestRecord> = log.iter().filter(|r| r.status == 429).collect();
    assert_eq!(limited.len(), 1, "{log:?}");
    let end = limited[0].finished + Duration::from_millis(1_900);
    let free: Vec<&RequestRecord> = log
        .iter()
        .filter(|r| r.status == 200 && r.model.as_deref().is_some_and(|m| m.ends_with(":free")))
        .collect();
    assert_eq!(free.len(), 2, "{log:?}");
    for r in free {
        assert!(
            r.arrived >= end,
            "{:?} arrived {:?} after the free-model 429",
            r.model,
            r.arrived - limited[0].finished
        );
    }
    let paid = log
        .iter()
        .find(|r| r.model.as_deref() == Some("y"))
        .unwrap();
    assert!(paid.arrived < limited[0].finished + Duration::from_millis(1_000));
}

#[test]
fn spend_cap_is_shared_across_pools() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = MockServer::start(MockConfig {
        threads: 2,
        cost_per_request: 0.01,
        ..MockConfig::default()
    })
    .unwrap();
    let json = |key: &str| {
        format!(
            r#"{{"base_url": "{}", "max_cost": 0.05, "keys": [{{"key": "{key}", "max_concurrent": 1}}],
                "shared": {{"redis_url": "{}", "namespace": "spend"}}}}"#,
            server.url(),
            redis.url()
        )
    };
    let count = |r: &[keypool::RequestResult]| {
        let ok = r.iter().filter(|r| r.is_ok()).count();
        let refused = r
            .iter()
            .filter(|r| matches!(r, Err(Error::BudgetExhausted { .. })))
            .count();
        (ok, refused)
    };
    let a = new_pool(&json("sk-spend-a"));
    assert_eq!(count(&a.batch((0..3).map(chat))), (3, 0));
    // Another pool (process) with the same namespace has 0.02 left of the 0.05.
    let b = new_pool(&json("sk-spend-b"));
    assert_eq!(count(&b.batch((0..10).map(chat))), (2, 8));
    assert_eq!(server.stats().total_requests, 5, "0.05 spent at the server");
    // The first pool learns it at its next answer at the latest: one request in
    // flight may still go, then nothing.
    let after = count(&a.batch((0..5).map(chat)));
    assert!(after.0 <= 1 && after.0 + after.1 == 5, "{after:?}");
    // A pool started once the cap is spent refuses at once: nothing more is sent.
    let sent = server.stats().total_requests;
    let c = new_pool(&json("sk-spend-c"));
    match c.submit(chat(0)) {
        Err(e @ Error::BudgetExhausted { .. }) => assert!(e.to_string().contains("0.05"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.stats().total_requests, sent);
    let total: f64 = redis::cmd("GET")
        .arg("kp:{spend}:spend")
        .query(&mut redis.conn())
        .unwrap();
    assert!((total - sent as f64 * 0.01).abs() < 1e-9, "{total}");
}

// ---- daily quotas (`rpd`) shared across processes (issue 24.3) ----

/// A config JSON: `keys` as (key, extra fields) with `max_concurrent` 2, in the order
/// given (the default strategy, `first_available`, prefers the first), shared through
/// `redis_url` with the extra `shared` fields `shared_extra`.
fn keys_json(mock_url: &str, redis_url: &str, keys: &[(&str, &str)], shared_extra: &str) -> String {
    let keys = keys
        .iter()
        .map(|(k, extra)| format!(r#"{{"key": "{k}", "max_concurrent": 2{extra}}}"#))
        .collect::<Vec<_>>()
        .join(",");
    pool_json(mock_url, redis_url, &keys, "", shared_extra)
}

/// Requests the mock saw on `key` (server-side count).
fn requests_on(server: &MockServer, key: &str) -> u64 {
    server.key_stats(key).map_or(0, |k| k.requests)
}

/// The stats' reason why key `i` of `pool` is out.
fn out_reason(pool: &Pool, i: usize) -> String {
    pool.stats().keys[i]
        .disabled_reason
        .clone()
        .unwrap_or_default()
}

/// `rpd` 5 on a key shared by two pools, each sending 10 requests at once with another
/// key beside it: the server sees exactly 5 on the quota's key in all (unshared, each
/// pool would send its own 5), the rest go to the other key and every request
/// succeeds; then both pools have the key out, "exhausted until" midnight UTC.
#[test]
fn rpd_is_shared_across_pools() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(10);
    let keys = [("sk-shared-0", r#", "rpd": 5"#), ("sk-shared-1", "")];
    let pools = new_pools(&keys_json(&server.url(), &redis.url(), &keys, ""), 2);
    run_pools(&pools, 10);
    // One more each, asking the quota's key first: out in both.
    for pool in &pools {
        run_ok(pool, 1);
    }
    assert_eq!(
        requests_on(&server, "sk-shared-0"),
        5,
        "the key's daily quota"
    );
    assert_eq!(requests_on(&server, "sk-shared-1"), 17);
    for pool in &pools {
        let reason = out_reason(pool, 0);
        assert!(
            reason.contains("rpd") && reason.contains("exhausted until"),
            "{reason}"
        );
        assert!(!reason.contains("sk-shared"), "{reason}");
        assert_eq!(out_reason(pool, 1), "");
    }
    // The count is named by the key's hash, never the key.
    let all = redis_keys(&redis);
    assert!(all.iter().any(|k| k.ends_with(":day")), "{all:?}");
    assert_named_by_hash(&all, &["sk-shared"]);
}

/// Two pools on `json` send 6 requests each at once: 5 succeed in all (the daily quota,
/// `per_key` counts the server's requests), and the other 7 end as a local quota ends
/// them when no key is left — `NoUsableKey` at once, naming the quota (`what`) and its
/// reset. Returns the two pools.
fn two_pools_spend_a_quota_of_5(json: &str, what: &str, sent: impl Fn() -> u64) -> Vec<Pool> {
    let pools = new_pools(json, 2);
    let t0 = Instant::now();
    let results: Vec<keypool::RequestResult> = std::thread::scope(|s| {
        let runs: Vec<_> = (pools.iter())
            .map(|pool| s.spawn(move || pool.batch((0..6).map(chat))))
            .collect();
        runs.into_iter().flat_map(|r| r.join().unwrap()).collect()
    });
    assert!(t0.elapsed() < Duration::from_secs(10), "no hang");
    assert_eq!(sent(), 5, "the daily quota, over both pools");
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 5);
    for r in results.iter().filter(|r| r.is_err()) {
        match r {
            Err(e @ Error::NoUsableKey { detail, .. }) => {
                assert!(detail.contains(what), "{e}");
                assert!(!detail.contains("sk-shared"), "{e}");
                assert!(detail.contains("daily quota"), "{e}");
                assert!(detail.contains("exhausted until"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
    pools
}

/// The only key's `rpd` 5 spent by two pools together: 5 requests reach the server,
/// the other 7 end with `NoUsableKey` as with a local quota.
#[test]
fn rpd_spent_by_other_pools_ends_requests_like_a_local_quota() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(10);
    let keys = [("sk-shared-0", r#", "rpd": 5"#)];
    let json = keys_json(&server.url(), &redis.url(), &keys, "");
    // The key's label in the detail (`key-0`), never the key.
    let pools =
        two_pools_spend_a_quota_of_5(&json, "key-0:", || requests_on(&server, "sk-shared-0"));
    // A pool started later refuses at its first admission, without sending.
    let late = new_pool(&json);
    assert!(matches!(
        late.batch([chat(0)])[0],
        Err(Error::NoUsableKey { .. })
    ));
    assert_eq!(requests_on(&server, "sk-shared-0"), 5);
    drop(pools);
}

/// A group's `rpd` 5 over its three keys, spent by two pools together: 5 requests reach
/// the group's keys, the other 7 end with `NoUsableKey` naming the group's quota.
#[test]
fn group_rpd_is_shared_across_pools() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let server = mock(10);
    let json = group_json(&server.url(), &redis.url(), r#", "rpd": 5"#);
    let pools = two_pools_spend_a_quota_of_5(&json, "group acct-shared", || {
        group_log(&server).len() as u64
    });
    for pool in &pools {
        for i in 0..GROUP_KEYS.len() {
            let reason = out_reason(pool, i);
            assert!(reason.contains("group acct-shared"), "{reason}");
        }
    }
    let all = redis_keys(&redis);
    assert_named_by_hash(&all, &["acct", "sk-shared"]);
}

/// Redis `kill -9`'d mid-run and restarted empty (`on_unavailable: local`), with daily
/// quotas: pool A spent key 0's `rpd` 6 through Redis before; pool B, running all
/// along, learned it from Redis and never sends to key 0 — not through Redis, not on
/// local limits during the outage, not after Redis came back without the count. Key 1's
/// `rpd` 20, partly spent through Redis when it died, is held by B's own count through
/// the outage and after: exactly 20. Every request of B ends in exactly one result, a
/// success (key 2, without a quota, takes the rest).
#[test]
fn rpd_holds_when_redis_dies_mid_run() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    let port = free_port();
    let Some(mut redis) = RedisServer::start_on(port) else {
        return;
    };
    let server = mock(0);
    for key in ["sk-shared-0", "sk-shared-1", "sk-shared-2"] {
        set_latency(&server, key, 20);
    }
    let keys = [
        ("sk-shared-0", r#", "rpd": 6"#),
        ("sk-shared-1", r#", "rpd": 20"#),
        ("sk-shared-2", ""),
    ];
    let shared = r#", "on_unavailable": "local", "timeout_ms": 200"#;
    let json = keys_json(&server.url(), &redis.url(), &keys, shared);
    let a = new_pool(&json);
    let b = new_pool(&json);
    // A, one request at a time, on key 0 (first available) until its quota is spent.
    for _ in 0..6 {
        run_ok(&a, 1);
    }
    assert_eq!(requests_on(&server, "sk-shared-0"), 6);
    let (stop, errors) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let feed = feeder(b, stop.clone(), errors.clone());
    wait_for("B on key 1 through Redis", Duration::from_secs(10), || {
        requests_on(&server, "sk-shared-1") >= 4
    });
    redis.child.kill().unwrap(); // SIGKILL
    redis.child.wait().unwrap();
    let before = requests_on(&server, "sk-shared-2");
    wait_for(
        "progress during the outage",
        Duration::from_secs(10),
        || requests_on(&server, "sk-shared-2") >= before + 30,
    );
    // Redis is back, empty: B admits through it again.
    let redis = RedisServer::start_on(port).expect("restart redis-server");
    let mut con = redis.conn();
    wait_for("leases in the new Redis", Duration::from_secs(5), || {
        live_leases(&mut con) > 0
    });
    let back = requests_on(&server, "sk-shared-2");
    wait_for("progress after recovery", Duration::from_secs(10), || {
        requests_on(&server, "sk-shared-2") >= back + 30
    });
    stop.store(true, SeqCst);
    let fed = feed.join().unwrap();
    assert_eq!(fed.ok + fed.unavailable + fed.other.len(), fed.submitted);
    assert!(fed.other.is_empty(), "{:?}", fed.other);
    assert_eq!(fed.ok, fed.submitted, "every request succeeds");
    assert_eq!(requests_on(&server, "sk-shared-0"), 6, "key 0 spent by A");
    assert_eq!(requests_on(&server, "sk-shared-1"), 20, "key 1's quota");
    let total: u64 = (0..3)
        .map(|i| requests_on(&server, &format!("sk-shared-{i}")))
        .sum();
    assert_eq!(total as usize, 6 + fed.ok, "one server request per success");
    drop(a);
}

/// Today's count of every daily quota in Redis (namespace `test`), by Redis key.
fn day_counts(redis: &RedisServer) -> Vec<u64> {
    let mut con = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("kp:{test}:*:day")
        .query(&mut con)
        .unwrap();
    keys.iter()
        .map(|k| {
            redis::cmd("HGET")
                .arg(k)
                .arg("n")
                .query::<Option<u64>>(&mut con)
                .unwrap()
                .unwrap_or(0)
        })
        .collect()
}

/// Daily requests sent while Redis is unreachable (`on_unavailable: local`, Redis's
/// data intact) count there once it answers again: pool A, cut off from the start,
/// sends 4 requests on key 0 (`rpd` 6, in a group of `rpd` 5) on fallback slots, by its
/// own counts. Within about a second of the link's return — with no new request —
/// Redis counts them at the key and at the group, so pool B gets only the group's one
/// request left (key 1 takes the rest). Uncounted, B would send 1 more than that.
#[test]
fn rpd_spent_during_an_outage_counts_once_redis_is_back() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(redis.port);
    let server = mock(5);
    let keys = [
        ("sk-shared-0", r#", "rpd": 6, "group": "acct""#),
        ("sk-shared-1", ""),
    ];
    let with_group = |json: String| {
        json.replace(
            r#""keys": ["#,
            r#""groups": [{"name": "acct", "rpd": 5}], "keys": ["#,
        )
    };
    let local = r#", "on_unavailable": "local", "timeout_ms": 200"#;
    proxy.set_down(true);
    let a = new_pool(&with_group(keys_json(
        &server.url(),
        &proxy.url(),
        &keys,
        local,
    )));
    for _ in 0..4 {
        run_ok(&a, 1);
    }
    assert_eq!(requests_on(&server, "sk-shared-0"), 4);
    assert!(
        day_counts(&redis).is_empty(),
        "counted in Redis while cut off"
    );
    proxy.set_down(false);
    wait_for(
        "the outage's requests counted in Redis",
        Duration::from_secs(5),
        || day_counts(&redis) == [4, 4],
    );
    let b = new_pool(&with_group(keys_json(
        &server.url(),
        &redis.url(),
        &keys,
        "",
    )));
    run_ok(&b, 10);
    assert_eq!(requests_on(&server, "sk-shared-0"), 5, "the group's quota");
    assert_eq!(requests_on(&server, "sk-shared-1"), 9);
    drop(a);
}
