//! The command line of the `keypool-mock` binary, reusable by other front ends.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};

use crate::{MockConfig, MockServer};

/// Usage text of the `keypool-mock` command line.
pub const USAGE: &str = "\
usage: keypool-mock [OPTIONS]

Runs an OpenAI-compatible mock server on 127.0.0.1, prints its base URL
(http://127.0.0.1:PORT/v1) as the only line on stdout, and serves until stdin
reaches end-of-file (or the process gets SIGTERM/SIGINT).

options (VALUE may also be given as --option=VALUE):
  --port P                port to listen on (default: a free port)
  --latency-ms L          fixed latency before each answer
  --jitter-ms J           extra uniform random latency 0..=J ms
  --fail-429-rate F       fraction of requests answered 429
  --retry-after-ms A[-B]  retry-after-ms of 429 answers (a value or a range)
  --fail-500-rate F       fraction answered 500
  --fail-502-rate F       fraction answered 502
  --fail-503-rate F       fraction answered 503
  --drop-rate F           fraction whose connection is closed without a response
  --slow-rate F           fraction answered after an extra --slow-ms delay
  --slow-ms MS            the extra delay of slow answers
  --slow-body-rate F      fraction whose body is sent in delayed chunks
  --malformed-rate F      fraction answered 200 with invalid JSON
  --error-in-200-rate F   fraction answered 200 with an error object
  --seed N                seed of the fault random generator
  --key-capacity N        answer 429 to a key's requests above N in flight
  --request-budget N/MS   N requests per key per MS-millisecond window, with
                          x-ratelimit-{limit,remaining,reset}-requests; 429 beyond
  --threads N             server worker threads (default 2)
  --tls                   serve https:// with a certificate from a CA generated
                          now; the CA is written to --ca-out (default:
                          keypool-mock-ca-PORT.pem in the temp directory) and its
                          path printed on stderr: trust it with SSL_CERT_FILE,
                          tls.ca_file or `keypool run --ca-file`
  --tls-cert FILE         serve https:// with this PEM chain (with --tls-key)
  --tls-key FILE          the private key of --tls-cert
  --ca-out FILE           where --tls writes the CA certificate
  --ignore-stdin          do not stop at stdin end-of-file; run until killed
  -h, --help              print this help
";

fn rate(name: &str, v: &str) -> Result<f64, String> {
    let f: f64 = v
        .parse()
        .map_err(|_| format!("{name}: expected a number in 0..=1, got {v:?}"))?;
    if !(0.0..=1.0).contains(&f) {
        return Err(format!("{name}: expected a number in 0..=1, got {v}"));
    }
    Ok(f)
}

fn int<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{name}: expected a non-negative integer, got {v:?}"))
}

/// Parses `keypool-mock` options (without the program name) into the port to listen
/// on (`None` = any free port) and the server configuration.
///
/// `--ignore-stdin` is accepted and ignored here (it is [`run_cli`]'s business).
/// `-h`/`--help` returns `Err` with [`USAGE`].
///
/// ```
/// let args: Vec<String> = ["--port", "0", "--fail-429-rate=0.5"].map(String::from).to_vec();
/// let (port, cfg) = keypool_mock::parse_args(&args).unwrap();
/// assert_eq!(port, Some(0));
/// assert_eq!(cfg.fail_429_rate, 0.5);
/// let args: Vec<String> = ["--request-budget", "10/1000"].map(String::from).to_vec();
/// assert_eq!(keypool_mock::parse_args(&args).unwrap().1.request_budget, Some((10, 1000)));
/// ```
pub fn parse_args(args: &[String]) -> Result<(Option<u16>, MockConfig), String> {
    let mut cfg = MockConfig::default();
    let mut port = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        match name {
            "-h" | "--help" => return Err(USAGE.to_owned()),
            "--ignore-stdin" => continue,
            _ => {}
        }
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{name}: missing value")),
            }
        };
        match name {
            "--port" => port = Some(int(name, &value()?)?),
            "--latency-ms" => cfg.latency_ms = int(name, &value()?)?,
            "--key-capacity" => cfg.key_capacity = Some(int::<usize>(name, &value()?)?),
            "--jitter-ms" => cfg.jitter_ms = int(name, &value()?)?,
            "--request-budget" => {
                let v = value()?;
                let (n, ms) = v
                    .split_once('/')
                    .ok_or_else(|| format!("{name}: expected N/MS, got {v:?}"))?;
                let (n, ms) = (int::<u64>(name, n)?, int::<u64>(name, ms)?);
                if ms == 0 {
                    return Err(format!("{name}: the window must be at least 1 ms"));
                }
                cfg.request_budget = Some((n, ms));
            }
            "--fail-429-rate" => cfg.fail_429_rate = rate(name, &value()?)?,
            "--retry-after-ms" => {
                let v = value()?;
                cfg.retry_after_ms = match v.split_once(['-', ',']) {
                    Some((a, b)) => (int(name, a)?, int(name, b)?),
                    None => {
                        let ms = int(name, &v)?;
                        (ms, ms)
                    }
                };
                if cfg.retry_after_ms.0 > cfg.retry_after_ms.1 {
                    return Err(format!("{name}: empty range {v}"));
                }
            }
            "--fail-500-rate" => cfg.fail_500_rate = rate(name, &value()?)?,
            "--fail-502-rate" => cfg.fail_502_rate = rate(name, &value()?)?,
            "--fail-503-rate" => cfg.fail_503_rate = rate(name, &value()?)?,
            "--drop-rate" => cfg.drop_rate = rate(name, &value()?)?,
            "--slow-rate" => cfg.slow_rate = rate(name, &value()?)?,
            "--slow-ms" => cfg.slow_ms = int(name, &value()?)?,
            "--slow-body-rate" => cfg.slow_body_rate = rate(name, &value()?)?,
            "--malformed-rate" => cfg.malformed_rate = rate(name, &value()?)?,
            "--error-in-200-rate" => cfg.error_in_200_rate = rate(name, &value()?)?,
            "--seed" => cfg.seed = Some(int(name, &value()?)?),
            "--threads" => {
                cfg.threads = int(name, &value()?)?;
                if cfg.threads == 0 {
                    return Err(format!("{name}: must be at least 1"));
                }
            }
            _ => return Err(format!("unknown option {arg:?}\n\n{USAGE}")),
        }
    }
    Ok((port, cfg))
}

/// Runs the `keypool-mock` command line (arguments without the program name): starts
/// the server on `127.0.0.1`, prints its base URL as one line on stdout, and serves until
/// stdin reaches end-of-file (or forever with `--ignore-stdin`). Returns the process
/// exit code: 0 on success, 2 on a usage error, 1 if the server cannot start.
pub fn run_cli(args: Vec<String>) -> i32 {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return 0;
    }
    let ignore_stdin = args.iter().any(|a| a == "--ignore-stdin");
    let (args, tls) = match tls_args(args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("keypool-mock: {e}");
            return 2;
        }
    };
    let tls_args_kept = tls.clone();
    let tls = match tls {
        TlsArgs::None => None,
        TlsArgs::Generate(_) => match crate::MockTls::generate() {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("keypool-mock: cannot generate a certificate: {e}");
                return 1;
            }
        },
        TlsArgs::Files { ref cert, ref key } => match crate::MockTls::from_pem_files(cert, key) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("keypool-mock: cannot read {cert} / {key}: {e}");
                return 1;
            }
        },
    };
    let (port, cfg) = match parse_args(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("keypool-mock: {e}");
            return 2;
        }
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port.unwrap_or(0)));
    let server = match MockServer::start_with(addr, cfg, tls) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keypool-mock: cannot listen on {addr}: {e}");
            return 1;
        }
    };
    if let (TlsArgs::Generate(out), Some(t)) = (&tls_args_kept, server.tls()) {
        let path = match out {
            Some(p) => std::path::PathBuf::from(p),
            None => {
                std::env::temp_dir().join(format!("keypool-mock-ca-{}.pem", server.addr().port()))
            }
        };
        if let Err(e) = t.write_ca(&path) {
            eprintln!("keypool-mock: cannot write {}: {e}", path.display());
            return 1;
        }
        eprintln!("keypool-mock: CA certificate: {}", path.display());
    }
    {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{}", server.url())
            .and_then(|_| out.flush())
            .is_err()
        {
            return 1;
        }
    }
    if ignore_stdin {
        loop {
            std::thread::park();
        }
    }
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 4096];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    server.shutdown();
    0
}

/// The TLS options of [`run_cli`].
#[derive(Clone)]
enum TlsArgs {
    None,
    /// `--tls`, with `--ca-out`.
    Generate(Option<String>),
    /// `--tls-cert` and `--tls-key`.
    Files {
        cert: String,
        key: String,
    },
}

/// Takes the TLS options out of `args`.
fn tls_args(args: Vec<String>) -> Result<(Vec<String>, TlsArgs), String> {
    let (mut tls, mut cert, mut key, mut ca_out) = (false, None, None, None);
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let slot = match name.as_str() {
            "--tls" => {
                tls = true;
                continue;
            }
            "--tls-cert" => &mut cert,
            "--tls-key" => &mut key,
            "--ca-out" => &mut ca_out,
            _ => {
                rest.push(arg);
                continue;
            }
        };
        let v = match inline {
            Some(v) => v,
            None => it.next().ok_or_else(|| format!("{name}: missing value"))?,
        };
        *slot = Some(v);
    }
    let tls = match (tls, cert, key) {
        (_, Some(cert), Some(key)) if ca_out.is_none() => TlsArgs::Files { cert, key },
        (_, Some(_), Some(_)) => return Err("--ca-out goes with --tls, not --tls-cert".into()),
        (_, Some(_), None) | (_, None, Some(_)) => {
            return Err("--tls-cert and --tls-key go together".into());
        }
        (true, None, None) => TlsArgs::Generate(ca_out),
        (false, None, None) if ca_out.is_some() => {
            return Err("--ca-out goes with --tls".into());
        }
        (false, None, None) => TlsArgs::None,
    };
    Ok((rest, tls))
}
