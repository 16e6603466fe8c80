//! `keypool run --metrics-addr`: `/metrics` scraped during a run against the mock.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use keypool_mock::{KeyRule, MockConfig, MockServer};
use support::*;

/// One HTTP/1.1 request; returns (status line, body).
fn http(addr: &str, method: &str, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    ))
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
}

#[test]
fn metrics_are_served_during_a_run() {
    let server = MockServer::start(MockConfig {
        latency_ms: 40,
        ..MockConfig::default()
    })
    .unwrap();
    server.set_key_rule(
        KEY_B,
        KeyRule {
            always_status: Some(429),
            retry_after_ms: Some(100),
            fail_first: 2,
            ..KeyRule::default()
        },
    );
    let dir = Dir::new("metrics");
    dir.write_input(&x_lines("m", 40));
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--per-key", "2", "--metrics-addr", "127.0.0.1:0"]);
    let mut child = spawn_piped(&mut c);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("keypool: metrics at http://") {
                let _ = tx.send(rest.trim_end_matches("/metrics").to_owned());
            }
            all += &line;
            all.push('\n');
        }
        all
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the run prints the metrics address");

    // Scrape until the run ends; keep what was seen.
    let (mut during, mut last) = (None, None);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60) {
        match http(&addr, "GET", "/metrics") {
            Ok((status, body)) => {
                assert_eq!(status, "HTTP/1.1 200 OK");
                assert_no_secret("/metrics", &body);
                let done = value(&body, "keypool_completed_total").unwrap();
                if done > 0.0 && done < 40.0 && during.is_none() {
                    let (nf, _) = http(&addr, "GET", "/nope").unwrap();
                    assert_eq!(nf, "HTTP/1.1 404 Not Found");
                    let (m, _) = http(&addr, "POST", "/metrics").unwrap();
                    assert_eq!(m, "HTTP/1.1 405 Method Not Allowed");
                    during = Some(body.clone());
                }
                last = Some(body);
            }
            Err(_) => break, // the run ended and took the endpoint with it
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    assert_no_secret("stderr", &err);
    assert!(status.success(), "{err}");
    assert_eq!(read_records(&dir.path("out.jsonl")).len(), 40);

    let during = during.expect("a scrape while the run was under way");
    assert!(value(&during, "keypool_submitted_total").is_some());
    assert!(during.contains("# TYPE keypool_request_duration_seconds histogram\n"));
    assert!(
        during.contains("keypool_in_flight{key=\"alpha\"} "),
        "{during}"
    );
    let last = last.unwrap();
    // Counters only grow, and match what the mock saw by the end.
    let ok = |t: &str, k: &str| {
        value(
            t,
            &format!("keypool_requests_total{{key=\"{k}\",outcome=\"success\"}}"),
        )
        .unwrap()
    };
    assert!(ok(&last, "alpha") >= ok(&during, "alpha"));
    let sent_a = server.key_stats(KEY_A).unwrap().requests as f64;
    assert!(ok(&last, "alpha") <= sent_a);
    assert_eq!(
        value(
            &last,
            "keypool_requests_total{key=\"beta\",outcome=\"rate_limited\"}"
        ),
        Some(2.0),
        "{last}"
    );
    assert_eq!(
        value(&last, "keypool_key_state{key=\"beta\",state=\"disabled\"}"),
        Some(0.0)
    );
}
