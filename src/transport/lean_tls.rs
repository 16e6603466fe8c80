//! TLS for ureq's connector chain, driving rustls straight over the socket of the TCP
//! layer ([`super::lean_tcp`]). ureq's own `RustlsConnector` reaches the socket through
//! the TCP transport's buffers (a second read buffer and write buffer per connection,
//! and a copy each way) and builds its rustls config per agent; here:
//!
//! - **rustls reads from and writes to the socket itself**: no TCP-layer buffers under
//!   TLS, one copy fewer each way, and the request's records (with the handshake's last
//!   flight on a new connection) leave in one `writev` when the connection next waits
//!   for input (corked, as the TCP layer does). The handshake itself runs at the
//!   connection's first write, bounded as ureq's connect phase (`LeanTls::shake`).
//! - **One `rustls::ClientConfig` per pool** ([`super::TlsTrust`]), so one root store
//!   in memory and one session cache: a key's new connection resumes a session another
//!   key's opened (no certificate chain to verify again).
//! - **A refusal after the handshake is a TLS error.** Under TLS 1.3 a server judges
//!   the client's certificate after the client's handshake is over; its alert arrives
//!   with the first read, or the connection is already reset when the request is
//!   written. On a connection that has not yet delivered a byte of response, a reset
//!   or broken pipe is answered by the alert still waiting in the socket, if any.
//!
//! - **Cancellable as the TCP layer is.** The socket is attached to the attempt
//!   running on this thread (`crate::cancel`) before the handshake and before each
//!   read and write of an attempt ([`Socket::attach`]), so a cancel shuts it down and
//!   ends a blocked read or write at once; an attempt whose request was already
//!   cancelled fails with `ConnectionAborted` before touching the socket.
//!
//! A connection through a proxy (ureq's `ConnectProxyConnector`) is left to ureq's
//! `RustlsConnector`, next in the chain.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, NextTimeout, Transport,
};

use super::lean_tcp::{CORK_LIMIT, LeanTcp, Socket, adjust, io_error};

/// Adds TLS to a [`LeanTcp`] connection for `https://`; anything else passes through.
#[derive(Debug)]
pub(crate) struct LeanTlsConnector {
    pub(crate) config: Arc<rustls::ClientConfig>,
}

impl<A: Transport> Connector<Either<A, LeanTcp>> for LeanTlsConnector {
    type Out = Either<Either<A, LeanTcp>, LeanTls>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<Either<A, LeanTcp>>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let tcp = match chained {
            Some(Either::B(tcp)) if details.needs_tls() => tcp,
            other => return Ok(other.map(Either::A)),
        };
        let tls = LeanTls::over(
            tcp,
            &self.config,
            details.uri.host().unwrap_or_default(),
            (
                details.config.input_buffer_size(),
                details.config.output_buffer_size(),
            ),
            details.timeout,
        )?;
        // The handshake runs at this connection's first write, right after ureq's
        // connect returns (`LeanTls::shake`).
        Ok(Some(Either::B(tls)))
    }
}

impl LeanTls {
    /// TLS to `host` over `tcp`, with ureq's buffer sizes `buffers` (read, write) for
    /// the HTTP layer above. The handshake runs at the connection's first write (or
    /// read), bounded by what is left of `timeout` since the TCP connection was begun:
    /// the connect timeout (and the call's deadline) covers TCP and TLS together.
    pub(crate) fn over(
        tcp: LeanTcp,
        config: &Arc<rustls::ClientConfig>,
        host: &str,
        buffers: (usize, usize),
        timeout: NextTimeout,
    ) -> Result<LeanTls, ureq::Error> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| ureq::Error::Tls("invalid DNS name for TLS"))?;
        let conn = rustls::ClientConnection::new(config.clone(), name).map_err(tls_error)?;
        let conn = Box::new(conn);
        let (socket, started) = tcp.into_socket();
        Ok(LeanTls {
            socket,
            conn,
            buffers: GrowBuffers::new(buffers.0, buffers.1),
            read_timeout: None,
            write_timeout: None,
            corked: 0,
            fresh: true,
            eof: false,
            attached: 0,
            handshake: Some((timeout.not_zero().map(|d| started + *d), timeout)),
        })
    }
}

/// A rustls error as ureq reports an I/O failure: `transport::tls::tls_failure` finds it.
fn tls_error(e: rustls::Error) -> ureq::Error {
    ureq::Error::Io(io::Error::new(io::ErrorKind::InvalidData, e))
}

/// A TLS connection as ureq's `Transport`.
pub(crate) struct LeanTls {
    socket: Arc<Socket>,
    /// Boxed: ureq's connector chain moves the connection by value through every
    /// level's frame (`ChainedConnector::connect`), and each frame is sized for it.
    /// Every worker thread connects at least once, so those frames are its stack's
    /// resident high-water mark (`benches/cpu.rs --memory`).
    conn: Box<rustls::ClientConnection>,
    /// ureq's buffers for the HTTP layer above (plaintext).
    buffers: GrowBuffers,
    /// The socket's current `SO_RCVTIMEO` / `SO_SNDTIMEO` (`None`: none set).
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    /// Plaintext handed to rustls since the last flush (its records are corked).
    corked: usize,
    /// No application data received yet: a reset may hide the server's alert.
    fresh: bool,
    /// The socket reached end-of-file: the next read reports it (rustls's reader
    /// says whether the close was clean).
    eof: bool,
    /// The cancellable attempt (`crate::cancel`) this connection was last attached
    /// to (0: none).
    attached: u64,
    /// The handshake still to do, with the connect phase's deadline and timeout (the
    /// same as if it ran inside ureq's connect). It runs at the first write (or read)
    /// instead, from ureq's call rather than from under ureq's connector chain: that
    /// chain's frames (about 8 KiB) and the handshake's (rustls, x25519, the AES key
    /// schedule: 12 KiB) no longer stack up, and every worker connects at least once,
    /// so that depth was resident in each worker's stack for the pool's life
    /// (`benches/cpu.rs --memory`).
    handshake: Option<(Option<Instant>, NextTimeout)>,
}

impl std::fmt::Debug for LeanTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanTls")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// The socket as `Read`/`Write` for rustls.
struct Io<'a>(&'a std::net::TcpStream);

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self.0).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LeanTls {
    /// Completes the handshake by `deadline`. The client's last flight stays corked:
    /// it leaves with the request.
    fn handshake(
        &mut self,
        deadline: Option<Instant>,
        timeout: &NextTimeout,
    ) -> Result<(), ureq::Error> {
        while self.conn.is_handshaking() {
            let left = match deadline {
                Some(d) => Some(
                    d.checked_duration_since(Instant::now())
                        .filter(|l| !l.is_zero())
                        .ok_or(ureq::Error::Timeout(timeout.reason))?,
                ),
                None => None,
            };
            if self.conn.wants_write() {
                self.write_out(left, timeout)?;
                continue;
            }
            if !self.read_in(left, timeout)? {
                return Err(self.salvage(ureq::Error::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the TLS handshake",
                ))));
            }
        }
        Ok(())
    }

    /// Writes every pending TLS record, each blocked write within `left`.
    fn write_out(
        &mut self,
        left: Option<Duration>,
        timeout: &NextTimeout,
    ) -> Result<(), ureq::Error> {
        let stream = &self.socket.0;
        adjust(&mut self.write_timeout, left, |t| {
            stream.set_write_timeout(t)
        })?;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Io(stream)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let e = io_error(e, timeout);
                    return Err(self.salvage(e));
                }
            }
        }
        Ok(())
    }

    /// Reads once from the socket into rustls and processes what arrived. `false`:
    /// end of file.
    fn read_in(
        &mut self,
        left: Option<Duration>,
        timeout: &NextTimeout,
    ) -> Result<bool, ureq::Error> {
        let started = Instant::now();
        {
            let stream = &self.socket.0;
            adjust(&mut self.read_timeout, left, |t| stream.set_read_timeout(t))?;
        }
        let n = loop {
            match self.conn.read_tls(&mut Io(&self.socket.0)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    // Linux does not restart a read with SO_RCVTIMEO after a signal.
                    if let Some(w) = left {
                        let rest = w.saturating_sub(started.elapsed());
                        if rest.is_zero() {
                            return Err(ureq::Error::Timeout(timeout.reason));
                        }
                        self.socket.0.set_read_timeout(Some(rest))?;
                        self.read_timeout = Some(rest);
                    }
                }
                Err(e) => {
                    let e = io_error(e, timeout);
                    return Err(self.salvage(e));
                }
            }
        };
        if n == 0 {
            self.eof = true;
        }
        self.conn.process_new_packets().map_err(tls_error)?;
        Ok(n > 0)
    }

    /// `e` (a reset, a broken pipe, end of file) on a connection that has delivered no
    /// response yet: the server's alert, if one is waiting in the socket, explains it.
    fn salvage(&mut self, e: ureq::Error) -> ureq::Error {
        if !self.fresh || matches!(e, ureq::Error::Timeout(_)) {
            return e;
        }
        let mut waiting = Vec::new();
        drain_now(&self.socket.0, &mut waiting);
        let mut rest = &waiting[..];
        while !rest.is_empty() {
            match self.conn.read_tls(&mut rest) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if let Err(r) = self.conn.process_new_packets() {
                        return tls_error(r);
                    }
                }
            }
        }
        e
    }

    /// Completes the handshake if it is still to do. Called after `attach`: a cancel
    /// cuts the handshake too.
    fn shake(&mut self) -> Result<(), ureq::Error> {
        if let Some((deadline, timeout)) = self.handshake.take() {
            self.handshake(deadline, &timeout)?;
        }
        Ok(())
    }

    /// Completes the handshake now (attached to this thread's attempt first, so a
    /// cancel cuts it), before any buffer of the HTTP layer above is allocated: every
    /// worker of a starting pool waits in its handshake at once, and what each holds
    /// then is the pool's peak memory (`benches/cpu.rs --memory`).
    pub(crate) fn handshake_now(&mut self) -> Result<(), ureq::Error> {
        self.socket.attach(&mut self.attached)?;
        self.shake()
    }

    /// Frees the HTTP layer's buffers while the connection is idle (unread input, which
    /// the pool never keeps, stays).
    pub(crate) fn release_buffers(&mut self) {
        self.buffers.release();
    }

    /// Sends every record rustls holds.
    fn flush(&mut self, timeout: NextTimeout) -> Result<(), ureq::Error> {
        if !self.conn.wants_write() {
            return Ok(());
        }
        let timeout = timeout.for_write();
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        self.corked = 0;
        self.write_out(timeout.not_zero().map(|d| *d), &timeout)
    }
}

/// What is waiting in the socket, read without blocking (a dead connection's last
/// bytes: a rare path, so plain mode switches).
fn drain_now(stream: &std::net::TcpStream, into: &mut Vec<u8>) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while into.len() < 64 * 1024 {
        match (&*stream).read(&mut buf) {
            Ok(n) if n > 0 => into.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let _ = stream.set_nonblocking(false);
}

impl Transport for LeanTls {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.socket.attach(&mut self.attached)?;
        self.shake()?;
        let mut done = 0;
        while done < amount {
            // rustls encrypts at once; it holds at most its buffer limit in records.
            let n = self
                .conn
                .writer()
                .write(&self.buffers.output()[done..amount])?;
            done += n;
            self.corked += n;
            if n == 0 || self.corked >= CORK_LIMIT {
                self.flush(timeout)?;
            }
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.socket.attach(&mut self.attached)?;
        self.shake()?;
        self.flush(timeout)?;
        let timeout = timeout.for_read();
        let started = Instant::now();
        loop {
            // The input buffer is allocated only when there is something to read into it
            // (decrypted bytes, or the end of the stream to report).
            let state = self.conn.process_new_packets().map_err(tls_error)?;
            if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() || self.eof {
                let input = self.buffers.input_append_buf();
                match self.conn.reader().read(input) {
                    Ok(n) => {
                        self.buffers.input_appended(n);
                        if n > 0 {
                            self.fresh = false;
                        }
                        return Ok(n > 0);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // Nothing decrypted yet: wait without the buffers (a request in flight
            // spends nearly all its time here).
            self.buffers.release();
            let left = match timeout.not_zero() {
                Some(d) => {
                    let rest = d.saturating_sub(started.elapsed());
                    if rest.is_zero() || timeout.after.is_zero() {
                        return Err(ureq::Error::Timeout(timeout.reason));
                    }
                    Some(rest)
                }
                None => None,
            };
            self.read_in(left, &timeout)?;
            if self.conn.wants_write() {
                // A key update answered, an alert: sent now.
                self.flush(timeout)?;
            }
        }
    }

    fn is_open(&mut self) -> bool {
        // Records still to send mean a request half sent; decrypted bytes nobody asked
        // for, or the peer's close, mean the connection is done.
        if self.conn.wants_write() || self.handshake.is_some() {
            return false;
        }
        match self.conn.process_new_packets() {
            // Claimed for this thread's attempt before the probe, as the TCP layer's.
            Ok(s) if s.plaintext_bytes_to_read() == 0 && !s.peer_has_closed() => {
                self.socket.claim_and_probe(&mut self.attached)
            }
            _ => false,
        }
    }

    fn is_tls(&self) -> bool {
        true
    }
}

/// ureq's buffers for the HTTP layer over TLS, the input buffer grown on demand.
///
/// ureq's `LazyBuffers` allocates the whole input buffer (the largest response head
/// accepted, 12 KiB) at once and keeps at least 10 KiB of it free as scratch space for
/// encoding a chunked request body. keypool never sends a chunked body (every body is
/// a byte slice sent with its `Content-Length`, which ureq copies straight into the
/// output buffer), and a response head is 1–3 KiB, so the input buffer starts at
/// [`INPUT_START`] and doubles, up to the configured size, only when a read fills it
/// (a larger head, a long body). The plaintext reaches it from rustls's own buffer,
/// so a smaller buffer costs no extra system call. A connection is resident for as
/// long as a request is in flight on it: 8 KiB less per connection
/// (`benches/cpu.rs --memory`).
#[derive(Debug)]
struct GrowBuffers {
    /// The configured input size: the most the input buffer grows to (ureq's
    /// `max_response_header_size` is set to the same).
    max_input: usize,
    output_size: usize,
    input: Vec<u8>,
    /// `input[consumed..filled]` is unread.
    filled: usize,
    consumed: usize,
    /// The last read filled the buffer: grow before the next.
    full: bool,
    output: Vec<u8>,
    progress: bool,
}

/// The input buffer's first size over TLS.
const INPUT_START: usize = 4 * 1024;

/// Buffers of [`INPUT_START`] bytes given back by connections that stopped moving bytes
/// (a request sent, a response read), for the next connection that needs one: most
/// of a connection's life is a wait that holds no buffer, so a pool of any size needs
/// only about as many as run at once. Taking one from here costs no `malloc` of 4 KiB
/// (which takes a lock shared by many threads: it was a third of the futex calls a
/// busy pool made) and no zeroing; at most [`SPARES_MAX`] wait here, 256 KiB in all,
/// for the whole process.
mod spares {
    use super::INPUT_START;
    use crossbeam_channel::{Receiver, Sender, bounded};
    use std::sync::LazyLock;

    /// The most buffers waiting for reuse.
    pub(super) const SPARES_MAX: usize = 64;

    /// Both ends of the list of spares.
    type Spares = (Sender<Vec<u8>>, Receiver<Vec<u8>>);

    static SPARES: LazyLock<Spares> = LazyLock::new(|| bounded(SPARES_MAX));

    /// A buffer of `INPUT_START` bytes: a spare (holding some earlier connection's
    /// bytes, which nothing reads: every reader reads only what it wrote), or a new
    /// one, zeroed.
    pub(super) fn take() -> Vec<u8> {
        SPARES.1.try_recv().unwrap_or_else(|_| vec![0; INPUT_START])
    }

    /// Keeps `b` for reuse if it is a standard buffer and there is room; frees it
    /// otherwise (one a large answer grew is not kept).
    pub(super) fn give(b: Vec<u8>) {
        if keepable(&b) {
            let _ = SPARES.0.try_send(b);
        }
    }

    /// A standard buffer: `INPUT_START` bytes, no more reserved (one a large answer
    /// grew, or resized to 4 KiB from a smaller limit, is not).
    pub(super) fn keepable(b: &Vec<u8>) -> bool {
        b.len() == INPUT_START && b.capacity() == INPUT_START
    }
}

/// Scratch space ureq asks for only to chunk a request body (which keypool never
/// sends); kept so that one would still go out, in smaller chunks.
const MIN_TMP: usize = 1024;

impl GrowBuffers {
    fn new(max_input: usize, output_size: usize) -> GrowBuffers {
        GrowBuffers {
            max_input: max_input.max(1),
            output_size: output_size.max(1),
            input: Vec::new(),
            filled: 0,
            consumed: 0,
            full: false,
            output: Vec::new(),
            progress: false,
        }
    }

    fn ensure_output(&mut self) {
        if self.output.is_empty() && self.output_size == INPUT_START {
            self.output = spares::take();
        } else if self.output.len() < self.output_size {
            self.output.resize(self.output_size, 0);
        }
    }

    fn ensure_input(&mut self) {
        if self.input.is_empty() {
            // Always from the first size: a stream's small events, each taken after
            // a wait, use 4 KiB, not what one large answer grew it to.
            if self.max_input >= INPUT_START {
                self.input = spares::take();
            } else {
                self.input.resize(self.max_input, 0);
            }
        }
    }

    /// Gives the output buffer back: everything in it was handed to rustls, which
    /// encrypts at once.
    fn release_output(&mut self) {
        spares::give(std::mem::take(&mut self.output));
    }

    /// Gives both buffers back while the connection waits or sits idle: the output
    /// buffer, and the input buffer if it holds no unread byte. Every worker's
    /// connection idles at the end of a batch; it then holds rustls's state and read
    /// buffer, not these 8 KiB or more (`benches/cpu.rs --memory`). Taken again once
    /// per request, from the spares.
    fn release(&mut self) {
        self.release_output();
        if self.consumed == self.filled && !self.input.is_empty() {
            spares::give(std::mem::take(&mut self.input));
            self.consumed = 0;
            self.filled = 0;
            self.full = false;
        }
    }

    /// Moves the unread bytes to the front when that frees room (as `LazyBuffers`
    /// does), then grows the buffer if the last read filled it.
    fn make_room(&mut self) {
        if self.consumed == self.filled {
            self.consumed = 0;
            self.filled = 0;
        } else if self.consumed > 0 && self.filled > self.input.len() / 2 {
            self.input.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
        }
        if (self.full || self.filled == self.input.len()) && self.input.len() < self.max_input {
            let size = (self.input.len() * 2).min(self.max_input);
            self.input.resize(size, 0);
        }
        self.full = false;
    }
}

impl Buffers for GrowBuffers {
    fn output(&mut self) -> &mut [u8] {
        self.ensure_output();
        &mut self.output
    }

    fn input(&self) -> &[u8] {
        &self.input[self.consumed..self.filled]
    }

    fn input_append_buf(&mut self) -> &mut [u8] {
        self.ensure_input();
        self.make_room();
        &mut self.input[self.filled..]
    }

    fn input_appended(&mut self, amount: usize) {
        self.filled += amount;
        assert!(self.filled <= self.input.len());
        self.full = amount > 0 && self.filled == self.input.len();
    }

    fn input_consume(&mut self, amount: usize) {
        self.progress = amount > 0;
        self.consumed += amount;
        assert!(self.consumed <= self.filled);
    }

    fn tmp_and_output(&mut self) -> (&mut [u8], &mut [u8]) {
        self.ensure_output();
        self.ensure_input();
        self.make_room();
        if self.input.len() - self.filled < MIN_TMP {
            let size = self.filled + MIN_TMP;
            self.input.resize(size, 0);
        }
        (&mut self.input[self.filled..], &mut self.output)
    }

    fn can_use_input(&self) -> bool {
        self.consumed < self.filled && self.progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_grows_only_when_filled_up_to_its_limit() {
        let mut b = GrowBuffers::new(12 * 1024, 4 * 1024);
        assert_eq!(b.input_append_buf().len(), INPUT_START);
        b.input_appended(100);
        b.input_consume(100);
        // Not filled: the same size, all free again.
        assert_eq!(b.input_append_buf().len(), INPUT_START);
        let n = b.input_append_buf().len();
        b.input_appended(n);
        assert_eq!(b.input().len(), INPUT_START);
        // Filled: doubled, the unread bytes kept.
        assert_eq!(b.input_append_buf().len(), INPUT_START);
        assert_eq!(b.input().len(), INPUT_START);
        let n = b.input_append_buf().len();
        b.input_appended(n);
        // At the limit: no more room until something is consumed.
        assert_eq!(b.input_append_buf().len(), 12 * 1024 - 2 * INPUT_START);
        let n = b.input_append_buf().len();
        b.input_appended(n);
        assert_eq!(b.input().len(), 12 * 1024);
        assert!(b.input_append_buf().is_empty());
        b.input_consume(12 * 1024);
        assert_eq!(b.input_append_buf().len(), 12 * 1024);
        assert_eq!(b.output().len(), 4 * 1024);
    }

    #[test]
    fn only_standard_buffers_are_kept_for_reuse() {
        let mut b = GrowBuffers::new(12 * 1024, 4 * 1024);
        b.input_append_buf();
        assert!(spares::keepable(&b.input));
        b.output();
        assert!(spares::keepable(&b.output));
        let n = b.input_append_buf().len();
        b.input_appended(n);
        b.input_append_buf();
        // Filled: grown past the standard size, so freed, not kept, once read.
        assert!(!spares::keepable(&b.input));
        // Resized to 4 KiB from a smaller buffer: more reserved than 4 KiB.
        let mut small = vec![0u8; 3 * 1024];
        small.resize(INPUT_START, 0);
        assert_eq!(small.len(), INPUT_START);
        assert_eq!(spares::keepable(&small), small.capacity() == INPUT_START);
        assert!(!spares::keepable(&vec![0u8; 2 * INPUT_START]));
        // A limit under 4 KiB never takes a spare.
        let mut tiny = GrowBuffers::new(1024, 4 * 1024);
        assert_eq!(tiny.input_append_buf().len(), 1024);
        const { assert!(spares::SPARES_MAX * INPUT_START <= 256 * 1024) };
    }

    #[test]
    fn unread_input_moves_to_the_front_and_scratch_space_is_kept() {
        let mut b = GrowBuffers::new(12 * 1024, 4 * 1024);
        b.input_append_buf()[2990..3000].copy_from_slice(b"0123456789");
        b.input_appended(3000);
        b.input_consume(2990);
        assert!(b.can_use_input());
        assert_eq!(b.input(), b"0123456789");
        // More than half the buffer filled: the unread bytes move to the front.
        assert_eq!(b.input_append_buf().len(), INPUT_START - 10);
        assert_eq!(b.input(), b"0123456789");
        let (tmp, out) = b.tmp_and_output();
        assert!(tmp.len() >= MIN_TMP);
        assert_eq!(out.len(), 4 * 1024);
    }
}
