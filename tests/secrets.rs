//! (g) The key string never appears in any Debug/Display/stats/error output.

use std::time::Duration;

use keypool::{Config, Pool, Request};
use keypool_mock::{KeyRule, MockConfig, MockServer};

const SECRET_A: &str = "sk-or-v1-SECRETaaaaaaaaaaaaaaaa";
const SECRET_B: &str = "sk-or-v1-SECRETbbbbbbbbbbbbbbbb";

fn assert_clean(what: &str, text: &str) {
    for s in [SECRET_A, SECRET_B, "SECRET"] {
        assert!(!text.contains(s), "{what} leaks a key: {text}");
    }
}

#[test]
fn keys_never_appear_in_output() {
    let server = MockServer::start(MockConfig::default()).unwrap();
    server.set_key_rule(
        SECRET_B,
        KeyRule {
            always_status: Some(401),
            ..KeyRule::default()
        },
    );
    let json = format!(
        r#"{{"base_url": "{}", "keys": [{{"key": "{SECRET_A}", "label": "acct-a", "max_concurrent": 2}},
                                       {{"key": "{SECRET_B}", "max_concurrent": 2}}],
            "retry": {{"max_attempts": 1}}, "strategy": "round_robin"}}"#,
        server.url()
    );
    let config = Config::from_json(&json).unwrap();
    assert_clean("Config Debug", &format!("{config:?}"));
    assert_clean(
        "KeyConfig Debug",
        &format!("{:?} {}", config.keys[0], config.keys[0].key),
    );
    let pool = Pool::new(config.clone()).unwrap();
    assert_clean("Pool Debug", &format!("{pool:?}"));

    let mut outputs = Vec::new();
    for r in pool.batch((0..6).map(|i| Request::chat("m", [("user", &*format!("p{i}"))]))) {
        match r {
            Ok(resp) => outputs.push(format!("{resp:?} {}", resp.text())),
            Err(e) => outputs.push(format!("{e} {e:?}")),
        }
    }
    // The revoked key's 401 is not the request's fault: the request moved to the good
    // key without spending its one attempt (it reports both attempts made).
    assert!(
        outputs.iter().any(|o| o.contains("attempts: 2")),
        "{outputs:?}"
    );
    for o in &outputs {
        assert_clean("result", o);
    }
    let stats = pool.stats();
    assert_clean("stats", &format!("{stats:?} {}", stats.to_json()));
    assert_eq!(
        stats.keys[1].disabled_reason.as_deref(),
        Some("HTTP 401: key rejected")
    );

    // Config errors: a key in the wrong place is not echoed.
    let bad = format!(r#"{{"keys": [{{"key": "{SECRET_A}", "max_concurrent": "{SECRET_B}"}}]}}"#);
    let e = Config::from_json(&bad).unwrap_err();
    assert_clean("config error", &format!("{e} {e:?}"));
    let bad = format!(r#"{{"keys": [{{"key": "{SECRET_A}", "label": "{SECRET_A}"}}]}}"#);
    let e = Config::from_json(&bad).unwrap_err();
    assert_clean("config error", &format!("{e} {e:?}"));
}

#[test]
fn transport_and_timeout_errors_do_not_leak_keys() {
    // A port nobody listens on: connection refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let config = Config::builder()
        .base_url(format!("http://{addr}/v1"))
        .key(SECRET_A, 1)
        .max_attempts(1)
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let e = pool
        .submit(Request::chat("m", [("user", "x")]))
        .unwrap()
        .wait()
        .unwrap_err();
    assert_eq!(e.code(), "transport", "{e}");
    assert_clean("transport error", &format!("{e} {e:?}"));

    // A server slower than the attempt timeout.
    let server = MockServer::start(MockConfig {
        latency_ms: 2_000,
        ..MockConfig::default()
    })
    .unwrap();
    let config = Config::builder()
        .base_url(server.url())
        .key(SECRET_B, 1)
        .timeout_ms(100)
        .max_attempts(1)
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let e = pool
        .submit(Request::chat("m", [("user", "x")]))
        .unwrap()
        .wait_timeout(Duration::from_secs(10));
    let e = e.unwrap_err();
    assert!(
        matches!(
            e,
            keypool::Error::Timeout {
                phase: keypool::TimeoutPhase::Attempt,
                ..
            }
        ),
        "{e}"
    );
    assert_clean("timeout error", &format!("{e} {e:?}"));
}

/// `Pool::mask_secrets` masks what the pool's own errors mask: every key (also as a
/// JSON string escapes it) and a base URL's password; text without one is `None`.
#[test]
fn mask_secrets_covers_keys_escaped_keys_and_url_passwords() {
    let config = Config::builder()
        .base_url("http://user:pa%2Fss@127.0.0.1:9/v1")
        .key_config(keypool::KeyConfig::new(SECRET_A).label("acct-a"))
        .key_config(keypool::KeyConfig::new("sk-slash/SECRETcc"))
        .build()
        .unwrap();
    let pool = Pool::new(config).unwrap();
    let text = format!(r#"{SECRET_A} "sk-slash\/SECRETcc" pa/ss pa%2Fss"#);
    let masked = String::from_utf8(pool.mask_secrets(text.as_bytes()).unwrap()).unwrap();
    assert_eq!(
        masked,
        r#"[REDACTED:acct-a] "[REDACTED:key-1]" [REDACTED] [REDACTED]"#
    );
    assert_clean("masked text", &masked);
    assert_eq!(pool.mask_secrets(b"nothing to hide"), None);
}
