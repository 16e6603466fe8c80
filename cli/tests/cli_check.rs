//! End-to-end tests of `keypool check` (each key: accepted or rejected, credit, models,
//! `--probe`), of `keypool mock --tls`, and of the one acceptance rule for 200 bodies
//! (what the engine accepts, a record holds as JSON).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use keypool_mock::{MockConfig, MockServer};
use serde_json::{Value, json};

mod support;
use support::*;

/// `keypool check` with both test keys against `url`.
fn check_cmd(url: &str) -> std::process::Command {
    let mut c = with_keys(keypool());
    c.args(["check", "--base-url", url]);
    c
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The output line of the key labelled `label`.
fn line_of<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(label))
        .unwrap_or_else(|| panic!("no line for {label} in:\n{text}"))
}

#[test]
fn check_reports_credit_and_models_and_exits_1_for_a_revoked_key() {
    let server = default_mock();
    server.set_credit(KEY_A, Some(5.0));
    fail_key(&server, KEY_B, 401);
    let out = run_to_end(check_cmd(&server.url()));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    let a = line_of(&text, "alpha");
    assert!(a.contains(" ok "), "{a}");
    assert!(a.contains("credit $5.00 left of $5.00 (used $0.00)"), "{a}");
    assert!(a.contains("2 models listed"), "{a}");
    let b = line_of(&text, "beta");
    assert!(
        b.contains(" rejected ") && b.contains("GET /key: HTTP 401"),
        "{b}"
    );
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        stderr(&out).contains("1 of 2 keys usable"),
        "{}",
        stderr(&out)
    );
    // No completion was sent: /key and /models are no requests at the mock.
    assert_eq!(server.stats().total_requests, 0);
    assert_eq!(server.credit(KEY_A).unwrap().checks, 1);
}

#[test]
fn check_all_usable_exits_0_and_json_lines_carry_the_figures() {
    let server = default_mock();
    server.set_credit(KEY_B, Some(2.5));
    let mut c = check_cmd(&server.url());
    c.args(["--json", "-q"]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    let lines = records(&stdout(&out));
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["key"], "alpha");
    assert_eq!(lines[0]["status"], "ok");
    assert_eq!(lines[0]["usable"], true);
    assert_eq!(lines[0]["credit"]["unlimited"], true);
    assert_eq!(lines[0]["models"], 2);
    assert_eq!(lines[1]["credit"]["limit"], 2.5);
    assert_eq!(lines[1]["credit"]["limit_remaining"], 2.5);
    assert_eq!(lines[1]["probe"], Value::Null);
}

#[test]
fn a_key_without_credit_is_unusable_and_a_server_without_models_is_said() {
    let server = MockServer::start(MockConfig {
        cost_per_request: 0.5,
        ..MockConfig::default()
    })
    .unwrap();
    server.set_models(None);
    server.set_credit(KEY_A, Some(1.0));
    // Spend alpha's dollar.
    let dir = Dir::new("check-credit");
    dir.write_input(&x_lines("c", 2));
    let mut run = keypool();
    run.env("KEYPOOL_API_KEYS", format!("alpha {KEY_A}"))
        .args([
            "run",
            "-q",
            "-i",
            &dir.s("in.jsonl"),
            "-o",
            &dir.s("out.jsonl"),
        ])
        .args(["--base-url", &server.url(), "--per-key", "1"]);
    assert_eq!(run_to_end(run).status.code(), Some(0));
    let out = run_to_end(check_cmd(&server.url()));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let a = line_of(&text, "alpha");
    assert!(
        a.contains(" no-credit ") && a.contains("credit $0.00 left of $1.00 (used $1.00)"),
        "{a}"
    );
    let b = line_of(&text, "beta");
    assert!(
        b.contains(" ok ") && b.contains("models: not listed by the server"),
        "{b}"
    );
}

#[test]
fn probe_sends_one_minimal_completion_per_key() {
    let server = default_mock();
    // beta's completions fail; its /key and /models answer.
    fail_key(&server, KEY_B, 500);
    let mut c = check_cmd(&server.url());
    c.args(["--probe", "--model", "m"]);
    let out = run_to_end(c);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let a = line_of(&text, "alpha");
    assert!(a.contains(" ok ") && a.contains("probe ok in"), "{a}");
    let b = line_of(&text, "beta");
    assert!(
        b.contains(" unknown ") && b.contains("probe (m): HTTP 500"),
        "{b}"
    );
    for key in [KEY_A, KEY_B] {
        let s = server.key_stats(key).unwrap();
        assert_eq!(s.requests, 1, "one completion per key");
        assert_eq!(s.log[0].model.as_deref(), Some("m"));
    }
    // --probe needs a model when a key has none configured.
    let mut c = check_cmd(&server.url());
    c.arg("--probe");
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--probe needs --model"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn keys_come_from_a_keys_file_or_a_config_as_for_run() {
    let server = default_mock();
    let dir = Dir::new("check-sources");
    std::fs::write(
        dir.path("keys.txt"),
        format!("one {KEY_A}\n{KEY_B} rpm=5\n"),
    )
    .unwrap();
    let mut c = keypool();
    c.args([
        "check",
        "--keys-file",
        &dir.s("keys.txt"),
        "--base-url",
        &server.url(),
    ]);
    let out = run_to_end(c);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    line_of(&text, "one");
    line_of(&text, "key-1");
    // A config: its base_url and each key's own models (the probe asks the first).
    std::fs::write(
        dir.path("pool.json"),
        json!({"base_url": server.url(), "keys": [
            {"key": KEY_A, "label": "cfg-a", "models": ["mock-model", "other/*"]},
        ]})
        .to_string(),
    )
    .unwrap();
    let mut c = keypool();
    c.args(["check", "-c", &dir.s("pool.json"), "--probe"]);
    let out = run_to_end(c);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    let a = line_of(&text, "cfg-a");
    assert!(
        a.contains("2 models listed, 1 of them served by this key") && a.contains("probe ok"),
        "{a}"
    );
    let log = server.key_stats(KEY_A).unwrap().log;
    assert_eq!(log.last().unwrap().model.as_deref(), Some("mock-model"));
}

/// A loopback HTTP server answering every request with `status` and `body`, where
/// `{token}` in the body is replaced by the request's bearer token (a server echoing
/// the key); with `status` 0 it reads the request and never answers (a stall).
fn raw_server(status: u16, body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                let mut token = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("authorization:") {
                        let v = line[line.len() - v.len()..].trim();
                        token = v.split_whitespace().nth(1).unwrap_or("").to_owned();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                if status == 0 {
                    std::thread::sleep(Duration::from_secs(30));
                    return;
                }
                let body = body.replace("{token}", &token);
                let _ = write!(
                    w,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = w.flush();
                let mut rest = Vec::new();
                let _ = r.read_to_end(&mut rest);
            });
        }
    });
    url
}

/// A proxy in front of `server` that answers `GET …/key` 503 and forwards every
/// other request (read whole, answered whole, one per connection).
fn raw_key_500_then_mock(server: &MockServer) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let upstream = server.addr();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                if head.starts_with("GET /v1/key ") {
                    let body = r#"{"error":{"message":"busy"}}"#;
                    let _ = write!(
                        conn,
                        "HTTP/1.1 503 X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    return;
                }
                let mut up = std::net::TcpStream::connect(upstream).unwrap();
                let head = head.replacen("\r\n\r\n", "\r\nconnection: close\r\n\r\n", 1);
                up.write_all(head.as_bytes()).unwrap();
                let mut answer = Vec::new();
                let _ = up.read_to_end(&mut answer);
                let _ = conn.write_all(&answer);
            });
        }
    });
    url
}

#[test]
fn hostile_answers_never_panic_and_leave_the_key_unknown_or_accepted() {
    // A 500 everywhere: nothing confirms the keys.
    let out = run_to_end(check_cmd(&raw_server(500, "<html>oops</html>")));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let a = line_of(&text, "alpha");
    assert!(
        a.contains(" unknown ")
            && a.contains("GET /key: HTTP 500")
            && a.contains("GET /models: HTTP 500"),
        "{a}"
    );
    // /key fails but /models lists (OpenRouter lists models to anyone): unconfirmed.
    let server = default_mock();
    let dir = Dir::new("check-key-500");
    std::fs::write(
        dir.path("pool.json"),
        json!({"base_url": server.url(), "keys": [{"key": KEY_A, "label": "a"}]}).to_string(),
    )
    .unwrap();
    let mut c = keypool();
    c.args(["check", "-c", &dir.s("pool.json"), "--base-url"])
        .arg(raw_key_500_then_mock(&server));
    let out = run_to_end(c);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let a = line_of(&text, "a");
    assert!(
        a.contains(" unknown ")
            && a.contains("GET /key: HTTP 503")
            && a.contains("2 models listed"),
        "{a}"
    );
    // A 401 that echoes the key: masked.
    let out = run_to_end(check_cmd(&raw_server(
        401,
        r#"{"error":{"message":"no such key: {token}"}}"#,
    )));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        line_of(&text, "beta").contains("no such key: [REDACTED]"),
        "{text}"
    );
    // A 200 that is no JSON, or JSON with absurd numbers: accepted, credit unreadable.
    for body in [
        "not json {{{",
        r#"{"data":{"limit":1e400,"usage":1}}"#,
        r#"{"data":{"limit":1e300,"limit_remaining":"7","usage":-3,"limit_reset":"\u001b[2J"},"data2":[[[[[[[[]]]]]]]]}"#,
    ] {
        let server = default_mock();
        server.set_key_body(KEY_A, Some(body.to_owned()));
        let out = run_to_end(check_cmd(&server.url()));
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{body}: {text}");
        let a = line_of(&text, "alpha");
        assert!(
            a.contains(" ok ")
                && (a.contains("GET /key: unreadable answer") || a.contains("figures unreadable")),
            "{body}: {a}"
        );
        assert!(!a.contains('\u{1b}'), "{a:?}");
    }
    // A server that stalls: each request meets --timeout-ms.
    let started = Instant::now();
    let mut c = check_cmd(&raw_server(0, ""));
    c.args(["--timeout-ms", "300"]);
    let out = run_to_end(c);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        line_of(&text, "alpha").contains("GET /key: timed out"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Nothing listening: unknown, not a crash.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = run_to_end(check_cmd(&format!("http://127.0.0.1:{port}/v1")));
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    // A server with neither route: nothing confirms the key, --probe is suggested.
    let out = run_to_end(check_cmd(&raw_server(404, r#"{"error":"not found"}"#)));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let a = line_of(&text, "alpha");
    assert!(a.contains(" unknown ") && a.contains("pass --probe"), "{a}");
}

#[test]
fn mock_tls_serves_https_that_run_and_check_trust_with_ca_file() {
    let dir = Dir::new("mock-tls");
    let ca = dir.path("ca.pem");
    let mut mock = spawn_piped(keypool().args(["mock", "--tls", "--ca-out"]).arg(&ca));
    let mut url = String::new();
    BufReader::new(mock.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let url = url.trim().to_owned();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert!(
        std::fs::read_to_string(&ca)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    dir.write_input(&x_lines("t", 5));
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &url);
    c.args(["-q", "--ca-file"]).arg(&ca);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(read_records(&dir.path("out.jsonl")).len(), 5);
    let mut c = check_cmd(&url);
    c.arg("--ca-file").arg(&ca);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    // Without the CA the certificate is refused: no key is usable, none is blamed.
    let out = run_to_end(check_cmd(&url));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(line_of(&text, "alpha").contains("TLS"), "{text}");
    interrupt(&mock);
    let err = read_stderr(&mut mock);
    assert_eq!(mock.wait().unwrap().code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("CA certificate: {}", ca.display())),
        "{err}"
    );
}

#[test]
fn mock_tls_without_ca_out_names_a_temp_file_and_removes_it() {
    let mut mock = spawn_piped(keypool().args(["mock", "--tls"]));
    let mut out = BufReader::new(mock.stdout.take().unwrap());
    let mut url = String::new();
    out.read_line(&mut url).unwrap();
    assert!(url.starts_with("https://"), "{url}");
    interrupt(&mock);
    let err = read_stderr(&mut mock);
    assert_eq!(mock.wait().unwrap().code(), Some(0), "{err}");
    let path = err
        .lines()
        .find_map(|l| l.strip_prefix("keypool mock: CA certificate: "))
        .and_then(|l| l.split(" (trust").next())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(path.ends_with(".pem"), "{path}");
    assert!(!std::path::Path::new(path).exists(), "{path} left behind");
    // `--ca-out -`: the PEM itself on stderr, ready to save.
    let mut mock = spawn_piped(keypool().args(["mock", "--tls", "--ca-out", "-"]));
    let mut url = String::new();
    BufReader::new(mock.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    interrupt(&mock);
    let err = read_stderr(&mut mock);
    assert_eq!(mock.wait().unwrap().code(), Some(0), "{err}");
    assert!(
        err.contains("-----BEGIN CERTIFICATE-----\n")
            && err.contains("-----END CERTIFICATE-----\n"),
        "{err}"
    );
}

/// A chat completion answered with exactly `body` (status 200) by the mock.
fn scripted(id: &str, body: &str) -> String {
    line(
        id,
        support::body("x", Some(json!({"status": 200, "body": body}))),
    )
}

#[test]
fn a_200_body_is_a_json_record_or_an_invalid_response_never_a_string() {
    let server = default_mock();
    let dir = Dir::new("acceptance");
    let nested = |levels: usize| {
        // The object is one level, `x` holds the rest.
        format!(
            r#"{{"id":"chatcmpl-deep","choices":[],"x":{}{}}}"#,
            "[".repeat(levels - 1),
            "]".repeat(levels - 1)
        )
    };
    let content = |c: &str| {
        format!(
            r#"{{"id":"chatcmpl-s","choices":[{{"index":0,"message":{{"role":"assistant","content":"{c}"}},"finish_reason":"stop"}}]}}"#
        )
    };
    dir.write_input(&[
        scripted("deep-100", &nested(100)),
        scripted("deep-101", &nested(101)),
        scripted("deep-500", &nested(500)),
        scripted("lone-high", &content(r"a\ud800b")),
        scripted("lone-low", &content(r"\udc00")),
        scripted("pair", &content(r"\ud83d\ude00")),
        scripted("huge", r#"{"id":"h","choices":[],"n":1e400}"#),
    ]);
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["-q", "--max-attempts", "1"]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // Every record is read by serde_json (its limit is 128 levels).
    let recs = read_records(&dir.path("out.jsonl"));
    assert_eq!(recs.len(), 7);
    for r in &recs {
        let id = id(r);
        if ["deep-100", "pair"].contains(&id) {
            assert!(ok(r), "{r}");
            let body = &r["response"]["body"];
            assert!(body.is_object(), "{id}: body written as {body}");
            assert!(r["response"]["request_id"].is_string(), "{id}: {r}");
            if id == "pair" {
                assert_eq!(body["choices"][0]["message"]["content"], "😀");
            }
        } else {
            assert_eq!(r["error"]["code"], "invalid_response", "{id}: {r}");
            let msg = r["error"]["message"].as_str().unwrap();
            assert!(
                msg.contains("past common reader limits"),
                "{id}: {msg:.200}"
            );
        }
    }
}

#[test]
fn check_help_documents_its_flags_statuses_and_exit_codes() {
    let out = keypool().args(["check", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--config",
        "--keys-file",
        "--base-url",
        "--ca-file",
        "--timeout-ms",
        "--probe",
        "--model",
        "--json",
        "no-credit",
        "Exit status",
    ] {
        assert!(help.contains(word), "{word} missing from:\n{help}");
    }
    let out = keypool().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("check"), "{help}");
    let out = keypool().args(["mock", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--tls") && help.contains("--ca-out"),
        "{help}"
    );
    // --model goes with --probe.
    let out = keypool().args(["check", "--model", "m"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
