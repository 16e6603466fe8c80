//! The only HTTP code: the [`Transport`] trait and its `ureq` implementation.
//!
//! Each key gets its own transport (for ureq: its own `Agent`, so its own keep-alive
//! connection pool sized to the key's worker count). Tests and benchmarks can plug in
//! a transport that never touches the network with [`Pool::with_transport`](crate::Pool::with_transport).
//!
//! The HTTP layer: this trait and error masking (here), [`UreqTransport`]
//! (`ureq_agent`), keypool's TCP layer under ureq (`lean_tcp`), TLS trust (`tls`), and
//! the bounded reader of server-sent events a streamed answer arrives in ([`sse`]).
//!
//! May use: `api`.

use std::sync::Arc;
use std::time::Duration;

use crate::config::ApiKey;
use crate::error::TimeoutPhase;

/// One HTTP POST, as handed to a [`Transport`].
pub struct HttpRequest<'a> {
    /// Full URL (base URL + path).
    pub url: &'a str,
    /// The key, to send as `Authorization: Bearer …`.
    pub key: &'a ApiKey,
    /// Pool, key and request headers, in that order (later ones override).
    pub headers: &'a [(String, String)],
    /// JSON body.
    pub body: &'a [u8],
    /// Time allowed for this attempt: the configured attempt timeout, or less when the
    /// request's deadline is nearer.
    pub timeout: Duration,
}

impl std::fmt::Debug for HttpRequest<'_> {
    /// Header values and the body are left out (they may carry secrets); the key is
    /// redacted by `ApiKey`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRequest")
            .field("url", &self.url)
            .field("key", self.key)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("body_len", &self.body.len())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What a [`Transport`] got back. Any status is a response, not an error.
#[derive(Debug, Clone, Default)]
pub struct HttpResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers worth keeping, lowercase names.
    pub headers: Vec<(String, String)>,
    /// Body bytes (at most the configured limit).
    pub body: Vec<u8>,
}

/// A streamed HTTP response ([`Transport::send_stream`]): status and headers now, the
/// body as it arrives.
pub struct HttpStream {
    /// HTTP status.
    pub status: u16,
    /// Headers worth keeping, lowercase names.
    pub headers: Vec<(String, String)>,
    /// The body, read as it arrives. A read that waits longer than the idle timeout (or
    /// past the attempt's timeout) must fail with an `io::Error` of kind `TimedOut`.
    /// Dropping it abandons the response (the connection is not reused).
    pub body: Box<dyn std::io::Read + Send>,
}

impl std::fmt::Debug for HttpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpStream")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

/// Why a transport got no response. More reasons may be added: a `match` needs a
/// wildcard arm.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportError {
    /// A phase timed out.
    Timeout(TimeoutPhase),
    /// Connection refused or reset, DNS, cut-short or oversized body, …
    Failed(String),
    /// The TLS handshake failed: the server's certificate is not trusted or not valid
    /// for its name, or the server refused the client's. The endpoint's fault, not the
    /// key's: the request is not retried on other keys.
    Tls(String),
    /// The proxy (`ALL_PROXY`, `HTTPS_PROXY` or `HTTP_PROXY`) refused to open a tunnel
    /// to the endpoint for a reason no retry changes: `407` (it wants credentials) or
    /// `403` (its policy). Not the key's fault: the request is not retried on other
    /// keys. (A proxy that cannot reach the endpoint, `502` or `504`, is a
    /// [`Self::Failed`], retried.)
    Proxy(String),
}

/// Settings a transport is built from, one per key.
#[derive(Debug, Clone)]
pub struct TransportSettings {
    /// The key's label.
    pub label: String,
    /// The key's worker count (size the connection pool to it).
    pub max_concurrent: usize,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Largest response body to read.
    pub max_response_bytes: u64,
    /// Roots to trust and the client certificate, for `https://`.
    pub tls: TlsTrust,
}

/// Sends one HTTP POST and returns the response, whatever its status.
///
/// Implementations must be thread-safe: all of a key's workers share one.
pub trait Transport: Send + Sync {
    /// Performs the request.
    fn send(&self, req: &HttpRequest<'_>) -> Result<HttpResponse, TransportError>;

    /// Performs the request and returns as soon as the response headers arrive, with
    /// the body to be read as it streams in (server-sent events). `idle_timeout` bounds
    /// each wait for more data, including the wait for the headers; `req.timeout` bounds
    /// the whole attempt, body included.
    ///
    /// The default implementation refuses: a custom transport that does not override it
    /// cannot serve [`Pool::submit_stream`](crate::Pool::submit_stream) requests (they
    /// fail with [`Error::Transport`](crate::Error::Transport) and are not retried
    /// elsewhere more than any transport failure).
    fn send_stream(
        &self,
        req: &HttpRequest<'_>,
        idle_timeout: Option<Duration>,
    ) -> Result<HttpStream, TransportError> {
        let _ = (req, idle_timeout);
        Err(TransportError::Failed(
            "this transport does not support streaming (Transport::send_stream)".to_owned(),
        ))
    }

    /// Performs a `GET` of `req.url` (the body is ignored) with the key as a bearer
    /// token and reads at most `max_bytes` of the answer. Used for the credit check
    /// (`credits.check`, `GET {base_url}/key`).
    ///
    /// The default implementation refuses: with a custom transport that does not
    /// override it, credit checks are skipped (never park a key).
    fn get(&self, req: &HttpRequest<'_>, max_bytes: u64) -> Result<HttpResponse, TransportError> {
        let _ = (req, max_bytes);
        Err(TransportError::Failed(
            "this transport does not support GET (Transport::get)".to_owned(),
        ))
    }
}

/// Builds one transport per key.
pub type TransportFactory = Arc<dyn Fn(&TransportSettings) -> Arc<dyn Transport> + Send + Sync>;

pub(crate) mod cancel;
mod direct;
mod lean_tcp;
mod lean_tls;
pub(crate) mod sse;
mod tls;
mod ureq_agent;

pub use tls::TlsTrust;
pub use ureq_agent::UreqTransport;

/// Replaces the request's key and its URL's userinfo secret in an error message: an
/// error text may quote the URL, and nothing guarantees it never quotes a header.
fn mask_error(e: TransportError, req: &HttpRequest<'_>) -> TransportError {
    match e {
        TransportError::Failed(m) => TransportError::Failed(mask_message(m, req)),
        TransportError::Tls(m) => TransportError::Tls(mask_message(m, req)),
        TransportError::Proxy(m) => TransportError::Proxy(mask_message(m, req)),
        other => other,
    }
}

fn mask_message(m: String, req: &HttpRequest<'_>) -> String {
    let secrets = std::iter::once((req.key.expose().to_owned(), "[REDACTED]".to_owned())).chain(
        crate::body::url_secrets(req.url)
            .into_iter()
            .map(|s| (s, "[REDACTED]".to_owned())),
    );
    crate::body::Masker::new(secrets).mask_str(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback HTTP/1.1 server: answers `/big` with 2,000 bytes, anything else with
    /// `{}`, and reports each request's `authorization` header.
    fn tiny_server() -> (String, std::sync::mpsc::Receiver<String>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut w = conn;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let big = line.contains("/big");
                        let (mut len, mut auth) = (0usize, String::new());
                        loop {
                            let mut h = String::new();
                            r.read_line(&mut h).unwrap();
                            if h == "\r\n" {
                                break;
                            }
                            let (k, v) = h.split_once(':').unwrap();
                            match k.to_ascii_lowercase().as_str() {
                                "content-length" => len = v.trim().parse().unwrap(),
                                "authorization" => auth = v.trim().to_owned(),
                                _ => {}
                            }
                        }
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).unwrap();
                        let _ = tx.send(auth);
                        let reply = if big { "x".repeat(2000) } else { "{}".into() };
                        write!(
                            w,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{reply}",
                            reply.len()
                        )
                        .unwrap();
                    }
                });
            }
        });
        (url, rx)
    }

    #[test]
    fn cached_url_and_key_follow_the_request_and_the_limit_holds() {
        let (url, seen) = tiny_server();
        let t = UreqTransport::new(&TransportSettings {
            label: "t".into(),
            max_concurrent: 1,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            max_response_bytes: 1000,
            tls: TlsTrust::default(),
        });
        let send = |path: &str, key: &ApiKey| {
            t.send(&HttpRequest {
                url: &format!("{url}{path}"),
                key,
                headers: &[],
                body: b"{}",
                timeout: Duration::from_secs(10),
            })
        };
        let (a, b) = (ApiKey::new("sk-first"), ApiKey::new("sk-second"));
        for key in [&a, &b, &a] {
            let r = send("/v1/chat/completions", key).unwrap();
            assert_eq!((r.status, &r.body[..]), (200, &b"{}"[..]));
            assert_eq!(seen.recv().unwrap(), format!("Bearer {}", key.expose()));
        }
        // Another URL on the same transport, then a body over the limit.
        assert!(send("/v1/embeddings", &b).is_ok());
        assert_eq!(seen.recv().unwrap(), "Bearer sk-second");
        match send("/big", &a) {
            Err(TransportError::Failed(m)) => assert!(m.contains("max_response_bytes"), "{m}"),
            other => panic!("expected the size limit, got {:?}", other.map(|r| r.status)),
        }
    }

    #[test]
    fn transport_errors_are_masked() {
        let key = ApiKey::new("sk-hidden-123");
        let req = HttpRequest {
            url: "http://user:hunter2%21@127.0.0.1:1/v1/chat/completions",
            key: &key,
            headers: &[],
            body: b"{}",
            timeout: Duration::from_secs(1),
        };
        let m = mask_message(
            "cannot reach http://user:hunter2%21@127.0.0.1:1 (hunter2!) with sk-hidden-123"
                .to_owned(),
            &req,
        );
        assert_eq!(
            m,
            "cannot reach http://user:[REDACTED]@127.0.0.1:1 ([REDACTED]) with [REDACTED]"
        );
        assert_eq!(
            mask_error(TransportError::Timeout(TimeoutPhase::Connect), &req),
            TransportError::Timeout(TimeoutPhase::Connect)
        );
    }
}
