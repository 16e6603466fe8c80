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

use std::io::{self, Read, Write};
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
    let _ = write!(out, "Content-Length: {}\r\n", req.body.len());
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
            let mut body = Vec::with_capacity(n.min(1 << 20));
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
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut slots);
            match resp.parse(rb.avail()) {
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
    let version = resp.version.unwrap_or(0);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut headers = Vec::new();
    for h in resp.headers.iter() {
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
        let kept = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            let lower = name.to_ascii_lowercase();
            is_kept_header(&lower).then_some(lower)
        } else {
            is_kept_header(name).then(|| name.to_owned())
        };
        if let Some(lower) = kept {
            if let Ok(v) = std::str::from_utf8(h.value) {
                headers.push((lower, v.to_owned()));
            }
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
