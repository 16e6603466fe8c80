//! `keypool run --metrics-addr HOST:PORT`: a minimal blocking HTTP responder on
//! `std::net` serving `GET /metrics` (the pool's `Stats::to_prometheus`) while the run
//! lasts. One thread, one connection at a time: a scrape endpoint, not a web server.
//! Every connection has short read and write timeouts, a request head is capped, and
//! the connection is closed after each answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use keypool::Pool;

/// The longest request head read (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// How long one client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves `/metrics` from `pool` on a background thread until the
/// process exits. Returns the bound address (port 0 picks a free one).
pub fn serve(addr: &str, pool: Pool) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| format!("--metrics-addr {addr}: cannot listen: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    std::thread::Builder::new()
        .name("keypool-metrics".to_owned())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &pool) {
                            log::debug!("keypool: metrics client: {e}");
                        }
                    }
                    Err(e) => {
                        log::warn!("keypool: metrics endpoint: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(|e| format!("--metrics-addr: cannot start its thread: {e}"))?;
    Ok(local)
}

/// Reads one request head and answers it.
fn answer(mut stream: TcpStream, pool: &Pool) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= MAX_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                false,
            );
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut words = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = pool.stats().to_prometheus();
            respond(&mut stream, "200 OK", &body, method == "HEAD")
        }
        ("GET" | "HEAD", _) => respond(&mut stream, "404 Not Found", "try /metrics\n", false),
        _ => respond(&mut stream, "405 Method Not Allowed", "", false),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}
