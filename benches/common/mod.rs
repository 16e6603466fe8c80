//! The mock server in a child process, shared by the benchmark programs: the client's
//! CPU time then is its own. The bench binary re-runs itself with
//! `KEYPOOL_BENCH_ROLE=mock` (see each bench's `main`), prints the mock's URL and runs
//! until its stdin closes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

/// A mock server running in a child process.
pub struct MockProcess {
    child: Child,
    /// The mock's base URL.
    pub url: String,
    /// For a TLS mock ([`MockProcess::start_tls`]): the file holding its CA certificate.
    #[allow(dead_code)]
    pub ca_file: Option<String>,
}

impl MockProcess {
    /// Starts the mock with `latency_ms` per request on `threads` threads.
    pub fn start(latency_ms: u64, threads: usize) -> MockProcess {
        Self::spawn(latency_ms, threads, false)
    }

    /// Starts a TLS mock (`https://`, a generated CA written to [`MockProcess::ca_file`]).
    #[allow(dead_code)]
    pub fn start_tls(latency_ms: u64, threads: usize) -> MockProcess {
        Self::spawn(latency_ms, threads, true)
    }

    fn spawn(latency_ms: u64, threads: usize, tls: bool) -> MockProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("KEYPOOL_BENCH_ROLE", "mock")
            .env("MOCK_TLS", if tls { "1" } else { "0" })
            .env("MOCK_LATENCY_MS", latency_ms.to_string())
            .env("MOCK_THREADS", threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the mock process");
        let mut out = BufReader::new(child.stdout.as_mut().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let mut ca = String::new();
        if tls {
            out.read_line(&mut ca).unwrap();
        }
        MockProcess {
            child,
            url: line.trim().to_owned(),
            ca_file: tls.then(|| ca.trim().to_owned()),
        }
    }
}

impl Drop for MockProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // EOF: the mock exits
        let _ = self.child.wait();
    }
}

/// The child side: serves until stdin closes.
pub fn run_mock() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let cfg = keypool_mock::MockConfig {
        latency_ms: env("MOCK_LATENCY_MS", 0),
        threads: env("MOCK_THREADS", 2) as usize,
        ..keypool_mock::MockConfig::default()
    };
    let tls = std::env::var("MOCK_TLS").as_deref() == Ok("1");
    let server = if tls {
        keypool_mock::MockServer::start_tls(cfg).unwrap()
    } else {
        keypool_mock::MockServer::start(cfg).unwrap()
    };
    println!("{}", server.url());
    if let Some(t) = server.tls() {
        let path =
            std::env::temp_dir().join(format!("keypool-bench-ca-{}.pem", server.addr().port()));
        t.write_ca(&path).unwrap();
        println!("{}", path.display());
    }
    std::io::stdout().flush().unwrap();
    let mut sink = String::new();
    while std::io::stdin()
        .read_line(&mut sink)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
    server.shutdown();
}
