//! A lean blocking HTTP/1.1 client for plain `http://` POSTs ([`Transport::send`]).
//!
//! Why not ureq here: measured (benches/cpu.rs), ureq's connection pool probes every
//! connection on check-out and return (2 `ioctl` + 1 `recvfrom`) and it resets the
//! socket timeouts with `setsockopt` on every request: ~13 system calls per request.
//! This client pays one `write` and (usually) one `read`: `TCP_NODELAY` is set once at
//! connect, socket timeouts only when they must change, and an idle connection is not
//! probed — a connection the server closed while idle fails on its first write or
//! read, and the request is then sent once more on a fresh connection (only when no
//! response byte arrived, so the server cannot have answered it).
//!
//! Every server byte is untrusted: the response head is parsed by `httparse` (the parser
//! hyper uses), at most [`HEAD_LIMIT`] bytes and [`MAX_HEADERS`] headers; the body is
//! framed by one valid `Content-Length`, `Transfer-Encoding: chunked` (sizes parsed
//! without overflow, extensions and trailers bounded) or the connection's end, and never
//! read beyond `max_response_bytes`.
//!
//! [`Transport::send`]: super::Transport::send

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{HttpRequest, HttpResponse, TransportError};
use crate::error::TimeoutPhase;
use crate::request::is_kept_header;

/// The largest response head accepted (status line and headers), as with ureq before.
pub(crate) const HEAD_LIMIT: usize = 64 * 1024;
/// The most response headers accepted.
pub(crate) const MAX_HEADERS: usize = 128;
// `head_of` records kept headers' indices as bytes.
const _: () = assert!(MAX_HEADERS <= 256);
/// The longest chunk-size line (size and extensions).
const CHUNK_LINE_LIMIT: usize = 4 * 1024;
/// The most trailer bytes after the last chunk.
const TRAILER_LIMIT: usize = 64 * 1024;
/// A connection idle longer than this is closed rather than reused.
const IDLE_MAX: Duration = Duration::from_secs(30);
/// Each connection's read buffer, allocated once; it grows up to [`HEAD_LIMIT`] only for
/// a response head that does not fit.
const READ_BUFFER: usize = 8 * 1024;

/// A plain `http://` URL, parsed once per transport.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `host[:port]` as written in the URL, without userinfo: the `Host` header, and
    /// which idle connections may serve this target.
    authority: String,
    /// The host to resolve (IPv6 literals without brackets).
    host: String,
    port: u16,
    /// Path and query, `/` when empty.
    path: String,
}

impl Target {
    /// The target of an `http://` URI, or `None` for any other scheme.
    pub(crate) fn from_uri(uri: &::ureq::http::Uri) -> Option<Target> {
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let auth = uri.authority()?;
        let host = auth.host();
        if host.is_empty() {
            return None;
        }
        let written = auth.as_str();
        let authority = written.rsplit_once('@').map_or(written, |(_, a)| a);
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let path = match uri.path_and_query().map(|p| p.as_str()) {
            Some(p) if p.starts_with('/') => p.to_owned(),
            Some(p) if !p.is_empty() => format!("/{p}"),
            _ => "/".to_owned(),
        };
        Some(Target {
            authority: authority.to_owned(),
            host: bare.to_owned(),
            port: auth.port_u16().unwrap_or(80),
            path,
        })
    }
}

/// The lean client: a LIFO pool of idle keep-alive connections.
pub(crate) struct Http1 {
    idle: Mutex<Vec<Conn>>,
    max_idle: usize,
    connect_timeout: Duration,
    max_response_bytes: u64,
}

/// Why an exchange failed, and whether it may be retried on a fresh connection.
#[derive(Debug)]
pub(crate) struct Fail {
    pub(crate) err: TransportError,
    /// The connection failed before any response byte arrived, in a way a server
    /// closing an idle connection causes (write error, EOF, reset).
    stale: bool,
}

impl Fail {
    fn failed(m: String) -> Fail {
        Fail {
            err: TransportError::Failed(m),
            stale: false,
        }
    }
    fn timeout() -> Fail {
        Fail {
            err: TransportError::Timeout(TimeoutPhase::Attempt),
            stale: false,
        }
    }
}

fn limit_error(limit: u64) -> Fail {
    Fail::failed(format!(
        "response body exceeds the {limit}-byte limit (max_response_bytes)"
    ))
}

impl Http1 {
    /// A client keeping at most `max_idle` idle connections.
    pub(crate) fn new(
        max_idle: usize,
        connect_timeout: Duration,
        max_response_bytes: u64,
    ) -> Http1 {
        Http1 {
            idle: Mutex::new(Vec::with_capacity(max_idle.max(1))),
            max_idle: max_idle.max(1),
            connect_timeout,
            max_response_bytes,
        }
    }

    /// Sends `req` as a POST to `target` (errors not yet masked).
    pub(crate) fn send(
        &self,
        target: &Target,
        req: &HttpRequest<'_>,
    ) -> Result<HttpResponse, TransportError> {
        validate(req)?;
        let deadline = Instant::now().checked_add(req.timeout);
        if req.timeout.is_zero() {
            return Err(TransportError::Timeout(TimeoutPhase::Attempt));
        }
        if let Some(conn) = self.checkout(&target.authority) {
            match self.exchange(conn, target, req, deadline) {
                Ok(r) => return Ok(r),
                // The server closed this idle connection: once more on a fresh one.
                Err(f) if f.stale => {}
                Err(f) => return Err(f.err),
            }
        }
        let conn = self.connect(target, deadline)?;
        self.exchange(conn, target, req, deadline)
            .map_err(|f| f.err)
    }

    fn checkout(&self, authority: &str) -> Option<Conn> {
        let mut idle = self.idle.lock();
        while let Some(c) = idle.pop() {
            if c.authority == authority && c.idle_since.elapsed() < IDLE_MAX {
                return Some(c);
            }
        }
        None
    }

    fn checkin(&self, mut conn: Conn) {
        conn.idle_since = Instant::now();
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    fn connect(&self, target: &Target, deadline: Option<Instant>) -> Result<Conn, TransportError> {
        let start = Instant::now();
        let mut until = start + self.connect_timeout;
        if let Some(d) = deadline {
            until = until.min(d);
        }
        let addrs = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .map_err(|e| {
                TransportError::Failed(format!("cannot resolve {}: {e}", target.authority))
            })?;
        let mut last: Option<io::Error> = None;
        for addr in addrs {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout(TimeoutPhase::Connect));
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(stream) => {
                    stream.set_nodelay(true).map_err(|e| {
                        TransportError::Failed(format!("connection to {}: {e}", target.authority))
                    })?;
                    return Ok(Conn::new(stream, target.authority.clone()));
                }
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                Err(TransportError::Timeout(TimeoutPhase::Connect))
            }
            Some(e) => Err(TransportError::Failed(format!(
                "connection to {} failed: {e}",
                target.authority
            ))),
            None => Err(TransportError::Failed(format!(
                "cannot resolve {}: no address",
                target.authority
            ))),
        }
    }

    /// One request and its response on `conn`; a connection left clean is returned to
    /// the idle pool.
    fn exchange(
        &self,
        mut conn: Conn,
        target: &Target,
        req: &HttpRequest<'_>,
        deadline: Option<Instant>,
    ) -> Result<HttpResponse, Fail> {
        conn.wire.deadline = deadline;
        conn.wire.slack = (req.timeout / 8).min(Duration::from_secs(1));
        conn.wbuf.clear();
        write_request(&mut conn.wbuf, target, req);
        if let Err(e) = conn.wire.write_all(&conn.wbuf) {
            return Err(match e {
                WireError::Timeout => Fail::timeout(),
                WireError::Io(e) => Fail {
                    err: TransportError::Failed(format!("sending the request failed: {e}")),
                    stale: true,
                },
            });
        }
        if conn.wbuf.capacity() > 64 * 1024 {
            conn.wbuf = Vec::new(); // a large body: do not keep its buffer per connection
        }
        let parsed = read_response(&mut conn.wire, &mut conn.rb, self.max_response_bytes)?;
        if parsed.reusable {
            self.checkin(conn);
        }
        Ok(HttpResponse {
            status: parsed.status,
            headers: parsed.headers,
            body: parsed.body,
        })
    }
}

/// Refuses a request whose headers would not survive the wire intact (CR/LF injection).
fn validate(req: &HttpRequest<'_>) -> Result<(), TransportError> {
    if !valid_value(req.key.expose().as_bytes()) {
        return Err(TransportError::Failed(
            "the API key is not a valid header value".into(),
        ));
    }
    for (k, v) in req.headers {
        if k.is_empty() || !k.bytes().all(is_tchar) {
            return Err(TransportError::Failed(format!(
                "invalid request header name {k:?}"
            )));
        }
        if !valid_value(v.as_bytes()) {
            return Err(TransportError::Failed(format!(
                "invalid value for request header {k}"
            )));
        }
    }
    Ok(())
}

fn valid_value(v: &[u8]) -> bool {
    v.iter().all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Writes the request head and body into `out`. Later request headers override earlier
/// ones and the defaults; the framing headers are ours alone.
fn write_request(out: &mut Vec<u8>, target: &Target, req: &HttpRequest<'_>) {
    let has = |name: &str| {
        req.headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(name))
    };
    out.reserve(256 + target.path.len() + req.body.len());
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(target.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !has("host") {
        out.extend_from_slice(b"Host: ");
        out.extend_from_slice(target.authority.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has("user-agent") {
        out.extend_from_slice(
            concat!("User-Agent: keypool/", env!("CARGO_PKG_VERSION"), "\r\n").as_bytes(),
        );
    }
    out.extend_from_slice(b"Authorization: Bearer ");
    out.extend_from_slice(req.key.expose().as_bytes());
    out.extend_from_slice(b"\r\n");
    if !has("content-type") {
        out.extend_from_slice(b"Content-Type: application/json\r\n");
    }
    out.extend_from_slice(b"Content-Length: ");
    push_decimal(out, req.body.len());
    out.extend_from_slice(b"\r\n");
    for (i, (k, v)) in req.headers.iter().enumerate() {
        let overridden = req.headers[i + 1..]
            .iter()
            .any(|(l, _)| l.eq_ignore_ascii_case(k));
        let ours = ["authorization", "content-length", "transfer-encoding"]
            .iter()
            .any(|n| k.eq_ignore_ascii_case(n));
        if overridden || ours {
            continue;
        }
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(req.body);
}

/// Appends `n` in decimal (what `write!` does, without the formatting machinery).
fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// One keep-alive connection.
struct Conn {
    wire: Wire,
    rb: ReadBuf,
    wbuf: Vec<u8>,
    authority: String,
    idle_since: Instant,
}

impl Conn {
    fn new(stream: TcpStream, authority: String) -> Conn {
        Conn {
            wire: Wire {
                stream,
                read_timeout: None,
                write_timeout: None,
                deadline: None,
                slack: Duration::ZERO,
            },
            rb: ReadBuf::new(),
            wbuf: Vec::new(),
            authority,
            idle_since: Instant::now(),
        }
    }
}

/// Where response bytes come from: the socket (with the attempt's deadline), or a byte
/// slice (fuzzing, tests).
pub(crate) trait Source {
    /// Reads some bytes; `Ok(0)` at the end of the stream.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, WireError>;
}

/// A read or write failure.
#[derive(Debug)]
pub(crate) enum WireError {
    /// The attempt's deadline passed.
    Timeout,
    /// Any other I/O error.
    Io(io::Error),
}

/// The socket with the socket timeouts it currently has, so a `setsockopt` is paid only
/// when they must change.
struct Wire {
    stream: TcpStream,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    /// The attempt's end (`None`: too far to represent).
    deadline: Option<Instant>,
    /// How far past the deadline a read may block before the socket timeout is
    /// shortened (saves a `setsockopt` per read).
    slack: Duration,
}

impl Wire {
    /// The time left, or `Timeout`; `None` without a deadline.
    fn left(&self) -> Result<Option<Duration>, WireError> {
        match self.deadline {
            None => Ok(None),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(WireError::Timeout)
                } else {
                    Ok(Some(left))
                }
            }
        }
    }

    /// The socket timeout to use now, if the current one (`cur`) must change.
    fn wanted(cur: Option<Duration>, left: Option<Duration>, slack: Duration) -> Option<Duration> {
        let left = left?;
        match cur {
            Some(c) if c <= left + slack => None,
            _ => Some(left.max(Duration::from_millis(1))),
        }
    }

    fn write_all(&mut self, mut data: &[u8]) -> Result<(), WireError> {
        while !data.is_empty() {
            let left = self.left()?;
            if let Some(t) = Wire::wanted(self.write_timeout, left, self.slack) {
                self.stream
                    .set_write_timeout(Some(t))
                    .map_err(WireError::Io)?;
                self.write_timeout = Some(t);
            }
            match self.stream.write(data) {
                Ok(0) => return Err(WireError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => data = &data[n..],
                Err(e) if is_timeout(&e) => self.write_timeout = None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        Ok(())
    }
}

impl Source for Wire {
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, WireError> {
        loop {
            let left = self.left()?;
            if let Some(t) = Wire::wanted(self.read_timeout, left, self.slack) {
                self.stream
                    .set_read_timeout(Some(t))
                    .map_err(WireError::Io)?;
                self.read_timeout = Some(t);
            }
            match self.stream.read(buf) {
                Ok(n) => return Ok(n),
                // Woken early by a socket timeout shorter than the time left (set for
                // an earlier attempt): set it afresh.
                Err(e) if is_timeout(&e) => self.read_timeout = None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A byte slice as a [`Source`], handing out at most `step` bytes per read.
pub(crate) struct SliceSource<'a> {
    pub(crate) data: &'a [u8],
    pub(crate) step: usize,
}

impl Source for SliceSource<'_> {
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, WireError> {
        let n = self.data.len().min(buf.len()).min(self.step.max(1));
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// A connection's read buffer: bytes `pos..len` of `buf` are received, not yet consumed.
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    /// Bytes received in the current exchange.
    received: usize,
}

impl ReadBuf {
    pub(crate) fn new() -> ReadBuf {
        ReadBuf {
            buf: vec![0; READ_BUFFER],
            pos: 0,
            len: 0,
            received: 0,
        }
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..self.len]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.len {
            self.pos = 0;
            self.len = 0;
        }
    }

    /// Reads more bytes after the unconsumed ones, growing the buffer up to `max`
    /// unconsumed bytes. Returns how many arrived (0: the peer closed).
    fn fill<S: Source>(&mut self, src: &mut S, max: usize) -> Result<usize, Fail> {
        if self.len == self.buf.len() {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.len, 0);
                self.len -= self.pos;
                self.pos = 0;
            } else if self.buf.len() < max {
                let grown = (self.buf.len() * 2).clamp(READ_BUFFER, max);
                self.buf.resize(grown, 0);
            }
        }
        let n = match src.read_some(&mut self.buf[self.len..]) {
            Ok(n) => n,
            Err(WireError::Timeout) => return Err(Fail::timeout()),
            Err(WireError::Io(e)) => {
                let closed = matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                );
                return Err(Fail {
                    err: TransportError::Failed(format!("reading the response failed: {e}")),
                    stale: closed && self.received == 0,
                });
            }
        };
        self.len += n;
        self.received += n;
        Ok(n)
    }

    /// Fills and fails on the peer's close: `what` names what was cut short.
    fn fill_more<S: Source>(&mut self, src: &mut S, max: usize, what: &str) -> Result<(), Fail> {
        if self.fill(src, max)? == 0 {
            return Err(Fail::failed(format!(
                "the server closed the connection in the middle of the {what}"
            )));
        }
        Ok(())
    }

    /// One line (without its CR LF or LF), at most `max` bytes, consumed.
    fn line<S: Source>(&mut self, src: &mut S, max: usize, what: &str) -> Result<Vec<u8>, Fail> {
        loop {
            if let Some(i) = self.avail().iter().position(|&b| b == b'\n') {
                if i > max {
                    return Err(Fail::failed(format!(
                        "the {what} is longer than {max} bytes"
                    )));
                }
                let mut line = self.avail()[..i].to_vec();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.consume(i + 1);
                return Ok(line);
            }
            if self.avail().len() >= max {
                return Err(Fail::failed(format!(
                    "the {what} is longer than {max} bytes"
                )));
            }
            self.fill_more(src, max.max(READ_BUFFER), what)?;
        }
    }
}

/// A response read to its end.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    /// Read to its end, keep-alive, nothing extra after it: the connection may serve
    /// another request.
    pub(crate) reusable: bool,
}

enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    framing: Framing,
    keep_alive: bool,
}

/// Reads one response (after skipping 1xx interim responses) with a body of at most
/// `limit` bytes.
pub(crate) fn read_response<S: Source>(
    src: &mut S,
    rb: &mut ReadBuf,
    limit: u64,
) -> Result<Parsed, Fail> {
    rb.received = rb.len - rb.pos;
    let head = loop {
        let head = read_head(src, rb)?;
        if !(100..200).contains(&head.status) {
            break head;
        }
        if head.status == 101 {
            return Err(Fail::failed(
                "the server switched protocols (101) without being asked".into(),
            ));
        }
    };
    let body = match head.framing {
        Framing::Empty => Vec::new(),
        Framing::Length(n) => {
            if n > limit {
                return Err(limit_error(limit));
            }
            let n = usize::try_from(n).map_err(|_| limit_error(limit))?;
            // One spare byte: the C ABI terminates a success's body in place.
            let mut body = Vec::with_capacity(n.saturating_add(1).min(1 << 20));
            while body.len() < n {
                if rb.avail().is_empty() {
                    rb.fill_more(src, READ_BUFFER, "response body")?;
                }
                let take = rb.avail().len().min(n - body.len());
                body.extend_from_slice(&rb.avail()[..take]);
                rb.consume(take);
            }
            body
        }
        Framing::Chunked => read_chunked(src, rb, limit)?,
        Framing::Close => {
            let mut body = Vec::new();
            loop {
                if !rb.avail().is_empty() {
                    if (body.len() + rb.avail().len()) as u64 > limit {
                        return Err(limit_error(limit));
                    }
                    body.extend_from_slice(rb.avail());
                    let n = rb.avail().len();
                    rb.consume(n);
                }
                if rb.fill(src, READ_BUFFER)? == 0 {
                    break;
                }
            }
            body
        }
    };
    let framed = !matches!(head.framing, Framing::Close);
    Ok(Parsed {
        status: head.status,
        headers: head.headers,
        body,
        reusable: framed && head.keep_alive && rb.avail().is_empty(),
    })
}

fn read_head<S: Source>(src: &mut S, rb: &mut ReadBuf) -> Result<Head, Fail> {
    loop {
        if !rb.avail().is_empty() {
            // Uninitialised slots: `[EMPTY_HEADER; 128]` would write 4 KiB per parse.
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut []);
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut resp,
                rb.avail(),
                &mut slots,
            ) {
                Ok(httparse::Status::Complete(n)) => {
                    let head = head_of(&resp)?;
                    rb.consume(n);
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => {
                    return Err(Fail::failed(format!("malformed response head: {e}")));
                }
            }
        }
        if rb.avail().len() >= HEAD_LIMIT {
            return Err(Fail::failed(format!(
                "the response head exceeds {HEAD_LIMIT} bytes"
            )));
        }
        if rb.fill(src, HEAD_LIMIT)? == 0 {
            return Err(Fail {
                err: TransportError::Failed(if rb.received == 0 {
                    "the server closed the connection without a response".into()
                } else {
                    "the server closed the connection in the middle of the response head".into()
                }),
                stale: rb.received == 0,
            });
        }
    }
}

fn head_of(resp: &httparse::Response<'_, '_>) -> Result<Head, Fail> {
    let status = resp.code.unwrap_or(0);
    // httparse takes any three digits; below 100 is no HTTP status (found by fuzzing).
    if !(100..=999).contains(&status) {
        return Err(Fail::failed(format!(
            "invalid status code {status} in the response"
        )));
    }
    let version = resp.version.unwrap_or(0);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_token = false;
    // Which headers to keep, found in this pass; their list is then allocated once at
    // its size (it lives as long as the response: in a batch, until the caller drops
    // the results).
    let mut kept = [0u8; MAX_HEADERS];
    let mut n_kept = 0;
    let mut buf = [0u8; 64];
    for (i, h) in resp.headers.iter().enumerate() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(Fail::failed(
                    "the response has more than one Content-Length".into(),
                ));
            }
            length = Some(parse_content_length(h.value)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let v = std::str::from_utf8(h.value).unwrap_or("").trim();
            if chunked || !v.eq_ignore_ascii_case("chunked") {
                return Err(Fail::failed(
                    "unsupported Transfer-Encoding in the response (only a single `chunked`)"
                        .into(),
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in std::str::from_utf8(h.value).unwrap_or("").split(',') {
                let token = token.trim();
                close |= token.eq_ignore_ascii_case("close");
                keep_alive_token |= token.eq_ignore_ascii_case("keep-alive");
            }
        }
        if kept_name(name, &mut buf).is_some() && std::str::from_utf8(h.value).is_ok() {
            // At most MAX_HEADERS (≤ 256) headers were parsed: `i` fits, `n_kept` too.
            kept[n_kept] = i as u8;
            n_kept += 1;
        }
    }
    let mut headers = Vec::with_capacity(n_kept);
    for &i in &kept[..n_kept] {
        let h = &resp.headers[usize::from(i)];
        if let (Some(name), Ok(v)) = (kept_name(h.name, &mut buf), std::str::from_utf8(h.value)) {
            headers.push((name.into_owned(), v.to_owned()));
        }
    }
    if chunked && length.is_some() {
        return Err(Fail::failed(
            "the response has both Transfer-Encoding and Content-Length".into(),
        ));
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let keep_alive = !close && (version == 1 || keep_alive_token);
    Ok(Head {
        status,
        headers,
        framing,
        keep_alive,
    })
}

/// `name` in lowercase if it is a header worth keeping (`is_kept_header`); a name
/// with capitals is lowered in `buf` (no allocation unless it is longer).
fn kept_name<'a>(name: &'a str, buf: &'a mut [u8; 64]) -> Option<Cow<'a, str>> {
    let lower = if !name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Borrowed(name)
    } else if let Some(b) = buf.get_mut(..name.len()) {
        b.copy_from_slice(name.as_bytes());
        b.make_ascii_lowercase();
        Cow::Borrowed(std::str::from_utf8(b).ok()?)
    } else {
        Cow::Owned(name.to_ascii_lowercase())
    };
    is_kept_header(&lower).then_some(lower)
}

/// A `Content-Length` value: decimal digits only, no overflow.
fn parse_content_length(v: &[u8]) -> Result<u64, Fail> {
    let v = v.trim_ascii();
    let bad = || Fail::failed("invalid Content-Length in the response".into());
    if v.is_empty() {
        return Err(bad());
    }
    v.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return Err(bad());
        }
        acc.checked_mul(10)
            .and_then(|a| a.checked_add(u64::from(b - b'0')))
            .ok_or_else(bad)
    })
}

/// A chunk-size line's size: hex digits (then optional whitespace and `;extensions`).
fn parse_chunk_size(line: &[u8]) -> Result<u64, Fail> {
    let size = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or(&[])
        .trim_ascii();
    let bad = || Fail::failed("invalid chunk size in the response".into());
    if size.is_empty() {
        return Err(bad());
    }
    size.iter().try_fold(0u64, |acc, &b| {
        let d = (b as char).to_digit(16).ok_or_else(bad)?;
        acc.checked_mul(16)
            .and_then(|a| a.checked_add(u64::from(d)))
            .ok_or_else(bad)
    })
}

fn read_chunked<S: Source>(src: &mut S, rb: &mut ReadBuf, limit: u64) -> Result<Vec<u8>, Fail> {
    let mut body = Vec::new();
    loop {
        let line = rb.line(src, CHUNK_LINE_LIMIT, "chunk-size line")?;
        let size = parse_chunk_size(&line)?;
        if size == 0 {
            break;
        }
        if size > limit - body.len() as u64 {
            return Err(limit_error(limit));
        }
        let mut left = usize::try_from(size).map_err(|_| limit_error(limit))?;
        while left > 0 {
            if rb.avail().is_empty() {
                rb.fill_more(src, READ_BUFFER, "response body")?;
            }
            let take = rb.avail().len().min(left);
            body.extend_from_slice(&rb.avail()[..take]);
            rb.consume(take);
            left -= take;
        }
        if !rb.line(src, 2, "chunk terminator")?.is_empty() {
            return Err(Fail::failed("chunk data longer than its size".into()));
        }
    }
    // Trailers: skipped, bounded.
    let mut trailer_bytes = 0usize;
    loop {
        let line = rb.line(
            src,
            CHUNK_LINE_LIMIT.max(TRAILER_LIMIT - trailer_bytes),
            "trailer",
        )?;
        if line.is_empty() {
            return Ok(body);
        }
        trailer_bytes += line.len() + 2;
        if trailer_bytes > TRAILER_LIMIT {
            return Err(Fail::failed(format!(
                "the response trailers exceed {TRAILER_LIMIT} bytes"
            )));
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn decimal_lengths_are_written_like_display() {
        for n in [0, 1, 9, 10, 99, 100, 12_345, usize::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }
    use super::*;
    use crate::config::ApiKey;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const LIMIT: u64 = 1000;

    fn parse(data: &[u8], step: usize) -> Result<Parsed, String> {
        let mut rb = ReadBuf::new();
        read_response(&mut SliceSource { data, step }, &mut rb, LIMIT).map_err(|f| match f.err {
            TransportError::Failed(m) => m,
            other => format!("{other:?}"),
        })
    }

    /// Every read size from 1 byte up gives the same answer.
    fn parse_all_steps(data: &[u8]) -> Result<Parsed, String> {
        let whole = parse(data, usize::MAX);
        for step in [1, 2, 3, 7, 64] {
            let r = parse(data, step);
            assert_eq!(
                format!("{:?}", r.as_ref().map(|p| (&p.status, &p.body, p.reusable))),
                format!(
                    "{:?}",
                    whole.as_ref().map(|p| (&p.status, &p.body, p.reusable))
                ),
                "step {step}"
            );
        }
        whole
    }

    #[test]
    fn content_length_body_and_kept_headers() {
        let p = parse_all_steps(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-RateLimit-Remaining-Requests: 7\r\n\
              Content-Type: application/json\r\nServer: x\r\nretry-after: \xff\r\n\r\nhello",
        )
        .unwrap();
        assert_eq!(
            (p.status, &p.body[..], p.reusable),
            (200, &b"hello"[..], true)
        );
        assert_eq!(
            p.headers,
            vec![
                ("x-ratelimit-remaining-requests".into(), "7".into()),
                ("content-type".into(), "application/json".into()),
            ]
        );
        // Allocated at its size; a capitalised name longer than the 64-byte lowering
        // buffer is kept too.
        assert_eq!(p.headers.capacity(), 2);
        let long = format!("X-RateLimit-{}", "Q".repeat(60));
        let raw = format!("HTTP/1.1 200 OK\r\n{long}: 1\r\nContent-Length: 0\r\n\r\n");
        let p = parse_all_steps(raw.as_bytes()).unwrap();
        assert_eq!(p.headers, vec![(long.to_ascii_lowercase(), "1".into())]);
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let p = parse_all_steps(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;name=value;x\r\nhello\r\n1 ; ext\r\n!\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n",
        )
        .unwrap();
        assert_eq!((&p.body[..], p.reusable), (&b"hello!"[..], true));
    }

    #[test]
    fn close_delimited_and_http10() {
        let p = parse_all_steps(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").unwrap();
        assert_eq!((&p.body[..], p.reusable), (&b"until the end"[..], false));
        let p = parse_all_steps(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx").unwrap();
        assert!(!p.reusable, "HTTP/1.0 without keep-alive");
        let p = parse_all_steps(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
        )
        .unwrap();
        assert!(p.reusable, "HTTP/1.0 with keep-alive");
        let p =
            parse_all_steps(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        assert!(!p.reusable, "Connection: close");
        // More bytes than the response, already received: the connection is not reused.
        let p = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxy", 99).unwrap();
        assert!(!p.reusable);
    }

    #[test]
    fn interim_responses_are_skipped_and_204_304_have_no_body() {
        let p = parse_all_steps(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n\
              HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}",
        )
        .unwrap();
        assert_eq!((p.status, &p.body[..]), (201, &b"{}"[..]));
        for status in [204, 304] {
            let head = format!("HTTP/1.1 {status} X\r\nContent-Length: 9\r\n\r\n");
            let p = parse_all_steps(head.as_bytes()).unwrap();
            assert_eq!((p.status, p.body.len(), p.reusable), (status, 0, true));
        }
        assert!(parse(b"HTTP/1.1 101 Switching\r\n\r\n", 99).is_err());
    }

    #[test]
    fn oversized_heads_and_bodies_are_refused() {
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        while big.len() <= HEAD_LIMIT {
            big.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
        }
        let e = parse(&big, 4096).unwrap_err();
        assert!(e.contains("malformed") || e.contains("exceeds"), "{e}");
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for _ in 0..=MAX_HEADERS {
            many.extend_from_slice(b"a: b\r\n");
        }
        many.extend_from_slice(b"\r\n");
        assert!(parse(&many, 999).unwrap_err().contains("too many headers"));
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.resize(HEAD_LIMIT + 10, b'a');
        assert!(parse(&long, 8192).unwrap_err().contains("exceeds"));

        let want = format!("response body exceeds the {LIMIT}-byte limit (max_response_bytes)");
        let cl = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", LIMIT + 1);
        assert_eq!(parse(cl.as_bytes(), 99).unwrap_err(), want);
        let mut close = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        close.resize(close.len() + LIMIT as usize + 1, b'x');
        assert_eq!(parse(&close, 99).unwrap_err(), want);
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..3 {
            chunked.extend_from_slice(format!("{:x}\r\n", 400).as_bytes());
            chunked.resize(chunked.len() + 400, b'x');
            chunked.extend_from_slice(b"\r\n");
        }
        assert_eq!(parse(&chunked, 99).unwrap_err(), want);
        // Exactly at the limit is fine.
        let mut at = format!("HTTP/1.1 200 OK\r\nContent-Length: {LIMIT}\r\n\r\n").into_bytes();
        at.resize(at.len() + LIMIT as usize, b'x');
        assert_eq!(parse(&at, 99).unwrap().body.len(), LIMIT as usize);
    }

    #[test]
    fn invalid_framing_is_refused() {
        for head in [
            "Content-Length: 1\r\nContent-Length: 1",
            "Content-Length: 1\r\nContent-Length: 2",
            "Content-Length: 1, 1",
            "Content-Length: -1",
            "Content-Length: +1",
            "Content-Length: 0x10",
            "Content-Length: ",
            "Content-Length: 99999999999999999999999",
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 3",
        ] {
            let r = format!("HTTP/1.1 200 OK\r\n{head}\r\n\r\nabc");
            assert!(parse(r.as_bytes(), 99).is_err(), "{head:?} accepted");
        }
        for chunks in [
            "10000000000000000\r\nx\r\n0\r\n\r\n", // 2^64: overflow
            "ffffffffffffffffff\r\n",
            "zz\r\n",
            "\r\n",
            "3\r\nabcd\r\n0\r\n\r\n", // data longer than its size
            "3\r\nab",                // cut short
        ] {
            let r = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}");
            assert!(parse(r.as_bytes(), 5).is_err(), "{chunks:?} accepted");
        }
        let long_ext = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;{}\r\nx\r\n0\r\n\r\n",
            "e".repeat(CHUNK_LINE_LIMIT + 1)
        );
        assert!(
            parse(long_ext.as_bytes(), 1000)
                .unwrap_err()
                .contains("longer")
        );
        let cut = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 99).unwrap_err();
        assert!(cut.contains("closed the connection"), "{cut}");
        assert!(parse(b"HTTP/1.1 200", 99).is_err());
        assert!(parse(b"HTTP/1.1 020 OK\r\nContent-Length: 0\r\n\r\n", 99).is_err());
        assert!(parse(b"", 99).unwrap_err().contains("without a response"));
        assert!(
            parse(b"garbage\r\n\r\n", 99)
                .unwrap_err()
                .contains("malformed")
        );
    }

    // ---- against scripted loopback servers ----

    /// Reads one request (head + Content-Length body); `None` when the client closed.
    fn read_request(r: &mut BufReader<TcpStream>) -> Option<String> {
        let mut head = String::new();
        let mut len = 0;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).ok()?;
        Some(head + &String::from_utf8(body).unwrap())
    }

    struct Server {
        target: Target,
        connections: Arc<AtomicUsize>,
        requests: Arc<AtomicUsize>,
    }

    /// Runs `script(connection index, reader, writer)` for every accepted connection
    /// (each on its own thread); counts connections and requests read by `read`.
    fn server(
        script: impl Fn(usize, &mut dyn FnMut() -> Option<String>, &mut TcpStream)
        + Send
        + Sync
        + 'static,
    ) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/chat", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, q) = (connections.clone(), requests.clone());
        let script = Arc::new(script);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut w) = conn else { return };
                let i = c.fetch_add(1, Ordering::SeqCst);
                let (script, q) = (script.clone(), q.clone());
                std::thread::spawn(move || {
                    let mut r = BufReader::new(w.try_clone().unwrap());
                    let mut read = || {
                        let req = read_request(&mut r);
                        if req.is_some() {
                            q.fetch_add(1, Ordering::SeqCst);
                        }
                        req
                    };
                    script(i, &mut read, &mut w);
                });
            }
        });
        Server {
            target: Target::from_uri(&url.parse().unwrap()).unwrap(),
            connections,
            requests,
        }
    }

    const KEY: &str = "sk-secret-key-42";

    fn send(
        c: &Http1,
        s: &Server,
        headers: &[(String, String)],
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        c.send(
            &s.target,
            &HttpRequest {
                url: "http://unused",
                key: &ApiKey::new(KEY),
                headers,
                body: b"{\"a\":1}",
                timeout,
            },
        )
    }

    fn client() -> Http1 {
        Http1::new(4, Duration::from_secs(5), LIMIT)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
    const T: Duration = Duration::from_secs(5);

    #[test]
    fn keep_alive_reuses_one_connection_and_sends_the_request_once() {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = parking_lot::Mutex::new(tx);
        let s = server(move |_, read, w| {
            while let Some(req) = read() {
                tx.lock().send(req).unwrap();
                w.write_all(OK).unwrap();
            }
        });
        let c = client();
        let h = [("X-Title".to_owned(), "t".to_owned())];
        for _ in 0..3 {
            assert_eq!(send(&c, &s, &h, T).unwrap().body, b"{}");
        }
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
        let req = rx.recv().unwrap();
        assert!(req.starts_with("POST /v1/chat HTTP/1.1\r\n"), "{req}");
        for line in [
            format!("Host: {}\r\n", s.target.authority),
            format!("Authorization: Bearer {KEY}\r\n"),
            "Content-Type: application/json\r\n".into(),
            "Content-Length: 7\r\n".into(),
            "X-Title: t\r\n".into(),
            concat!("User-Agent: keypool/", env!("CARGO_PKG_VERSION"), "\r\n").into(),
        ] {
            assert!(req.contains(&line), "{line:?} missing in {req}");
        }
        assert!(req.ends_with("\r\n\r\n{\"a\":1}"), "{req}");
    }

    #[test]
    fn an_idle_connection_the_server_closed_is_replaced_once() {
        // Every connection answers one request, then closes (without saying so).
        let (closed_tx, closed) = std::sync::mpsc::channel();
        let closed_tx = parking_lot::Mutex::new(closed_tx);
        let s = server(move |_, read, w| {
            if read().is_some() {
                w.write_all(OK).unwrap();
                w.shutdown(std::net::Shutdown::Both).unwrap();
                closed_tx.lock().send(()).unwrap();
            }
        });
        let c = client();
        send(&c, &s, &[], T).unwrap();
        closed.recv().unwrap();
        send(&c, &s, &[], T).unwrap();
        assert_eq!(s.connections.load(Ordering::SeqCst), 2);
        assert_eq!(
            s.requests.load(Ordering::SeqCst),
            2,
            "the second request arrived once"
        );
    }

    #[test]
    fn a_server_closing_without_answering_is_an_error_not_a_retry_loop() {
        let s = server(|_, read, _| {
            let _ = read();
        });
        let c = client();
        let e = send(&c, &s, &[], T).unwrap_err();
        assert!(
            matches!(&e, TransportError::Failed(m) if m.contains("without a response")),
            "{e:?}"
        );
        assert_eq!(s.requests.load(Ordering::SeqCst), 1);
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);

        // On a reused connection: one retry on a fresh connection, never more.
        let s = server(|i, read, w| {
            if read().is_some() && i == 0 {
                w.write_all(OK).unwrap();
                let _ = read(); // the second request: swallowed, then close
            }
        });
        send(&c, &s, &[], T).unwrap();
        assert!(send(&c, &s, &[], T).is_err());
        assert_eq!(s.connections.load(Ordering::SeqCst), 2);
        assert_eq!(s.requests.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_partial_response_is_never_retried() {
        // The first request is answered; the second gets half a response and a close.
        let s = server(|_, read, w| {
            if read().is_some() {
                w.write_all(OK).unwrap();
            }
            if read().is_some() {
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{")
                    .unwrap();
            }
        });
        let c = client();
        send(&c, &s, &[], T).unwrap();
        let e = send(&c, &s, &[], T).unwrap_err();
        assert!(format!("{e:?}").contains("closed the connection"), "{e:?}");
        assert_eq!(s.requests.load(Ordering::SeqCst), 2);
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_trickling_server_is_bounded_by_the_attempt_timeout() {
        let s = server(|_, read, w| {
            let _ = read();
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n");
            while w.write_all(b"x").is_ok() {
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let c = client();
        let t0 = Instant::now();
        let e = send(&c, &s, &[], Duration::from_millis(400)).unwrap_err();
        let took = t0.elapsed();
        assert_eq!(e, TransportError::Timeout(TimeoutPhase::Attempt));
        assert!(took >= Duration::from_millis(400), "{took:?}");
        assert!(took < Duration::from_millis(900), "{took:?}");
    }

    #[test]
    fn connection_close_is_honoured() {
        let s = server(|_, read, w| {
            while read().is_some() {
                w.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
                    .unwrap();
            }
        });
        let c = client();
        send(&c, &s, &[], T).unwrap();
        send(&c, &s, &[], T).unwrap();
        assert_eq!(s.connections.load(Ordering::SeqCst), 2);
        assert_eq!(s.requests.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn header_injection_is_refused_before_connecting_and_the_key_never_shows() {
        let s = server(|_, read, _| while read().is_some() {});
        let c = client();
        for h in [
            ("X-A".to_owned(), "v\r\nX-Injected: 1".to_owned()),
            ("X-A".to_owned(), "v\nx".to_owned()),
            ("X-A\r\nB".to_owned(), "v".to_owned()),
            ("X A".to_owned(), "v".to_owned()),
            (String::new(), "v".to_owned()),
        ] {
            let e = send(&c, &s, std::slice::from_ref(&h), T).unwrap_err();
            assert!(
                matches!(&e, TransportError::Failed(m) if !m.contains(KEY)),
                "{e:?}"
            );
        }
        let bad_key = ApiKey::new("sk-a\r\nX: y");
        let e = c
            .send(
                &s.target,
                &HttpRequest {
                    url: "http://unused",
                    key: &bad_key,
                    headers: &[],
                    body: b"",
                    timeout: T,
                },
            )
            .unwrap_err();
        assert!(!format!("{e:?}").contains("sk-a"), "{e:?}");
        assert_eq!(s.connections.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn refused_connections_fail_with_a_masked_message() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://user:pw-secret@{}/v1", l.local_addr().unwrap());
        drop(l);
        let t = super::super::UreqTransport::new(&super::super::TransportSettings {
            label: "t".into(),
            max_concurrent: 1,
            timeout: T,
            connect_timeout: T,
            max_response_bytes: LIMIT,
        });
        let key = ApiKey::new(KEY);
        let e = super::super::Transport::send(
            &t,
            &HttpRequest {
                url: &url,
                key: &key,
                headers: &[],
                body: b"{}",
                timeout: T,
            },
        )
        .unwrap_err();
        let m = format!("{e:?}");
        assert!(matches!(e, TransportError::Failed(_)), "{m}");
        assert!(!m.contains(KEY) && !m.contains("pw-secret"), "{m}");
        assert!(m.contains("connection to 127.0.0.1:"), "{m}");
    }

    #[test]
    fn ipv6_literal_and_userinfo_targets() {
        let t = Target::from_uri(&"http://u:p@[::1]:8080/a?b=1".parse().unwrap()).unwrap();
        assert_eq!(
            (
                t.authority.as_str(),
                t.host.as_str(),
                t.port,
                t.path.as_str()
            ),
            ("[::1]:8080", "::1", 8080, "/a?b=1")
        );
        let t = Target::from_uri(&"http://example.com".parse().unwrap()).unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/"));
        assert!(Target::from_uri(&"https://example.com/".parse().unwrap()).is_none());
    }
}
