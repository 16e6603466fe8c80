//! `keypool demo`: the mock server in-process, four fake keys, a few hundred prompts
//! through exactly the machinery of `keypool run`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use keypool::{Config, KeyConfig, Pool, RetryConfig};
use keypool_mock::{MockConfig, MockServer};

use crate::args::DemoArgs;
use crate::run::{RunOptions, run as run_file};

/// Requests in flight per demo key.
const PER_KEY: usize = 4;
const LABELS: [&str; 4] = ["demo-a", "demo-b", "demo-c", "demo-d"];

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn demo_key(i: usize) -> String {
    format!("sk-demo-{i}")
}

/// Runs the demo.
pub fn run(a: &DemoArgs) -> Result<ExitCode, String> {
    let interrupts = crate::signals::interrupts()?;
    let server = MockServer::start(MockConfig {
        latency_ms: 40,
        jitter_ms: 20,
        fail_429_rate: 0.03,
        retry_after_ms: (100, 300),
        fail_500_rate: 0.02,
        ..MockConfig::default()
    })
    .map_err(|e| format!("cannot start the mock server: {e}"))?;

    let mut builder = Config::builder().base_url(server.url()).retry({
        let mut r = RetryConfig::default();
        r.max_attempts = 5;
        r.base_delay_ms = 100;
        r.max_delay_ms = 1_000;
        r
    });
    for (i, label) in LABELS.iter().enumerate() {
        builder = builder.key_config(
            KeyConfig::new(demo_key(i))
                .label(*label)
                .max_concurrent(PER_KEY),
        );
    }
    let config = builder.build().map_err(|e| e.to_string())?;
    let pool = Pool::new(config).map_err(|e| e.to_string())?;

    let dir = TempDir(std::env::temp_dir().join(format!(
        "keypool-demo-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    )));
    std::fs::create_dir_all(&dir.0).map_err(|e| format!("creating a temp dir: {e}"))?;
    let input = dir.0.join("requests.jsonl");
    let output = dir.0.join("results.jsonl");
    write_input(&input, a.requests).map_err(|e| format!("writing the demo input: {e}"))?;

    println!(
        "keypool demo: {} prompts, {} keys × {PER_KEY} in flight, mock server at {} \
         (40-60 ms latency, 3 % 429s, 2 % 500s)",
        a.requests,
        LABELS.len(),
        server.url()
    );
    let opts = RunOptions {
        input,
        output: output.clone(),
        ordered: false,
        quiet: a.quiet,
        retry_failed: false,
        overwrite: false,
        progress_every: std::time::Duration::from_secs(10),
    };
    let report = run_file(&pool, &opts, &interrupts)?;
    if report.interrupted != crate::run::Interrupted::No {
        std::process::exit(130);
    }
    pool.close();

    let first = std::fs::read_to_string(&output)
        .ok()
        .and_then(|t| t.lines().next().map(str::to_owned))
        .unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "\nfirst output line:\n{first}\n");
    // The output is a temporary file, deleted at exit: say so rather than name a path
    // that will not exist.
    out += &report.summary(&PathBuf::from("a temporary file (deleted at exit)"));
    let server_stats = server.stats();
    let _ = writeln!(out, "\nserver side (what the mock saw):");
    for (i, label) in LABELS.iter().enumerate() {
        let rec = server_stats.keys.get(&demo_key(i));
        let _ = writeln!(
            out,
            "  {label}: {} requests, at most {} in flight (limit {PER_KEY})",
            rec.map_or(0, |r| r.requests),
            rec.map_or(0, |r| r.max_in_flight),
        );
    }
    let secs = report.elapsed.as_secs_f64();
    let _ = writeln!(
        out,
        "throughput: {:.0} requests/s over {secs:.2} s (one key alone would manage about {:.0}/s)",
        (report.ok + report.failed) as f64 / secs.max(1e-9),
        PER_KEY as f64 / 0.05,
    );
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    server.shutdown();
    Ok(if report.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn write_input(path: &std::path::Path, n: usize) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..n {
        let line = serde_json::json!({
            "custom_id": format!("prompt-{i}"),
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "demo-model",
                "messages": [{"role": "user", "content": format!("Write a haiku about key number {i}")}],
            },
        });
        serde_json::to_writer(&mut f, &line)?;
        f.write_all(b"\n")?;
    }
    f.flush()
}
