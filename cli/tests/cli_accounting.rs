//! End-to-end tests of `keypool run` for issue 9: every line read is accounted for,
//! only keypool output is resumed, ids are unique, Ctrl-C stops spending, keys are read
//! exactly as given, and records tell the truth. Each test runs the real `keypool`
//! binary on real files against the in-process mock server.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use keypool_mock::{MockConfig, MockServer};
use serde_json::json;

mod support;
use support::*;

// ---- Nothing missing, ever ----

/// A server `Retry-After` too large for a `Duration` made workers panic and the lines
/// vanish (0 records, exit 0). Whatever the engine does with it, the CLI must either
/// write a record for each line or fail naming the lines that have none.
#[test]
fn lines_without_a_record_fail_the_run_and_are_named() {
    let server = default_mock();
    let dir = Dir::new("unrecorded");
    let huge = json!({"status": 429, "retry_after": "18446744073709551615"});
    let ids: Vec<String> = (0..5).map(|i| format!("ra-{i}")).collect();
    let lines: Vec<String> = ids
        .iter()
        .map(|i| line(i, body("x", Some(huge.clone()))))
        .collect();
    dir.write_input(&lines);
    // The engine clamps the hint to max_retry_after_ms: keep it short so the keys'
    // cooldowns do not make the test wait a minute per round.
    std::fs::write(
        dir.path("cfg.json"),
        r#"{"retry": {"max_retry_after_ms": 200}, "keys": [{"key": "sk-placeholder"}]}"#,
    )
    .unwrap();
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--max-attempts", "1", "--timeout-ms", "5000"])
        .args(["--config", &dir.s("cfg.json")]);
    let out = run_to_end(c);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    let recs = read_records(&dir.path("out.jsonl"));
    let recorded: BTreeSet<&str> = recs.iter().map(id).collect();
    for i in &ids {
        assert!(
            recorded.contains(i.as_str()) || err.contains(&format!("{i} (line")),
            "{i} has no record and is not named: {err}"
        );
    }
    if recorded.len() < ids.len() {
        assert!(
            err.contains(&format!(
                "{} line(s) read have no record",
                5 - recorded.len()
            )),
            "{err}"
        );
    }
}

// ---- Ctrl-C stops spending; cancelled lines are reported ----

/// Measured at the server: after the first Ctrl-C, no request is sent that was not
/// already in flight; the in-flight ones finish and are written; the lines read but not
/// sent are named (no record) and a resume sends exactly them.
#[test]
fn first_ctrl_c_sends_nothing_more_and_names_the_unsent_lines() {
    let server = default_mock();
    let dir = Dir::new("ctrlc");
    let lines: Vec<String> = (0..40)
        .map(|i| {
            line(
                &format!("s-{i}"),
                body("x", Some(json!({"delay_ms": 1500}))),
            )
        })
        .collect();
    dir.write_input(&lines);
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--per-key", "2", "--max-attempts", "3"]);
    let mut child = spawn_piped(&mut c);
    // Wait (bounded) until every worker (2 keys x 2) has a request at the server; the
    // window (8) then also holds 4 read but unsent requests.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.stats().in_flight_total < 4 {
        assert!(Instant::now() < deadline, "never saturated");
        std::thread::sleep(Duration::from_millis(5));
    }
    let at_sigint = server.stats();
    interrupt(&child);
    let t0 = Instant::now();
    let err = read_stderr(&mut child);
    let status = child.wait().unwrap();
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(130), "{err}");
    let after = server.stats();
    assert!(
        after.total_requests - at_sigint.total_requests == 0,
        "{} requests sent after Ctrl-C (in flight then: {}): {err}",
        after.total_requests - at_sigint.total_requests,
        at_sigint.in_flight_total
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let recs = read_records(&dir.path("out.jsonl"));
    assert_eq!(recs.len() as u64, at_sigint.total_requests, "{err}");
    assert!(recs.iter().all(ok));
    // The unsent lines are counted and named, not dropped silently.
    assert!(err.contains("have no record"), "{err}");
    let named = err.matches(" (line ").count();
    assert!(named >= 1, "{err}");

    // Resume: exactly the rest is sent, nothing twice.
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--per-key", "8"]);
    server.reset_stats();
    let out = run_to_end(c);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("{} done, {} to go", recs.len(), 40 - recs.len())),
        "{err}"
    );
    assert_eq!(server.stats().total_requests, 40 - recs.len() as u64);
    let all = read_records(&dir.path("out.jsonl"));
    let ids: BTreeSet<&str> = all.iter().map(id).collect();
    assert_eq!((all.len(), ids.len()), (40, 40));
}

// ---- Resume only what keypool wrote ----

#[test]
fn foreign_output_files_are_refused_byte_for_byte() {
    let server = default_mock();
    let dir = Dir::new("foreign");
    let lines = x_lines("f", 3);
    dir.write_input(&lines);
    let record = |cid: &str| {
        json!({"id": "batch_req_1", "custom_id": cid, "response": null, "error": null,
               "keypool": {"key": "a", "attempts": 1, "latency_ms": 1, "line": 1}})
        .to_string()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // A keys file without its trailing newline: its last key was "repaired" away.
        ("keys.txt", b"sk-one\nsk-two".to_vec()),
        // A file of request lines: every request was skipped with exit 0.
        ("requests.jsonl", (lines.join("\n") + "\n").into_bytes()),
        // Records, then something else, then a cut-off record: not ours to repair.
        (
            "mixed.jsonl",
            format!("{}\nnotes\n{{\"id\":\"batch_req_2\",\"cust", record("f-0")).into_bytes(),
        ),
        ("prose.txt", b"hello".to_vec()),
    ];
    for (name, content) in cases {
        std::fs::write(dir.path(name), &content).unwrap();
        let out = run_to_end(run_cmd(&dir, "in.jsonl", name, &server.url()));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(
            err.contains("is not keypool output") && err.contains("--overwrite"),
            "{name}: {err}"
        );
        assert_eq!(std::fs::read(dir.path(name)).unwrap(), content, "{name}");
    }
    assert_eq!(server.stats().total_requests, 0);

    // A cut-off record after records is repaired (and its line re-run).
    std::fs::write(
        dir.path("ours.jsonl"),
        format!(
            "{}\n{{\"id\":\"batch_req_9\",\"custom_id\":\"f-1",
            record("f-0")
        ),
    )
    .unwrap();
    let out = run_to_end(run_cmd(&dir, "in.jsonl", "ours.jsonl", &server.url()));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("repaired") && err.contains("1 done, 2 to go"),
        "{err}"
    );
    assert_eq!(server.stats().total_requests, 2);
    assert_eq!(read_records(&dir.path("ours.jsonl")).len(), 3);
}

#[test]
fn overwrite_starts_afresh() {
    let server = default_mock();
    let dir = Dir::new("overwrite");
    dir.write_input(&x_lines("w", 4));
    std::fs::write(dir.path("out.jsonl"), "not keypool output\n").unwrap();
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.arg("--overwrite");
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(read_records(&dir.path("out.jsonl")).len(), 4);
    // Again with --overwrite: everything is sent again, the file holds one run.
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.arg("--overwrite");
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("resuming"));
    assert_eq!(read_records(&dir.path("out.jsonl")).len(), 4);
    assert_eq!(server.stats().total_requests, 8);
}

// ---- Ids are unique ----

#[test]
fn duplicate_custom_ids_are_refused_before_anything_is_sent() {
    let server = default_mock();
    let dir = Dir::new("dups");
    let lines = vec![
        line("same", body("1", None)),
        line("other", body("2", None)),
        line("same", body("3", None)),
        body("bare", None).to_string(), // line-4
        line("same", body("5", None)),
        line("line-4", body("6", None)),
    ];
    dir.write_input(&lines);
    let out = run_to_end(run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url()));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("\"same\" on lines 1, 3, 5"), "{err}");
    assert!(err.contains("\"line-4\" on lines 4, 6"), "{err}");
    assert_eq!(server.stats().total_requests, 0);
    assert!(!dir.path("out.jsonl").exists());

    // From stdin (read once): caught when read, naming the line; exit 2.
    let mut c = run_cmd(&dir, "-", "out2.jsonl", &server.url());
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(lines.join("\n").as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("line 3: custom_id \"same\" was already used"),
        "{err}"
    );
}

// ---- Keys are read exactly as given ----

#[test]
fn keys_are_read_exactly_as_given() {
    let server = default_mock();
    let dir = Dir::new("keys");
    dir.write_input(&[line("k-1", body("x", None))]);
    // A base64-style key ending in "==", unlabelled, and one with a label.
    let b64 = "c2stU0VDUkVULWI2NA==SECRET==";
    std::fs::write(
        dir.path("keys.txt"),
        format!("  {b64}  \nacct-b\t{KEY_B}=x\n"),
    )
    .unwrap();
    let mut c = keypool();
    c.args(["run", "-i", &dir.s("in.jsonl"), "-o", &dir.s("out.jsonl")])
        .args([
            "--keys-file",
            &dir.s("keys.txt"),
            "--base-url",
            &server.url(),
        ])
        .args(["--per-key", "1"]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rec = &read_records(&dir.path("out.jsonl"))[0];
    // The first key (first_available) answered, under its default label.
    assert_eq!(rec["keypool"]["key"], "key-0");
    let seen: Vec<String> = server.stats().keys.keys().cloned().collect();
    assert_eq!(seen, vec![b64.to_owned()], "the server got the whole key");
    let err = stderr(&out);
    assert!(err.contains("acct-b"), "{err}");
    assert!(!err.contains("c2st"), "key text printed as a label: {err}");

    // The same key twice, under two labels: refused, naming the labels.
    std::fs::write(dir.path("dup.txt"), format!("one {KEY_A}\n\ntwo {KEY_A}\n")).unwrap();
    let mut c = keypool();
    c.args(["run", "-i", &dir.s("in.jsonl"), "-o", &dir.s("o2.jsonl")])
        .args([
            "--keys-file",
            &dir.s("dup.txt"),
            "--base-url",
            &server.url(),
        ]);
    let out = run_to_end(c);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("listed twice, as one and two"), "{err}");

    // A newline inside an env key says "newline".
    let mut c = keypool();
    c.env("OPENAI_API_KEY", format!("{KEY_A}\n{KEY_B}"))
        .args(["run", "-i", &dir.s("in.jsonl"), "-o", &dir.s("o3.jsonl")])
        .args(["--base-url", &server.url()]);
    let out = run_to_end(c);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("newline") && !err.contains("spaces"), "{err}");

    // Padding is padding in every source: config JSON, keys file (above), env.
    std::fs::write(
        dir.path("pool.json"),
        json!({"keys": [{"key": format!(" {KEY_A}\n"), "label": "cfg"}]}).to_string(),
    )
    .unwrap();
    let mut c = keypool();
    c.args(["run", "-c", &dir.s("pool.json"), "-i", &dir.s("in.jsonl")])
        .args(["-o", &dir.s("o4.jsonl"), "--base-url", &server.url()]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut c = keypool();
    c.env("OPENROUTER_API_KEY", format!("\t{KEY_B} \n"))
        .args(["run", "-i", &dir.s("in.jsonl"), "-o", &dir.s("o5.jsonl")])
        .args(["--base-url", &server.url()]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stats = server.stats();
    assert_eq!(stats.keys[KEY_A].requests, 1);
    assert_eq!(stats.keys[KEY_B].requests, 1);
}

// ---- Records tell the truth ----

/// Every attempt the server saw is accounted for in some record: a request moved off a
/// rejected key records the key that answered it and its real attempt count.
#[test]
fn records_count_every_attempt_the_server_saw() {
    let server = default_mock();
    for k in [KEY_A, KEY_B] {
        fail_key(&server, k, 401);
    }
    let dir = Dir::new("truth");
    dir.write_input(&x_lines("t", 6));
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--per-key", "1"]);
    let out = run_to_end(c);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let recs = read_records(&dir.path("out.jsonl"));
    assert_eq!(recs.len(), 6);
    let attempts: u64 = recs
        .iter()
        .map(|r| r["keypool"]["attempts"].as_u64().unwrap())
        .sum();
    assert_eq!(attempts, server.stats().total_requests, "{recs:#?}");
    for r in &recs {
        let n = r["keypool"]["attempts"].as_u64().unwrap();
        assert_eq!(n > 0, r["keypool"]["key"].is_string(), "{r}");
    }
    // Both keys are listed as disabled, with the reason.
    assert!(
        err.contains("key alpha disabled: ") && err.contains("key beta disabled: "),
        "{err}"
    );
    assert!(err.contains("401"), "{err}");
}

#[test]
fn summary_separates_failed_attempts_from_failed_records() {
    let server = default_mock();
    fail_key(&server, KEY_A, 401);
    let dir = Dir::new("summary");
    dir.write_input(&x_lines("u", 6));
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--per-key", "1"]);
    let out = run_to_end(c);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("6 records written"), "{err}");
    assert!(err.contains(": 6 ok, 0 failed"), "{err}");
    assert!(err.contains("7 HTTP attempts: 6 ok, 1 failed"), "{err}");
    assert!(err.contains("key alpha disabled: "), "{err}");
}

#[test]
fn stream_true_lines_run_streamed_and_record_the_assembled_completion() {
    let server = default_mock();
    let dir = Dir::new("stream");
    let mut streamed = body("hello there", None);
    streamed["stream"] = json!(true);
    let lines = vec![
        line("a", body("x", None)),
        line("b", streamed.clone()),
        streamed.to_string(),
    ];
    dir.write_input(&lines);
    let out = run_to_end(run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url()));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let recs = read_records(&dir.path("out.jsonl"));
    assert_eq!(recs.len(), 3);
    for r in recs.iter().filter(|r| id(r) != "a") {
        assert!(ok(r), "{r}");
        let b = &r["response"]["body"];
        // The same record shape as a non-streamed line: a chat.completion with usage.
        assert_eq!(b["object"], "chat.completion", "{r}");
        assert_eq!(b["choices"][0]["message"]["content"], "echo: hello there");
        assert_eq!(b["choices"][0]["finish_reason"], "stop");
        assert!(b["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["response"]["status_code"], 200);
    }
    assert_eq!(server.stats().total_requests, 3);
}

#[test]
fn a_broken_stream_is_an_error_record_that_retry_failed_redoes() {
    let server = default_mock();
    let dir = Dir::new("stream-broken");
    let mut broken = body(
        "abcdefghijkl",
        Some(json!({"stream_fault": "truncate", "fault_after": 1})),
    );
    broken["stream"] = json!(true);
    let mut malformed = body(
        "abcdefghijkl",
        Some(json!({"stream_fault": "malformed", "fault_after": 1})),
    );
    malformed["stream"] = json!(true);
    write_lines(
        &dir.path("in.jsonl"),
        &[line("cut", broken.clone()), line("bad", malformed.clone())],
    );
    let out = run_to_end(run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url()));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let recs = read_records(&dir.path("out.jsonl"));
    assert_eq!(recs.len(), 2);
    for r in &recs {
        assert!(!ok(r), "{r}");
        assert_eq!(r["error"]["code"], "stream", "{r}");
        let m = r["error"]["message"].as_str().unwrap();
        assert!(m.contains("delivered"), "{m}");
        assert!(r["keypool"]["key"].is_string(), "{r}");
    }
    assert!(recs.iter().any(|r| {
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("incomplete")
    }));
    assert!(recs.iter().any(|r| {
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed")
    }));
    // The server heals (the same lines without faults): --retry-failed redoes both.
    let mut healed = body("abcdefghijkl", None);
    healed["stream"] = json!(true);
    write_lines(
        &dir.path("in.jsonl"),
        &[line("cut", healed.clone()), line("bad", healed)],
    );
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.arg("--retry-failed");
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recs = read_records(&dir.path("out.jsonl"));
    assert_eq!(recs.len(), 4);
    assert!(recs[2..].iter().all(ok), "{recs:#?}");
}

#[test]
fn demo_does_not_name_the_file_it_deletes() {
    let out = run_to_end({
        let mut c = keypool();
        c.args(["demo", "--quiet", "--requests", "20"]);
        c
    });
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("results.jsonl"), "{stdout}");
    assert!(
        stdout.contains("20 records written to a temporary file"),
        "{stdout}"
    );
}

/// Needs the engine's retryable `invalid_response` failure (another engineer's branch):
/// a 200 whose body is not JSON is a failure, and `--retry-failed` redoes it.
#[test]
fn broken_200_is_an_error_record_and_retry_failed_redoes_it() {
    let server = MockServer::start(MockConfig {
        malformed_rate: 1.0,
        ..MockConfig::default()
    })
    .unwrap();
    let dir = Dir::new("broken200");
    dir.write_input(&x_lines("b", 3));
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--max-attempts", "1"]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let recs = read_records(&dir.path("out.jsonl"));
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(|r| !ok(r)), "{recs:#?}");
    server.set_config(MockConfig::default());
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.arg("--retry-failed");
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recs = read_records(&dir.path("out.jsonl"));
    assert_eq!(recs.len(), 6);
    assert!(recs[3..].iter().all(ok));
}
