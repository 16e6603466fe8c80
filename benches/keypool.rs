//! Benchmarks: a program that prints figures and ratios; it never fails on timing.
//!
//! Run: `cargo bench --bench keypool` (release profile). Figures go to stdout.
//! The mock server runs in a child process (this program re-executed with
//! `KEYPOOL_BENCH_ROLE=mock`) so that client CPU time is the process's own.

#[path = "common/mod.rs"]
mod common;
use common::{MockProcess, run_mock};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keypool::{Config, HttpResponse, Pool, Request, Strategy, Transport, TransportSettings};

fn main() {
    match std::env::var("KEYPOOL_BENCH_ROLE").as_deref() {
        Ok("mock") => return run_mock(),
        Ok("rss") => return run_rss(),
        _ => {}
    }
    let quick = std::env::args().any(|a| a == "--quick");
    println!(
        "keypool benchmarks ({} cores){}",
        cores(),
        if quick { " — quick mode" } else { "" }
    );
    // `--only N` runs benchmark N alone (1–5).
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1)?.parse::<u32>().ok());
    let run = |n: u32| only.is_none_or(|o| o == n);
    if run(1) {
        bench_latency_bound(quick);
    }
    if run(2) {
        bench_zero_latency(quick);
    }
    if run(3) {
        bench_dispatch_overhead(quick);
    }
    if run(4) {
        bench_idle_rss();
    }
    if run(5) {
        bench_first_wave(quick);
    }
}

// ---------------------------------------------------------------------------------
// helpers

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Process CPU time (user + system, all threads, including exited ones).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from 1; `after` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / 100.0) // USER_HZ is 100 on Linux
}

fn rss_kib(pid: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn config(url: &str, keys: usize, per_key: usize) -> Config {
    let mut b = Config::builder()
        .base_url(url)
        .strategy(Strategy::FirstAvailable)
        .queue_capacity(4096)
        .max_attempts(1);
    for i in 0..keys {
        b = b.key(format!("sk-bench-{i}"), per_key);
    }
    b.build().unwrap()
}

fn prompt(i: usize) -> Request {
    Request::chat(
        "bench",
        [("user", &*format!("benchmark prompt number {i}"))],
    )
}

/// Runs `n` requests through the pool with a bounded window; returns (wall, cpu, failures).
fn drive(pool: &Pool, n: usize) -> (Duration, Duration, usize) {
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let failures = pool
        .stream((0..n).map(prompt), 0)
        .filter(|(_, r)| r.is_err())
        .count();
    (t0.elapsed(), cpu_time() - cpu0, failures)
}

// ---------------------------------------------------------------------------------
// 1. Latency-bound throughput against the ideal K·C/latency.

fn bench_latency_bound(quick: bool) {
    let (k, c, latency_ms) = (8, 16, 100);
    let n = if quick { 4_000 } else { 20_000 };
    let mock = MockProcess::start(latency_ms, 2);
    let pool = Pool::new(config(&mock.url, k, c)).unwrap();
    let (wall, _, failures) = drive(&pool, n);
    let rps = n as f64 / wall.as_secs_f64();
    let ideal = (k * c) as f64 / (latency_ms as f64 / 1000.0);
    println!("\n[1] K={k} x C={c}, mock latency {latency_ms} ms, {n} requests, first_available");
    println!(
        "    achieved {rps:.0} req/s, ideal {ideal:.0} req/s, ratio {:.3} (target >= 0.98), failures {failures}",
        rps / ideal
    );
    // Time each slot spent per request: the nominal latency plus everything the
    // engine, the loopback and the mock's timer add.
    let per_slot_ms = wall.as_secs_f64() * 1000.0 * (k * c) as f64 / n as f64;
    println!(
        "    wall time per request per slot {per_slot_ms:.1} ms (nominal latency {latency_ms} ms)"
    );
}

// ---------------------------------------------------------------------------------
// 2. Zero latency: keypool vs plain ureq threads, same keys and concurrency.

fn bench_zero_latency(quick: bool) {
    let (k, c) = (4, 16);
    let n = if quick { 20_000 } else { 100_000 };
    let mock = MockProcess::start(0, 2);

    // Baseline: 64 threads each looping ureq calls, one agent per key.
    let agents: Vec<ureq::Agent> = (0..k)
        .map(|_| {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_idle_connections_per_host(c)
                .build()
                .into()
        })
        .collect();
    let per_thread = n / (k * c);
    let url = format!("{}/chat/completions", mock.url);
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for (key, agent) in agents.iter().enumerate() {
            for _ in 0..c {
                let url = &url;
                s.spawn(move || {
                    for i in 0..per_thread {
                        let body = serde_json::to_vec(&serde_json::json!({"model": "bench", "messages": [{"role": "user", "content": format!("benchmark prompt number {i}")}]})).unwrap();
                        let mut r = agent
                            .post(url.as_str())
                            .header("authorization", format!("Bearer sk-bench-{key}"))
                            .header("content-type", "application/json")
                            .send(&body[..])
                            .unwrap();
                        let _ = r.body_mut().read_to_vec().unwrap();
                    }
                });
            }
        }
    });
    let base_wall = t0.elapsed();
    let base_cpu = cpu_time() - cpu0;
    let base_n = per_thread * k * c;
    let base_rps = base_n as f64 / base_wall.as_secs_f64();

    // The transport alone, same threads: separates HTTP-client cost from engine cost.
    let transport_line = {
        let settings = TransportSettings {
            label: "x".into(),
            max_concurrent: c,
            timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
            max_response_bytes: 1 << 24,
            tls: keypool::TlsTrust::default(),
        };
        let ts: Vec<keypool::UreqTransport> = (0..k)
            .map(|_| keypool::UreqTransport::new(&settings))
            .collect();
        let keys: Vec<keypool::ApiKey> = (0..k)
            .map(|i| keypool::ApiKey::new(format!("sk-bench-{i}")))
            .collect();
        let cpu0 = cpu_time();
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for (t, kk) in ts.iter().zip(&keys) {
                for _ in 0..c {
                    let url = &url;
                    s.spawn(move || {
                        for i in 0..per_thread {
                            let body = serde_json::to_vec(&serde_json::json!({"model": "bench", "messages": [{"role": "user", "content": format!("benchmark prompt number {i}")}]})).unwrap();
                            let r = keypool::HttpRequest { url, key: kk, headers: &[], body: &body, timeout: Duration::from_secs(600) };
                            t.send(&r).unwrap();
                        }
                    });
                }
            }
        });
        format!(
            "    UreqTransport alone (64 threads): {:.0} req/s, {:.1} µs CPU/request",
            base_n as f64 / t0.elapsed().as_secs_f64(),
            (cpu_time() - cpu0).as_secs_f64() * 1e6 / base_n as f64
        )
    };
    let pool = Pool::new(config(&mock.url, k, c)).unwrap();
    let (wall, cpu, failures) = drive(&pool, base_n);
    let rps = base_n as f64 / wall.as_secs_f64();
    println!("\n[2] K={k} x C={c}, mock latency 0 ms (mock in another process), {base_n} requests");
    println!(
        "    baseline (64 ureq threads): {base_rps:.0} req/s, {:.1} µs CPU/request",
        base_cpu.as_secs_f64() * 1e6 / base_n as f64
    );
    println!(
        "    keypool:                    {rps:.0} req/s, {:.1} µs CPU/request, failures {failures}",
        cpu.as_secs_f64() * 1e6 / base_n as f64
    );
    println!("{transport_line}");
    pool.close();
    println!(
        "    ratio keypool/baseline: {:.3} (target >= 0.9)",
        rps / base_rps
    );
}

// ---------------------------------------------------------------------------------
// 3. Dispatch overhead with a transport that answers at once.

struct Instant200;

impl Transport for Instant200 {
    fn send(&self, _: &keypool::HttpRequest<'_>) -> Result<HttpResponse, keypool::TransportError> {
        Ok(HttpResponse {
            status: 200,
            headers: Vec::new(),
            body: br#"{"id":"x","choices":[]}"#.to_vec(),
        })
    }
}

fn bench_dispatch_overhead(quick: bool) {
    let (k, c) = (4, 16);
    let n = if quick { 50_000 } else { 300_000 };
    let pool = Pool::with_transport(
        config("http://127.0.0.1:9", k, c),
        |_: &TransportSettings| Arc::new(Instant200) as Arc<dyn Transport>,
    )
    .unwrap();
    let (wall, cpu, failures) = drive(&pool, n);
    println!(
        "\n[3] dispatch overhead, K={k} x C={c}, instant transport, {n} requests via Pool::stream"
    );
    println!(
        "    {:.0} req/s, {:.2} µs CPU/request (target <= 20), failures {failures}",
        n as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / n as f64
    );
    let t0 = Instant::now();
    let cpu0 = cpu_time();
    let m = n / 10;
    for i in 0..m {
        pool.submit(prompt(i)).unwrap().wait().unwrap();
    }
    println!(
        "    one at a time (submit + wait): {:.1} µs wall, {:.1} µs CPU per request",
        t0.elapsed().as_secs_f64() * 1e6 / m as f64,
        (cpu_time() - cpu0).as_secs_f64() * 1e6 / m as f64
    );
}

// ---------------------------------------------------------------------------------
// 4. Idle memory of 64 keys x 16 workers, in a fresh process.

fn bench_idle_rss() {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("KEYPOOL_BENCH_ROLE", "rss")
        .output()
        .expect("run the rss child");
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

fn run_rss() {
    let before = rss_kib("self");
    let pool = Pool::new(config("http://127.0.0.1:9", 64, 16)).unwrap();
    // Let every worker reach its blocking recv: one round trip per key through the
    // dispatcher would need a server, so wait for the thread count instead.
    let want = 64 * 16 + 1;
    let t0 = Instant::now();
    while std::fs::read_dir("/proc/self/task").unwrap().count() < want + 1
        && t0.elapsed() < Duration::from_secs(10)
    {
        std::thread::yield_now();
    }
    let threads = std::fs::read_dir("/proc/self/task").unwrap().count();
    let after = rss_kib("self");
    println!(
        "\n[4] idle pool, 64 keys x 16 workers ({threads} threads, stack {} KiB each)",
        pool.config().worker_stack_size / 1024
    );
    println!(
        "    process RSS {:.1} MiB (before the pool: {:.1} MiB) (target <= 64 MiB)",
        after as f64 / 1024.0,
        before as f64 / 1024.0
    );
    pool.close();
}

// ---------------------------------------------------------------------------------
// 5. The first wave at LLM latencies (issue 21.5): 8 keys x 16, 256 requests that take
//    L each, so any client needs 2 L at best (two full waves). With probing each key
//    sends one request alone first; proven keys (`retry.prove_keys`: an authenticated
//    GET at start) open at once, keys on trial only after that request's answer.

fn bench_first_wave(quick: bool) {
    let (k, c, n) = (8, 16, 256);
    let latency_ms = if quick { 500 } else { 2_000 };
    let mock = MockProcess::start(latency_ms, 2);
    let ideal = Duration::from_millis(2 * latency_ms);
    println!(
        "\n[5] first wave: K={k} x C={c}, {n} requests, mock latency {latency_ms} ms; \
         ideal (two full waves) {:.2} s",
        ideal.as_secs_f64()
    );
    for (name, probe, prove) in [
        ("probing off", false, false),
        ("probing on, keys proven (default)", true, true),
        ("probing on, trial only", true, false),
    ] {
        let mut cfg = config(&mock.url, k, c);
        cfg.retry = cfg.retry.probe_keys(probe).prove_keys(prove);
        let pool = Pool::new(cfg).unwrap();
        let t0 = Instant::now();
        let failures = pool
            .batch((0..n).map(prompt))
            .iter()
            .filter(|r| r.is_err())
            .count();
        let wall = t0.elapsed();
        println!(
            "    {name:<36} {:.2} s, ratio to ideal {:.3} (target >= 0.95), failures {failures}",
            wall.as_secs_f64(),
            ideal.as_secs_f64() / wall.as_secs_f64()
        );
    }
}
