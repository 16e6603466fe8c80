//! The server handle, its runtime and the accept loop.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpSocket;
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::stats::Accounting;
use crate::{KeyRecord, KeyRule, MockConfig, MockStats};

/// A key rule and how many of its `fail_first` failures are left.
pub(crate) struct RuleState {
    pub(crate) rule: KeyRule,
    pub(crate) remaining: u32,
    /// When the rule was set (for [`KeyRule::fail_for_ms`]).
    pub(crate) set_at: std::time::Instant,
}

/// Configuration that changes at runtime.
pub(crate) struct Control {
    pub(crate) cfg: MockConfig,
    pub(crate) rng: fastrand::Rng,
    pub(crate) rules: HashMap<String, RuleState>,
    /// Per-key credit (`GET …/key`, 402 when spent, `usage.cost`).
    pub(crate) credits: HashMap<String, crate::MockCredit>,
    /// Per-key request budget use ([`MockConfig::request_budget`]): (window, used).
    pub(crate) budgets: HashMap<String, (u128, u64)>,
    /// Per-key request budgets replacing the global one ([`MockServer::set_request_budget`]).
    pub(crate) key_budgets: HashMap<String, Option<(u64, u64)>>,
    /// The model ids `GET …/models` lists (`None`: the route answers 404).
    pub(crate) models: Option<Vec<String>>,
}

/// The models `GET …/models` lists until [`MockServer::set_models`] changes them.
pub(crate) const DEFAULT_MODELS: [&str; 2] = ["mock-model", "mock-embedding"];

/// State shared by the handle and every connection task.
pub(crate) struct Shared {
    pub(crate) control: Mutex<Control>,
    pub(crate) acc: Arc<Accounting>,
    pub(crate) ids: AtomicU64,
    pub(crate) timer: crate::timer::PreciseTimer,
}

/// A running mock server. Stops on [`MockServer::shutdown`] or when dropped.
///
/// All methods take `&self` and may be called from any thread while requests are being
/// served.
pub struct MockServer {
    addr: SocketAddr,
    tls: Option<crate::MockTls>,
    shared: Arc<Shared>,
    runtime: Option<Runtime>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for MockServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn rng_for(seed: Option<u64>) -> fastrand::Rng {
    match seed {
        Some(s) => fastrand::Rng::with_seed(s),
        None => fastrand::Rng::new(),
    }
}

impl MockServer {
    /// Starts a server on `127.0.0.1` with a free port chosen by the system.
    pub fn start(cfg: MockConfig) -> io::Result<MockServer> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), cfg)
    }

    /// Starts a server on `addr` (use port 0 for a free port). The server runs its own
    /// tokio runtime with [`MockConfig::threads`] worker threads.
    pub fn start_on(addr: SocketAddr, cfg: MockConfig) -> io::Result<MockServer> {
        Self::start_with(addr, cfg, None)
    }

    /// Starts a TLS server (`https://`) on `127.0.0.1` with a free port, serving a
    /// certificate from a freshly generated CA ([`MockTls::generate`](crate::MockTls::generate)):
    /// trust [`MockServer::ca_pem`] to reach it.
    pub fn start_tls(cfg: MockConfig) -> io::Result<MockServer> {
        Self::start_with(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            cfg,
            Some(crate::MockTls::generate()?),
        )
    }

    /// Starts a server on `addr` (use port 0 for a free port), serving TLS with `tls`
    /// when it is `Some`. The server runs its own tokio runtime with
    /// [`MockConfig::threads`] worker threads.
    pub fn start_with(
        addr: SocketAddr,
        cfg: MockConfig,
        tls: Option<crate::MockTls>,
    ) -> io::Result<MockServer> {
        let acceptor = match &tls {
            Some(t) => Some(tokio_rustls::TlsAcceptor::from(t.server_config()?)),
            None => None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads.max(1))
            .thread_name("keypool-mock")
            .enable_all()
            .build()?;
        let listener = {
            let _guard = runtime.enter();
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(4096)?
        };
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                rng: rng_for(cfg.seed),
                cfg,
                rules: HashMap::new(),
                credits: HashMap::new(),
                budgets: HashMap::new(),
                key_budgets: HashMap::new(),
                models: Some(DEFAULT_MODELS.iter().map(|m| (*m).to_owned()).collect()),
            }),
            acc: Arc::new(Accounting::new()),
            ids: AtomicU64::new(0),
            timer: crate::timer::PreciseTimer::start()?,
        });
        let (stop, stopped) = watch::channel(false);
        runtime.spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            acceptor,
            stopped,
        ));
        Ok(MockServer {
            addr,
            tls,
            shared,
            runtime: Some(runtime),
            stop,
        })
    }

    /// The base URL: `http://127.0.0.1:PORT/v1`, or `https://…` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}/v1", self.addr)
    }

    /// The PEM certificate a client must trust to reach this TLS server, or `None` for
    /// a plain-HTTP one.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(crate::MockTls::ca_pem)
    }

    /// The TLS identity this server serves, or `None` for a plain-HTTP one.
    pub fn tls(&self) -> Option<&crate::MockTls> {
        self.tls.as_ref()
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the global configuration (latency and fault rates) for requests that
    /// arrive from now on. `threads` is ignored; the random generator is reseeded only
    /// when `seed` is `Some`.
    pub fn set_config(&self, cfg: MockConfig) {
        let mut c = self.shared.control.lock();
        if let Some(seed) = cfg.seed {
            c.rng = fastrand::Rng::with_seed(seed);
        }
        c.cfg = cfg;
    }

    /// Sets (or replaces) the rule for the key `key` (the bearer token). A default
    /// [`KeyRule`] removes any override.
    pub fn set_key_rule(&self, key: &str, rule: KeyRule) {
        let mut c = self.shared.control.lock();
        c.rules.insert(
            key.to_owned(),
            RuleState {
                remaining: rule.fail_first,
                rule,
                set_at: std::time::Instant::now(),
            },
        );
    }

    /// Gives the key `key` its own request budget `(limit, window_ms)` (`None`: none),
    /// replacing [`MockConfig::request_budget`] for it.
    pub fn set_request_budget(&self, key: &str, budget: Option<(u64, u64)>) {
        self.shared
            .control
            .lock()
            .key_budgets
            .insert(key.to_owned(), budget);
    }

    /// Gives the key `key` a cap of `limit` dollars (`None`: no cap), keeping what it
    /// spent so far.
    pub fn set_credit(&self, key: &str, limit: Option<f64>) {
        self.shared
            .control
            .lock()
            .credits
            .entry(key.to_owned())
            .or_default()
            .limit = limit;
    }

    /// Makes `GET …/key` answer exactly `body` (status 200) for the key `key`; `None`
    /// restores the normal answer.
    pub fn set_key_body(&self, key: &str, body: Option<String>) {
        self.shared
            .control
            .lock()
            .credits
            .entry(key.to_owned())
            .or_default()
            .key_body = body;
    }

    /// Sets the model ids `GET {,/v1,/api/v1}/models` lists (OpenAI's shape,
    /// `{"object": "list", "data": [{"id", "object": "model", …}]}`); `None` makes the
    /// route answer 404, as a server without it does. Defaults to `mock-model` and
    /// `mock-embedding`. (Requests are served whatever their model.)
    pub fn set_models(&self, models: Option<Vec<String>>) {
        self.shared.control.lock().models = models;
    }

    /// The key's credit record, or `None` if it has none (no cap set, nothing spent,
    /// never checked).
    pub fn credit(&self, key: &str) -> Option<crate::MockCredit> {
        self.shared.control.lock().credits.get(key).cloned()
    }

    /// A snapshot of all accounting.
    pub fn stats(&self) -> MockStats {
        self.shared.acc.snapshot()
    }

    /// A snapshot of one key's accounting, or `None` if it has sent no request.
    pub fn key_stats(&self, key: &str) -> Option<KeyRecord> {
        self.shared.acc.key(key)
    }

    /// Clears all counters and logs. Requests in flight stay counted as in flight (and
    /// as the new maximum) until they finish, but are not logged.
    pub fn reset_stats(&self) {
        self.shared.acc.reset();
    }

    /// Stops the server: closes the listener and every connection at once (requests in
    /// flight are abandoned) and joins nothing that could hang.
    pub fn shutdown(self) {
        // Drop does the work.
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(rt) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Dropped inside some async context, where blocking is not allowed.
                rt.shutdown_background();
            } else {
                // Tasks are dropped, not awaited; this waits only for the worker threads.
                rt.shutdown_timeout(Duration::from_secs(1));
            }
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut warned = false;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.changed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if e.raw_os_error() == Some(24) && !warned {
                    warned = true;
                    eprintln!(
                        "keypool-mock: accept failed: too many open files (EMFILE); raise `ulimit -n`"
                    );
                }
                // Out of file descriptors or a transient error: back off briefly.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let conn = shared.acc.connection_opened();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let acc = Arc::clone(&shared.acc);
            let svc = service_fn(move |req| crate::handler::handle(Arc::clone(&shared), conn, req));
            let mut server = http1::Builder::new();
            server.keep_alive(true);
            match acceptor {
                None => {
                    let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => {
                        let _ = server.serve_connection(TokioIo::new(tls), svc).await;
                    }
                    Err(_) => acc.tls_failed(),
                },
            }
        });
    }
}
