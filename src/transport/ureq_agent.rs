//! [`UreqTransport`], the default transport: a key's `ureq::Agent`s (one per call in
//! progress, sharing one configuration and DNS cache) serve every request, `http://`
//! and `https://` alike (TLS is a layer under the same HTTP/1.1
//! connection, framing and timeout code). ureq probes an idle keep-alive connection
//! before reusing it (stale bytes or end-of-file: dropped), never sends a request
//! twice, resolves names within the connect timeout, and bounds each call by one
//! absolute deadline (`timeout_global`) across resolve, connect, write and every read.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::{
    HttpRequest, HttpResponse, HttpStream, Transport, TransportError, TransportSettings, mask_error,
};
use crate::config::ApiKey;
use crate::error::TimeoutPhase;
use crate::request::is_kept_header;

/// ureq's per-connection read buffer (also the largest response header accepted; over
/// TLS the most keypool's TLS layer grows it to, from 4 KiB, `lean_tls::GrowBuffers`). With
/// [`OUTPUT_BUFFER`] and rustls's own (4 KiB while idle) this is most of a connection's
/// heap: 12 KiB holds any LLM API's response head (1–3 KiB in practice; nginx proxies
/// at most `proxy_buffer_size`, 4–8 KiB) and ureq's 10 KiB scratch space for writing a
/// request (`LazyBuffers::tmp_and_output`, which grows this buffer to it anyway).
const INPUT_BUFFER: usize = 12 * 1024;
/// ureq's per-connection write buffer: it must hold the request's longest header line;
/// larger request bodies go out in pieces (over TLS one record each, all corked into
/// one write while they fit [`super::lean_tcp::CORK_LIMIT`]).
const OUTPUT_BUFFER: usize = 4 * 1024;
/// A request body at least this large is sent with `Expect: 100-continue`: a server
/// that answers before reading it (413, 401, as nginx's `client_max_body_size` does)
/// is heard instead of cutting the upload short with a reset.
const EXPECT_CONTINUE_FROM: usize = 1 << 20;
/// How long a large upload waits for `100 Continue` (or an early answer) before it
/// goes anyway, for servers that ignore `Expect`.
pub(super) const AWAIT_100: Duration = Duration::from_millis(1000);
/// The largest response head accepted: one byte under the input buffer, so a head that
/// fills the whole buffer is "too big" (ureq checks `>`), not a read with no room that
/// looks like the peer disconnecting.
pub(super) const MAX_RESPONSE_HEAD: usize = INPUT_BUFFER - 1;
/// The `User-Agent` every request carries.
const USER_AGENT: &str = concat!("keypool/", env!("CARGO_PKG_VERSION"));

/// How long a resolved host name is reused (curl's default DNS cache time).
const DNS_TTL: Duration = Duration::from_secs(60);

/// ureq's resolver behind a one-entry cache. ureq resolves the host before every call,
/// even one that then reuses a pooled connection, and with a resolve timeout each
/// resolution runs on a new thread (so it can be abandoned at the timeout): without
/// the cache that is a thread and a `getaddrinfo` per request. IP literals are never
/// looked up. (`ureq::unversioned`: pinned by Cargo.lock, may change in a minor ureq.)
#[derive(Debug, Default)]
struct CachingResolver {
    inner: ureq::unversioned::resolver::DefaultResolver,
    /// Scheme and authority, when resolved, the addresses.
    last: parking_lot::Mutex<Option<(String, std::time::Instant, Addrs)>>,
}

type Addrs = ureq::unversioned::resolver::ResolvedSocketAddrs;

impl ureq::unversioned::resolver::Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<Addrs, ureq::Error> {
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return self.inner.resolve(uri, config, timeout);
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if let (Ok(ip), Some(port)) = (
            host.parse::<std::net::IpAddr>(),
            authority.port_u16().or(match scheme {
                "http" => Some(80),
                "https" => Some(443),
                _ => None,
            }),
        ) {
            let mut addrs = self.inner.empty();
            addrs.truncate(0);
            addrs.push(std::net::SocketAddr::new(ip, port));
            return Ok(addrs);
        }
        if let Some((key, at, addrs)) = &*self.last.lock() {
            if at.elapsed() < DNS_TTL
                && key.len() == scheme.len() + authority.as_str().len()
                && key.starts_with(scheme)
                && key.ends_with(authority.as_str())
            {
                return Ok(addrs.clone());
            }
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        *self.last.lock() = Some((
            format!("{scheme}{}", authority.as_str()),
            std::time::Instant::now(),
            addrs.clone(),
        ));
        Ok(addrs)
    }
}

/// A request URL, parsed once.
struct Parsed {
    url: String,
    uri: ureq::http::Uri,
    /// The `Host` header for it, as ureq-proto would write it (the port only when it is
    /// not the scheme's default), built once: ureq-proto builds it per request (an
    /// allocation, and a `format!` for a port) unless the request carries one.
    host: Option<ureq::http::HeaderValue>,
}

/// `uri`'s `Host` header value: its host, with the port when it is not the scheme's
/// default (`ureq_proto`'s `maybe_with_port`).
fn host_header(uri: &ureq::http::Uri) -> Option<ureq::http::HeaderValue> {
    let host = uri.host()?;
    let default = match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") | None => Some(80),
        Some(_) => None,
    };
    let value = match uri.port_u16() {
        Some(port) if Some(port) != default => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    ureq::http::HeaderValue::from_str(&value).ok()
}

/// A key's resolver, shared by its agents ([`Agents`]).
#[derive(Debug)]
struct SharedResolver(Arc<CachingResolver>);

impl ureq::unversioned::resolver::Resolver for SharedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<Addrs, ureq::Error> {
        self.0.resolve(uri, config, timeout)
    }
}

/// A key's `ureq::Agent`s: one per call in progress, each with at most one idle
/// keep-alive connection, taken from and returned to a free list. ureq's connection
/// pool looks for a connection and purges by walking its idle list (with a host-key
/// comparison per entry, and a pass per host) twice per call: with one agent shared by
/// a key's 16 workers that walk was about a tenth of the instructions of a request over
/// TLS (`benches/cpu.rs --callgrind 3000 --tls`). A worker takes the agent it last
/// returned (last in, first out), so it usually finds its own connection; the key's
/// connections stay as many as its calls in progress, each probed before reuse as
/// before. The agents share one configuration, connector chain settings and DNS cache.
struct Agents {
    free: parking_lot::Mutex<Vec<ureq::Agent>>,
    /// The key's idle connections for `send` ([`super::direct`]), which does not go
    /// through an agent.
    idle: super::direct::Idle,
    /// How many of them to keep (the key's worker count).
    max_idle: usize,
    connect_timeout: Duration,
    config: ureq::config::Config,
    tls: Arc<rustls::ClientConfig>,
    resolver: Arc<CachingResolver>,
}

impl Agents {
    fn take(self: &Arc<Self>) -> AgentLease {
        let agent = self.free.lock().pop().unwrap_or_else(|| self.build());
        AgentLease {
            agents: self.clone(),
            agent: Some(agent),
        }
    }

    fn build(&self) -> ureq::Agent {
        // ureq's default chain with its TCP layer replaced by `LeanTcpConnector`
        // (corked output, one-syscall probe, lazy socket timeouts): HTTP CONNECT
        // proxies, then TCP, then rustls for https://.
        // keypool's TLS layer over it (rustls driven over the socket itself), and
        // ureq's rustls for connections through a proxy.
        use ureq::unversioned::transport::{
            ConnectProxyConnector, Connector as _, RustlsConnector,
        };
        let connector = ()
            .chain(ConnectProxyConnector::default())
            .chain(super::lean_tcp::LeanTcpConnector)
            .chain(super::lean_tls::LeanTlsConnector {
                config: self.tls.clone(),
            })
            .chain(RustlsConnector::default());
        ureq::Agent::with_parts(
            self.config.clone(),
            connector,
            SharedResolver(self.resolver.clone()),
        )
    }
}

/// An agent taken for one call (a stream's: until its body is dropped), returned to
/// the free list on drop.
struct AgentLease {
    agents: Arc<Agents>,
    agent: Option<ureq::Agent>,
}

impl AgentLease {
    fn agent(&self) -> &ureq::Agent {
        self.agent.as_ref().expect("an agent until dropped")
    }
}

impl Drop for AgentLease {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            self.agents.free.lock().push(agent);
        }
    }
}

/// The default transport: `ureq::Agent`s with keep-alive (one per call in progress,
/// [`Agents`]), HTTP statuses returned as responses, a body size limit, a connect
/// timeout and one deadline per attempt.
pub struct UreqTransport {
    agents: Arc<Agents>,
    max_response_bytes: u64,
    attempt_timeout: Duration,
    /// The first URL sent to, parsed once (a key's requests nearly always share it).
    uri: OnceLock<Arc<Parsed>>,
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
            // One absolute deadline per call: resolve, connect, send and every read
            // share it (a per-request `timeout_global` when the request's deadline is
            // nearer). Name resolution runs within the connect timeout too.
            .timeout_global(Some(s.timeout))
            .timeout_resolve(Some(s.connect_timeout))
            .timeout_connect(Some(s.connect_timeout))
            .timeout_await_100(Some(AWAIT_100))
            // Per agent, and an agent serves one call at a time (`Agents`).
            .max_idle_connections_per_host(1)
            .max_idle_connections(2)
            .user_agent(USER_AGENT)
            .tls_config(s.tls.config.clone())
            // ureq's defaults are 128 KiB each, per connection and per layer (TCP and
            // TLS): allocations at glibc's mmap threshold, zeroed, faulted in page by
            // page (benches/cpu.rs --memory). The input buffer must hold a whole
            // response header (`max_response_header_size`); the output buffer only
            // stages the request (bodies larger than it go out in pieces).
            .input_buffer_size(INPUT_BUFFER)
            .max_response_header_size(MAX_RESPONSE_HEAD)
            .output_buffer_size(OUTPUT_BUFFER)
            .build();
        // Agents (for streams, GETs and proxied requests) are built when first needed.
        let agents = Arc::new(Agents {
            free: parking_lot::Mutex::new(Vec::new()),
            idle: super::direct::Idle::default(),
            max_idle: s.max_concurrent.max(1),
            connect_timeout: s.connect_timeout,
            config,
            tls: s.tls.rustls.clone(),
            resolver: Arc::new(CachingResolver::default()),
        });
        UreqTransport {
            agents,
            max_response_bytes: s.max_response_bytes,
            attempt_timeout: s.timeout,
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
        let p = Arc::new(Parsed {
            url: url.to_owned(),
            host: host_header(&uri),
            uri,
        });
        let _ = self.uri.set(p.clone());
        Ok(p)
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
        let lease = self.agents.take();
        let mut builder = lease.agent().get(req.url);
        // An empty key sends no credentials (the key proofs' control request).
        if !req.key.expose().is_empty() {
            builder = builder.header("authorization", self.authorization(req.key)?);
        }
        for (k, v) in req.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let mut resp = builder
            .config()
            .timeout_global(Some(req.timeout))
            .build()
            .call()
            .map_err(|e| mask_error(map_ureq_error(e, req.url), req))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(max_bytes.min(self.max_response_bytes))
            .read_to_vec()
            .map_err(|e| mask_error(map_ureq_error(e, req.url), req))?;
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
        let deadline = super::direct::after(req.timeout);
        let parsed = self.parsed(req.url)?;
        if self.proxied(&parsed.uri) {
            return self.send_by_agent(req);
        }
        let a = &*self.agents;
        let opener = super::direct::Opener {
            config: &a.config,
            resolver: &*a.resolver,
            tls: &a.tls,
            connect_timeout: a.connect_timeout,
        };
        let prepared = super::direct::Prepared {
            uri: &parsed.uri,
            headers: self.headers(req, &parsed)?,
            body: req.body,
            deadline,
            max_body: self.max_response_bytes,
        };
        super::direct::post(&opener, &a.idle, a.max_idle, prepared)
            .map_err(|e| mask_error(map_ureq_error(e, req.url), req))
    }
}

impl UreqTransport {
    /// Whether requests to `uri` go through a proxy (ureq's, from the environment):
    /// those are sent by a ureq agent, whose connector chain speaks to proxies.
    fn proxied(&self, uri: &ureq::http::Uri) -> bool {
        self.agents
            .config
            .proxy()
            .is_some_and(|p| !p.is_no_proxy(uri))
    }

    /// A POST's headers for [`super::direct`]: as [`Self::builder`] sets them (the
    /// request's own headers last, each replacing one of the same name).
    fn headers(
        &self,
        req: &HttpRequest<'_>,
        parsed: &Parsed,
    ) -> Result<ureq::http::HeaderMap, TransportError> {
        use ureq::http::header;
        let mut h = ureq::http::HeaderMap::with_capacity(8 + req.headers.len());
        if let Some(host) = &parsed.host {
            h.insert(header::HOST, host.clone());
        }
        h.insert(header::AUTHORIZATION, self.authorization(req.key)?);
        h.insert(
            header::CONTENT_TYPE,
            ureq::http::HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::USER_AGENT,
            ureq::http::HeaderValue::from_static(USER_AGENT),
        );
        h.insert(header::CONTENT_LENGTH, req.body.len().into());
        if req.body.len() >= EXPECT_CONTINUE_FROM {
            h.insert(
                header::EXPECT,
                ureq::http::HeaderValue::from_static("100-continue"),
            );
        }
        for (k, v) in req.headers {
            let bad = || TransportError::Failed(format!("the header {k:?} is not valid"));
            let name = ureq::http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad())?;
            // The body is framed here (Content-Length, sent by direct.rs as one slice).
            if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
                continue;
            }
            h.insert(
                name,
                ureq::http::HeaderValue::from_str(v).map_err(|_| bad())?,
            );
        }
        Ok(h)
    }

    /// `send` through a ureq agent (a proxied request).
    fn send_by_agent(&self, req: &HttpRequest<'_>) -> Result<HttpResponse, TransportError> {
        let lease = self.agents.take();
        let builder = self.builder(lease.agent(), req)?;
        // Only an attempt cut short by the request's deadline pays for a per-request config.
        let builder = if req.timeout < self.attempt_timeout {
            builder.config().timeout_global(Some(req.timeout)).build()
        } else {
            builder
        };
        let mut resp = builder
            .send(req.body)
            .map_err(|e| mask_error(map_ureq_error(e, req.url), req))?;
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
        .map_err(|e| mask_error(map_io_error(e, req.url), req))?;
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
        agent: &ureq::Agent,
        req: &HttpRequest<'_>,
    ) -> Result<ureq::RequestBuilder<ureq::typestate::WithBody>, TransportError> {
        let mut builder = agent
            .post(self.parsed(req.url)?.uri.clone())
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
        if req.body.len() >= EXPECT_CONTINUE_FROM {
            builder = builder.header(
                ureq::http::header::EXPECT,
                ureq::http::HeaderValue::from_static("100-continue"),
            );
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
        // The agent stays taken until the stream's body is dropped: its connection is
        // in use until then.
        let lease = self.agents.take();
        let builder = self
            .builder(lease.agent(), req)?
            .header("accept", "text/event-stream")
            .config()
            .timeout_global(Some(req.timeout))
            .timeout_per_read(idle)
            .build();
        let resp = builder
            .send(req.body)
            .map_err(|e| mask_error(map_ureq_error(e, req.url), req))?;
        let status = resp.status().as_u16();
        let headers = kept_headers(resp.headers());
        let body = resp.into_body().into_reader();
        Ok(HttpStream {
            status,
            headers,
            body: Box::new(TimeoutsAsTimedOut(body, lease)),
        })
    }
}

/// Turns ureq's timeout errors (wrapped in `io::Error::other`) into `TimedOut` errors,
/// as [`HttpStream::body`] promises. Holds the stream's agent until dropped (after the
/// body, fields drop in order, so its connection is back in the agent's pool first).
struct TimeoutsAsTimedOut<R>(R, #[allow(dead_code)] AgentLease);

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
fn map_io_error(e: std::io::Error, url: &str) -> TransportError {
    map_ureq_error(ureq::Error::from(e), url)
}

fn map_ureq_error(e: ureq::Error, url: &str) -> TransportError {
    let tls = match &e {
        ureq::Error::Io(io) => super::tls::tls_failure(io),
        ureq::Error::Rustls(r) => super::tls::tls_failure(r),
        other => super::tls::tls_failure(other),
    };
    let host = || {
        url.parse::<ureq::http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .unwrap_or_default()
    };
    if let Some(reason) = tls {
        return TransportError::Tls(format!("TLS with {} failed: {reason}", host()));
    }
    if let ureq::Error::ConnectProxyFailed(reason) = &e {
        if let Some(refusal) = proxy_refusal(reason) {
            return TransportError::Proxy(format!(
                "the proxy (ALL_PROXY, HTTPS_PROXY or HTTP_PROXY) refused a tunnel to {}: {refusal}",
                host()
            ));
        }
    }
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

/// What a proxy's answer to `CONNECT` says, when it is a refusal no retry changes
/// (`403`, `407`; ureq words it "proxy server responded 407/407").
fn proxy_refusal(reason: &str) -> Option<&'static str> {
    let status = reason
        .strip_prefix("proxy server responded ")?
        .split('/')
        .next()?
        .trim()
        .parse::<u16>()
        .ok()?;
    match status {
        407 => Some(
            "407 Proxy Authentication Required (give or check the proxy's user and password in its URL: http://user:password@host:port)",
        ),
        403 => Some("403 Forbidden (the proxy's policy)"),
        _ => None,
    }
}

/// The response headers worth keeping (`is_kept_header`), lowercase names; values that
/// are not visible ASCII are dropped.
pub(super) fn kept_headers(h: &ureq::http::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .filter(|(k, _)| is_kept_header(k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{host_header, proxy_refusal};

    #[test]
    fn only_a_proxy_s_403_and_407_are_refusals() {
        assert!(
            proxy_refusal("proxy server responded 407/407")
                .unwrap()
                .starts_with("407 Proxy Authentication Required")
        );
        assert!(proxy_refusal("proxy server responded 403/403").is_some());
        for retried in [
            "proxy server responded 502/502",
            "proxy server responded 504/504",
            "proxy server did not respond",
            "proxy server responded x/407",
            "",
        ] {
            assert_eq!(proxy_refusal(retried), None, "{retried}");
        }
    }

    /// The `Host` header keypool sends itself is the one ureq-proto would have built.
    #[test]
    fn the_host_header_has_the_port_only_when_it_is_not_the_default() {
        let host =
            |u: &str| host_header(&u.parse().unwrap()).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            host("https://openrouter.ai/api/v1").as_deref(),
            Some("openrouter.ai")
        );
        assert_eq!(
            host("https://openrouter.ai:443/api/v1").as_deref(),
            Some("openrouter.ai")
        );
        assert_eq!(host("http://127.0.0.1:80/v1").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            host("http://127.0.0.1:8080/v1").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(
            host("https://localhost:8443").as_deref(),
            Some("localhost:8443")
        );
        assert_eq!(host("http://[::1]:9000/v1").as_deref(), Some("[::1]:9000"));
        assert_eq!(host("/relative"), None);
    }
}
