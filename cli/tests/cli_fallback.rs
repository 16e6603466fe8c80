//! `keypool run` with the config's `fallback_models`: a line whose model the provider
//! does not have (OpenRouter's 404 "No endpoints found", scripted per key and model at
//! the mock) is served by the fallback, and its record says so in
//! `keypool.fallback_model`; every other record is unchanged.

use keypool_mock::KeyRule;
use serde_json::json;

mod support;
use support::*;

const OR_MODEL_404: &str = r#"{"error":{"message":"No endpoints found for acme/x.","code":404}}"#;

#[test]
fn a_fallback_served_record_names_the_model() {
    let server = default_mock();
    for k in [KEY_A, KEY_B] {
        server.set_key_rule(
            k,
            KeyRule {
                model: Some("acme/x".into()),
                always_status: Some(404),
                body: Some(OR_MODEL_404.into()),
                ..KeyRule::default()
            },
        );
    }
    let dir = Dir::new("fallback");
    let cfg = json!({
        "keys": [{"key": KEY_A, "label": "acct-a", "max_concurrent": 2},
                 {"key": KEY_B, "label": "acct-b", "max_concurrent": 2}],
        "fallback_models": {"acme/x": ["acme/y"]},
        "retry": {"max_attempts": 1}
    });
    std::fs::write(dir.path("pool.json"), cfg.to_string()).unwrap();
    let chat = |model: &str, i: usize| json!({"model": model, "messages": [{"role": "user", "content": format!("q{i}")}]});
    let mut lines: Vec<String> = (0..6)
        .map(|i| line(&format!("x-{i}"), chat("acme/x", i)))
        .collect();
    lines.extend((0..3).map(|i| line(&format!("y-{i}"), chat("acme/y", i))));
    let mut failing = chat("acme/x", 9);
    failing["mock"] = json!({"status": 400});
    lines.push(line("bad", failing));
    dir.write_input(&lines);
    let mut c = keypool();
    c.args(["run", "-c", &dir.s("pool.json"), "-i", &dir.s("in.jsonl")])
        .args(["-o", &dir.s("out.jsonl"), "--base-url", &server.url()]);
    let out = run_to_end(c);
    let err = stderr(&out);
    let recs = read_records(&dir.path("out.jsonl"));
    assert_eq!(recs.len(), 10, "{err}");
    for r in &recs {
        let meta = r["keypool"].as_object().unwrap();
        // The existing fields are all there, whatever the outcome.
        for f in ["key", "attempts", "latency_ms", "queue_ms", "line"] {
            assert!(meta.contains_key(f), "{r}");
        }
        match id(r) {
            x if x.starts_with("x-") => {
                assert!(ok(r), "{r}");
                assert_eq!(meta["fallback_model"], "acme/y", "{r}");
                assert_eq!(r["response"]["body"]["model"], "acme/y", "{r}");
            }
            y if y.starts_with("y-") => {
                assert!(ok(r), "{r}");
                assert!(!meta.contains_key("fallback_model"), "{r}");
            }
            _ => {
                assert_eq!(r["error"]["code"], "http", "{r}");
                assert!(!meta.contains_key("fallback_model"), "{r}");
            }
        }
    }
    // The provider was asked for acme/x (and said it has none) before the fallback.
    let asked_x = [KEY_A, KEY_B]
        .iter()
        .filter_map(|k| server.key_stats(k))
        .flat_map(|s| s.log)
        .filter(|l| l.model.as_deref() == Some("acme/x"))
        .count();
    assert!(asked_x >= 1, "the mock never saw acme/x");
    // The run had a failed line, so it does not exit 0; nothing else failed.
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert_eq!(recs.iter().filter(|r| !ok(r)).count(), 1, "{err}");
}
