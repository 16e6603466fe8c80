//! Edges of the non-streamed HTTP path (`src/transport/direct.rs`), scripted loopback
//! servers against `UreqTransport::send` directly: an idle connection is reused only
//! for its own origin, an early answer to a large upload is heard at once (whole or
//! split, fresh or reused connection), framing headers from the config never break
//! the request, hostile Content-Lengths are errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use keypool::{
    ApiKey, HttpRequest, TlsTrust, Transport, TransportError, TransportSettings, UreqTransport,
};

fn transport(timeout: Duration) -> UreqTransport {
    UreqTransport::new(&TransportSettings {
        label: "t".into(),
        max_concurrent: 1,
        timeout,
        connect_timeout: Duration::from_secs(2),
        max_response_bytes: 1 << 20,
        tls: TlsTrust::default(),
    })
}

/// Reads one request head: its Content-Length, or None at EOF.
fn read_head(r: &mut BufReader<TcpStream>) -> Option<(usize, String)> {
    let mut len = 0;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            return Some((len, head));
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
}

/// A loopback server for one connection, scripted by `script` (its writer, and its
/// reader for [`read_head`]); returns the URL to post to.
fn one_connection(script: impl FnOnce(TcpStream, BufReader<TcpStream>) + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/x", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let w = c.try_clone().unwrap();
        script(w, BufReader::new(c));
    });
    url
}

/// A loopback HTTP/1.1 server: each request's body goes to `answer`, whose bytes are
/// the response's body (every connection kept alive).
fn serve(answer: impl Fn(&[u8]) -> Vec<u8> + Send + Sync + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1/x", l.local_addr().unwrap());
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let mut r = BufReader::new(c);
                while let Some((len, _)) = read_head(&mut r) {
                    let mut b = vec![0; len];
                    if r.read_exact(&mut b).is_err() {
                        return;
                    }
                    let out = answer(&b);
                    let _ = write!(
                        w,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                        out.len()
                    );
                    let _ = w.write_all(&out);
                }
            });
        }
    });
    url
}

/// A server that answers every request on every connection with `who` as the body,
/// and counts them.
fn named_server(who: &'static str) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s2 = seen.clone();
    let url = serve(move |_| {
        s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        who.as_bytes().to_vec()
    });
    (url, seen)
}

fn post(
    t: &UreqTransport,
    url: &str,
    body: &[u8],
    headers: &[(String, String)],
) -> Result<keypool::HttpResponse, TransportError> {
    let key = ApiKey::new("sk-review-secret");
    t.send(&HttpRequest {
        url,
        key: &key,
        headers,
        body,
        timeout: Duration::from_secs(5),
    })
}

/// The idle pool is one list per transport, not per origin: a request to B goes out
/// on A's idle connection (with its Authorization header) and A's answer comes back.
#[test]
fn an_idle_connection_is_only_reused_for_its_own_origin() {
    let (a, seen_a) = named_server("A");
    let (b, seen_b) = named_server("B");
    let t = transport(Duration::from_secs(5));
    let r = post(&t, &a, b"{}", &[]).unwrap();
    assert_eq!(r.body, b"A");
    let r = post(&t, &b, b"{}", &[]).unwrap();
    let got = String::from_utf8_lossy(&r.body).into_owned();
    let (na, nb) = (
        seen_a.load(std::sync::atomic::Ordering::SeqCst),
        seen_b.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert_eq!(
        (got.as_str(), na, nb),
        ("B", 1, 1),
        "request to B answered by {got}; A saw {na}, B saw {nb}"
    );
}

/// A reused connection, a large body (Expect: 100-continue), and an early answer whose
/// status line arrives before the rest of its head: `await_100` never reads again
/// (`maybe_await_input` sees old `progress` and unconsumed input), spins for the whole
/// AWAIT_100 second, then uploads the body the server refused.
#[test]
fn a_split_early_answer_on_a_reused_connection_is_heard_at_once() {
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let url = one_connection(move |mut w, mut r| {
        // Request 1: small, answered, kept alive.
        let (len, _) = read_head(&mut r).unwrap();
        let mut b = vec![0; len];
        r.read_exact(&mut b).unwrap();
        w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .unwrap();
        // Request 2: the head only; the 413 in two writes.
        let (_, _) = read_head(&mut r).unwrap();
        w.write_all(b"HTTP/1.1 413 Payload Too Large\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        w.write_all(b"content-length: 0\r\nconnection: close\r\n\r\n")
            .unwrap();
        // Count what arrives of the body we refused, for 2 s.
        r.get_ref()
            .set_read_timeout(Some(Duration::from_millis(2000)))
            .unwrap();
        let mut n = 0;
        let mut buf = [0u8; 65536];
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(2000) {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        let _ = tx.send(n);
    });
    let t = transport(Duration::from_secs(5));
    assert_eq!(post(&t, &url, b"{}", &[]).unwrap().body, b"ok");
    let big = vec![b'x'; 2 << 20];
    let started = Instant::now();
    let r = post(&t, &url, &big, &[]);
    let took = started.elapsed();
    let uploaded = rx.recv().unwrap();
    assert_eq!(
        r.as_ref().map(|r| r.status).ok(),
        Some(413),
        "{:?}",
        r.err()
    );
    assert!(
        took < Duration::from_millis(500) && uploaded == 0,
        "413 after {took:?}, {uploaded} body bytes uploaded after it"
    );
}

/// Edge cases that must work (checked, for the report): close-delimited, chunked
/// ended by `0\r\n` then FIN, 204 then reuse, 103 before 200, a hostile
/// Content-Length.
#[test]
fn body_edge_cases() {
    fn serve(script: &'static [&'static [u8]], close: bool) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/x", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let mut w = c.try_clone().unwrap();
                let mut r = BufReader::new(c);
                for part in script {
                    let Some((len, _)) = read_head(&mut r) else {
                        return;
                    };
                    let mut b = vec![0; len];
                    let _ = r.read_exact(&mut b);
                    let _ = w.write_all(part);
                }
                if close {
                    let _ = w.shutdown(std::net::Shutdown::Both);
                } else {
                    std::thread::sleep(Duration::from_secs(3));
                }
            }
        });
        url
    }
    let t = transport(Duration::from_secs(3));
    let u = serve(&[b"HTTP/1.1 200 OK\r\n\r\nclose-delimited"], true);
    assert_eq!(post(&t, &u, b"{}", &[]).unwrap().body, b"close-delimited");
    let t = transport(Duration::from_secs(3));
    let u = serve(
        &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"],
        true,
    );
    assert_eq!(post(&t, &u, b"{}", &[]).unwrap().body, b"abc");
    let t = transport(Duration::from_secs(3));
    let u = serve(
        &[
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ],
        false,
    );
    assert_eq!(post(&t, &u, b"{}", &[]).unwrap().status, 204);
    let r = post(&t, &u, b"{}", &[]).unwrap();
    assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]));
    let t = transport(Duration::from_secs(3));
    let u = serve(
        &[b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\n\r\nxxxx"],
        true,
    );
    let e = post(&t, &u, b"{}", &[]).unwrap_err();
    assert!(format!("{e:?}").contains("Failed"), "{e:?}");
    let t = transport(Duration::from_secs(3));
    let u = serve(
        &[b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\nxxxx"],
        true,
    );
    let e = post(&t, &u, b"{}", &[]).unwrap_err();
    assert!(!format!("{e:?}").contains("sk-review-secret"), "{e:?}");
}

/// A header the config allows (`transfer-encoding: chunked`): ureq's agent chunked
/// the body; direct.rs fails every request with it.
#[test]
fn a_transfer_encoding_header_from_config() {
    let (a, _) = named_server("A");
    let t = transport(Duration::from_secs(5));
    let r = post(
        &t,
        &a,
        b"{}",
        &[("Transfer-Encoding".into(), "chunked".into())],
    );
    assert!(r.is_ok(), "{:?}", r.err());
}

/// Headers a config may carry: none may panic (errors are fine).
#[test]
fn odd_headers_never_panic() {
    let (a, _) = named_server("A");
    let t = transport(Duration::from_secs(2));
    for (k, v) in [
        ("content-length", "abc"),
        ("content-length", "1"),
        ("content-length", "99"),
        ("host", ""),
        ("connection", "close"),
        ("connection", "upgrade"),
        ("expect", "100-continue"),
        ("expect", "nonsense"),
        ("transfer-encoding", "gzip"),
        ("te", "trailers"),
        ("upgrade", "h2c"),
    ] {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            post(&t, &a, b"{}", &[(k.into(), v.into())])
        }));
        println!(
            "{k}: {v} -> {:?}",
            r.as_ref().map(|r| r.as_ref().map(|r| r.status))
        );
        assert!(r.is_ok(), "{k}: {v} panicked");
    }
}

/// A fresh connection, a large body (Expect: 100-continue), and a whole early answer
/// in one segment from a server that keeps the connection open (as RFC 9110 allows:
/// it will read and discard the body if one comes): `await_100` has the answer in
/// the buffer, but `recv_response`'s `maybe_await_input` sees `progress == false`
/// (nothing was consumed) and blocks on the socket until the deadline.
#[test]
fn a_whole_early_answer_on_an_open_connection_is_heard_at_once() {
    let url = one_connection(|mut w, mut r| {
        let _ = read_head(&mut r).unwrap();
        w.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
            .unwrap();
        // Discard whatever comes, keep the connection open.
        let mut buf = [0u8; 65536];
        r.get_ref()
            .set_read_timeout(Some(Duration::from_secs(4)))
            .unwrap();
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    let t = transport(Duration::from_secs(2));
    let key = ApiKey::new("sk-review-secret");
    let big = vec![b'x'; 2 << 20];
    let started = Instant::now();
    let r = t.send(&HttpRequest {
        url: &url,
        key: &key,
        headers: &[],
        body: &big,
        timeout: Duration::from_secs(2),
    });
    let took = started.elapsed();
    assert_eq!(
        r.as_ref().map(|r| r.status).ok(),
        Some(401),
        "{:?} after {took:?}",
        r.err()
    );
    assert!(took < Duration::from_millis(500), "{took:?}");
}

/// A server that answers each request with its body, echoed.
fn echo_server() -> String {
    serve(|body| body.to_vec())
}

/// The request head and the body's first piece share the output buffer (4 KiB): every
/// split of head and body around its size arrives whole, on one reused connection, with
/// a short head and with one that nearly fills the buffer alone.
#[test]
fn heads_and_bodies_around_the_output_buffer_arrive_whole() {
    let url = echo_server();
    let t = transport(Duration::from_secs(5));
    for head_pad in [0usize, 3_600, 4_000] {
        let headers = if head_pad == 0 {
            Vec::new()
        } else {
            vec![("x-pad".to_owned(), "p".repeat(head_pad))]
        };
        for len in [1usize, 100, 3_500, 4_095, 4_096, 4_097, 8_192, 20_000] {
            let body: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let r = post(&t, &url, &body, &headers)
                .unwrap_or_else(|e| panic!("pad {head_pad}, body {len}: {e:?}"));
            assert_eq!(r.status, 200);
            assert!(
                r.body == body,
                "pad {head_pad}, body {len}: echoed {} bytes",
                r.body.len()
            );
        }
    }
}

/// A server that answers a large upload's head with `interim` (informational answers),
/// then reads the body and answers 200 `ok`. Returns the answer's body and how long the
/// upload took.
fn upload_after(interim: &'static [u8]) -> (Vec<u8>, Duration) {
    let url = one_connection(move |mut w, mut r| {
        let Some((len, _)) = read_head(&mut r) else {
            return;
        };
        w.write_all(interim).unwrap();
        let mut b = vec![0; len];
        r.read_exact(&mut b).unwrap();
        w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
    });
    let t = transport(Duration::from_secs(5));
    let big = vec![b'x'; (1 << 20) + 7];
    let started = Instant::now();
    let r = post(&t, &url, &big, &[]).unwrap();
    (r.body, started.elapsed())
}

/// A 103 and the 100 Continue in one segment: the body goes at once (the 100 is
/// already in the buffer), not after AWAIT_100.
#[test]
fn a_103_and_100_in_one_segment_send_the_body_at_once() {
    let (body, took) =
        upload_after(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n");
    assert_eq!(body, b"ok");
    assert!(took < Duration::from_millis(500), "{took:?}");
}

/// A real 103 (with a Link header) then 100 Continue: ureq-proto's `try_read_100`
/// parses with room for no header and would take the 103 for a final answer, the body
/// never sent (the server waits for it: the attempt times out).
#[test]
fn a_103_with_a_link_header_before_the_100_does_not_stall_the_upload() {
    let (body, took) = upload_after(
        b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n",
    );
    assert_eq!(body, b"ok");
    assert!(took < Duration::from_millis(500), "{took:?}");
}
