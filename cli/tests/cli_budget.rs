//! `keypool run --max-cost`: the spend cap end to end, counted at the mock server.

use keypool_mock::{MockConfig, MockServer};

mod support;
use support::*;

#[test]
fn max_cost_stops_the_run_and_records_the_rest_as_budget_exhausted() {
    // Every answer costs 0.01: 0.05 is reached after five; at most one more request per
    // worker (2 keys x 2) was in flight then.
    let server = MockServer::start(MockConfig {
        cost_per_request: 0.01,
        ..MockConfig::default()
    })
    .unwrap();
    let dir = Dir::new("max-cost");
    dir.write_input(&x_lines("c", 40));
    let mut c = run_cmd(&dir, "in.jsonl", "out.jsonl", &server.url());
    c.args(["--per-key", "2", "--max-cost", "0.05"]);
    let out = run_to_end(c);
    let err = stderr(&out);
    let recs = read_records(&dir.path("out.jsonl"));
    assert_eq!(recs.len(), 40, "one record per line: {err}");
    let sent = server.stats().total_requests;
    assert!((5..=9).contains(&sent), "the server saw {sent} requests");
    let done = recs.iter().filter(|r| ok(r)).count() as u64;
    assert_eq!(done, sent, "every request sent succeeded");
    let refused = recs
        .iter()
        .filter(|r| r["error"]["code"] == "budget_exhausted")
        .count() as u64;
    assert_eq!(done + refused, 40, "{recs:#?}");
    // The run failed (records with errors), and says why.
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("budget") || err.contains("max_cost"), "{err}");
    let bad = {
        let mut c = run_cmd(&dir, "in.jsonl", "out2.jsonl", &server.url());
        c.arg("--max-cost=-1");
        run_to_end(c)
    };
    assert!(stderr(&bad).contains("--max-cost"), "{}", stderr(&bad));
}
