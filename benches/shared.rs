//! Shared limits through Redis (`Config::shared`): prints figures only; never fails on
//! timing.
//!
//! Run: `cargo bench --features redis --bench shared` (release profile). It starts its
//! own `redis-server` on a free loopback port (skipped, with a message, when the binary
//! is missing) and prints:
//! 1. per-request overhead of shared mode against local mode in the same run: one
//!    request at a time on one key (the added latency of the two Redis round trips), and
//!    a batch over 8 keys × 4 workers on a zero-latency mock (the mock in a child
//!    process, see `common/mod.rs`);
//! 2. throughput of 3 processes (this program re-executed with
//!    `KEYPOOL_BENCH_ROLE=pool`) sharing 8 keys × `max_concurrent` 4 on a 20 ms mock,
//!    against the ideal K·C/L = 8·4/0.02 s = 1600 req/s, with the server-side max in
//!    flight per key (never above 4 when the sharing is exact).

#[path = "common/mod.rs"]
mod common;
use common::{MockProcess, run_mock};

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keypool::{Config, Pool, Request};
use keypool_mock::{MockConfig, MockServer};

const KEYS: usize = 8;
const PER_KEY: usize = 4;
const PROCESSES: usize = 3;
const LATENCY_MS: u64 = 20;

fn main() {
    match std::env::var("KEYPOOL_BENCH_ROLE").as_deref() {
        Ok("mock") => return run_mock(),
        Ok("pool") => return run_pool(),
        _ => {}
    }
    let Some(redis) = Redis::start() else {
        println!("shared benchmark SKIPPED: no redis-server (apt-get install redis-server)");
        return;
    };
    println!(
        "shared limits benchmark ({} cores, redis-server on 127.0.0.1:{})",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        redis.port
    );
    overhead(&redis.url());
    throughput(&redis.url());
}

fn chat(i: usize) -> Request {
    Request::chat("mock-model", [("user", &*format!("p{i}"))])
}

/// A config of `keys` keys of `per_key` each, shared through `redis_url` if given.
fn config_json(mock_url: &str, redis_url: Option<&str>, keys: usize, per_key: usize) -> String {
    let keys = (0..keys)
        .map(|i| format!(r#"{{"key": "sk-bench-{i}", "max_concurrent": {per_key}}}"#))
        .collect::<Vec<_>>()
        .join(",");
    let shared = redis_url.map_or(String::new(), |u| {
        format!(r#", "shared": {{"redis_url": "{u}", "namespace": "bench", "lease_ms": 30000}}"#)
    });
    format!(
        r#"{{"base_url": "{mock_url}", "keys": [{keys}], "queue_capacity": 4096,
            "retry": {{"probe_keys": false, "max_attempts": 1}}{shared}}}"#
    )
}

fn pool(json: &str) -> Pool {
    Pool::new(Config::from_json(json).expect("config")).expect("pool")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// 1. Shared against local, alternating, in the same run.
fn overhead(redis_url: &str) {
    let mock = MockProcess::start(0, 2);
    let rounds = 3;
    // One request at a time on one key: the added latency per request.
    let n = 2000;
    let (mut local, mut shared) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (url, out) in [(None, &mut local), (Some(redis_url), &mut shared)] {
            let p = pool(&config_json(&mock.url, url, 1, 1));
            // Warm up the connections.
            for i in 0..50 {
                p.submit(chat(i)).expect("submit").wait().expect("warm-up");
            }
            let t = Instant::now();
            for i in 0..n {
                p.submit(chat(i)).expect("submit").wait().expect("request");
            }
            out.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
            p.close();
        }
    }
    let (l, s) = (median(&mut local), median(&mut shared));
    println!(
        "[1a] one request at a time, 1 key, 0 ms mock, {n} requests × {rounds} rounds (median): \
         local {l:.1} µs, shared {s:.1} µs per request: +{:.1} µs ({:.2}×)",
        s - l,
        s / l
    );
    // A batch over 8 keys × 4 workers: overhead under concurrency (one Redis connection
    // per pool, so its round trips queue).
    let n = 4000;
    let (mut local, mut shared) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (url, out) in [(None, &mut local), (Some(redis_url), &mut shared)] {
            let p = pool(&config_json(&mock.url, url, KEYS, PER_KEY));
            let _ = p.batch((0..200).map(chat));
            let t = Instant::now();
            let ok = p
                .batch((0..n).map(chat))
                .iter()
                .filter(|r| r.is_ok())
                .count();
            out.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
            if ok != n {
                println!("     (warning: {} of {n} requests failed)", n - ok);
            }
            p.close();
        }
    }
    let (l, s) = (median(&mut local), median(&mut shared));
    println!(
        "[1b] batch, {KEYS} keys × {PER_KEY}, 0 ms mock, {n} requests × {rounds} rounds (median): \
         local {l:.1} µs, shared {s:.1} µs per request ({:.0} vs {:.0} req/s): {:.2}×",
        1e6 / l,
        1e6 / s,
        s / l
    );
}

/// 2. Three processes sharing 8 keys against one mock (in this process, so its
///    per-key records are read directly).
fn throughput(redis_url: &str) {
    let server = MockServer::start(MockConfig {
        latency_ms: LATENCY_MS,
        threads: 4,
        ..MockConfig::default()
    })
    .expect("mock");
    let per_process = 1500;
    let json = config_json(&server.url(), Some(redis_url), KEYS, PER_KEY);
    let mut children: Vec<Child> = (0..PROCESSES)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .env("KEYPOOL_BENCH_ROLE", "pool")
                .env("BENCH_POOL_CONFIG", &json)
                .env("BENCH_POOL_REQUESTS", per_process.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn a pool process")
        })
        .collect();
    // Every process has its pool up; then they start together.
    let mut outs: Vec<BufReader<std::process::ChildStdout>> = children
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().unwrap()))
        .collect();
    for out in &mut outs {
        let mut line = String::new();
        out.read_line(&mut line).expect("pool process ready");
    }
    for c in &mut children {
        let mut stdin = c.stdin.take().unwrap();
        let _ = stdin.write_all(b"go\n");
    }
    let mut ok = 0usize;
    for (c, out) in children.iter_mut().zip(outs) {
        for line in out.lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("POOL-OK ") {
                ok += n.trim().parse::<usize>().unwrap_or(0);
            }
        }
        let _ = c.wait();
    }
    let stats = server.stats();
    let first = stats
        .keys
        .values()
        .filter_map(|k| k.log.iter().map(|r| r.arrived).min());
    let last = stats
        .keys
        .values()
        .filter_map(|k| k.log.iter().map(|r| r.finished).max());
    let span = match (first.min(), last.max()) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => f64::NAN,
    };
    let total = stats.total_requests as f64;
    let rate = total / span;
    let ideal = (KEYS * PER_KEY) as f64 * 1000.0 / LATENCY_MS as f64;
    let max_key = stats
        .keys
        .values()
        .map(|k| k.max_in_flight)
        .max()
        .unwrap_or(0);
    let min_key = stats
        .keys
        .values()
        .map(|k| k.max_in_flight)
        .min()
        .unwrap_or(0);
    println!(
        "[2] {PROCESSES} processes sharing {KEYS} keys × max_concurrent {PER_KEY}, {LATENCY_MS} ms mock, \
         {per_process} requests each ({ok} ok of {total}): {rate:.0} req/s of an ideal {ideal:.0} \
         ({:.2}), server-side max in flight per key {min_key}–{max_key} (limit {PER_KEY}), \
         all keys at once {}",
        rate / ideal,
        stats.max_in_flight_total
    );
    server.shutdown();
}

/// A pool process: builds its pool, says so, waits for "go", runs its batch and prints
/// how many succeeded.
fn run_pool() {
    let json = std::env::var("BENCH_POOL_CONFIG").expect("BENCH_POOL_CONFIG");
    let n: usize = std::env::var("BENCH_POOL_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let p = pool(&json);
    println!("READY");
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    let ok = p
        .batch((0..n).map(chat))
        .iter()
        .filter(|r| r.is_ok())
        .count();
    println!("POOL-OK {ok}");
    p.close();
}

/// A `redis-server` on a free loopback port, stopped on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Option<Redis> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in out.lines().map_while(Result::ok) {
                if line.contains("Ready to accept connections") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        Some(Redis { child, port })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
