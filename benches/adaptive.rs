//! Learned concurrency against a hidden per-key capacity: prints the learned limit over
//! time, then throughput against the ideal and the share of 429s. Prints figures only;
//! never fails on timing.
//!
//! `cargo bench --bench adaptive`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keypool::{Config, KeyConfig, Pool, Request};
use keypool_mock::{MockConfig, MockServer};

fn main() {
    for (capacity, latency_ms) in [(4usize, 20u64), (12, 20), (24, 40)] {
        run(capacity, latency_ms);
    }
}

fn run(capacity: usize, latency_ms: u64) {
    let server = MockServer::start(MockConfig {
        latency_ms,
        key_capacity: Some(capacity),
        threads: 2,
        ..MockConfig::default()
    })
    .expect("mock");
    let config = Config::builder()
        .base_url(server.url())
        .queue_capacity(4096)
        .key_config(KeyConfig::new("sk-bench").max_concurrent(32).adaptive(true))
        .build()
        .expect("config");
    let pool = Pool::new(config).expect("pool");
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (pool, stop) = (pool.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut tickets = std::collections::VecDeque::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Keep the queue full: far more outstanding than any capacity.
                while tickets.len() < 256 {
                    let r = Request::chat("m", [("user", &*format!("p{i}"))]);
                    i += 1;
                    tickets.push_back(pool.submit(r).expect("submit"));
                }
                if let Some(t) = tickets.pop_front() {
                    let _ = t.wait();
                }
            }
            for t in tickets {
                let _ = t.wait();
            }
        })
    };
    println!("hidden capacity {capacity}, latency {latency_ms} ms, max_concurrent 32");
    println!("  t (s)  learned limit");
    let t0 = Instant::now();
    let mut line = String::new();
    let warmup = Duration::from_secs(3);
    while t0.elapsed() < warmup {
        std::thread::sleep(Duration::from_millis(200));
        let l = pool.stats().keys[0].learned_limit.unwrap_or(0);
        line.push_str(&format!("  {:>5.1}  {l}\n", t0.elapsed().as_secs_f64()));
    }
    print!("{line}");
    server.reset_stats();
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let rec = server.key_stats("sk-bench").unwrap_or_default();
    let secs = t1.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let ok = rec.statuses.get(&200).copied().unwrap_or(0);
    let rejected = rec.statuses.get(&429).copied().unwrap_or(0);
    let ideal = capacity as f64 * 1000.0 / latency_ms as f64;
    let got = ok as f64 / secs;
    println!(
        "  steady 3 s: {got:.0} ok/s of an ideal {ideal:.0} ({:.2}), 429s {rejected} of {} attempts ({:.2} %), server max in flight {}, learned limit {}\n",
        got / ideal,
        rec.requests,
        100.0 * rejected as f64 / rec.requests.max(1) as f64,
        rec.max_in_flight,
        pool.stats().keys[0].learned_limit.unwrap_or(0),
    );
    feeder.join().expect("feeder");
    pool.close();
}
