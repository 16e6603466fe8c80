//! Streaming benchmarks: a program that prints figures; it never fails on timing.
//!
//! `cargo bench --bench streaming` (the `bench` profile: release with line tables).
//!
//! 1. Memory of 1,000 concurrent streams: 10 keys × 100 workers, the mock (in a child
//!    process, so this process's RSS is the client's alone) sending 20 content chunks
//!    50 ms apart; all 1,000 streams are submitted, then consumed by 4 threads. Prints
//!    VmRSS before the pool, with the idle pool, at peak (sampled every 2 ms, and
//!    VmHWM) and after, and the server-side maximum of streams in flight.
//! 2. Time to first token seen by the caller, keypool against a direct `ureq` streaming
//!    call in the same run (interleaved), the mock in-process with a 20 ms delay before
//!    the first content chunk.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keypool::{Config, KeyConfig, Pool, Request, ResponseStream, StreamEvent};
use keypool_mock::{MockConfig, MockServer};
use serde_json::{Value, json};

const STREAMS: usize = 1000;
const KEYS: usize = 10;
const PER_KEY: usize = 100;
const CONSUMERS: usize = 4;
const TTFT_REQUESTS: usize = 300;
const FIRST_CHUNK_DELAY_MS: u64 = 20;

fn main() {
    if std::env::var("KEYPOOL_BENCH_ROLE").as_deref() == Ok("mock") {
        return run_mock();
    }
    println!(
        "keypool streaming benchmarks ({} cores)\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // Memory first: VmHWM is the process's peak since it started.
    bench_concurrent_streams();
    bench_ttft();
}

// ---------------------------------------------------------------------------------
// helpers

/// A field of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: &str, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss() -> u64 {
    status_kib("self", "VmRSS:")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The mock in a child process (this program re-executed with
/// `KEYPOOL_BENCH_ROLE=mock`). It prints its URL, then answers each `stats` line on
/// stdin with `<max in flight> <VmHWM KiB>` (and resets its statistics), and exits at
/// end of file.
struct MockProcess {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    url: String,
}

impl MockProcess {
    fn start() -> MockProcess {
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .env("KEYPOOL_BENCH_ROLE", "mock")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the mock process");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut url = String::new();
        out.read_line(&mut url).expect("mock url");
        MockProcess {
            child,
            out,
            url: url.trim().to_owned(),
        }
    }

    /// (server-side max streams in flight since the last call, the mock's VmHWM KiB)
    fn stats(&mut self) -> (u64, u64) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"stats\n").expect("ask the mock");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("mock stats");
        let mut f = line.split_whitespace().map(|v| v.parse().unwrap_or(0));
        (f.next().unwrap_or(0), f.next().unwrap_or(0))
    }
}

impl Drop for MockProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // EOF: the mock exits
        let _ = self.child.wait();
    }
}

fn run_mock() {
    // Two tokio threads (the default) hold 1,000 SSE connections easily; the listen
    // backlog is 4,096 and `ulimit -n` must allow ~1,100 descriptors.
    let server = MockServer::start(MockConfig::default()).expect("mock");
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", server.url()).expect("stdout");
    stdout.flush().expect("flush");
    let mut line = String::new();
    loop {
        line.clear();
        match std::io::stdin().read_line(&mut line) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
        if line.trim() == "stats" {
            let max = server.stats().max_in_flight_total;
            server.reset_stats();
            writeln!(stdout, "{max} {}", status_kib("self", "VmHWM:")).expect("stdout");
            stdout.flush().expect("flush");
        }
    }
    server.shutdown();
}

/// A chat request whose `mock` object sets the stream's shape.
fn request(prompt: &str, mock: Value) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": prompt}], "mock": mock})
}

// ---------------------------------------------------------------------------------
// 1. memory of 1,000 concurrent streams

/// What one consumed stream gave: content chunks and whether it ended in success.
fn consume(stream: ResponseStream) -> (u64, bool) {
    let mut content = 0;
    for ev in stream {
        match ev {
            StreamEvent::Chunk(c) => content += u64::from(!c.delta().is_empty()),
            StreamEvent::Done(r) => return (content, r.is_ok()),
        }
    }
    (content, false)
}

fn bench_concurrent_streams() {
    println!(
        "[1] {STREAMS} concurrent streams: {KEYS} keys × {PER_KEY} workers, mock in a child process, \
         20 content chunks 50 ms apart, consumed by {CONSUMERS} threads"
    );
    let mut mock = MockProcess::start();
    let before = rss();
    let mut b = Config::builder()
        .base_url(mock.url.clone())
        .queue_capacity(4096);
    for i in 0..KEYS {
        b = b.key_config(KeyConfig::new(format!("sk-bench-{i}")).max_concurrent(PER_KEY));
    }
    let pool = Pool::new(b.build().expect("config")).expect("pool");
    // One short stream per key first: each key's first request goes alone (key probing).
    let warm: Vec<_> = (0..KEYS)
        .map(|i| {
            let r = Request::new(&request(&format!("warm {i}"), json!({"stream_chunks": 1})));
            pool.submit_stream(r).expect("submit")
        })
        .collect();
    for s in warm {
        let _ = s.wait();
    }
    let _ = mock.stats(); // reset the server-side maximum
    let idle = rss();
    println!(
        "  VmRSS before the pool {:.1} MiB; with the pool ({} workers, {KEYS} warm connections) {:.1} MiB",
        mib(before),
        KEYS * PER_KEY,
        mib(idle)
    );
    println!(
        "  round  submit (ms)  all done (s)  ok     text chunks  server max in flight  peak VmRSS (MiB)  per stream (KiB)  after (MiB)"
    );
    for round in 1..=2 {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let t0 = Instant::now();
        let mut streams: Vec<Vec<ResponseStream>> = (0..CONSUMERS).map(|_| Vec::new()).collect();
        for i in 0..STREAMS {
            let r = Request::new(&request(
                "a fairly long prompt so that each of the twenty chunks has a few characters in it, \
                 like a real reply would",
                json!({"stream_chunks": 20, "chunk_delay_ms": 50}),
            ));
            streams[i % CONSUMERS].push(pool.submit_stream(r).expect("submit"));
        }
        let submitted = t0.elapsed();
        let consumers: Vec<_> = streams
            .into_iter()
            .map(|mine| {
                std::thread::spawn(move || {
                    mine.into_iter().fold((0u64, 0usize), |(c, ok), s| {
                        let (n, good) = consume(s);
                        (c + n, ok + usize::from(good))
                    })
                })
            })
            .collect();
        let (mut content, mut ok) = (0, 0);
        for c in consumers {
            let (n, good) = c.join().expect("consumer");
            content += n;
            ok += good;
        }
        let done = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        sampler.join().expect("sampler");
        let peak = peak.load(Ordering::Relaxed);
        let (server_max, _) = mock.stats();
        let after = rss();
        println!(
            "  {round:>5}  {:>11.1}  {:>12.2}  {ok:>5}  {content:>11}  {server_max:>20}  {:>16.1}  {:>16.1}  {:>11.1}",
            ms(submitted),
            done.as_secs_f64(),
            mib(peak),
            peak.saturating_sub(idle) as f64 / STREAMS as f64,
            mib(after),
        );
    }
    let hwm = status_kib("self", "VmHWM:");
    pool.close();
    let (_, mock_hwm) = mock.stats();
    println!(
        "  VmHWM {:.1} MiB; after close {:.1} MiB; the mock's own VmHWM {:.1} MiB\n",
        mib(hwm),
        mib(rss()),
        mib(mock_hwm)
    );
}

// ---------------------------------------------------------------------------------
// 2. time to first token, keypool against a direct ureq call

/// Caller-seen times of one stream: to the first event (the role chunk) and to the
/// first content chunk.
struct Times {
    first_event: Duration,
    first_token: Duration,
}

fn via_keypool(pool: &Pool, body: &Value) -> Times {
    let t0 = Instant::now();
    let stream = pool
        .submit_stream(Request::new(body))
        .expect("submit_stream");
    let (mut first_event, mut first_token) = (None, None);
    for ev in stream {
        match ev {
            StreamEvent::Chunk(c) => {
                first_event.get_or_insert_with(|| t0.elapsed());
                if !c.delta().is_empty() && first_token.is_none() {
                    first_token = Some(t0.elapsed());
                }
            }
            StreamEvent::Done(r) => {
                r.expect("stream ok");
            }
        }
    }
    Times {
        first_event: first_event.expect("a chunk"),
        first_token: first_token.expect("a content chunk"),
    }
}

/// The same request as keypool sends it (`stream`, `stream_options.include_usage`),
/// straight through one ureq agent: read lines, parse each `data:` JSON, read to the
/// end so the connection is kept alive.
fn via_ureq(agent: &ureq::Agent, url: &str, body: &[u8]) -> Times {
    let t0 = Instant::now();
    let resp = agent
        .post(url)
        .header("authorization", "Bearer sk-direct")
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .send(body)
        .expect("direct call");
    assert_eq!(resp.status().as_u16(), 200);
    let mut reader = BufReader::new(resp.into_body().into_reader());
    let (mut first_event, mut first_token) = (None, None);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).expect("read") == 0 {
            break;
        }
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        first_event.get_or_insert_with(|| t0.elapsed());
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).expect("chunk json");
        let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        if !content.is_empty() && first_token.is_none() {
            first_token = Some(t0.elapsed());
        }
    }
    Times {
        first_event: first_event.expect("an event"),
        first_token: first_token.expect("a content chunk"),
    }
}

fn bench_ttft() {
    println!(
        "[2] time to first token seen by the caller: {TTFT_REQUESTS} sequential streams each way, interleaved; \
         mock in-process, first content chunk after {FIRST_CHUNK_DELAY_MS} ms, 4 content chunks"
    );
    let server = MockServer::start(MockConfig::default()).expect("mock");
    let pool = Pool::new(
        Config::builder()
            .base_url(server.url())
            .key_config(KeyConfig::new("sk-bench").max_concurrent(4))
            .build()
            .expect("config"),
    )
    .expect("pool");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}/chat/completions", server.url());
    let mock = json!({"first_chunk_delay_ms": FIRST_CHUNK_DELAY_MS, "stream_chunks": 4});
    let body = request("how long until the first token?", mock);
    let mut direct_body = body.clone();
    direct_body["stream"] = json!(true);
    direct_body["stream_options"] = json!({"include_usage": true});
    let direct_body = serde_json::to_vec(&direct_body).expect("json");
    // Warm up both paths (connections, key probing, page faults).
    for _ in 0..20 {
        via_keypool(&pool, &body);
        via_ureq(&agent, &url, &direct_body);
    }
    let (mut kp, mut direct) = (Vec::new(), Vec::new());
    for i in 0..TTFT_REQUESTS {
        // Alternate which goes first so neither always follows the other.
        if i % 2 == 0 {
            kp.push(via_keypool(&pool, &body));
            direct.push(via_ureq(&agent, &url, &direct_body));
        } else {
            direct.push(via_ureq(&agent, &url, &direct_body));
            kp.push(via_keypool(&pool, &body));
        }
    }
    let engine_ttft = pool.stats().keys[0].ttft_p50_ms;
    let sorted = |v: &[Times], f: fn(&Times) -> Duration| {
        let mut s: Vec<f64> = v.iter().map(|t| ms(f(t))).collect();
        s.sort_by(f64::total_cmp);
        s
    };
    println!("  measure              path     p50 (ms)  p99 (ms)");
    for (name, f) in [
        (
            "first content chunk",
            (|t: &Times| t.first_token) as fn(&Times) -> Duration,
        ),
        ("first event (role)", |t: &Times| t.first_event),
    ] {
        let (k, d) = (sorted(&kp, f), sorted(&direct, f));
        for (path, s) in [("direct", &d), ("keypool", &k)] {
            println!(
                "  {name:<21}{path:<9}{:>9.3}{:>10.3}",
                percentile(s, 0.5),
                percentile(s, 0.99)
            );
        }
        let (k50, d50) = (percentile(&k, 0.5), percentile(&d, 0.5));
        let (k99, d99) = (percentile(&k, 0.99), percentile(&d, 0.99));
        println!(
            "  {name:<21}overhead p50 {:+.3} ms (× {:.3}), p99 {:+.3} ms (× {:.3})",
            k50 - d50,
            k50 / d50,
            k99 - d99,
            k99 / d99
        );
    }
    println!(
        "  (keypool's own ttft_p50_ms for the key, measured inside the worker: {engine_ttft:.3} ms)\n"
    );
    pool.close();
    server.shutdown();
}
