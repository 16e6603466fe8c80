//! (f) Invalid configuration is rejected at construction with an error naming the field.

use keypool::{Config, Error, KeyConfig, Pool, Strategy};

fn field_of(json: &str) -> (String, String) {
    match Config::from_json(json) {
        Err(Error::Config { field, message }) => (field, message),
        other => panic!("expected a config error for {json}, got {other:?}"),
    }
}

#[test]
fn json_errors_name_the_field() {
    let cases: &[(&str, &str)] = &[
        (r#"{"keys": []}"#, "keys"),
        (r#"{}"#, "keys"),
        (r#"{"keys": [{"key": ""}]}"#, "keys[0].key"),
        (r#"{"keys": [{"key": "   "}]}"#, "keys[0].key"),
        (
            r#"{"keys": [{"key": "sk-a"}, {"key": "sk b"}]}"#,
            "keys[1].key",
        ),
        (r#"{"keys": [{"key": "sk-a\nX-Evil: 1"}]}"#, "keys[0].key"),
        (
            r#"{"keys": [{"key": "sk-a", "max_concurrent": 0}]}"#,
            "keys[0].max_concurrent",
        ),
        (
            r#"{"keys": [{"key": "sk-a", "max_concurrent": 100000}]}"#,
            "keys[0].max_concurrent",
        ),
        (
            r#"{"keys": [{"key": "sk-a", "max_concurrent": "x"}]}"#,
            "keys[0].max_concurrent",
        ),
        (
            r#"{"keys": [{"key": "sk-a", "max_concurrent": -1}]}"#,
            "keys[0].max_concurrent",
        ),
        (
            r#"{"base_url": "not a url", "keys": [{"key": "sk-a"}]}"#,
            "base_url",
        ),
        (
            r#"{"base_url": "ftp://x.org", "keys": [{"key": "sk-a"}]}"#,
            "base_url",
        ),
        (
            r#"{"keys": [{"key": "sk-a", "base_url": "::"}]}"#,
            "keys[0].base_url",
        ),
        (
            r#"{"strategy": "fastest", "keys": [{"key": "sk-a"}]}"#,
            "strategy",
        ),
        (r#"{"keys": [{"key": "sk-a"}], "bogus": 1}"#, "bogus"),
        (
            r#"{"keys": [{"key": "sk-a", "lable": "x"}]}"#,
            "keys[0].lable",
        ),
        (r#"{"keys": 5}"#, "keys"),
        (
            r#"{"keys": [{"key": "sk-a", "label": "a"}, {"key": "sk-b", "label": "a"}]}"#,
            "keys[1].label",
        ),
        (
            r#"{"keys": [{"key": "sk-a"}], "queue_capacity": 0}"#,
            "queue_capacity",
        ),
        (
            r#"{"keys": [{"key": "sk-a"}], "timeout_ms": 0}"#,
            "timeout_ms",
        ),
        (
            r#"{"keys": [{"key": "sk-a"}], "headers": {"Bad Header": "x"}}"#,
            "headers.Bad Header",
        ),
        (
            r#"{"keys": [{"key": "sk-a"}], "retry": {"max_attempts": 0}}"#,
            "retry.max_attempts",
        ),
        (
            r#"{"keys": [{"key": "sk-a"}], "retry": {"max_atempts": 2}}"#,
            "retry.max_atempts",
        ),
        (r#"{"keys": [{"key": "sk-a", "rpm": 0}]}"#, "keys[0].rpm"),
        (
            r#"{"keys": [{"key": "sk-a", "label": "x\u0001"}]}"#,
            "keys[0].label",
        ),
        ("{\"keys\": [", "keys"),
        ("42", "config"),
    ];
    for (json, want) in cases {
        let (field, message) = field_of(json);
        assert!(
            field == *want || field.starts_with(want),
            "for {json}: field {field:?} (message {message:?}), want {want:?}"
        );
        assert!(!message.is_empty());
    }
}

#[test]
fn serde_messages_do_not_echo_values() {
    // A key given where a number is expected must not be echoed back.
    let (field, message) =
        field_of(r#"{"keys": [{"key": "sk-a", "max_concurrent": "sk-secret-123"}]}"#);
    assert_eq!(field, "keys[0].max_concurrent");
    assert!(!message.contains("sk-secret-123"), "{message}");
}

#[test]
fn defaults_and_full_json() {
    let c = Config::from_json(
        r#"{"base_url": "https://openrouter.ai/api/v1", "strategy": "least_loaded",
            "timeout_ms": 600000, "connect_timeout_ms": 10000, "queue_capacity": 1024,
            "headers": {"HTTP-Referer": "https://example.org", "X-Title": "my tool"},
            "keys": [{"key": "sk-a", "label": "acct-a", "max_concurrent": 5,
                      "base_url": "http://127.0.0.1:9/v1", "headers": {}},
                     {"key": "sk-b"}]}"#,
    )
    .unwrap();
    assert_eq!(c.strategy, Strategy::LeastLoaded);
    assert_eq!(c.key_label(0), "acct-a");
    assert_eq!(c.key_label(1), "key-1");
    assert_eq!(c.keys[1].max_concurrent, 4);
    assert_eq!(c.key_base_url(0), "http://127.0.0.1:9/v1");
    assert_eq!(c.key_base_url(1), "https://openrouter.ai/api/v1");
    assert_eq!(c.retry.max_attempts, 3);
    let d = Config::default();
    assert_eq!(
        (d.timeout_ms, d.connect_timeout_ms, d.queue_capacity),
        (600_000, 10_000, 1024)
    );
    assert_eq!(d.strategy, Strategy::FirstAvailable);
}

#[test]
fn builder_validates_and_pool_rejects() {
    assert!(
        matches!(Config::builder().build(), Err(Error::Config { ref field, .. }) if field == "keys")
    );
    let e = Config::builder()
        .key_config(KeyConfig::new("sk-a").max_concurrent(0))
        .build()
        .unwrap_err();
    assert!(
        matches!(e, Error::Config { ref field, .. } if field == "keys[0].max_concurrent"),
        "{e}"
    );
    // Pool::new validates a config built by hand, too.
    let mut c = Config::default();
    c.keys.push(KeyConfig::new("sk-a"));
    c.base_url = "nope".into();
    let e = Pool::new(c).unwrap_err();
    assert!(
        matches!(e, Error::Config { ref field, .. } if field == "base_url"),
        "{e}"
    );
    assert!(
        e.to_string().starts_with("invalid config: base_url:"),
        "{e}"
    );
    assert!("round_robin".parse::<Strategy>().is_ok());
    assert!("x".parse::<Strategy>().is_err());
}

/// Upper bounds: a value that would abort the host process (a queue of 1e9 slots is
/// allocated up front), exhaust threads or memory, or overflow a clock is rejected at
/// construction, naming the field.
#[test]
fn upper_bounds_are_enforced() {
    let long_key = "k".repeat(keypool::MAX_KEY_BYTES + 1);
    let many_workers: String = (0..9)
        .map(|i| format!(r#"{{"key": "sk-{i}", "max_concurrent": 1024}}"#))
        .collect::<Vec<_>>()
        .join(",");
    let cases: Vec<(String, &str)> = vec![
        (
            r#"{"queue_capacity": 1000000000, "keys": [{"key": "sk-a"}]}"#.into(),
            "queue_capacity",
        ),
        (
            r#"{"worker_stack_size": 1099511627776, "keys": [{"key": "sk-a"}]}"#.into(),
            "worker_stack_size",
        ),
        (
            format!(r#"{{"keys": [{{"key": "{long_key}"}}]}}"#),
            "keys[0].key",
        ),
        (format!(r#"{{"keys": [{many_workers}]}}"#), "keys"),
        (
            r#"{"deadline_ms": 18446744073709551615, "keys": [{"key": "sk-a"}]}"#.into(),
            "deadline_ms",
        ),
        (
            r#"{"timeout_ms": 18446744073709551615, "keys": [{"key": "sk-a"}]}"#.into(),
            "timeout_ms",
        ),
        (
            r#"{"retry": {"default_cooldown_ms": 18446744073709551615}, "keys": [{"key": "sk-a"}]}"#
                .into(),
            "retry.default_cooldown_ms",
        ),
        (
            r#"{"retry": {"max_retry_after_ms": 18446744073709551615}, "keys": [{"key": "sk-a"}]}"#
                .into(),
            "retry.max_retry_after_ms",
        ),
    ];
    for (json, want) in &cases {
        let (field, message) = field_of(json);
        assert_eq!(&field, want, "{message}");
        assert!(message.len() < 300, "{message}");
    }
    // The largest allowed values are accepted.
    let ok = format!(
        r#"{{"queue_capacity": {}, "deadline_ms": {}, "keys": [{{"key": "sk-a"}}]}}"#,
        keypool::MAX_QUEUE_CAPACITY,
        keypool::MAX_DURATION_MS
    );
    Config::from_json(&ok).unwrap();
}

/// A per-request deadline too far away to represent is no deadline, not a panic.
#[test]
fn absurd_request_deadline_does_not_panic() {
    let server = keypool_mock::MockServer::start(keypool_mock::MockConfig::default()).unwrap();
    let pool = Pool::new(
        Config::builder()
            .base_url(server.url())
            .key("sk-a", 1)
            .build()
            .unwrap(),
    )
    .unwrap();
    let req = keypool::Request::chat("m", [("user", "x")]).with_deadline(std::time::Duration::MAX);
    assert!(pool.submit(req).unwrap().wait().is_ok());
    pool.close();
}
