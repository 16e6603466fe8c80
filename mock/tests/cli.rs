//! The `keypool-mock` binary and its argument parser.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keypool_mock::parse_args;

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn parse_args_reads_every_option() {
    let (port, cfg) = parse_args(&args(&[
        "--port",
        "8080",
        "--latency-ms",
        "5",
        "--jitter-ms=3",
        "--fail-429-rate",
        "0.25",
        "--retry-after-ms",
        "100-200",
        "--fail-500-rate",
        "0.1",
        "--fail-502-rate",
        "0.05",
        "--fail-503-rate",
        "0.2",
        "--drop-rate",
        "0.01",
        "--slow-rate",
        "0.5",
        "--slow-ms",
        "900",
        "--slow-body-rate",
        "0.3",
        "--malformed-rate",
        "0.02",
        "--error-in-200-rate",
        "0.03",
        "--seed",
        "42",
        "--threads",
        "4",
    ]))
    .unwrap();
    assert_eq!(port, Some(8080));
    assert_eq!((cfg.latency_ms, cfg.jitter_ms), (5, 3));
    assert_eq!(cfg.fail_429_rate, 0.25);
    assert_eq!(cfg.retry_after_ms, (100, 200));
    assert_eq!(
        (cfg.fail_500_rate, cfg.fail_502_rate, cfg.fail_503_rate),
        (0.1, 0.05, 0.2)
    );
    assert_eq!(
        (cfg.drop_rate, cfg.slow_rate, cfg.slow_ms),
        (0.01, 0.5, 900)
    );
    assert_eq!(cfg.slow_body_rate, 0.3);
    assert_eq!((cfg.malformed_rate, cfg.error_in_200_rate), (0.02, 0.03));
    assert_eq!((cfg.seed, cfg.threads), (Some(42), 4));

    let (port, cfg) = parse_args(&[]).unwrap();
    assert_eq!(port, None);
    assert_eq!(cfg.threads, 2);
    assert_eq!(cfg.retry_after_ms, (0, 0));

    for bad in [
        &["--port"][..],
        &["--port", "x"],
        &["--fail-429-rate", "1.5"],
        &["--bogus"],
        &["--threads", "0"],
        &["--retry-after-ms", "5-1"],
    ] {
        assert!(parse_args(&args(bad)).is_err(), "{bad:?}");
    }
    assert!(
        parse_args(&args(&["--help"]))
            .unwrap_err()
            .contains("usage")
    );
}

#[test]
fn binary_prints_url_serves_and_exits_on_stdin_eof() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keypool-mock"))
        .args(["--latency-ms", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let url = line.trim_end();
    let hostport = url
        .strip_prefix("http://")
        .and_then(|s| s.strip_suffix("/v1"))
        .unwrap_or_else(|| panic!("bad url line {line:?}"));
    assert!(hostport.starts_with("127.0.0.1:"));

    let mut s = TcpStream::connect(hostport).unwrap();
    let body = r#"{"messages":[{"role":"user","content":"ping"}]}"#;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("echo: ping"), "{resp}");

    drop(child.stdin.take()); // EOF on stdin
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keypool-mock did not exit on stdin EOF"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "only one line on stdout");
}

#[test]
fn binary_serves_tls_and_writes_its_ca() {
    let dir = std::env::temp_dir().join(format!("keypool-mock-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_path = dir.join("ca.pem");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keypool-mock"))
        .args(["--tls", "--ca-out"])
        .arg(&ca_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut err = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut err)
        .unwrap();
    assert!(line.starts_with("https://127.0.0.1:"), "{line}");
    assert!(err.contains(&ca_path.display().to_string()), "{err}");
    let ca = std::fs::read(&ca_path).unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&[
                    ureq::tls::Certificate::from_pem(&ca).unwrap(),
                ]))
                .build(),
        )
        .build()
        .into();
    let resp = agent
        .post(format!("{}/chat/completions", line.trim_end()))
        .header("authorization", "Bearer k")
        .send(r#"{"messages":[{"role":"user","content":"ping"}]}"#)
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
    // Usage errors.
    let out = Command::new(env!("CARGO_BIN_EXE_keypool-mock"))
        .args(["--tls-cert", "x.pem"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
