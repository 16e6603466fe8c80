//! End-to-end tests of the `keypool` binary against the in-process mock server.
//!
//! Synchronisation is by pipes and process exit only: a test that interrupts a run
//! reads records from its stdout (`--output -`) or notes from its stderr before sending
//! the signal, and request latency comes from the mock's per-request `delay_ms`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdout};
use std::time::{Duration, Instant};

use keypool_mock::{MockConfig, MockServer};
use serde_json::{Value, json};

mod support;
use support::*;

/// `n` request lines `{prefix}-0`, … of which those from the `fast`-th on are answered
/// after `delay_ms`.
fn slow_tail_lines(prefix: &str, n: usize, fast: usize, delay_ms: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mock = (i >= fast).then(|| json!({"delay_ms": delay_ms}));
            line(&format!("{prefix}-{i}"), body("x", mock))
        })
        .collect()
}

/// Spawns `keypool run --per-key 2` on `dir`'s `in.jsonl` with records on its stdout,
/// and reads the first `n` records (returned as text) from that stdout.
fn spawn_and_read_records(
    dir: &Dir,
    url: &str,
    n: usize,
) -> (Child, BufReader<ChildStdout>, String) {
    let mut c = run_cmd(dir, "in.jsonl", "-", url);
    c.args(["--per-key", "2"]);
    let mut child = spawn_piped(&mut c);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    for _ in 0..n {
        assert!(stdout.read_line(&mut first).unwrap() > 0);
    }
    (child, stdout, first)
}

#[test]
fn mixed_file_every_custom_id_once_and_exit_1() {
    let server = default_mock();
    let dir = Dir::new("mixed");
    let mut lines = Vec::new();
    let mut expect: BTreeMap<String, bool> = BTreeMap::new();
    for i in 1..=2000 {
        if i % 500 == 0 {
            lines.push(String::new()); // blank lines are skipped
        }
        let n = lines.len() + 1; // this line's number
        let (id, text, good) = if i % 97 == 0 {
            (format!("line-{n}"), "{not json".to_owned(), false)
        } else if i % 41 == 0 {
            let b = body(&format!("p{i}"), Some(json!({"status": 500})));
            (format!("req-{i}"), line(&format!("req-{i}"), b), false)
        } else if i % 13 == 0 {
            let b = body(&format!("p{i}"), None);
            (format!("line-{n}"), b.to_string(), true)
        } else {
            let b = body(&format!("p{i}"), None);
            (format!("req-{i}"), line(&format!("req-{i}"), b), true)
        };
        assert!(expect.insert(id, good).is_none());
        lines.push(text);
    }
    dir.write_input(&lines);
    std::fs::write(
        dir.path("keys.txt"),
        format!("# test keys\nalpha {KEY_A}\n\n{KEY_B}\n"),
    )
    .unwrap();
    let mut c = keypool();
    c.args(["run", "--input", &dir.s("in.jsonl"), "--output"])
        .arg(dir.path("out.jsonl"))
        .args([
            "--keys-file",
            &dir.s("keys.txt"),
            "--base-url",
            &server.url(),
        ])
        .args(["--max-attempts", "1", "--per-key", "8"]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2000 records written"), "{stderr}");

    let text = std::fs::read_to_string(dir.path("out.jsonl")).unwrap();
    assert_no_secret("output file", &text);
    let recs = records(&text);
    assert_eq!(recs.len(), 2000);
    let mut seen = HashMap::new();
    for r in &recs {
        assert!(seen.insert(id(r).to_owned(), ok(r)).is_none(), "dup {r}");
        assert!(r["id"].as_str().unwrap().starts_with("batch_req_"));
        if ok(r) {
            assert_eq!(r["response"]["status_code"], 200);
            let content = r["response"]["body"]["choices"][0]["message"]["content"]
                .as_str()
                .unwrap();
            assert!(content.starts_with("echo: p"), "{content}");
            assert!(["alpha", "key-1"].contains(&r["keypool"]["key"].as_str().unwrap()));
            assert_eq!(r["keypool"]["attempts"], 1);
        } else if r["error"]["code"] == "http" {
            assert_eq!(r["response"]["status_code"], 500);
        } else {
            assert_eq!(r["error"]["code"], "invalid_request");
            assert!(r["response"].is_null());
        }
    }
    let seen: BTreeMap<String, bool> = seen.into_iter().collect();
    assert_eq!(seen, expect);
    // The per-key limit held at the server.
    for k in [KEY_A, KEY_B] {
        assert!(server.stats().keys[k].max_in_flight <= 8);
    }
}

#[test]
fn ordered_output_follows_input_order() {
    let server = MockServer::start(MockConfig {
        jitter_ms: 8,
        ..MockConfig::default()
    })
    .unwrap();
    let dir = Dir::new("ordered");
    let ids: Vec<String> = (0..300).map(|i| format!("o-{i}")).collect();
    let lines: Vec<String> = ids.iter().map(|i| line(i, body(i, None))).collect();
    dir.write_input(&lines);
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--ordered", "--per-key", "4"]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let got: Vec<String> = read_records(&dir.path("out.jsonl"))
        .iter()
        .map(|r| id(r).to_owned())
        .collect();
    assert_eq!(got, ids);
}

#[test]
fn sigint_mid_run_then_resume_completes_without_duplicates() {
    let server = default_mock();
    let dir = Dir::new("resume");
    // 10 fast requests, then 50 that take 100 ms each: the run is surely mid-way
    // when the 10th record has been read.
    dir.write_input(&slow_tail_lines("r", 60, 10, 100));
    let (mut child, mut stdout, mut first) = spawn_and_read_records(&dir, &server.url(), 10);
    interrupt(&child);
    stdout.read_to_string(&mut first).unwrap();
    let stderr = read_stderr(&mut child);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_no_secret("stderr", &stderr);
    let before = records(&first);
    assert!(before.len() >= 10 && before.len() < 60, "{}", before.len());
    assert!(before.iter().all(ok));

    // The output as a crash would leave it: a cut-off last line.
    let out = dir.path("out.jsonl");
    std::fs::write(
        &out,
        format!("{first}{{\"id\":\"batch_req_1\",\"custom_id\":\"r-5"),
    )
    .unwrap();
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--per-key", "4"]);
    let res = run_to_end(c);
    assert_eq!(res.status.code(), Some(0), "{res:?}");
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("repaired"), "{stderr}");
    assert!(
        stderr.contains(&format!("skipped {}", before.len())),
        "{stderr}"
    );
    let after = read_records(&out);
    let ids: Vec<&str> = after.iter().map(id).collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 60, "duplicates: {ids:?}");
    assert_eq!(unique.len(), 60);
    assert!(after.iter().all(ok));
    assert_eq!(after[..before.len()], before[..]);
}

#[test]
fn second_sigint_cancels_in_flight_and_leaves_a_resumable_file() {
    let server = default_mock();
    let dir = Dir::new("cancel");
    // 8 fast requests, then 12 that would take 30 s.
    dir.write_input(&slow_tail_lines("c", 20, 8, 30_000));
    let started = Instant::now();
    let (mut child, mut stdout, mut first) = spawn_and_read_records(&dir, &server.url(), 8);
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    interrupt(&child);
    let mut note = String::new();
    stderr.read_line(&mut note).unwrap();
    assert!(note.contains("interrupted"), "{note}");
    interrupt(&child);
    stdout.read_to_string(&mut first).unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130), "{rest}");
    assert!(rest.contains("cancelling"), "{rest}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // Only the 8 answered requests; nothing for the cancelled ones.
    let done = records(&first);
    assert_eq!(done.len(), 8);
    assert!(done.iter().all(ok));

    // Resume: the slow ones now time out at once and are recorded as failures.
    std::fs::write(dir.path("out.jsonl"), &first).unwrap();
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["-q", "--max-attempts", "1", "--timeout-ms", "200"]);
    let res = run_to_end(c);
    assert_eq!(res.status.code(), Some(1));
    let all = read_records(&dir.path("out.jsonl"));
    let ids: BTreeSet<&str> = all.iter().map(id).collect();
    assert_eq!((all.len(), ids.len()), (20, 20));
    assert_eq!(all.iter().filter(|r| !ok(r)).count(), 12);
    assert!(
        all.iter()
            .filter(|r| !ok(r))
            .all(|r| r["error"]["code"] == "timeout")
    );
}

#[test]
fn quiet_success_prints_nothing_and_retry_failed_reruns_failures() {
    let server = default_mock();
    let dir = Dir::new("quiet");
    let lines: Vec<String> = (0..30)
        .map(|i| line(&format!("q-{i}"), body(&format!("{i}"), None)))
        .collect();
    dir.write_input(&lines);
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.arg("--quiet");
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert_eq!(read_records(&dir.path("out.jsonl")).len(), 30);

    // Now a file whose requests fail once: --retry-failed appends newer records.
    let dir2 = Dir::new("retry");
    dir2.write_input(&x_lines("f", 5));
    fail_key(&server, KEY_A, 503);
    let run = |extra: &[&str]| {
        let mut c = keypool();
        c.env("OPENAI_API_KEY", KEY_A)
            .args([
                "run",
                "-q",
                "-i",
                &dir2.s("in.jsonl"),
                "-o",
                &dir2.s("out.jsonl"),
            ])
            .args(["--base-url", &server.url(), "--max-attempts", "1"])
            .args(extra);
        run_to_end(c)
    };
    assert_eq!(run(&[]).status.code(), Some(1));
    assert_eq!(read_records(&dir2.path("out.jsonl")).len(), 5);
    server.set_key_rule(KEY_A, keypool_mock::KeyRule::default());
    // Without --retry-failed the failures stay (and still count): exit 1, nothing new.
    assert_eq!(run(&[]).status.code(), Some(1));
    assert_eq!(read_records(&dir2.path("out.jsonl")).len(), 5);
    assert_eq!(run(&["--retry-failed"]).status.code(), Some(0));
    let all = read_records(&dir2.path("out.jsonl"));
    assert_eq!(all.len(), 10);
    assert!(all[5..].iter().all(ok));
    // Nothing left to do.
    assert_eq!(run(&["--retry-failed"]).status.code(), Some(0));
    assert_eq!(read_records(&dir2.path("out.jsonl")).len(), 10);
}

#[test]
fn env_fallback_and_config_errors() {
    let server = default_mock();
    let dir = Dir::new("env");
    dir.write_input(&[body("bare", None).to_string(), line("e-1", body("x", None))]);
    for var in ["OPENAI_API_KEY", "OPENROUTER_API_KEY"] {
        let out_file = dir.s(&format!("out-{var}.jsonl"));
        let mut c = keypool();
        c.env(var, KEY_B)
            .args(["run", "-i", &dir.s("in.jsonl"), "-o", &out_file])
            .args(["--base-url", &server.url()]);
        let out = run_to_end(c);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let recs = read_records(Path::new(&out_file));
        assert_eq!(recs.len(), 2);
        assert!(recs.iter().all(|r| r["keypool"]["key"] == "key-0"));
        assert!(recs.iter().any(|r| id(r) == "line-1"));
    }
    assert_eq!(server.stats().keys[KEY_B].requests, 4);

    let usage = |args: &[&str], env: Option<(&str, &str)>, msg: &str| {
        let mut c = keypool();
        c.args(["run", "-i", &dir.s("in.jsonl"), "-o", &dir.s("x.jsonl")])
            .args(args);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let out = run_to_end(c);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with(msg), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    };
    usage(&[], None, "keypool: error: no API keys");
    let k = Some(("OPENAI_API_KEY", KEY_A));
    usage(
        &["--per-key", "0"],
        k,
        "keypool: error: --per-key must be between 1 and 1024",
    );
    usage(
        &["--per-key", "5000"],
        k,
        "keypool: error: --per-key must be",
    );
    usage(&["--strategy", "fastest"], k, "keypool: error: --strategy");
    usage(
        &["--base-url", "ftp://x"],
        k,
        "keypool: error: invalid config: base_url",
    );
    usage(
        &["--keys-file", "/nonexistent/k"],
        None,
        "keypool: error: cannot read --keys-file",
    );
    std::fs::write(
        dir.path("bad.json"),
        "{\"keys\": [{\"key\": \"sk-SECRET-x\", \"max_concurrent\": 0}]}",
    )
    .unwrap();
    usage(
        &["--config", &dir.s("bad.json")],
        None,
        "keypool: error: invalid config: keys[0].max_concurrent",
    );
    let mut c = keypool();
    c.env("OPENAI_API_KEY", KEY_A).args([
        "run",
        "-i",
        &dir.s("missing.jsonl"),
        "-o",
        &dir.s("x.jsonl"),
    ]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("keypool: error: cannot open --input")
    );
}

#[test]
fn config_file_with_strategy_and_flag_overrides() {
    let server = default_mock();
    let dir = Dir::new("config");
    let cfg = json!({
        "base_url": "http://127.0.0.1:9/v1",
        "strategy": "first_available",
        "keys": [{"key": KEY_A, "label": "acct-a", "max_concurrent": 32},
                 {"key": KEY_B, "label": "acct-b", "max_concurrent": 32}],
        // No first-request trial: a key on trial is skipped by round-robin, and at
        // the mock's speed the other key would take most of the run meanwhile.
        "retry": {"max_attempts": 1, "probe_keys": false}
    });
    std::fs::write(dir.path("pool.json"), cfg.to_string()).unwrap();
    dir.write_input(&x_lines("k", 40));
    let mut c = keypool();
    c.args(["run", "-c", &dir.s("pool.json"), "-i", &dir.s("in.jsonl")])
        .args(["-o", &dir.s("out.jsonl"), "--base-url", &server.url()])
        .args(["--strategy", "round_robin"]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let recs = read_records(&dir.path("out.jsonl"));
    let a = recs
        .iter()
        .filter(|r| r["keypool"]["key"] == "acct-a")
        .count();
    // The flag won: first_available would send all 40 to acct-a (its workers are
    // never all busy); round-robin alternates.
    assert_eq!(a, 20, "round robin splits evenly");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("acct-a") && stderr.contains("p99"),
        "{stderr}"
    );
    for k in [KEY_A, KEY_B] {
        assert!(server.stats().keys[k].max_in_flight <= 32);
    }
}

#[test]
fn mock_subcommand_serves_until_sigint() {
    let mut mock = spawn_piped(keypool().args(["mock", "--port", "0", "--latency-ms", "1"]));
    let mut url = String::new();
    BufReader::new(mock.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let url = url.trim().to_owned();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/v1"),
        "{url}"
    );
    let dir = Dir::new("mockcmd");
    dir.write_input(&x_lines("m", 20));
    let mut c = run_cmd(&dir, "in.jsonl", "-", &url);
    c.arg("-q");
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(records(&String::from_utf8_lossy(&out.stdout)).len(), 20);
    interrupt(&mock);
    let err = read_stderr(&mut mock);
    assert_eq!(mock.wait().unwrap().code(), Some(0), "{err}");
    assert!(err.contains("20 requests"), "{err}");
}

#[test]
fn demo_runs_fast_and_shows_per_key_limits() {
    let started = Instant::now();
    let out = run_to_end({
        let mut c = keypool();
        c.args(["demo", "--quiet"]);
        c
    });
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("sk-demo"), "{stdout}");
    assert_eq!(stdout.matches("at most 4 in flight").count(), 4, "{stdout}");
    assert!(stdout.contains("200 records written"), "{stdout}");
}

#[test]
fn help_documents_every_flag_with_its_default() {
    let out = keypool().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--input",
        "--output",
        "--config",
        "--keys-file",
        "--base-url",
        "--per-key",
        "--strategy",
        "--max-attempts",
        "--timeout-ms",
        "--ordered",
        "--retry-failed",
        "--quiet",
        "Exit status",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let out = keypool().args(["mock", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--fail-429-rate") && help.contains("[default: 0]"),
        "{help}"
    );
    let out = keypool().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("run") && help.contains("mock") && help.contains("demo"));
    // Unknown flags are usage errors.
    let out = keypool().args(["run", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let _ = std::io::stderr().flush();
}

#[test]
fn adaptive_run_learns_a_hidden_capacity_and_shows_credit() {
    let server = MockServer::start(MockConfig {
        latency_ms: 5,
        key_capacity: Some(3),
        cost_per_request: 0.125,
        ..MockConfig::default()
    })
    .unwrap();
    server.set_credit(KEY_A, Some(1000.0));
    let dir = Dir::new("adaptive");
    let lines: Vec<String> = (0..150)
        .map(|i| line(&format!("r{i}"), body(&format!("p{i}"), None)))
        .collect();
    dir.write_input(&lines);
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--per-key", "16", "--adaptive"]);
    c.args(["--credits-floor", "0.5", "--max-attempts", "10"]);
    let out = run_to_end(c);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(read_records(&dir.path("out.jsonl")).iter().all(ok));
    assert!(
        stderr.contains("keypool: key alpha: learned limit "),
        "{stderr}"
    );
    assert!(
        stderr.contains("keypool: key beta: learned limit "),
        "{stderr}"
    );
    assert!(stderr.contains("credit left $"), "{stderr}");
    assert!(stderr.contains(" of 16"), "{stderr}");
    assert_eq!(server.credit(KEY_A).unwrap().checks, 1);
    assert!(server.stats().keys.values().all(|k| k.max_in_flight <= 4));
}

/// A success body that echoes a key (the mock echoes the prompt, which holds one) is
/// masked in the record as the pool's error messages are, JSON-escaped forms included;
/// nothing else in the record changes.
#[test]
fn a_key_echoed_in_a_success_body_is_masked_in_the_record() {
    let server = default_mock();
    let dir = Dir::new("echoed-key");
    dir.write_input(&[line("leak", body(&format!("repeat {KEY_A} please"), None))]);
    let out = run_to_end(run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url()));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = std::fs::read_to_string(dir.path("out.jsonl")).unwrap();
    assert_no_secret("output file", &text);
    let recs = records(&text);
    assert_eq!(recs.len(), 1);
    let content = recs[0]["response"]["body"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert_eq!(content, "echo: repeat [REDACTED:alpha] please");
}

/// The run a new user tried (issue 28): 60 lines, 3 flagged by moderation with
/// OpenRouter's documented 403. 57 ok, 3 records `flagged` blamed on the request, each
/// flagged prompt sent once, no key taken out, exit 1 (some records failed).
#[test]
fn a_flagged_prompt_fails_alone_and_no_key_is_taken_out() {
    let server = default_mock();
    let dir = Dir::new("flagged");
    let moderation = r#"{"error":{"code":403,"message":"Your input was flagged for \"harassment\"","metadata":{"reasons":["harassment"],"flagged_input":"...","provider_name":"OpenAI"}}}"#;
    let lines: Vec<String> = (0..60)
        .map(|i| {
            let mock = (i % 20 == 7).then(|| json!({"status": 403, "body": moderation}));
            line(&format!("l-{i}"), body("x", mock))
        })
        .collect();
    dir.write_input(&lines);
    let out = run_to_end(run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url()));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let recs = read_records(&dir.path("out.jsonl"));
    assert_eq!(recs.len(), 60);
    let flagged: Vec<&Value> = recs.iter().filter(|r| !ok(r)).collect();
    assert_eq!(flagged.len(), 3);
    for r in flagged {
        assert_eq!(r["error"]["code"], "flagged", "{r}");
        assert_eq!(r["error"]["blame"], "request", "{r}");
        assert_eq!(r["response"]["status_code"], 403, "{r}");
        assert!(r["keypool"]["queue_ms"].is_u64(), "{r}");
        assert!(id(r).ends_with('7'), "{r}");
    }
    let log: Vec<u16> = server
        .stats()
        .keys
        .into_values()
        .flat_map(|k| k.log.into_iter().map(|r| r.status))
        .collect();
    assert_eq!(log.iter().filter(|&&s| s == 403).count(), 3);
    assert_eq!(log.len(), 60);
    let err = stderr(&out);
    assert!(!err.contains("disabled"), "{err}");
}

/// `keypool run` over https: the mock's CA trusted through `--ca-file` and through
/// `SSL_CERT_FILE`; without either, every record says which host failed TLS and why,
/// and the server saw no request.
#[test]
fn run_over_https_trusts_ca_file_and_ssl_cert_file() {
    let server = MockServer::start_tls(MockConfig::default()).unwrap();
    let dir = Dir::new("https");
    std::fs::write(dir.path("ca.pem"), server.ca_pem().unwrap()).unwrap();
    dir.write_input(&x_lines("h", 6));
    let mut c = run_cmd(&dir, "in.jsonl", "out-ca-file.jsonl", &server.url());
    c.args(["--ca-file", &dir.s("ca.pem"), "-q"]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut c = run_cmd(&dir, "in.jsonl", "out-env.jsonl", &server.url());
    c.arg("-q").env("SSL_CERT_FILE", dir.path("ca.pem"));
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(server.stats().total_requests, 12);

    server.reset_stats();
    let mut c = run_cmd(&dir, "in.jsonl", "out-untrusted.jsonl", &server.url());
    c.arg("-q")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = std::fs::read_to_string(dir.path("out-untrusted.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 6);
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("TLS with 127.0.0.1") && msg.contains("UnknownIssuer"),
            "{l}"
        );
        assert_eq!(v["keypool"]["attempts"], 1, "{l}");
    }
    assert_eq!(server.stats().total_requests, 0);
}

/// Every record carries its line's id (issue 22.6): a line whose model no key serves
/// (refused at submit) and a truncated line whose `custom_id` can still be read.
#[test]
fn every_record_carries_its_lines_id() {
    let server = default_mock();
    let dir = Dir::new("ids");
    let cfg = json!({
        "keys": [{"key": KEY_A, "label": "alpha", "models": ["m"]}],
    });
    std::fs::write(dir.path("pool.json"), cfg.to_string()).unwrap();
    let mut unserved = body("x", None);
    unserved["model"] = json!("z");
    let lines = vec![
        line("served", body("x", None)),
        line("unserved", unserved),
        r#"{"custom_id": "truncated", "body": {"model": "m""#.to_owned(),
    ];
    dir.write_input(&lines);
    let mut c = keypool();
    c.args(["run", "-c", &dir.s("pool.json"), "-i", &dir.s("in.jsonl")])
        .args(["-o", &dir.s("out.jsonl"), "--base-url", &server.url(), "-q"]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let recs = read_records(&dir.path("out.jsonl"));
    let ids: BTreeSet<&str> = recs.iter().map(id).collect();
    assert_eq!(ids, BTreeSet::from(["served", "unserved", "truncated"]));
    for r in &recs {
        match id(r) {
            "served" => assert!(ok(r), "{r}"),
            "unserved" => assert_eq!(r["error"]["code"], "model_not_served", "{r}"),
            _ => assert_eq!(r["error"]["code"], "invalid_request", "{r}"),
        }
    }
}

/// An `OPENAI_API_KEY` goes where OpenAI's own client sends it (issue 22.5):
/// `OPENAI_BASE_URL` is honoured (and without it, OpenAI's API — never the default
/// OpenRouter base; unit-tested in keys.rs, as a test may reach only 127.0.0.1).
#[test]
fn an_openai_key_follows_openai_base_url() {
    let server = default_mock();
    let dir = Dir::new("openai-env");
    dir.write_input(&x_lines("o", 3));
    let mut c = keypool();
    c.args([
        "run",
        "-i",
        &dir.s("in.jsonl"),
        "-o",
        &dir.s("out.jsonl"),
        "-q",
    ])
    .env("OPENAI_API_KEY", KEY_A)
    .env("OPENAI_BASE_URL", server.url());
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(server.key_stats(KEY_A).unwrap().requests, 3);
}

/// `--stats-json FILE` (issue 22.9): the run's outcome, machine-readable — record
/// counts and the pool's stats per key (by label, never the key).
#[test]
fn stats_json_writes_the_final_stats() {
    let server = default_mock();
    fail_key(&server, KEY_B, 401);
    let dir = Dir::new("stats-json");
    dir.write_input(&x_lines("s", 12));
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--stats-json", &dir.s("stats.json"), "-q"]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(dir.path("stats.json")).unwrap();
    assert_no_secret("--stats-json", &text);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["records"]["ok"], 12, "{v}");
    assert_eq!(v["records"]["failed"], 0);
    assert_eq!(v["interrupted"], false);
    let keys = v["stats"]["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let beta = keys.iter().find(|k| k["label"] == "beta").unwrap();
    assert!(
        beta["disabled_reason"].as_str().unwrap().contains("401"),
        "{beta}"
    );
    assert_eq!(beta["parked"], false);
    let alpha = keys.iter().find(|k| k["label"] == "alpha").unwrap();
    assert_eq!(alpha["succeeded"], 12);
    assert!(alpha["queue_p99_ms"].is_f64() && v["stats"]["queue_p50_ms"].is_f64());
}

/// Without a terminal, progress is a plain line now and then, and `-v` turns the
/// engine's log on (issue 22.10): a disabled key is logged as it happens.
#[test]
fn progress_lines_and_verbose_logs_without_a_terminal() {
    let server = MockServer::start(MockConfig {
        latency_ms: 20,
        ..MockConfig::default()
    })
    .unwrap();
    fail_key(&server, KEY_B, 401);
    let dir = Dir::new("plain-progress");
    dir.write_input(&x_lines("p", 30));
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["-v", "--per-key", "1", "--progress-every-ms", "100"]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(" done, ")).collect();
    assert!(lines.len() >= 2, "{err}");
    assert!(
        lines[0].starts_with("keypool: ") && lines[0].contains("/30 done"),
        "{err}"
    );
    assert!(
        err.contains("WARN") && err.contains("key beta disabled"),
        "{err}"
    );
    // Quiet: neither.
    let mut c = run_cmd(&dir, "in.jsonl", "out2.jsonl", &server.url());
    c.args(["-q", "--progress-every-ms", "1"]);
    let out = run_to_end(c);
    assert_eq!(stderr(&out), "");
}
