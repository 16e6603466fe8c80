//! `https://` through an HTTP CONNECT proxy, as on a corporate network: `HTTPS_PROXY`
//! (read as ureq reads it, with `NO_PROXY`) sends every connection through the
//! proxy, which resolves the endpoint's name; the private CA is still trusted through
//! `tls.ca_file`; a proxy that refuses (`407`) is one clear error per request, tried
//! once, and one that stalls ends each request at its deadline; no key is blamed; the
//! answers OpenRouter and OpenAI document, and hostile ones, come through as directly.
//!
//! The proxy variables are read from the environment, which a test must not change
//! under the other tests of its process: each case runs in a child process (this
//! binary, `--exact child_through_the_proxy`) started with them set.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keypool::{Config, Error, KeyConfig, Pool, Request, StreamEvent, TlsConfig};
use keypool_mock::{MockConfig, MockServer};
use serde_json::json;

mod support;

/// How the test proxy answers a `CONNECT`.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `200`, then bytes both ways.
    Tunnel,
    /// `407 Proxy Authentication Required`, then close.
    Refuse,
    /// Reads the request and never answers.
    Stall,
}

/// A CONNECT proxy on 127.0.0.1 that records each request line it gets.
struct Proxy {
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start(mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = lines.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let seen = seen.clone();
                std::thread::spawn(move || serve(conn, mode, &seen));
            }
        });
        Proxy { port, lines }
    }

    fn connects(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

fn serve(client: TcpStream, mode: Mode, seen: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    seen.lock().unwrap().push(line.trim().to_owned());
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
    }
    let mut client = client;
    match mode {
        Mode::Refuse => {
            let _ = client.write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
        Mode::Stall => {
            // Holds the connection until the client gives up.
            let _ = client.read(&mut [0u8; 1]);
        }
        Mode::Tunnel => {
            // `CONNECT localhost:PORT HTTP/1.1`: this proxy reaches only 127.0.0.1.
            let target = line.split_whitespace().nth(1).unwrap_or("");
            let port = target.rsplit_once(':').map_or("", |(_, p)| p);
            let Ok(upstream) = TcpStream::connect(format!("127.0.0.1:{port}")) else {
                let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
                return;
            };
            let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
            // Bytes the client sent after its head are still in `reader`'s buffer.
            let early = reader.buffer().to_vec();
            let mut up = upstream.try_clone().unwrap();
            let _ = up.write_all(&early);
            let (mut from_up, mut to_client) = (upstream, client.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_up, &mut to_client);
                let _ = to_client.shutdown(Shutdown::Write);
            });
            let _ = std::io::copy(&mut client, &mut up);
            let _ = up.shutdown(Shutdown::Write);
        }
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keypool-proxy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `child_through_the_proxy` for `case` with `HTTPS_PROXY` pointing at `proxy`,
/// every other proxy variable removed; panics with its output if it failed.
fn run_child(case: &str, proxy: &Proxy, url: &str, ca: &std::path::Path) {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child_through_the_proxy", "--nocapture"]);
    for v in [
        "ALL_PROXY",
        "all_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        c.env_remove(v);
    }
    c.env("HTTPS_PROXY", format!("http://127.0.0.1:{}", proxy.port))
        .env("KEYPOOL_PROXY_CASE", case)
        .env("KEYPOOL_PROXY_URL", url)
        .env("KEYPOOL_PROXY_CA", ca);
    // Bounded: a request that never ends (a deadline not kept) fails the test, not
    // hangs it.
    let mut child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{case} (after {:?}): {}{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The mock over TLS, reached as `https://localhost:PORT` (the name its certificate
/// holds, resolved by the proxy), and its CA in a file.
fn tls_mock(name: &str) -> (MockServer, String, PathBuf) {
    let server = MockServer::start_tls(MockConfig::default()).unwrap();
    let ca = dir(name).join("ca.pem");
    std::fs::write(&ca, server.ca_pem().unwrap()).unwrap();
    let url = format!("https://localhost:{}/v1", server.addr().port());
    (server, url, ca)
}

#[test]
fn https_goes_through_a_connect_proxy_with_the_private_ca_trusted() {
    let (server, url, ca) = tls_mock("tunnel");
    let proxy = Proxy::start(Mode::Tunnel);
    run_child("tunnel", &proxy, &url, &ca);
    let connects = proxy.connects();
    let target = format!("CONNECT localhost:{} HTTP/1.1", server.addr().port());
    assert!(!connects.is_empty(), "nothing went through the proxy");
    assert!(
        connects.iter().all(|l| *l == target),
        "the proxy resolves the name: {connects:?}"
    );
    let st = server.stats();
    assert_eq!(st.total_requests, 61);
    // Every connection the mock accepted came through the proxy.
    assert_eq!(st.connections, connects.len() as u64);
    // Kept alive through the tunnels: the 60 requests rode one connection per worker
    // (2 keys x 2), and one more where a key's proof took a worker's idle connection
    // and closed it (as over `https://` without a proxy, `schemes.rs`). The other
    // tunnels carried the proofs' GETs (two unkeyed controls, one per key) and the
    // stream: none of it grows with the requests.
    for k in ["sk-proxy-0", "sk-proxy-1"] {
        let rec = &st.keys[k];
        assert!(rec.max_in_flight <= 2, "{k}: {rec:?}");
        assert!(
            rec.connections() <= 3,
            "{k}: {} connections",
            rec.connections()
        );
    }
    assert!(
        connects.len() <= 2 * 3 + 2 + 2 + 1,
        "{} tunnels",
        connects.len()
    );
    let _ = std::fs::remove_dir_all(ca.parent().unwrap());
}

/// Through the proxy, the answers OpenRouter and OpenAI document and hostile ones
/// (`support::documented_and_hostile_answers`), with key proofs and rate limits on.
#[test]
fn documented_and_hostile_answers_through_the_proxy() {
    let (server, url, ca) = tls_mock("documented");
    let proxy = Proxy::start(Mode::Tunnel);
    run_child("documented", &proxy, &url, &ca);
    assert!(
        !proxy.connects().is_empty(),
        "nothing went through the proxy"
    );
    assert_eq!(server.stats().connections, proxy.connects().len() as u64);
    let _ = std::fs::remove_dir_all(ca.parent().unwrap());
}

#[test]
fn a_proxy_that_refuses_or_stalls_is_an_error_within_the_deadline_and_no_key_is_blamed() {
    for (mode, case) in [(Mode::Refuse, "refuse"), (Mode::Stall, "stall")] {
        let (server, url, ca) = tls_mock(case);
        let proxy = Proxy::start(mode);
        run_child(case, &proxy, &url, &ca);
        assert!(
            !proxy.connects().is_empty(),
            "{case}: the proxy was not asked"
        );
        assert_eq!(server.stats().total_requests, 0, "{case}");
        let _ = std::fs::remove_dir_all(ca.parent().unwrap());
    }
}

/// The child side: passes at once unless `KEYPOOL_PROXY_CASE` is set.
#[test]
fn child_through_the_proxy() {
    let Ok(case) = std::env::var("KEYPOOL_PROXY_CASE") else {
        return;
    };
    let url = std::env::var("KEYPOOL_PROXY_URL").unwrap();
    let ca = std::env::var("KEYPOOL_PROXY_CA").unwrap();
    if case == "documented" {
        support::documented_and_hostile_answers(
            Config::builder()
                .base_url(&url)
                .tls(TlsConfig::default().ca_file(&*ca)),
            "through the proxy",
        );
        return;
    }
    let mut b = Config::builder()
        .base_url(&url)
        .tls(TlsConfig::default().ca_file(&*ca))
        .deadline_ms(1500);
    for i in 0..2 {
        b = b.key_config(
            KeyConfig::new(format!("sk-proxy-{i}"))
                .label(format!("k{i}"))
                .max_concurrent(2),
        );
    }
    let pool = Pool::new(b.build().unwrap()).unwrap();
    let prompt = |i: usize| Request::chat("m", [("user", format!("p{i}"))]);
    if case == "tunnel" {
        let results = pool.batch((0..60).map(prompt));
        for r in &results {
            assert!(r.is_ok(), "{:?}", r.as_ref().err().map(|e| e.to_string()));
        }
        let stream = pool
            .submit_stream(Request::new(&json!({
                "model": "m", "messages": [{"role": "user", "content": "one two three"}],
                "mock": {"stream_chunks": 3},
            })))
            .unwrap();
        let (mut chunks, mut done) = (0, None);
        for ev in stream {
            match ev {
                StreamEvent::Chunk(c) if !c.delta().is_empty() => chunks += 1,
                StreamEvent::Chunk(_) => {}
                StreamEvent::Done(r) => done = Some(r),
            }
        }
        assert!(done.unwrap().is_ok());
        assert_eq!(chunks, 3);
    } else {
        let t = Instant::now();
        let results = pool.batch((0..4).map(prompt));
        let took = t.elapsed();
        for r in &results {
            let e = r.as_ref().expect_err("no answer can come through");
            let msg = e.to_string();
            match case.as_str() {
                // The proxy's refusal is the same for every key: tried once.
                "refuse" => {
                    assert!(
                        msg.contains("the proxy (ALL_PROXY, HTTPS_PROXY or HTTP_PROXY) refused a tunnel to localhost: 407 Proxy Authentication Required"),
                        "{msg}"
                    );
                    assert_eq!(e.attempts(), 1, "{msg}");
                }
                _ => assert!(matches!(e, Error::Timeout { .. }), "{e:?}: {msg}"),
            }
            assert!(!msg.contains("sk-proxy"), "a key in an error: {msg}");
        }
        // The deadline (1.5 s from submission) ends every request, stalled or not: within
        // its 100 ms, and as much again for this child's scheduling on a loaded 2-core
        // CI machine (without the deadline a stalled tunnel waits for the 10 s connect
        // timeout).
        assert!(took < Duration::from_millis(1700), "{case}: took {took:?}");
        for k in pool.stats().keys {
            assert!(k.disabled_reason.is_none(), "{case}: {} blamed", k.label);
        }
    }
    pool.close();
}
