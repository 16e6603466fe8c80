//! Offline demo: starts the bundled mock server on loopback, builds a pool of four fake
//! keys, sends a batch of 200 prompts, and prints how they were spread.
//!
//! Run: `cargo run --release --example demo`

use std::time::Instant;

use keypool::{Config, KeyConfig, Pool, Request, Strategy};
use keypool_mock::{MockConfig, MockServer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = MockServer::start(MockConfig {
        latency_ms: 50,
        jitter_ms: 20,
        ..MockConfig::default()
    })?;
    let mut config = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::FirstAvailable);
    for (i, per_key) in [8, 8, 4, 4].into_iter().enumerate() {
        let key = KeyConfig::new(format!("sk-demo-{i}"))
            .label(format!("demo-{}", (b'a' + i as u8) as char));
        config = config.key_config(key.max_concurrent(per_key));
    }
    let pool = Pool::new(config.build()?)?;
    println!(
        "mock server at {} — 4 keys, 24 workers, 200 prompts",
        server.url()
    );

    let started = Instant::now();
    let prompts =
        (0..200).map(|i| Request::chat("mock-model", [("user", &*format!("prompt #{i}"))]));
    let results = pool.batch(prompts);
    let elapsed = started.elapsed();

    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!(
        "{ok}/{} succeeded in {:.2} s ({:.0} requests/s)",
        results.len(),
        elapsed.as_secs_f64(),
        results.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "{:<8} {:>8} {:>10} {:>22}",
        "key", "requests", "max_conc", "server max in-flight"
    );
    for (i, k) in pool.stats().keys.iter().enumerate() {
        let server_max = server
            .key_stats(&format!("sk-demo-{i}"))
            .map_or(0, |r| r.max_in_flight);
        println!(
            "{:<8} {:>8} {:>10} {:>22}",
            k.label, k.succeeded, k.max_concurrent, server_max
        );
    }
    pool.close();
    if ok != results.len() {
        return Err("some requests failed".into());
    }
    Ok(())
}
