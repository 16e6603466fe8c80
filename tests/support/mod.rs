//! Shared helpers for the integration tests: fake transports that never touch the
//! network, and config shortcuts for the mock server.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::{Receiver, Sender};
use keypool::{HttpRequest, HttpResponse, Transport, TransportError, TransportSettings};

pub const OK_BODY: &str = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;

pub fn ok() -> HttpResponse {
    HttpResponse {
        status: 200,
        headers: vec![],
        body: OK_BODY.as_bytes().to_vec(),
    }
}

/// A transport built from a closure: `f(key label, request) -> result`.
pub struct FnTransport<F>(pub String, pub Arc<F>);

impl<F> Transport for FnTransport<F>
where
    F: Fn(&str, &HttpRequest<'_>) -> Result<HttpResponse, TransportError> + Send + Sync,
{
    fn send(&self, req: &HttpRequest<'_>) -> Result<HttpResponse, TransportError> {
        (self.1)(&self.0, req)
    }
}

/// A factory for `Pool::with_transport` from a closure shared by every key.
pub fn factory<F>(f: F) -> impl Fn(&TransportSettings) -> Arc<dyn Transport> + Send + Sync + 'static
where
    F: Fn(&str, &HttpRequest<'_>) -> Result<HttpResponse, TransportError> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    move |s: &TransportSettings| {
        Arc::new(FnTransport(s.label.clone(), f.clone())) as Arc<dyn Transport>
    }
}

/// A gate: transports call `pass()`, which reports "entered" and blocks until the
/// gate opens (its sender is dropped).
#[derive(Clone)]
pub struct Gate {
    entered_tx: Sender<String>,
    open_rx: Receiver<()>,
    pub passed: Arc<AtomicUsize>,
}

pub struct GateControl {
    pub entered: Receiver<String>,
    open_tx: Option<Sender<()>>,
}

impl GateControl {
    pub fn open(&mut self) {
        self.open_tx.take();
    }
}

pub fn gate() -> (Gate, GateControl) {
    let (entered_tx, entered) = crossbeam_channel::unbounded();
    let (open_tx, open_rx) = crossbeam_channel::bounded(0);
    (
        Gate {
            entered_tx,
            open_rx,
            passed: Arc::new(AtomicUsize::new(0)),
        },
        GateControl {
            entered,
            open_tx: Some(open_tx),
        },
    )
}

impl Gate {
    pub fn pass(&self, label: &str) {
        let _ = self.entered_tx.send(label.to_owned());
        let _ = self.open_rx.recv(); // returns Err when the gate opens
        self.passed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Names of this process's threads that belong to keypool.
pub fn keypool_threads() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            if let Ok(name) = std::fs::read_to_string(e.path().join("comm")) {
                let name = name.trim().to_owned();
                if name.starts_with("keypool-") {
                    out.push(name);
                }
            }
        }
    }
    out
}

/// A factory whose transport answers 200 once the gate opens; every call reports on
/// `entered` first.
pub fn gated_ok() -> (
    impl Fn(&TransportSettings) -> Arc<dyn Transport> + Send + Sync + 'static,
    GateControl,
) {
    let (g, ctl) = gate();
    let f = factory(move |label, _| {
        g.pass(label);
        Ok(ok())
    });
    (f, ctl)
}

/// A mock over one scheme, and the config that trusts it.
pub struct Mock {
    pub server: keypool_mock::MockServer,
    pub tls: keypool::TlsConfig,
    dir: Option<std::path::PathBuf>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub fn mock(cfg: keypool_mock::MockConfig, https: bool) -> Mock {
    if !https {
        return Mock {
            server: keypool_mock::MockServer::start(cfg).unwrap(),
            tls: keypool::TlsConfig::default(),
            dir: None,
        };
    }
    let server = keypool_mock::MockServer::start_tls(cfg).unwrap();
    let dir = std::env::temp_dir().join(format!(
        "keypool-schemes-{}-{}",
        std::process::id(),
        server.addr().port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, server.ca_pem().unwrap()).unwrap();
    Mock {
        server,
        tls: keypool::TlsConfig::default().ca_file(ca.display().to_string()),
        dir: Some(dir),
    }
}

/// A mock server (2 threads) that reports `cost` dollars as `usage.cost` per request.
pub fn server(cost: f64) -> keypool_mock::MockServer {
    keypool_mock::MockServer::start(keypool_mock::MockConfig {
        threads: 2,
        cost_per_request: cost,
        ..keypool_mock::MockConfig::default()
    })
    .unwrap()
}

/// `n` chat requests for model `m`, prompts `p0`, `p1`, ….
pub fn chats(n: usize) -> impl Iterator<Item = keypool::Request> {
    (0..n).map(|i| keypool::Request::chat("m", [("user", &*format!("p{i}"))]))
}

/// The requests the mock received with `key`.
pub fn requests(server: &keypool_mock::MockServer, key: &str) -> u64 {
    server.key_stats(key).map_or(0, |r| r.requests)
}
