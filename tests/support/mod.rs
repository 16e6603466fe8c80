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

/// Retries 1–5 ms apart: tests wait on the deadline, not on backoff.
pub fn fast_retry() -> keypool::RetryConfig {
    keypool::RetryConfig::default()
        .base_delay(std::time::Duration::from_millis(1))
        .max_delay(std::time::Duration::from_millis(5))
}

/// The answers OpenRouter and OpenAI document, and hostile ones, to a pool built on
/// `base` (its URL and trust set) with three keys of 2 workers, `rpm` 600 each, key
/// proofs on and a 2 s deadline: an OpenRouter moderation 403 (flagged, tried once), an
/// OpenAI `model_not_found` 404, an OpenRouter upstream 429 with provider metadata and
/// a `Retry-After` of 99999999999999999999999, a 400 echoing the keys, a truncated 200
/// (`InvalidResponse`), and a server stalling past the deadline. Every line gets one
/// result within 3 s, no key appears in any result, `Debug`, stats or metrics, no key is
/// disabled, and every key serves afterwards. `s` names the run in failures.
pub fn documented_and_hostile_answers(base: keypool::ConfigBuilder, s: &str) {
    use keypool::{Error, KeyConfig, Pool, Request};
    use serde_json::{Value, json};
    use std::time::{Duration, Instant};
    const OR_MODERATION: &str = r#"{"error":{"code":403,"message":"openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for \"harassment\"","metadata":{"reasons":["harassment"],"flagged_input":"you are a ...","provider_name":"OpenAI","model_slug":"openai/gpt-4o"}}}"#;
    const OPENAI_404: &str = r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;
    const OR_UPSTREAM_429: &str = r#"{"error":{"code":429,"message":"Provider returned error","metadata":{"provider_name":"Acme","raw":"acme/x is temporarily rate-limited upstream. Please retry shortly."}}}"#;
    let secret = |i: usize| format!("sk-or-v1-SECRET{i}xxxxxxxxxxxxxxxxxxxxxxxx");
    let echoed = format!(
        r#"{{"error":{{"message":"bad request from {} / {} / {}","code":400}}}}"#,
        secret(0),
        secret(1),
        secret(2)
    );
    let line = |i: usize, model: &str, mock: Value| {
        Request::new(&json!({
            "model": model,
            "messages": [{"role": "user", "content": format!("line {i}")}],
            "mock": mock,
        }))
    };
    let mut b = base.deadline_ms(2_000).retry(fast_retry());
    for i in 0..3 {
        b = b.key_config(KeyConfig::new(secret(i)).max_concurrent(2).rpm(600));
    }
    let pool = Pool::new(b.build().unwrap()).unwrap();
    let special = |i: usize| match i {
        3 => Some(line(i, "m", json!({"status": 403, "body": OR_MODERATION}))),
        5 => Some(line(i, "gpt-9", json!({"status": 404, "body": OPENAI_404}))),
        7 => Some(line(
            i,
            "acme/x",
            json!({"status": 429, "body": OR_UPSTREAM_429,
                   "retry_after": "99999999999999999999999"}),
        )),
        9 => Some(line(i, "m", json!({"status": 400, "body": echoed}))),
        11 => Some(line(
            i,
            "m",
            json!({"status": 200, "body": r#"{"id":"x","choices":[{"index":0,"#}),
        )),
        13 => Some(line(i, "m", json!({"delay_ms": 20_000}))),
        _ => None,
    };
    let t0 = Instant::now();
    let results =
        pool.batch((0..20).map(|i| special(i).unwrap_or_else(|| line(i, "m", json!({})))));
    let took = t0.elapsed();
    // The stalled line ends at its deadline (2 s), everything else long before.
    assert!(took < Duration::from_millis(3_000), "{s}: {took:?}");
    assert_eq!(results.len(), 20, "{s}");
    for (i, r) in results.iter().enumerate() {
        let shown = format!("{r:?}");
        assert!(!shown.contains("SECRET"), "{s}: line {i}: {shown}");
        match (i, r) {
            (3, Err(e)) => {
                assert!(matches!(e, Error::Flagged { .. }), "{s}: {e:?}");
                assert_eq!(e.attempts(), 1, "{s}");
            }
            (5, Err(e)) => assert_eq!(e.http_status(), Some(404), "{s}: {e}"),
            (7 | 13, Err(_)) => {}
            (9, Err(e)) => {
                assert_eq!(e.http_status(), Some(400), "{s}: {e}");
                assert!(!e.to_string().contains("SECRET"), "{s}: {e}");
            }
            (11, Err(e)) => {
                assert!(matches!(e, Error::InvalidResponse { .. }), "{s}: {e:?}")
            }
            (3 | 5 | 7 | 9 | 11 | 13, Ok(_)) => panic!("{s}: line {i} succeeded"),
            (_, r) => assert!(r.is_ok(), "{s}: line {i}: {r:?}"),
        }
    }
    let stats = pool.stats();
    let text = format!("{stats:?} {}", stats.to_prometheus());
    assert!(!text.contains("SECRET"), "{s}: {text}");
    for k in &stats.keys {
        assert_eq!(
            k.disabled_reason, None,
            "{s}: key {} was taken out",
            k.label
        );
    }
    // Every key still serves.
    for r in pool.batch((0..6).map(|i| line(100 + i, "m", json!({})))) {
        assert!(r.is_ok(), "{s}: {r:?}");
    }
    pool.close();
}
