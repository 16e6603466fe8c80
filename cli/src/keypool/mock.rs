//! `keypool mock`: the bundled mock server (crate `keypool-mock`) on loopback.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use keypool_mock::{MockConfig, MockServer};

use crate::args::MockArgs;

/// The server configuration the flags describe.
pub fn config(a: &MockArgs) -> MockConfig {
    MockConfig {
        latency_ms: a.latency_ms,
        jitter_ms: a.jitter_ms,
        fail_429_rate: a.fail_429_rate,
        retry_after_ms: a.retry_after_ms,
        fail_500_rate: a.fail_500_rate,
        fail_502_rate: a.fail_502_rate,
        fail_503_rate: a.fail_503_rate,
        drop_rate: a.drop_rate,
        slow_rate: a.slow_rate,
        slow_ms: a.slow_ms,
        malformed_rate: a.malformed_rate,
        error_in_200_rate: a.error_in_200_rate,
        seed: a.seed,
        threads: a.threads as usize,
        key_capacity: a.key_capacity,
        cost_per_request: a.cost_per_request,
        ..MockConfig::default()
    }
}

/// Starts the server, prints its URL on stdout, serves until Ctrl-C (or SIGTERM).
pub fn run(a: &MockArgs) -> Result<ExitCode, String> {
    let interrupts = crate::signals::interrupts()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, a.port));
    let server = MockServer::start_on(addr, config(a))
        .map_err(|e| format!("cannot start the mock server on {addr}: {e}"))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", server.url())
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing to stdout: {e}"))?;
    drop(out);
    eprintln!("keypool mock: serving on {} until Ctrl-C", server.url());
    let _ = interrupts.recv();
    let stats = server.stats();
    eprintln!(
        "keypool mock: {} requests, at most {} in flight",
        stats.total_requests, stats.max_in_flight_total
    );
    server.shutdown();
    Ok(ExitCode::SUCCESS)
}
