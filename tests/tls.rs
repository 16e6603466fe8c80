//! Trust like curl: a private CA through `tls.ca_file`, `SSL_CERT_FILE` and
//! `SSL_CERT_DIR`; a client certificate for mTLS; an untrusted endpoint is one clear
//! error, tried once, with no key blamed.

use std::path::PathBuf;
use std::process::Command;

use keypool::{Config, Error, KeyConfig, Pool, Request, RetryConfig, TlsConfig};
use keypool_mock::{MockConfig, MockServer, MockTls};

/// A fresh directory for this test's files.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("keypool-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tls_server() -> MockServer {
    MockServer::start_tls(MockConfig::default()).unwrap()
}

fn pool(url: &str, keys: usize, per_key: usize, tls: TlsConfig) -> Result<Pool, Error> {
    pool_with(url, keys, per_key, tls, RetryConfig::default())
}

fn pool_with(
    url: &str,
    keys: usize,
    per_key: usize,
    tls: TlsConfig,
    retry: RetryConfig,
) -> Result<Pool, Error> {
    let mut b = Config::builder().base_url(url).tls(tls).retry(retry);
    for i in 0..keys {
        b = b.key_config(
            KeyConfig::new(format!("sk-tls-{i}"))
                .label(format!("k{i}"))
                .max_concurrent(per_key),
        );
    }
    Pool::new(b.build()?)
}

fn prompt(i: usize) -> Request {
    Request::chat("m", [("user", format!("p{i}"))])
}

#[test]
fn a_private_ca_is_trusted_through_tls_ca_file_and_connections_are_reused() {
    let server = tls_server();
    let d = dir("ca-file");
    let ca = d.join("ca.pem");
    std::fs::write(&ca, server.ca_pem().unwrap()).unwrap();
    let (keys, per_key) = (3, 4);
    // Without key proofs: a proof's `GET` goes through its key's agent and can take one
    // of the workers' idle connections (then closed, `connection: close`), so a worker
    // opens one more than `per_key` (1 run in 5 to 12, on main as on this branch).
    let pool = pool_with(
        &server.url(),
        keys,
        per_key,
        TlsConfig::default().ca_file(ca.display().to_string()),
        RetryConfig::default().prove_keys(false),
    )
    .unwrap();
    let results = pool.batch((0..300).map(prompt));
    assert!(results.iter().all(Result::is_ok), "{:?}", results[0]);
    let st = server.stats();
    assert_eq!(st.total_requests, 300);
    assert_eq!(st.tls_failures, 0);
    for i in 0..keys {
        let rec = &st.keys[&format!("sk-tls-{i}")];
        assert!(rec.max_in_flight <= per_key);
        assert!(
            rec.connections() <= per_key + 1,
            "key {i}: {} connections for {} requests",
            rec.connections(),
            rec.requests
        );
    }
    pool.close();
    let _ = std::fs::remove_dir_all(&d);
}

/// keypool's TLS layer starts ureq's input buffer small and grows it when a read fills
/// it, up to the largest response head accepted: a head of 9 KiB and a body of 48 KiB
/// arrive whole, on a reused connection; a head beyond the limit is a transport error
/// that says the header is too big.
#[test]
fn large_response_heads_and_bodies_arrive_whole_over_tls() {
    let server = tls_server();
    let d = dir("large");
    let ca = d.join("ca.pem");
    std::fs::write(&ca, server.ca_pem().unwrap()).unwrap();
    let body = format!(
        r#"{{"id":"x","object":"chat.completion","model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}}}"#,
        "y".repeat(48 * 1024)
    );
    let rule = |header: usize| keypool_mock::KeyRule {
        always_status: Some(200),
        body: Some(body.clone()),
        headers: vec![("x-large".to_owned(), "z".repeat(header))],
        ..Default::default()
    };
    server.set_key_rule("sk-tls-0", rule(9 * 1024));
    let pool = pool_with(
        &server.url(),
        1,
        1,
        TlsConfig::default().ca_file(ca.display().to_string()),
        RetryConfig::default().prove_keys(false).max_attempts(1),
    )
    .unwrap();
    for i in 0..3 {
        let r = pool.submit(prompt(i)).unwrap().wait().unwrap();
        assert_eq!(r.content().map(|c| c.len()), Some(48 * 1024));
    }
    assert_eq!(server.stats().keys["sk-tls-0"].connections(), 1);
    server.set_key_rule("sk-tls-0", rule(20 * 1024));
    let e = pool.submit(prompt(3)).unwrap().wait().unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    // Said as what it is, not as the peer disconnecting.
    assert!(e.to_string().contains("header is too big"), "{e}");
    pool.close();
    let _ = std::fs::remove_dir_all(&d);
}

/// A server that accepts the connection and never answers the TLS handshake: the
/// handshake is bounded by `connect_timeout_ms` and reported as a connect timeout,
/// however long the attempt's own timeout.
#[test]
fn a_stalled_tls_handshake_is_a_connect_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "https://127.0.0.1:{}/v1",
        listener.local_addr().unwrap().port()
    );
    let held = std::thread::spawn(move || {
        let mut kept = Vec::new();
        for s in listener.incoming().take(1) {
            kept.push(s);
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    });
    let pool = Pool::new(
        Config::builder()
            .base_url(&url)
            .connect_timeout_ms(300)
            .timeout_ms(10_000)
            .retry(RetryConfig::default().prove_keys(false).max_attempts(1))
            .key_config(KeyConfig::new("sk-tls-0").label("k0"))
            .build()
            .unwrap(),
    )
    .unwrap();
    let t = std::time::Instant::now();
    let e = pool.submit(prompt(0)).unwrap().wait().unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(
            e,
            Error::Timeout {
                phase: keypool::TimeoutPhase::Connect,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        took >= std::time::Duration::from_millis(250)
            && took < std::time::Duration::from_millis(1500),
        "{took:?}"
    );
    pool.close();
    held.join().unwrap();
}

#[test]
fn an_untrusted_endpoint_is_one_clear_error_and_no_key_is_blamed() {
    let server = tls_server();
    let pool = pool(&server.url(), 3, 2, TlsConfig::default()).unwrap();
    let e = pool.submit(prompt(0)).unwrap().wait().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Transport { .. }), "{msg}");
    assert!(msg.contains("127.0.0.1"), "names the host: {msg}");
    assert!(msg.contains("UnknownIssuer"), "names the reason: {msg}");
    assert!(msg.contains("ca_file"), "says how to fix it: {msg}");
    assert_eq!(e.attempts(), 1, "not retried across keys: {msg}");
    let stats = pool.stats();
    assert!(stats.keys.iter().all(|k| k.disabled_reason.is_none()));
    // A second request fails the same way: no key was taken out.
    let e2 = pool.submit(prompt(1)).unwrap().wait().unwrap_err();
    assert!(e2.to_string().contains("UnknownIssuer"), "{e2}");
    pool.close();
    assert_eq!(
        server.stats().total_requests,
        0,
        "the server saw no request"
    );
}

#[test]
fn unreadable_or_incomplete_tls_files_are_config_errors() {
    let d = dir("bad-files");
    let empty = d.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    for (tls, field) in [
        (
            TlsConfig::default().ca_file(d.join("missing.pem").display().to_string()),
            "tls.ca_file",
        ),
        (
            TlsConfig::default().ca_file(empty.display().to_string()),
            "tls.ca_file",
        ),
        (
            TlsConfig::default().client_cert(empty.display().to_string(), "/nonexistent"),
            "tls.client_cert_file",
        ),
    ] {
        match pool("https://127.0.0.1:1/v1", 1, 1, tls) {
            Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected a config error on {field}, got {other:?}"),
        }
    }
    let json = r#"{"keys": [{"key": "sk-x"}], "tls": {"client_cert_file": "c.pem"}}"#;
    match Config::from_json(json) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "tls.client_key_file"),
        other => panic!("expected a config error, got {other:?}"),
    }
    let json = r#"{"keys": [{"key": "sk-x"}], "tls": {"ca_file": "/etc/ca.pem"}}"#;
    assert_eq!(
        Config::from_json(json).unwrap().tls.ca_file.as_deref(),
        Some("/etc/ca.pem")
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_client_certificate_is_presented_for_mutual_tls() {
    let tls = MockTls::generate().unwrap();
    let ca = tls.ca_pem().to_owned();
    let (cert, key) = tls.client_cert().unwrap().unwrap();
    let server = MockServer::start_with(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        MockConfig::default(),
        Some(tls.require_client_cert(&ca).unwrap()),
    )
    .unwrap();
    let d = dir("mtls");
    for (name, text) in [("ca.pem", &ca), ("client.pem", &cert), ("client.key", &key)] {
        std::fs::write(d.join(name), text).unwrap();
    }
    let path = |n: &str| d.join(n).display().to_string();
    let with_cert = TlsConfig::default()
        .ca_file(path("ca.pem"))
        .client_cert(path("client.pem"), path("client.key"));
    let p = pool(&server.url(), 1, 1, with_cert).unwrap();
    assert!(p.submit(prompt(0)).unwrap().wait().is_ok());
    p.close();
    // Without it the server refuses the handshake. Over TLS 1.3 the client learns it
    // only when its first read meets the server's alert: the endpoint's TLS fault, no
    // key blamed (more in the next test).
    let p = pool(
        &server.url(),
        2,
        1,
        TlsConfig::default().ca_file(path("ca.pem")),
    )
    .unwrap();
    let e = p.submit(prompt(1)).unwrap().wait().unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    assert!(p.stats().keys.iter().all(|k| k.disabled_reason.is_none()));
    p.close();
    assert_eq!(
        server.stats().total_requests,
        1,
        "only the request with a certificate"
    );
    assert!(server.stats().tls_failures >= 1);
    let _ = std::fs::remove_dir_all(&d);
}

/// A client certificate the server refuses, under TLS 1.3: the client's handshake has
/// already "succeeded" when the server checks the certificate, so the refusal (an alert,
/// then the connection closed or reset) meets the request's first write or read. It is
/// still the endpoint's TLS fault: one clear error naming the host and the reason,
/// tried once (not on every key), no key disabled. Repeated, as the alert and the reset
/// race the request's bytes.
#[test]
fn a_client_certificate_refused_after_a_tls13_handshake_is_the_endpoints_fault() {
    let tls = MockTls::generate().unwrap();
    let ca = tls.ca_pem().to_owned();
    // A certificate from another CA than the one the server requires.
    let other = MockTls::generate().unwrap();
    let (cert, key) = other.client_cert().unwrap().unwrap();
    let server = MockServer::start_with(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        MockConfig::default(),
        Some(tls.require_client_cert(&ca).unwrap()),
    )
    .unwrap();
    let d = dir("mtls-refused");
    for (name, text) in [("ca.pem", &ca), ("client.pem", &cert), ("client.key", &key)] {
        std::fs::write(d.join(name), text).unwrap();
    }
    let path = |n: &str| d.join(n).display().to_string();
    for (what, cfg) in [
        (
            "a certificate from an unknown CA",
            TlsConfig::default()
                .ca_file(path("ca.pem"))
                .client_cert(path("client.pem"), path("client.key")),
        ),
        (
            "no certificate",
            TlsConfig::default().ca_file(path("ca.pem")),
        ),
    ] {
        let p = pool(&server.url(), 3, 2, cfg).unwrap();
        for i in 0..12 {
            let e = p.submit(prompt(i)).unwrap().wait().unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::Transport { .. }), "{what}: {msg}");
            assert!(msg.contains("TLS with 127.0.0.1 failed"), "{what}: {msg}");
            assert!(
                msg.contains("client certificate"),
                "{what}: names the reason: {msg}"
            );
            assert_eq!(e.attempts(), 1, "{what}: not retried across keys: {msg}");
        }
        assert!(
            p.stats().keys.iter().all(|k| k.disabled_reason.is_none()),
            "{what}: no key blamed"
        );
        p.close();
    }
    assert_eq!(server.stats().total_requests, 0);
    let _ = std::fs::remove_dir_all(&d);
}

/// Run in a child process (by [`ssl_cert_file_and_dir_are_honoured`]) with
/// `SSL_CERT_FILE` or `SSL_CERT_DIR` set: a request to the URL in
/// `KEYPOOL_TLS_CHILD_URL` must succeed without any `tls` config. Passes at once when
/// that variable is not set.
#[test]
fn child_trusts_the_environment() {
    let Some(url) = std::env::var_os("KEYPOOL_TLS_CHILD_URL") else {
        return;
    };
    let p = pool(url.to_str().unwrap(), 1, 1, TlsConfig::default()).unwrap();
    let r = p.submit(prompt(0)).unwrap().wait();
    assert!(r.is_ok(), "{:?}", r.err().map(|e| e.to_string()));
    p.close();
}

#[test]
fn ssl_cert_file_and_dir_are_honoured() {
    let server = tls_server();
    let d = dir("env");
    std::fs::create_dir_all(d.join("certs")).unwrap();
    std::fs::write(d.join("ca.pem"), server.ca_pem().unwrap()).unwrap();
    std::fs::write(d.join("certs/private-ca.pem"), server.ca_pem().unwrap()).unwrap();
    let child = |var: Option<(&str, PathBuf)>| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "child_trusts_the_environment", "--nocapture"])
            .env("KEYPOOL_TLS_CHILD_URL", server.url())
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        if let Some((k, v)) = var {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    for var in [
        ("SSL_CERT_FILE", d.join("ca.pem")),
        ("SSL_CERT_DIR", d.join("certs")),
    ] {
        let out = child(Some(var.clone()));
        assert!(
            out.status.success(),
            "{}: {}{}",
            var.0,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And without either the child fails: the test can fail.
    let out = child(None);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("UnknownIssuer"), "{text}");
    let _ = std::fs::remove_dir_all(&d);
}
