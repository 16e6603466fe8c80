//! [`UreqTransport`], the default transport: plain `http://` POSTs (`send`) go through
//! the lean HTTP/1.1 client in [`super::http1`]; `https://`, proxied requests, streams
//! and `get` go through one `ureq::Agent` per key.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::http1::{self, Http1};
use super::{
    HttpRequest, HttpResponse, HttpStream, Transport, TransportError, TransportSettings, mask_error,
};
use crate::config::ApiKey;
use crate::error::TimeoutPhase;
use crate::request::is_kept_header;

/// ureq's per-connection read buffer (also the largest response header accepted).
const INPUT_BUFFER: usize = 64 * 1024;
/// ureq's per-connection write buffer.
const OUTPUT_BUFFER: usize = 16 * 1024;

/// A request URL, parsed once.
struct Parsed {
    url: String,
    uri: ureq::http::Uri,
    /// Plain `http://` and no proxy applies: sent by the lean client.
    lean: Option<http1::Target>,
}

/// The default transport: one `ureq::Agent` with keep-alive, HTTP statuses returned as
/// responses, a body size limit, connect and per-attempt timeouts.
pub struct UreqTransport {
    agent: ureq::Agent,
    proxy: Option<ureq::Proxy>,
    max_response_bytes: u64,
    attempt_timeout: Duration,
    /// The first URL sent to, parsed once (a key's requests nearly always share it).
    uri: OnceLock<Arc<Parsed>>,
    /// The lean client for plain `http://` POSTs without a proxy.
    http1: Http1,
    /// The first key's `Authorization` value, built once (marked sensitive). The key
    /// text is kept to check later requests against; it is never printed.
    auth: OnceLock<(String, ureq::http::HeaderValue)>,
}

impl std::fmt::Debug for UreqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UreqTransport")
            .field("max_response_bytes", &self.max_response_bytes)
            .field("attempt_timeout", &self.attempt_timeout)
            .finish_non_exhaustive()
    }
}

impl UreqTransport {
    /// Builds the agent for one key.
    pub fn new(s: &TransportSettings) -> UreqTransport {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Per-phase timeouts rather than `timeout_global`: measured here, a global
            // timeout made each call ~4x more expensive in CPU (benches/keypool.rs [2]).
            .timeout_connect(Some(s.connect_timeout))
            .timeout_send_request(Some(s.timeout))
            .timeout_send_body(Some(s.timeout))
            .timeout_recv_response(Some(s.timeout))
            .timeout_recv_body(Some(s.timeout))
            .max_idle_connections_per_host(s.max_concurrent.max(1))
            .max_idle_connections(s.max_concurrent.max(1) * 2)
            .user_agent(concat!("keypool/", env!("CARGO_PKG_VERSION")))
            // ureq's defaults are 128 KiB each, per connection: allocations at glibc's
            // mmap threshold, zeroed, faulted in page by page (benches/cpu.rs). The
            // input buffer must hold a whole response header (`max_response_header_size`,
            // 64 KiB); the output buffer only stages the request (bodies larger than it
            // go out in pieces).
            .input_buffer_size(INPUT_BUFFER)
            .max_response_header_size(INPUT_BUFFER)
            .output_buffer_size(OUTPUT_BUFFER)
            .build();
        let agent: ureq::Agent = config.into();
        UreqTransport {
            // The proxy ureq read from the environment (`ALL_PROXY`, `HTTPS_PROXY`,
            // `HTTP_PROXY`, lowercase too, and `NO_PROXY`), if any.
            proxy: agent.config().proxy().cloned(),
            agent,
            max_response_bytes: s.max_response_bytes,
            attempt_timeout: s.timeout,
            http1: Http1::new(s.max_concurrent, s.connect_timeout, s.max_response_bytes),
            uri: OnceLock::new(),
            auth: OnceLock::new(),
        }
    }

    /// `req.url`, parsed once per transport while it stays the same URL.
    fn parsed(&self, url: &str) -> Result<Arc<Parsed>, TransportError> {
        if let Some(p) = self.uri.get() {
            if p.url == url {
                return Ok(p.clone());
            }
        }
        let uri: ureq::http::Uri = url
            .parse()
            .map_err(|_| TransportError::Failed("the request URL is not a valid URI".into()))?;
        // A proxy that applies to this URL: ureq keeps the request (behaviour unchanged).
        let proxied = self.proxy.as_ref().is_some_and(|p| !p.is_no_proxy(&uri));
        let lean = if proxied {
            None
        } else {
            http1::Target::from_uri(&uri)
        };
        let p = Arc::new(Parsed {
            url: url.to_owned(),
            uri,
            lean,
        });
        let _ = self.uri.set(p.clone());
        Ok(p)
    }

    fn uri(&self, url: &str) -> Result<ureq::http::Uri, TransportError> {
        Ok(self.parsed(url)?.uri.clone())
    }

    /// `Bearer <key>`, built once per transport while it stays the same key.
    fn authorization(&self, key: &ApiKey) -> Result<ureq::http::HeaderValue, TransportError> {
        if let Some((k, v)) = self.auth.get() {
            if k == key.expose() {
                return Ok(v.clone());
            }
        }
        let mut v = ureq::http::HeaderValue::try_from(format!("Bearer {}", key.expose())).map_err(
            |_| TransportError::Failed("the API key is not a valid header value".into()),
        )?;
        v.set_sensitive(true);
        let _ = self.auth.set((key.expose().to_owned(), v.clone()));
        Ok(v)
    }
}

impl Transport for UreqTransport {
    fn get(&self, req: &HttpRequest<'_>, max_bytes: u64) -> Result<HttpResponse, TransportError> {
        let mut builder = self
            .agent
            .get(req.url)
            .header("authorization", format!("Bearer {}", req.key.expose()));
        for (k, v) in req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let mut resp = builder
            .config()
            .timeout_recv_response(Some(req.timeout))
            .timeout_recv_body(Some(req.timeout))
            .build()
            .call()
            .map_err(|e| mask_error(map_ureq_error(e), req))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(max_bytes.min(self.max_response_bytes))
            .read_to_vec()
            .map_err(|e| mask_error(map_ureq_error(e), req))?;
        Ok(HttpResponse {
            status,
            headers: Vec::new(),
            body,
        })
    }

    fn send_stream(
        &self,
        req: &HttpRequest<'_>,
        idle_timeout: Option<Duration>,
    ) -> Result<HttpStream, TransportError> {
        self.stream(req, idle_timeout)
    }

    fn send(&self, req: &HttpRequest<'_>) -> Result<HttpResponse, TransportError> {
        let parsed = self.parsed(req.url).map_err(|e| mask_error(e, req))?;
        if let Some(target) = &parsed.lean {
            return self.http1.send(target, req).map_err(|e| mask_error(e, req));
        }
        let builder = self.builder(req)?;
        // Only an attempt cut short by the request's deadline pays for a per-request config.
        let builder = if req.timeout < self.attempt_timeout {
            builder
                .config()
                .timeout_recv_response(Some(req.timeout))
                .timeout_recv_body(Some(req.timeout))
                .build()
        } else {
            builder
        };
        let mut resp = builder
            .send(req.body)
            .map_err(|e| mask_error(map_ureq_error(e), req))?;
        let status = resp.status().as_u16();
        let headers = kept_headers(resp.headers());
        // Sized from Content-Length (within the limit): no regrowth while reading.
        let hint = resp
            .body()
            .content_length()
            .unwrap_or(0)
            .min(self.max_response_bytes)
            .min(1 << 20);
        let mut body = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
        std::io::Read::read_to_end(
            &mut resp
                .body_mut()
                .with_config()
                .limit(self.max_response_bytes)
                .reader(),
            &mut body,
        )
        .map_err(|e| mask_error(map_io_error(e), req))?;
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}

impl UreqTransport {
    fn builder(
        &self,
        req: &HttpRequest<'_>,
    ) -> Result<ureq::RequestBuilder<ureq::typestate::WithBody>, TransportError> {
        let mut builder = self
            .agent
            .post(self.uri(req.url)?)
            .header(
                ureq::http::header::AUTHORIZATION,
                self.authorization(req.key)?,
            )
            .header(
                ureq::http::header::CONTENT_TYPE,
                ureq::http::HeaderValue::from_static("application/json"),
            );
        for (k, v) in req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        Ok(builder)
    }
}

/// The streaming half of [`UreqTransport`]: `send_stream` is implemented here so the
/// blocking `send` above stays untouched.
impl UreqTransport {
    fn stream(
        &self,
        req: &HttpRequest<'_>,
        idle: Option<Duration>,
    ) -> Result<HttpStream, TransportError> {
        let builder = self
            .builder(req)?
            .header("accept", "text/event-stream")
            .config()
            .timeout_recv_response(Some(req.timeout))
            .timeout_recv_body(Some(req.timeout))
            .timeout_per_read(idle)
            .build();
        let resp = builder
            .send(req.body)
            .map_err(|e| mask_error(map_ureq_error(e), req))?;
        let status = resp.status().as_u16();
        let headers = kept_headers(resp.headers());
        let body = resp.into_body().into_reader();
        Ok(HttpStream {
            status,
            headers,
            body: Box::new(TimeoutsAsTimedOut(body)),
        })
    }
}

/// Turns ureq's timeout errors (wrapped in `io::Error::other`) into `TimedOut` errors,
/// as [`HttpStream::body`] promises.
struct TimeoutsAsTimedOut<R>(R);

impl<R: std::io::Read> std::io::Read for TimeoutsAsTimedOut<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            let timed_out = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<ureq::Error>())
                .is_some_and(|u| matches!(u, ureq::Error::Timeout(_)));
            if timed_out {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out reading the stream")
            } else {
                e
            }
        })
    }
}

/// A body read error, as `read_to_vec` would have returned it: ureq's own error when
/// it wraps one (timeouts, the size limit).
fn map_io_error(e: std::io::Error) -> TransportError {
    map_ureq_error(ureq::Error::from(e))
}

fn map_ureq_error(e: ureq::Error) -> TransportError {
    match e {
        ureq::Error::Timeout(t) => TransportError::Timeout(match t {
            ureq::Timeout::Connect | ureq::Timeout::Resolve => TimeoutPhase::Connect,
            // Only streams set a per-read timeout (`stream_idle_timeout_ms`).
            ureq::Timeout::PerRead => TimeoutPhase::StreamIdle,
            _ => TimeoutPhase::Attempt,
        }),
        ureq::Error::BodyExceedsLimit(n) => TransportError::Failed(format!(
            "response body exceeds the {n}-byte limit (max_response_bytes)"
        )),
        // ureq errors describe the connection or the URL (which may carry a password
        // in its userinfo): `mask_error` scrubs them.
        other => TransportError::Failed(other.to_string()),
    }
}

/// The response headers worth keeping (`is_kept_header`), lowercase names; values that
/// are not visible ASCII are dropped.
fn kept_headers(h: &ureq::http::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .filter(|(k, _)| is_kept_header(k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}
