//! The HTTP path over TLS against scripted rustls servers that choose their record
//! boundaries: heads split across records and sizes around the buffers, bodies ended
//! by close_notify or a bare EOF, bytes after the body, `Expect: 100-continue` (100,
//! 413, ignored, a 103 before the 100), a trickled stream, random framings; through
//! `UreqTransport::send` and `send_stream`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keypool::{
    ApiKey, HttpRequest, TlsConfig, TlsTrust, Transport, TransportError, TransportSettings,
    UreqTransport,
};

/// A rustls server connection over a blocking socket, with explicit record flushes.
struct Conn {
    tls: rustls::ServerConnection,
    sock: TcpStream,
    /// Plaintext read but not yet consumed.
    buf: Vec<u8>,
}

impl Conn {
    fn pump_in(&mut self) -> bool {
        loop {
            let mut tmp = [0u8; 16384];
            match self.tls.reader().read(&mut tmp) {
                Ok(0) => return false,
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
            if self.tls.process_new_packets().is_err() {
                return false;
            }
            self.flush();
        }
    }

    fn flush(&mut self) {
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut self.sock).is_err() {
                return;
            }
        }
    }

    /// The next request's head, or None at EOF.
    fn read_head(&mut self) -> Option<(usize, String)> {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i + 4]).into_owned();
                self.buf.drain(..i + 4);
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                return Some((len, head));
            }
            if !self.pump_in() {
                return None;
            }
        }
    }

    fn read_body(&mut self, len: usize) -> Option<Vec<u8>> {
        while self.buf.len() < len {
            if !self.pump_in() {
                return None;
            }
        }
        Some(self.buf.drain(..len).collect())
    }

    fn request(&mut self) -> Option<(String, Vec<u8>)> {
        let (len, head) = self.read_head()?;
        let body = self.read_body(len)?;
        Some((head, body))
    }

    /// `bytes` as their own record(s), sent now.
    fn send(&mut self, bytes: &[u8]) {
        let _ = self.tls.writer().write_all(bytes);
        self.flush();
    }

    fn close_notify(&mut self) {
        self.tls.send_close_notify();
        self.flush();
    }
}

struct Identity {
    config: Arc<rustls::ServerConfig>,
    ca_file: String,
}

fn identity() -> Identity {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("review CA {}", fastrand::u64(..)),
    );
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    let dir = std::env::temp_dir().join(format!(
        "keypool-review2-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    Identity {
        config: Arc::new(config),
        ca_file: ca_file.display().to_string(),
    }
}

/// A TLS server running `script` on every connection; the URL, the client's trust,
/// the number of connections accepted.
fn server(
    script: impl Fn(&mut Conn, usize) + Send + Sync + 'static,
) -> (String, TlsTrust, Arc<AtomicUsize>) {
    let id = identity();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/v1/x", l.local_addr().unwrap());
    let conns = Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    let script = Arc::new(script);
    let config = id.config.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(sock) = s else { return };
            let n = c2.fetch_add(1, Ordering::SeqCst);
            let script = script.clone();
            let config = config.clone();
            std::thread::spawn(move || {
                let tls = rustls::ServerConnection::new(config).unwrap();
                let mut c = Conn {
                    tls,
                    sock,
                    buf: Vec::new(),
                };
                script(&mut c, n);
            });
        }
    });
    let trust = TlsTrust::load(&TlsConfig::default().ca_file(id.ca_file)).unwrap();
    (url, trust, conns)
}

fn transport(tls: TlsTrust, timeout: Duration) -> UreqTransport {
    UreqTransport::new(&TransportSettings {
        label: "t".into(),
        max_concurrent: 1,
        timeout,
        connect_timeout: Duration::from_secs(2),
        max_response_bytes: 4 << 20,
        tls,
    })
}

fn post(
    t: &UreqTransport,
    url: &str,
    body: &[u8],
) -> Result<keypool::HttpResponse, TransportError> {
    let key = ApiKey::new("sk-review");
    t.send(&HttpRequest {
        url,
        key: &key,
        headers: &[],
        body,
        timeout: Duration::from_secs(3),
    })
}

fn ok(len: usize) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes()
}

/// Reads a request body of `len` bytes and answers 200 with its length as the body.
fn answer_length(c: &mut Conn, len: usize) {
    let body = c.read_body(len).unwrap();
    let s = body.len().to_string();
    let mut a = ok(s.len());
    a.extend_from_slice(s.as_bytes());
    c.send(&a);
}

/// A head split across records and time, then a body in many small records, larger
/// than every buffer; three requests on one connection.
#[test]
fn split_heads_and_long_bodies_in_small_records_arrive_whole() {
    let (url, trust, conns) = server(|c, _| {
        while let Some((_, body)) = c.request() {
            let n: usize = String::from_utf8_lossy(&body).parse().unwrap();
            let answer: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            let head = ok(n);
            c.send(&head[..10]);
            std::thread::sleep(Duration::from_millis(20));
            c.send(&head[10..]);
            for piece in answer.chunks(700) {
                c.send(piece);
            }
        }
    });
    let t = transport(trust, Duration::from_secs(5));
    for n in [10usize, 4096, 200_000, 5, 70_000] {
        let r = post(&t, &url, n.to_string().as_bytes()).unwrap();
        let want: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
        assert!(r.body == want, "{n}: {} bytes", r.body.len());
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

/// Heads of every size around the input buffer's steps (4, 8 KiB), on one connection.
#[test]
fn heads_around_the_input_buffer_sizes_arrive_whole() {
    let (url, trust, _) = server(|c, _| {
        while let Some((_, body)) = c.request() {
            let pad: usize = String::from_utf8_lossy(&body).parse().unwrap();
            let mut r = format!(
                "HTTP/1.1 200 OK\r\nx-pad: {}\r\ncontent-length: 3\r\n\r\nend",
                "p".repeat(pad)
            )
            .into_bytes();
            // Head and body in one record, or the body a moment later.
            if pad % 2 == 0 {
                c.send(&r);
            } else {
                let body = r.split_off(r.len() - 3);
                c.send(&r);
                std::thread::sleep(Duration::from_millis(5));
                c.send(&body);
            }
        }
    });
    let t = transport(trust, Duration::from_secs(5));
    for base in [4096usize, 8192] {
        for pad in base - 60..base + 4 {
            let r = post(&t, &url, pad.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("pad {pad}: {e:?}"));
            assert_eq!(r.body, b"end", "pad {pad}");
        }
    }
}

/// Close-delimited bodies, with and without close_notify; truncated length-delimited
/// ones are errors either way.
#[test]
fn ends_of_stream_over_tls() {
    let (url, trust, _) = server(|c, n| {
        let _ = c.request();
        match n {
            0 => {
                c.send(b"HTTP/1.1 200 OK\r\n\r\nclose-delimited");
                c.close_notify();
            }
            1 => {
                c.send(b"HTTP/1.1 200 OK\r\n\r\nclose-delimited");
            }
            2 => {
                c.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\ntruncated");
                c.close_notify();
            }
            3 => {
                c.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\ntruncated");
            }
            _ => {
                c.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n");
                c.close_notify();
            }
        }
        let _ = c.sock.shutdown(std::net::Shutdown::Both);
    });
    let t = transport(trust, Duration::from_secs(3));
    let r0 = post(&t, &url, b"{}");
    let r1 = post(&t, &url, b"{}");
    let r2 = post(&t, &url, b"{}");
    let r3 = post(&t, &url, b"{}");
    let r4 = post(&t, &url, b"{}");
    let show = |r: &Result<keypool::HttpResponse, TransportError>| match r {
        Ok(r) => format!("ok {:?}", String::from_utf8_lossy(&r.body)),
        Err(e) => format!("err {e:?}"),
    };
    eprintln!(
        "0 {}\n1 {}\n2 {}\n3 {}\n4 {}",
        show(&r0),
        show(&r1),
        show(&r2),
        show(&r3),
        show(&r4)
    );
    assert_eq!(r0.unwrap().body, b"close-delimited");
    assert!(r2.is_err());
    assert!(r3.is_err());
    assert_eq!(r4.unwrap().body, b"abc");
}

/// Bytes after the body (in the body's record, or a moment later) are never the next
/// request's answer.
#[test]
fn bytes_after_the_body_are_never_an_answer_over_tls() {
    let (url, trust, conns) = server(|c, n| {
        let mut i = 0;
        while c.request().is_some() {
            i += 1;
            let mut a = ok(2);
            a.extend_from_slice(b"ok");
            if n == 0 && i == 1 {
                a.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nSTALE");
                c.send(&a);
            } else if n == 1 && i == 1 {
                c.send(&a);
                std::thread::sleep(Duration::from_millis(30));
                c.send(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nSTALE");
            } else {
                c.send(&a);
            }
        }
    });
    let t = transport(trust, Duration::from_secs(3));
    assert_eq!(post(&t, &url, b"{}").unwrap().body, b"ok");
    assert_eq!(post(&t, &url, b"{}").unwrap().body, b"ok");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(post(&t, &url, b"{}").unwrap().body, b"ok");
    assert_eq!(conns.load(Ordering::SeqCst), 3);
}

/// A large upload over TLS: Expect: 100-continue answered with 100 (body read), or
/// refused early on a kept-open connection.
#[test]
fn expect_100_continue_over_tls() {
    let (url, trust, _) = server(|c, n| {
        while let Some((len, head)) = c.read_head() {
            assert!(
                head.to_ascii_lowercase().contains("expect: 100-continue"),
                "{head}"
            );
            if n == 0 {
                c.send(b"HTTP/1.1 100 Continue\r\n\r\n");
                answer_length(c, len);
            } else {
                c.send(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n");
                while c.pump_in() {
                    c.buf.clear();
                }
                return;
            }
        }
    });
    let t = transport(trust.clone(), Duration::from_secs(5));
    let big = vec![b'x'; (1 << 20) + 12345];
    let r = post(&t, &url, &big).unwrap();
    assert_eq!(r.body, big.len().to_string().as_bytes());
    let r = post(&t, &url, &big).unwrap();
    assert_eq!(r.body, big.len().to_string().as_bytes());
    let t = transport(trust, Duration::from_secs(5));
    let started = Instant::now();
    let r = post(&t, &url, &big).unwrap();
    assert_eq!(r.status, 413);
    assert!(started.elapsed() < Duration::from_millis(700));
}

/// A stream over TLS: events trickled in records of every size arrive whole.
#[test]
fn a_trickled_stream_over_tls_arrives_whole() {
    let events: Vec<String> = (0..300)
        .map(|i| {
            format!(
                "data: {{\"i\":{i},\"pad\":\"{}\"}}\n\n",
                "q".repeat(i * 37 % 5000)
            )
        })
        .collect();
    let all: String = events.concat();
    let events2 = events.clone();
    let (url, trust, _) = server(move |c, _| {
        let _ = c.request();
        c.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n");
        for (i, e) in events2.iter().enumerate() {
            let chunk = format!("{:x}\r\n{e}\r\n", e.len());
            let b = chunk.as_bytes();
            let cut = (i * 7) % b.len();
            c.send(&b[..cut]);
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            c.send(&b[cut..]);
        }
        c.send(b"0\r\n\r\n");
        std::thread::sleep(Duration::from_millis(200));
    });
    let t = transport(trust, Duration::from_secs(10));
    let key = ApiKey::new("sk-review");
    let mut s = t
        .send_stream(
            &HttpRequest {
                url: &url,
                key: &key,
                headers: &[],
                body: b"{}",
                timeout: Duration::from_secs(10),
            },
            Some(Duration::from_secs(2)),
        )
        .unwrap();
    let mut got = Vec::new();
    s.body.read_to_end(&mut got).unwrap();
    assert!(
        got == all.as_bytes(),
        "{} of {} bytes",
        got.len(),
        all.len()
    );
}

/// The expected answer body for `seed`.
fn answer_for(seed: u64) -> (usize, bool, Vec<u8>) {
    let mut r = fastrand::Rng::with_seed(seed);
    let pad = match r.u8(0..4) {
        0 => 0,
        1 => r.usize(3900..4200),
        2 => r.usize(7900..8300),
        _ => r.usize(0..11000),
    };
    let chunked = r.bool();
    let len = match r.u8(0..4) {
        0 => r.usize(0..10),
        1 => r.usize(4000..4200),
        2 => r.usize(12000..13000),
        _ => r.usize(0..40_000),
    };
    let body = (0..len).map(|_| r.alphanumeric() as u8).collect();
    (pad, chunked, body)
}

/// Random heads, bodies (up to 40 KB), framings and record splits, one connection,
/// 120 requests.
#[test]
fn random_answers_in_random_records_arrive_whole() {
    let (url, trust, conns) = server(|c, _| {
        while let Some((_, body)) = c.request() {
            let seed: u64 = String::from_utf8_lossy(&body).parse().unwrap();
            let (pad, chunked, b) = answer_for(seed);
            let mut out = format!("HTTP/1.1 200 OK\r\nx-pad: {}\r\n", "p".repeat(pad)).into_bytes();
            if chunked {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                let mut r = fastrand::Rng::with_seed(seed ^ 1);
                let mut at = 0;
                while at < b.len() {
                    let n = r.usize(1..5000).min(b.len() - at);
                    out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    out.extend_from_slice(&b[at..at + n]);
                    out.extend_from_slice(b"\r\n");
                    at += n;
                }
                out.extend_from_slice(b"0\r\n\r\n");
            } else {
                out.extend_from_slice(format!("content-length: {}\r\n\r\n", b.len()).as_bytes());
                out.extend_from_slice(&b);
            }
            let mut r = fastrand::Rng::with_seed(seed ^ 2);
            let mut at = 0;
            while at < out.len() {
                let n = match r.u8(0..3) {
                    0 => r.usize(1..50),
                    1 => r.usize(1..5000),
                    _ => r.usize(1..40000),
                }
                .min(out.len() - at);
                c.send(&out[at..at + n]);
                at += n;
                if r.u8(0..8) == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    });
    let t = transport(trust, Duration::from_secs(5));
    // 120 answers: about 2 s in a debug build (rustls unoptimised).
    for seed in 0..120u64 {
        let (_, _, want) = answer_for(seed);
        let r = post(&t, &url, seed.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
        assert!(
            r.body == want,
            "seed {seed}: {} of {} bytes",
            r.body.len(),
            want.len()
        );
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

/// A server that ignores Expect: the body goes after AWAIT_100, the answer arrives;
/// then a 103 and a 100 in one record, the answer after the body.
#[test]
fn expect_ignored_or_preceded_by_103_over_tls() {
    let (url, trust, conns) = server(|c, _| {
        let mut i = 0;
        while let Some((len, _)) = c.read_head() {
            i += 1;
            if i == 2 {
                c.send(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n");
            }
            answer_length(c, len);
        }
    });
    let t = transport(trust, Duration::from_secs(5));
    let big = vec![b'x'; (1 << 20) + 7];
    let started = Instant::now();
    let r = post(&t, &url, &big).unwrap();
    assert_eq!(r.body, big.len().to_string().as_bytes());
    assert!(started.elapsed() >= Duration::from_millis(900));
    let started = Instant::now();
    let r = post(&t, &url, &big).unwrap();
    assert_eq!(r.body, big.len().to_string().as_bytes());
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
    let r = post(&t, &url, b"{}").unwrap();
    assert_eq!(r.body, b"2");
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}
