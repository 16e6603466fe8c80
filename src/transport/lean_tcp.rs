//! The TCP layer under ureq (and under TLS): ureq's own `TcpTransport`, minus three
//! costs per request that the benchmarks measured.
//!
//! - **One write per request.** ureq transmits the request head and then the body,
//!   two `send`s (over TLS, two records). Output is corked here and sent when the
//!   connection next waits for input, or once [`CORK_LIMIT`] bytes are pending.
//! - **One system call per probe.** ureq checks an idle connection before reusing it
//!   (and again when releasing it) with `ioctl(FIONBIO)`, `recv`, `ioctl(FIONBIO)`;
//!   here a single `recv(MSG_PEEK | MSG_DONTWAIT)` answers the same question: bytes
//!   waiting (a stale answer, an unsolicited 408) or end-of-file mean the connection
//!   is dropped.
//! - **Socket timeouts set when they must change.** With one deadline per call the
//!   time left differs at every read, so ureq sets `SO_RCVTIMEO` before each one.
//!   Here the socket's timeout is changed only when it differs from the time left by
//!   more than [`TIMEOUT_SLACK`] (a read could give up that much early or late).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, ShutdownHandle,
    Transport,
};

/// Output pending beyond this is sent without waiting for the next read.
pub(crate) const CORK_LIMIT: usize = 64 * 1024;
/// This layer's read buffer under TLS (the TLS layer above has ureq's full-size one).
const TLS_LAYER_INPUT: usize = 8 * 1024;
/// This layer's write buffer under TLS.
const TLS_LAYER_OUTPUT: usize = 4 * 1024;
/// The corking buffer a connection keeps between requests.
const SMALL: usize = 4 * 1024;
/// How much later than the deadline a blocked read or write may give up.
pub(crate) const TIMEOUT_SLACK: Duration = Duration::from_millis(20);

/// Opens plain TCP connections for ureq's connector chain (a chained transport, e.g.
/// a proxy's, passes through untouched).
#[derive(Debug, Default)]
pub(crate) struct LeanTcpConnector;

/// The socket, shared with ureq's shutdown handle and with a cancellable request's
/// slot (`cancel.rs`).
#[derive(Debug)]
pub(crate) struct Socket(pub(crate) TcpStream, parking_lot::Mutex<u64>);

impl Socket {
    /// Marks the socket as used by `attempt` (`crate::cancel`; 0: by no cancellable
    /// attempt).
    fn claim(&self, attempt: u64) {
        *self.1.lock() = attempt;
    }

    /// Attaches the socket to the attempt running on this thread, if it is not the
    /// one `attached` names (a keep-alive connection serves one attempt after
    /// another), so a cancel of that request shuts it down. Called before each read
    /// and write of an attempt, by this layer and by the TLS layer that drives the
    /// socket itself ([`super::lean_tls`]). Fails if the request was cancelled
    /// already: nothing more may be sent or read.
    pub(crate) fn attach(self: &Arc<Self>, attached: &mut u64) -> Result<(), ureq::Error> {
        let attempt = crate::cancel::current();
        if attempt == *attached {
            return Ok(());
        }
        let weak = Arc::downgrade(self) as std::sync::Weak<dyn crate::cancel::Conn>;
        if !crate::cancel::attach(weak, |a| self.claim(a)) {
            return Err(
                io::Error::new(io::ErrorKind::ConnectionAborted, "request cancelled").into(),
            );
        }
        *attached = attempt;
        Ok(())
    }

    /// Whether an idle connection may carry another request ([`probe`]), asked when
    /// the pool hands the connection out (and when it takes it back): claimed for this
    /// thread's attempt under the socket's lock first, so a cancel of the attempt that
    /// used it before either shut it down already (the probe sees EOF) or leaves it
    /// alone. `attached` is reset: the slot learns of it at the first read or write.
    pub(crate) fn claim_and_probe(&self, attached: &mut u64) -> bool {
        let mut owner = self.1.lock();
        *owner = crate::cancel::current();
        *attached = 0;
        probe(&self.0)
    }
}

impl ShutdownHandle for Socket {
    fn shutdown(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

impl crate::cancel::Conn for Socket {
    fn close_if_used_by(&self, attempt: u64) {
        let owner = self.1.lock();
        if *owner == attempt {
            // A blocked read returns end-of-file, a blocked write fails: ureq gives
            // the attempt up, and the connection is never reused (its probe sees EOF).
            let _ = self.0.shutdown(Shutdown::Both);
        }
    }
}

impl<In: Transport> Connector<In> for LeanTcpConnector {
    type Out = Either<In, LeanTcp>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        if chained.is_some() {
            return Ok(chained.map(Either::A));
        }
        let addrs: Vec<std::net::SocketAddr> = details.addrs.iter().copied().collect();
        let tcp = LeanTcp::open(
            &addrs,
            details.timeout,
            details.config.no_delay(),
            details.needs_tls(),
            (
                details.config.input_buffer_size(),
                details.config.output_buffer_size(),
            ),
        )?;
        let weak = Arc::downgrade(&tcp.socket) as std::sync::Weak<dyn ShutdownHandle>;
        (details.register_shutdown)(weak)?;
        Ok(Some(Either::B(tcp)))
    }
}

impl LeanTcp {
    /// Connects to the first of `addrs` that answers within `timeout` (shared between
    /// them, [`connect`]). `buffers` are the read and write buffer sizes for plain HTTP;
    /// under TLS (`for_tls`) this layer only carries records to and from rustls, which
    /// reassembles them itself: it needs no room for a whole response head, and its
    /// output is corked anyway, so small buffers cost no extra system calls on writes.
    pub(crate) fn open(
        addrs: &[std::net::SocketAddr],
        timeout: NextTimeout,
        no_delay: bool,
        for_tls: bool,
        buffers: (usize, usize),
    ) -> Result<LeanTcp, ureq::Error> {
        let started = std::time::Instant::now();
        let stream = connect(addrs, timeout)?;
        if no_delay {
            stream.set_nodelay(true)?;
        }
        let socket = Arc::new(Socket(stream, parking_lot::Mutex::new(0)));
        let (input, output) = if for_tls {
            (TLS_LAYER_INPUT, TLS_LAYER_OUTPUT)
        } else {
            buffers
        };
        Ok(LeanTcp {
            socket,
            started,
            buffers: LazyBuffers::new(input, output),
            pending: Vec::new(),
            read_timeout: None,
            write_timeout: None,
            attached: 0,
        })
    }
}

/// Tries each resolved address in turn, sharing the connect timeout between them
/// (the first gets half, the next a quarter, …, the last what is left; at least
/// 10 ms each).
fn connect(addrs: &[std::net::SocketAddr], next: NextTimeout) -> Result<TcpStream, ureq::Error> {
    let timeout = next.not_zero().map(|d| *d);
    let start = std::time::Instant::now();
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let attempt = match timeout {
            None => TcpStream::connect(addr),
            Some(total) => {
                let left = total.saturating_sub(start.elapsed());
                if left.is_zero() {
                    break;
                }
                let share = if i + 1 == addrs.len() {
                    left
                } else {
                    (left / 2).max(Duration::from_millis(10)).min(left)
                };
                TcpStream::connect_timeout(addr, share)
            }
        };
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) if e.kind() == io::ErrorKind::TimedOut => Err(ureq::Error::Timeout(next.reason)),
        Some(e) => Err(e.into()),
        None if timeout.is_some() => Err(ureq::Error::Timeout(next.reason)),
        None => {
            Err(io::Error::new(io::ErrorKind::ConnectionRefused, "no address to connect to").into())
        }
    }
}

/// A TCP connection as ureq's `Transport`: corked output, one-syscall probe, lazy
/// socket timeouts.
#[derive(Debug)]
pub(crate) struct LeanTcp {
    socket: Arc<Socket>,
    /// When the connection was begun (a TLS handshake on it shares the connect timeout).
    started: std::time::Instant,
    buffers: LazyBuffers,
    /// Output handed over by `transmit_output` and not yet sent.
    pending: Vec<u8>,
    /// The socket's current `SO_RCVTIMEO` / `SO_SNDTIMEO` (`None`: none set).
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    /// The cancellable attempt (`crate::cancel`) this connection was last attached
    /// to (0: none).
    attached: u64,
}

/// Sets the socket timeout `current` to `want` unless it is already within
/// [`TIMEOUT_SLACK`] of it either way: a blocked read or write then gives up at most
/// that much before or after the deadline. (Each call brings a fresh deadline, so the
/// time left at a read differs by microseconds from call to call: a timeout kept only
/// while it was not shorter was set again on about every other request.)
pub(crate) fn adjust(
    current: &mut Option<Duration>,
    want: Option<Duration>,
    set: impl FnOnce(Option<Duration>) -> io::Result<()>,
) -> io::Result<()> {
    let close_enough = match (*current, want) {
        (None, None) => true,
        (Some(c), Some(w)) => c.abs_diff(w) <= TIMEOUT_SLACK,
        _ => false,
    };
    if !close_enough {
        set(want)?;
        *current = want;
    }
    Ok(())
}

/// A timeout error as ureq reports it, or the I/O error.
pub(crate) fn io_error(e: io::Error, timeout: &NextTimeout) -> ureq::Error {
    if matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    ) {
        ureq::Error::Timeout(timeout.reason)
    } else {
        e.into()
    }
}

impl LeanTcp {
    /// Attaches the connection to the attempt running on this thread
    /// ([`Socket::attach`]).
    fn attach(&mut self) -> Result<(), ureq::Error> {
        self.socket.attach(&mut self.attached)
    }

    /// The socket (shared with ureq's shutdown handle and, once attached, with a
    /// cancellable request's slot) and when the connection was begun, for a TLS layer
    /// that drives the socket itself ([`super::lean_tls`]). Nothing was sent or read
    /// on it yet, and it is attached to no attempt.
    pub(crate) fn into_socket(self) -> (Arc<Socket>, std::time::Instant) {
        (self.socket, self.started)
    }

    /// Sends everything pending within `timeout`.
    fn flush(&mut self, timeout: NextTimeout) -> Result<(), ureq::Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let timeout = timeout.for_write();
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let stream = &self.socket.0;
        adjust(
            &mut self.write_timeout,
            timeout.not_zero().map(|d| *d),
            |t| stream.set_write_timeout(t),
        )?;
        let mut w = &self.socket.0;
        let result = w.write_all(&self.pending);
        self.pending.clear();
        if self.pending.capacity() > 2 * SMALL {
            // A large upload's buffer is not kept for the connection's life.
            self.pending = Vec::with_capacity(SMALL);
        }
        result.map_err(|e| io_error(e, &timeout))
    }
}

impl Transport for LeanTcp {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.attach()?;
        let out = &self.buffers.output()[..amount];
        self.pending.extend_from_slice(out);
        if self.pending.len() >= CORK_LIMIT {
            self.flush(timeout)?;
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.attach()?;
        self.flush(timeout)?;
        let timeout = timeout.for_read();
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let want = timeout.not_zero().map(|d| *d);
        let started = std::time::Instant::now();
        {
            let stream = &self.socket.0;
            adjust(&mut self.read_timeout, want, |t| stream.set_read_timeout(t))?;
        }
        let input = self.buffers.input_append_buf();
        let mut r = &self.socket.0;
        let amount = loop {
            match r.read(input) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    // Linux does not restart a read with SO_RCVTIMEO after a signal.
                    if let Some(w) = want {
                        let left = w.saturating_sub(started.elapsed());
                        if left.is_zero() {
                            return Err(ureq::Error::Timeout(timeout.reason));
                        }
                        self.socket.0.set_read_timeout(Some(left))?;
                        self.read_timeout = Some(left);
                    }
                }
                Err(e) => return Err(io_error(e, &timeout)),
            }
        };
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        // Output still corked means a request is half sent: not reusable.
        if !self.pending.is_empty() {
            return false;
        }
        self.socket.claim_and_probe(&mut self.attached)
    }
}

/// Whether an idle connection may carry another request: nothing waiting to be read
/// and not closed by the peer. One `recv(MSG_PEEK | MSG_DONTWAIT)`.
#[cfg(unix)]
fn probe(stream: &TcpStream) -> bool {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    match socket2::SockRef::from(stream)
        .recv_with_flags(&mut buf, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    {
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        // Ok(0): end-of-file; Ok(_): bytes nobody asked for.
        Ok(_) => false,
    }
}

/// Elsewhere, ureq's probe: a non-blocking read between two mode switches.
#[cfg(not(unix))]
fn probe(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut buf = [0u8; 1];
    let open = matches!((&*stream).peek(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    stream.set_nonblocking(false).is_ok() && open
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_change_only_when_they_must() {
        let mut sets = Vec::new();
        let mut cur = None;
        let ms = Duration::from_millis;
        for want in [
            Some(ms(1000)),
            Some(ms(990)),
            Some(ms(1015)),
            Some(ms(975)),
            Some(ms(2000)),
            Some(ms(1990)),
            Some(ms(2010)),
            None,
            None,
        ] {
            adjust(&mut cur, want, |t| {
                sets.push(t);
                Ok(())
            })
            .unwrap();
        }
        // 990 and 1015 are within the slack of 1000, 975 is not; 1990 and 2010 within
        // that of 2000.
        assert_eq!(sets, [Some(ms(1000)), Some(ms(975)), Some(ms(2000)), None]);
    }

    #[test]
    fn the_probe_sees_stale_bytes_and_end_of_file() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        assert!(probe(&client), "an idle connection is open");
        server
            .write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            .unwrap();
        // Peeking never consumes: wait until the bytes are there, then probe twice.
        let mut buf = [0u8; 4];
        assert_eq!(client.peek(&mut buf).unwrap(), 4);
        assert!(!probe(&client));
        assert!(!probe(&client));
        let client2 = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server2, _) = listener.accept().unwrap();
        drop(server2);
        // End-of-file is readable once the FIN arrived: peek blocks until then.
        assert_eq!(client2.peek(&mut buf).unwrap(), 0);
        assert!(!probe(&client2));
    }
}
