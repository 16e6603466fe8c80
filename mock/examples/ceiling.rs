//! Measures the mock server's ceiling, so tests know it is not the bottleneck.
//!
//! ```text
//! cargo run --release -p keypool-mock --example ceiling [-- SECONDS CONNECTIONS]
//! ```
//!
//! 1. Throughput: requests/s at latency 0 with 64 client threads (one ureq agent per
//!    thread, keep-alive), for SECONDS (default 3).
//! 2. Concurrency: CONNECTIONS (default 4000) keep-alive connections, each with one
//!    request in flight at latency 1000 ms (raw `TcpStream`s writing a minimal HTTP/1.1
//!    request); checks all complete and the server saw them all in flight at once.
//!
//! Client and server share the machine, so the figures are lower bounds for the server.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use keypool_mock::{MockConfig, MockServer};

const EMFILE: i32 = 24;

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let conns: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(4000);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("machine: {threads} hardware threads; server: 2 tokio worker threads");
    throughput(seconds);
    if let Err(e) = concurrency(conns) {
        if e.raw_os_error() == Some(EMFILE) {
            eprintln!(
                "concurrency: too many open files (EMFILE): {conns} connections need about \
                 {} descriptors in this process (client + server ends); raise `ulimit -n`",
                2 * conns + 64
            );
        } else {
            eprintln!("concurrency: {e}");
        }
        std::process::exit(1);
    }
}

fn throughput(seconds: u64) {
    const CLIENTS: usize = 64;
    let server = MockServer::start(MockConfig::default()).expect("start server");
    let url = format!("{}/chat/completions", server.url());
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(CLIENTS + 1));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (url, stop, done, errors, barrier) = (
                url.clone(),
                Arc::clone(&stop),
                Arc::clone(&done),
                Arc::clone(&errors),
                Arc::clone(&barrier),
            );
            std::thread::Builder::new()
                .name(format!("client-{i}"))
                .stack_size(256 << 10)
                .spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .build()
                        .into();
                    let key = format!("Bearer sk-{}", i % 8);
                    barrier.wait();
                    while !stop.load(Ordering::Relaxed) {
                        let ok = agent
                            .post(&url)
                            .header("Authorization", &key)
                            .content_type("application/json")
                            .send(body)
                            .and_then(|mut r| {
                                r.body_mut().read_to_vec()?;
                                Ok(r.status().as_u16() == 200)
                            })
                            .unwrap_or(false);
                        if ok {
                            done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
                .expect("spawn client")
        })
        .collect();
    barrier.wait();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = t.elapsed();
    for h in handles {
        h.join().unwrap();
    }
    let stats = server.stats();
    println!(
        "throughput: {:.0} requests/s ({n} ok, {} errors in {:.2} s; {CLIENTS} client threads, \
         keep-alive, latency 0); server max in flight {}",
        n as f64 / elapsed.as_secs_f64(),
        errors.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        stats.max_in_flight_total,
    );
}

fn request(body: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-conc\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads one HTTP/1.1 response with a content-length; returns its status.
fn read_response(s: &mut TcpStream) -> io::Result<u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other("bad status line"))?;
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| io::Error::other("no content-length"))?;
        while buf.len() < end + 4 + len {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body cut short",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Ok(status);
    }
}

fn concurrency(conns: usize) -> io::Result<()> {
    const LATENCY_MS: u64 = 1000;
    const OPENERS: usize = 8;
    let server = MockServer::start(MockConfig {
        latency_ms: LATENCY_MS,
        ..MockConfig::default()
    })?;
    let addr: SocketAddr = server.addr();
    let req = Arc::new(request(r#"{"messages":[{"role":"user","content":"hi"}]}"#));
    let t = Instant::now();
    // Each opener thread connects its share and writes one request on each connection
    // at once, then reads the answers; connections stay open until all are read.
    let handles: Vec<_> = (0..OPENERS)
        .map(|i| {
            let req = Arc::clone(&req);
            let share = conns / OPENERS + usize::from(i < conns % OPENERS);
            std::thread::spawn(move || -> io::Result<(Vec<TcpStream>, usize)> {
                let mut streams = Vec::with_capacity(share);
                for _ in 0..share {
                    let mut s = TcpStream::connect(addr)?;
                    s.set_nodelay(true)?;
                    s.write_all(&req)?;
                    streams.push(s);
                }
                let mut ok = 0;
                for s in &mut streams {
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    if read_response(s)? == 200 {
                        ok += 1;
                    }
                }
                Ok((streams, ok))
            })
        })
        .collect();
    let mut open = Vec::with_capacity(conns);
    let mut ok = 0;
    let mut first_err = None;
    for h in handles {
        match h.join().expect("opener thread") {
            Ok((streams, n)) => {
                ok += n;
                open.extend(streams);
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let elapsed = t.elapsed();
    // A second request on every still-open connection proves they were kept alive.
    let stats_first = server.stats();
    server.reset_stats();
    server.set_config(MockConfig::default());
    let mut reused = 0;
    for s in &mut open {
        s.write_all(&req)?;
    }
    for s in &mut open {
        if read_response(s)? == 200 {
            reused += 1;
        }
    }
    println!(
        "concurrency: {ok}/{conns} requests completed with 200 in {:.2} s at latency {LATENCY_MS} ms; \
         server max in flight {} (key max {}); {reused}/{conns} connections reused (keep-alive)",
        elapsed.as_secs_f64(),
        stats_first.max_in_flight_total,
        stats_first
            .keys
            .get("sk-conc")
            .map_or(0, |k| k.max_in_flight),
    );
    if ok != conns || stats_first.max_in_flight_total != conns || reused != conns {
        println!("concurrency: NOT all connections were served concurrently");
    }
    Ok(())
}
