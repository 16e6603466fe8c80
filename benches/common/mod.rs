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
    /// For [`MockProcess::start_tls_favoured`]: whether the mock runs at nice -10
    /// (`None`: not asked; `Some(false)`: refused, which needs `CAP_SYS_NICE`).
    #[allow(dead_code)]
    pub favoured: Option<bool>,
}

impl MockProcess {
    /// Starts the mock with `latency_ms` per request on `threads` threads.
    pub fn start(latency_ms: u64, threads: usize) -> MockProcess {
        Self::spawn(latency_ms, threads, false, false)
    }

    /// Starts a TLS mock (`https://`, a generated CA written to [`MockProcess::ca_file`]).
    #[allow(dead_code)]
    pub fn start_tls(latency_ms: u64, threads: usize) -> MockProcess {
        Self::spawn(latency_ms, threads, true, false)
    }

    /// [`MockProcess::start_tls`] at nice -10 (every thread of the mock): the
    /// scheduler then serves the mock before the client's threads, so its answers
    /// are not delayed by how many threads the client runs on the same cores, as a
    /// remote server's are not. Needs `CAP_SYS_NICE` (root); see
    /// [`MockProcess::favoured`].
    #[allow(dead_code)]
    pub fn start_tls_favoured(latency_ms: u64, threads: usize) -> MockProcess {
        Self::spawn(latency_ms, threads, true, true)
    }

    fn spawn(latency_ms: u64, threads: usize, tls: bool, favoured: bool) -> MockProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("KEYPOOL_BENCH_ROLE", "mock")
            .env("MOCK_NICE", if favoured { "-10" } else { "" })
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
        let mut nice = String::new();
        if favoured {
            out.read_line(&mut nice).unwrap();
        }
        MockProcess {
            child,
            url: line.trim().to_owned(),
            ca_file: tls.then(|| ca.trim().to_owned()),
            favoured: favoured.then(|| nice.trim() == "nice ok"),
        }
    }
}

impl MockProcess {
    /// The mock process's id.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A process's CPU time so far (user + system, every thread), in microseconds, from
/// `/proc/<pid>/stat` (clock-tick resolution); 0 if it cannot be read.
#[allow(dead_code)]
pub fn process_cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field of
    // the line, the 12th after the closing parenthesis; stime the next.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf reads a constant; no pointers.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 * 1e6 / per_second as f64
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
    // Before the server's threads start: they inherit this thread's nice value.
    let nice = std::env::var("MOCK_NICE")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .map(|n| {
            // SAFETY: setpriority on this thread (who = 0); no pointers.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) == 0 }
        });
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
    if let Some(ok) = nice {
        println!("{}", if ok { "nice ok" } else { "nice refused" });
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
