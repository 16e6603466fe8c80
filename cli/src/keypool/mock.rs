//! `keypool mock`: the bundled mock server (crate `keypool-mock`) on loopback, over
//! http:// or (`--tls`) https:// with a generated CA.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;

use keypool_mock::{MockConfig, MockServer, MockTls};

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
/// With `--tls`, writes the CA to trust and names it on stderr first.
pub fn run(a: &MockArgs) -> Result<ExitCode, String> {
    let interrupts = crate::signals::interrupts()?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, a.port));
    let tls = if a.tls {
        Some(MockTls::generate().map_err(|e| format!("cannot generate a certificate: {e}"))?)
    } else {
        None
    };
    let server = MockServer::start_with(addr, config(a), tls)
        .map_err(|e| format!("cannot start the mock server on {addr}: {e}"))?;
    // A CA file this run created in the temp directory, removed at exit.
    let mut temp_ca = None;
    if let Some(t) = server.tls() {
        match a.ca_out.as_deref() {
            Some(p) if p.as_os_str() == "-" => {
                eprint!("keypool mock: CA certificate to trust:\n{}", t.ca_pem());
            }
            out => {
                let path = out.map_or_else(
                    || {
                        std::env::temp_dir()
                            .join(format!("keypool-mock-ca-{}.pem", server.addr().port()))
                    },
                    Path::to_path_buf,
                );
                t.write_ca(&path)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                eprintln!(
                    "keypool mock: CA certificate: {} (trust it with --ca-file {0})",
                    path.display()
                );
                if out.is_none() {
                    temp_ca = Some(path);
                }
            }
        }
    }
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
    if let Some(p) = temp_ca {
        let _ = std::fs::remove_file(p);
    }
    Ok(ExitCode::SUCCESS)
}
