//! A non-streamed POST (every [`Transport::send`](super::Transport::send)) driven
//! through ureq's own HTTP/1.1 state machine, `ureq_proto::client::Call`, over
//! keypool's connection layers ([`super::lean_tcp`], [`super::lean_tls`] for
//! `https://`), with one keep-alive pool per key.
//!
//! ureq's `Agent::run` does the same on top of machinery a key's workers do not use:
//! per-call timings of nine phases, middleware, redirect and cookie handling,
//! decompression, a boxed body reader chain, request and response extensions, and a
//! connector chain walked per connection, moving the call's state by value through
//! frames of up to 9 KiB. Measured over TLS (`benches/cpu.rs --https`): ureq's agent
//! cost about 29 µs of user CPU per request more than a minimal blocking client over
//! rustls (49 against 20), which is itself within 1.1× of an async hyper client.
//!
//! The HTTP is still ureq's: `ureq_proto` writes the request head, frames the body
//! (`Content-Length`), answers `Expect: 100-continue`, parses the response head and
//! decodes the body (length-delimited, chunked or close-delimited), and says whether
//! the connection may carry another request. What is here is the loop ureq's `run`
//! has around it, and the guarantees issue 20 asks of a hand-written loop:
//!
//! - **An idle connection is checked before reuse**: bytes left in its buffer after
//!   the body and it is closed at once; then `Transport::is_open` (one
//!   `recv(MSG_PEEK | MSG_DONTWAIT)`; over TLS, no decrypted byte nobody asked for):
//!   stale bytes or end-of-file and the connection is dropped, never parsed as an
//!   answer. Idle connections older than [`MAX_IDLE_AGE`] are dropped too (ureq's
//!   default), before a server's keep-alive limit closes them under a request.
//! - **A request is never sent twice**: there is no resend at all; a connection that
//!   fails is an attempt that failed.
//! - **Names resolve within the connect timeout and the deadline** (the key's caching
//!   resolver, ureq's resolver under it).
//! - **One absolute deadline per attempt** across resolve, connect, handshake, write
//!   and every read.
//! - **An early answer is heard**: a body of [`super::ureq_agent`]'s
//!   `EXPECT_CONTINUE_FROM` or more is sent with `Expect: 100-continue`, so a server
//!   that refuses it (413, 401) before reading it is answered, not written to.
//!
//! A request through an HTTP proxy (ureq's `Proxy`, from the environment) goes through
//! ureq's agent instead, as do streams and `GET`s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::Timeout;
use ureq::http::{self, Method, header};
use ureq::unversioned::transport::{NextTimeout, Transport as Conn, time::Duration as UDuration};
use ureq_proto::BodyMode;
use ureq_proto::client::{
    Await100Result, Call, RecvBodyResult, RecvResponseResult, SendRequestResult, state,
};

use super::HttpResponse;
use super::lean_tcp::LeanTcp;
use super::lean_tls::LeanTls;

/// An idle connection older than this is closed rather than reused (ureq's default
/// `max_idle_age`).
pub(super) const MAX_IDLE_AGE: Duration = Duration::from_secs(15);

/// What a request needs besides its body, prepared by the caller.
pub(super) struct Prepared<'a> {
    /// The parsed URL.
    pub uri: &'a http::Uri,
    /// The request's headers: `Authorization`, `Content-Type`, `User-Agent`, the
    /// pool's, the key's and the request's.
    pub headers: http::HeaderMap,
    /// The body.
    pub body: &'a [u8],
    /// When the attempt ends.
    pub deadline: Instant,
    /// Largest body to read.
    pub max_body: u64,
}

/// How a key opens connections: the settings its ureq agents have too.
pub(super) struct Opener<'a> {
    pub config: &'a ureq::config::Config,
    pub resolver: &'a dyn ureq::unversioned::resolver::Resolver,
    pub tls: &'a Arc<rustls::ClientConfig>,
    pub connect_timeout: Duration,
}

/// A key's idle keep-alive connections, most recently used last, with when each went
/// idle.
#[derive(Default)]
pub(super) struct Idle(parking_lot::Mutex<Vec<IdleConn>>);

/// When a connection went idle, what it was opened for, the connection.
type IdleConn = (Instant, Origin, Box<dyn Pooled>);

/// Scheme and authority a connection was opened for (ureq's `PoolKey` without the proxy).
type Origin = (Option<http::uri::Scheme>, Option<http::uri::Authority>);

fn origin(uri: &http::Uri) -> Origin {
    (uri.scheme().cloned(), uri.authority().cloned())
}

/// A connection this module pools: ureq's `Transport`, and a way to give back what it
/// needs only while bytes move.
pub(super) trait Pooled: Conn {
    /// Frees the buffers of the HTTP layer while the connection sits idle.
    fn park(&mut self);
}

impl Pooled for LeanTcp {
    fn park(&mut self) {
        // ureq's `LazyBuffers` cannot give its buffers back; plain HTTP holds no TLS
        // state and stays under the memory target without it.
    }
}

impl Pooled for LeanTls {
    fn park(&mut self) {
        self.release_buffers();
    }
}

impl Idle {
    /// The most recently used idle connection that is still good (`is_open`, younger
    /// than [`MAX_IDLE_AGE`]); the others met on the way are closed.
    fn take(&self, now: Instant, uri: &http::Uri) -> Option<Box<dyn Pooled>> {
        // Compared in place: nothing cloned to look.
        let same = |o: &Origin| o.0.as_ref() == uri.scheme() && o.1.as_ref() == uri.authority();
        loop {
            let (since, mut conn) = {
                let mut idle = self.0.lock();
                let i = idle.iter().rposition(|(_, o, _)| same(o))?;
                let (since, _, conn) = idle.remove(i);
                (since, conn)
            };
            if now.saturating_duration_since(since) < MAX_IDLE_AGE && conn.is_open() {
                return Some(conn);
            }
        }
    }

    /// Keeps `conn` for the next request, up to `max` idle connections (the oldest
    /// goes first).
    fn put(&self, mut conn: Box<dyn Pooled>, uri: &http::Uri, max: usize) {
        conn.park();
        let mut idle = self.0.lock();
        if idle.len() >= max.max(1) {
            idle.remove(0);
        }
        idle.push((Instant::now(), origin(uri), conn));
    }
}

/// The instant `d` from now; a duration too long for an `Instant` (a transport built
/// with `Duration::MAX`) is a year.
pub(super) fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
}

/// The time left until `deadline` as ureq's transports take it, or the timeout error
/// for `reason` if none is left.
fn left(deadline: Instant, reason: Timeout) -> Result<NextTimeout, ureq::Error> {
    let after = deadline.saturating_duration_since(Instant::now());
    if after.is_zero() {
        return Err(ureq::Error::Timeout(reason));
    }
    Ok(NextTimeout {
        after: UDuration::Exact(after),
        reason,
        per_read: None,
        per_write: None,
    })
}

fn disconnected() -> ureq::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "Peer disconnected").into()
}

/// Opens a connection for `uri` within the connect timeout and the deadline.
fn open(
    o: &Opener<'_>,
    uri: &http::Uri,
    deadline: Instant,
) -> Result<Box<dyn Pooled>, ureq::Error> {
    let until = deadline.min(after(o.connect_timeout));
    let reason = if until < deadline {
        Timeout::Connect
    } else {
        Timeout::Global
    };
    let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let addrs = o.resolver.resolve(uri, o.config, left(until, reason)?)?;
    let buffers = (o.config.input_buffer_size(), o.config.output_buffer_size());
    let timeout = left(until, reason)?;
    let tcp = LeanTcp::open(&addrs, timeout, o.config.no_delay(), https, buffers)?;
    if https {
        let host = uri.host().unwrap_or_default();
        let mut tls = LeanTls::over(tcp, o.tls, host, buffers, timeout)?;
        tls.handshake_now()?;
        Ok(Box::new(tls))
    } else {
        Ok(Box::new(tcp))
    }
}

/// Sends `p` on an idle connection of `idle` or a new one, and reads the whole
/// response. The connection goes back to `idle` (at most `max_idle`) if ureq-proto
/// says it may carry another request.
pub(super) fn post(
    o: &Opener<'_>,
    idle: &Idle,
    max_idle: usize,
    p: Prepared<'_>,
) -> Result<HttpResponse, ureq::Error> {
    let deadline = p.deadline;
    let mut conn = match idle.take(Instant::now(), p.uri) {
        Some(c) => c,
        None => open(o, p.uri, deadline)?,
    };
    let mut request = http::Request::new(());
    *request.method_mut() = Method::POST;
    *request.uri_mut() = p.uri.clone();
    *request.headers_mut() = p.headers;
    let mut call = Call::new(request)?.proceed();

    // The head: ureq-proto writes it into the connection's output buffer, where it
    // stays (`staged` bytes) for the body's first piece to join it: a request that
    // fits leaves in one write, over TLS one record (one encryption, not two).
    // (Each write gets the whole buffer, as ureq gives it: ureq-proto refuses a header
    // that does not fit what it is given, and a head longer than the buffer goes out in
    // pieces.)
    let mut staged = 0;
    while !call.can_proceed() {
        if staged > 0 {
            conn.transmit_output(staged, left(deadline, Timeout::Global)?)?;
        }
        staged = call.write(conn.buffers().output())?;
    }
    let call = match call.proceed()?.ok_or_else(disconnected)? {
        SendRequestResult::SendBody(c) => send_body(c, p.body, &mut *conn, deadline, staged)?,
        other => {
            if staged > 0 {
                conn.transmit_output(staged, left(deadline, Timeout::Global)?)?;
            }
            match other {
                SendRequestResult::Await100(c) => match await_100(c, &mut *conn, deadline)? {
                    Await100Result::SendBody(c) => send_body(c, p.body, &mut *conn, deadline, 0)?,
                    Await100Result::RecvResponse(c) => c,
                },
                SendRequestResult::RecvResponse(c) => c,
                SendRequestResult::SendBody(_) => unreachable!("matched above"),
            }
        }
    };
    let (status, headers, next) = recv_response(call, &mut *conn, deadline)?;
    let (body, must_close) = match next {
        RecvResponseResult::RecvBody(c) => {
            let hint = headers_hint(&headers).min(p.max_body).min(1 << 20);
            recv_body(c, &mut *conn, deadline, p.max_body, hint as usize)?
        }
        RecvResponseResult::Redirect(c) => (Vec::new(), c.must_close_connection()),
        RecvResponseResult::Cleanup(c) => (Vec::new(), c.must_close_connection()),
    };
    // Bytes after the body already in the buffer (more than its Content-Length, an
    // unsolicited answer in the same segment) are what the probe looks for in the
    // socket: the connection is not reused.
    if !must_close && conn.buffers().input().is_empty() {
        idle.put(conn, p.uri, max_idle);
    }
    Ok(HttpResponse {
        status,
        headers: super::ureq_agent::kept_headers(&headers),
        body,
    })
}

/// The response's `Content-Length`, to size the body buffer (0: unknown).
fn headers_hint(h: &http::HeaderMap) -> u64 {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
        .unwrap_or(0)
}

/// Copies the body into the output buffer piece by piece, after the `staged` bytes of
/// the head already there (it is sent with its `Content-Length`, so ureq-proto only
/// counts it).
fn send_body(
    mut call: Call<state::SendBody>,
    body: &[u8],
    conn: &mut dyn Conn,
    deadline: Instant,
    mut staged: usize,
) -> Result<Call<state::RecvResponse>, ureq::Error> {
    let mut sent = 0;
    while !call.can_proceed() {
        let out = conn.buffers().output();
        let n = (out.len() - staged).min(body.len() - sent);
        if n == 0 {
            if staged > 0 {
                // The head filled the buffer: it goes first.
                conn.transmit_output(staged, left(deadline, Timeout::Global)?)?;
                staged = 0;
                continue;
            }
            // The body is shorter than its Content-Length: cannot happen, as the
            // header is written from its length.
            return Err(ureq::Error::Protocol(
                ureq_proto::Error::BodyContentAfterFinish,
            ));
        }
        out[staged..staged + n].copy_from_slice(&body[sent..sent + n]);
        call.consume_direct_write(n)?;
        conn.transmit_output(staged + n, left(deadline, Timeout::Global)?)?;
        staged = 0;
        sent += n;
    }
    call.proceed().ok_or_else(disconnected)
}

/// Waits up to `AWAIT_100` (within the deadline) for `100 Continue` or an early
/// answer, as ureq's `run` does.
fn await_100(
    mut call: Call<state::Await100>,
    conn: &mut dyn Conn,
    deadline: Instant,
) -> Result<Await100Result, ureq::Error> {
    let until = deadline.min(Instant::now() + super::ureq_agent::AWAIT_100);
    // A read whenever what is buffered was all used or is incomplete (never decided
    // by the buffers' `progress` flag, which may be left over from the previous
    // answer on this connection, or cleared by a partial head).
    let mut read = true;
    while call.can_keep_await_100() {
        if read {
            if Instant::now() >= until {
                if until < deadline {
                    break; // stop waiting: send the body
                }
                return Err(ureq::Error::Timeout(Timeout::Global));
            }
            match conn.await_input(left(until, Timeout::Await100)?) {
                Ok(_) => {}
                Err(ureq::Error::Timeout(Timeout::Await100)) => break,
                Err(e) => return Err(e),
            }
        }
        let input = conn.buffers().input();
        if input.is_empty() {
            return Err(disconnected());
        }
        // ureq-proto parses with room for no header: a 1xx with headers (a 103's
        // Link) would pass for a final answer, and the body would never be sent.
        let mut h = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut h);
        let n = match r.parse(input) {
            Ok(httparse::Status::Complete(n)) if matches!(r.code, Some(102..=199)) => n,
            _ => call.try_read_100(input)?,
        };
        conn.buffers().input_consume(n);
        // No break on n > 0: a 103 is consumed and the wait goes on, on what is
        // already buffered first (a 100 in the same segment); a 100 or a final
        // answer ends it (`can_keep_await_100`).
        read = n == 0 || conn.buffers().input().is_empty();
    }
    Ok(call.proceed()?)
}

/// Reads the response head (at most `max_response_header_size` bytes).
fn recv_response(
    mut call: Call<state::RecvResponse>,
    conn: &mut dyn Conn,
    deadline: Instant,
) -> Result<(u16, http::HeaderMap, RecvResponseResult), ureq::Error> {
    let limit = super::ureq_agent::MAX_RESPONSE_HEAD;
    let response = loop {
        // What is already buffered first (an early answer read while awaiting 100),
        // then a read whenever the head is incomplete.
        let input = conn.buffers().input();
        let (used, response) = call.try_response(input, false)?;
        let size = if response.is_some() {
            used
        } else {
            input.len()
        };
        if size > limit {
            return Err(ureq::Error::LargeResponseHeader(input.len(), limit));
        }
        conn.buffers().input_consume(used);
        if let Some(r) = response {
            break r;
        }
        if used == 0 && !conn.await_input(left(deadline, Timeout::Global)?)? {
            return Err(disconnected());
        }
    };
    let (parts, ()) = response.into_parts();
    let next = call.proceed().ok_or_else(disconnected)?;
    Ok((parts.status.as_u16(), parts.headers, next))
}

/// Reads the body (at most `max` bytes) as ureq's `BodyHandler` does. Returns it and
/// whether the connection must be closed.
fn recv_body(
    mut call: Call<state::RecvBody>,
    conn: &mut dyn Conn,
    deadline: Instant,
    max: u64,
    hint: usize,
) -> Result<(Vec<u8>, bool), ureq::Error> {
    let mut body = Vec::with_capacity(hint);
    let mut remote_closed = false;
    let read = |call: &mut Call<state::RecvBody>,
                conn: &mut dyn Conn,
                body: &mut Vec<u8>|
     -> Result<(usize, usize), ureq::Error> {
        let input = conn.buffers().input();
        // Decoding never makes the body longer than its encoding.
        let room = input.len().max(1);
        let at = body.len();
        body.resize(at + room, 0);
        let (used, out) = call.read(input, &mut body[at..])?;
        body.truncate(at + out);
        conn.buffers().input_consume(used);
        if body.len() as u64 > max {
            return Err(ureq::Error::BodyExceedsLimit(max));
        }
        Ok((used, out))
    };
    loop {
        let fulfilled = match call.body_mode() {
            BodyMode::LengthDelimited(_) | BodyMode::Chunked => call.can_proceed(),
            BodyMode::CloseDelimited => false,
            BodyMode::NoBody => true,
        };
        if fulfilled {
            break;
        }
        if conn.buffers().can_use_input() {
            let (used, out) = read(&mut call, conn, &mut body)?;
            if out > 0 || used > 0 {
                continue;
            }
        }
        if remote_closed {
            break;
        }
        let progress = match conn.maybe_await_input(left(deadline, Timeout::Global)?) {
            Ok(v) => v,
            Err(ureq::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                remote_closed = true;
                true
            }
            Err(e) => return Err(e),
        };
        let ended = conn.buffers().input().is_empty();
        let (_, out) = read(&mut call, conn, &mut body)?;
        if out > 0 {
            continue;
        } else if ended {
            break;
        } else if !progress {
            return Err(ureq::Error::BodyStalled);
        }
    }
    // A chunked body ended by `0\r\n` and then the connection closed: the body is
    // whole, the connection is not reusable.
    let ended_chunked = call.is_ended_chunked();
    if !call.can_proceed() {
        if ended_chunked {
            return Ok((body, true));
        }
        return Err(disconnected());
    }
    let must_close = match call.proceed().ok_or_else(disconnected)? {
        RecvBodyResult::Redirect(c) => c.must_close_connection(),
        RecvBodyResult::Cleanup(c) => c.must_close_connection(),
    };
    Ok((body, must_close))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_too_long_for_an_instant_is_a_year() {
        let far = after(Duration::MAX);
        let year = far.duration_since(Instant::now());
        assert!(year > Duration::from_secs(364 * 86_400), "{year:?}");
        assert!(after(Duration::from_secs(1)) < far);
    }

    #[test]
    fn the_time_left_is_a_timeout_once_the_deadline_passed() {
        let past = Instant::now() - Duration::from_millis(1);
        assert!(matches!(
            left(past, Timeout::Connect),
            Err(ureq::Error::Timeout(Timeout::Connect))
        ));
        let t = left(Instant::now() + Duration::from_secs(5), Timeout::Global).unwrap();
        assert!(matches!(t.after, UDuration::Exact(d) if d > Duration::from_secs(4)));
        assert_eq!(t.reason, Timeout::Global);
    }
}
