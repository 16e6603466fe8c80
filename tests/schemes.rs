//! The transport-level behaviours, each run twice against the mock: over `http://` and
//! over `https://` (the mock's generated CA trusted through `tls.ca_file`). One HTTP
//! path serves both, so both must hold the same guarantees: the per-key cap at the
//! server, absolute deadlines, retries and failover, streaming as sent, keep-alive
//! reuse, hostile bodies.

use std::time::{Duration, Instant};

use keypool::{Config, ConfigBuilder, Error, KeyConfig, Pool, Request, StreamEvent, StreamFailure};
use keypool_mock::{KeyRule, MockConfig};

mod support;
use serde_json::{Value, json};
use support::{Mock, mock};

fn builder(m: &Mock, keys: usize, per_key: usize) -> ConfigBuilder {
    let mut b = Config::builder()
        .base_url(m.server.url())
        .tls(m.tls.clone())
        .queue_capacity(4096)
        .retry(
            keypool::RetryConfig::default()
                .base_delay(Duration::from_millis(1))
                .max_delay(Duration::from_millis(5)),
        );
    for i in 0..keys {
        b = b.key_config(
            KeyConfig::new(format!("sk-{i}"))
                .label(format!("k{i}"))
                .max_concurrent(per_key),
        );
    }
    b
}

fn build(b: ConfigBuilder) -> Pool {
    Pool::new(b.build().unwrap()).unwrap()
}

fn req(prompt: &str, mock: Value) -> Request {
    Request::new(&json!({
        "model": "m", "messages": [{"role": "user", "content": prompt}], "mock": mock,
    }))
}

const SCHEMES: [bool; 2] = [false, true];

fn scheme(https: bool) -> &'static str {
    if https { "https" } else { "http" }
}

#[test]
fn per_key_cap_holds_at_the_server_and_connections_are_reused() {
    for https in SCHEMES {
        let m = mock(
            MockConfig {
                latency_ms: 20,
                jitter_ms: 10,
                ..MockConfig::default()
            },
            https,
        );
        let (keys, per_key) = (4, 6);
        let pool = build(builder(&m, keys, per_key));
        let n = 20 * keys * per_key;
        let results = pool.batch((0..n).map(|i| req(&format!("p{i}"), json!({}))));
        assert!(results.iter().all(Result::is_ok), "{}", scheme(https));
        let st = m.server.stats();
        assert_eq!(st.total_requests, n as u64);
        for i in 0..keys {
            let rec = &st.keys[&format!("sk-{i}")];
            assert_eq!(rec.max_in_flight, per_key, "{} key {i}", scheme(https));
            // Keep-alive: a long run opens at most one connection per worker (and one
            // more the key proof may close: `key_proof.rs`).
            assert!(
                rec.connections() <= per_key + 1,
                "{} key {i}: {} connections for {} requests",
                scheme(https),
                rec.connections(),
                rec.requests
            );
        }
        assert_eq!(st.tls_failures, 0);
        pool.close();
    }
}

#[test]
fn a_slow_answer_is_cut_at_the_deadline() {
    for https in SCHEMES {
        let m = mock(MockConfig::default(), https);
        let pool = build(builder(&m, 1, 1).deadline_ms(500));
        let t = Instant::now();
        let e = pool
            .submit(req("x", json!({"delay_ms": 3000})))
            .unwrap()
            .wait()
            .unwrap_err();
        let took = t.elapsed();
        assert!(matches!(e, Error::Timeout { .. }), "{}: {e}", scheme(https));
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(700),
            "{}: {took:?}",
            scheme(https)
        );
        pool.close();
    }
}

#[test]
fn a_500_fails_over_to_another_key_and_a_dropped_connection_is_retried() {
    for https in SCHEMES {
        let m = mock(MockConfig::default(), https);
        m.server.set_key_rule(
            "sk-0",
            KeyRule {
                always_status: Some(500),
                fail_first: 1,
                ..KeyRule::default()
            },
        );
        let pool = build(builder(&m, 2, 2));
        let r = pool.submit(req("x", json!({}))).unwrap().wait().unwrap();
        assert_eq!(
            (r.attempts(), r.key_label()),
            (2, "k1"),
            "{}",
            scheme(https)
        );
        let r = pool
            .submit(req("y", json!({"drop": true})))
            .unwrap()
            .wait()
            .unwrap_err();
        // Every attempt dropped: a transport error after all attempts, each a new
        // connection the server saw.
        assert!(
            matches!(r, Error::Transport { .. }),
            "{}: {r}",
            scheme(https)
        );
        assert_eq!(r.attempts(), 3, "{}: {r}", scheme(https));
        pool.close();
    }
}

#[test]
fn stream_chunks_arrive_as_sent_and_the_deadline_ends_a_stream() {
    for https in SCHEMES {
        let m = mock(MockConfig::default(), https);
        let pool = build(builder(&m, 1, 1));
        // Five content chunks 150 ms apart: each must be handed over when it is sent,
        // not when the stream ends.
        let stream = pool
            .submit_stream(req(
                "one two three four five six",
                json!({"stream_chunks": 5, "chunk_delay_ms": 150}),
            ))
            .unwrap();
        let t = Instant::now();
        let mut arrivals = Vec::new();
        let mut result = None;
        for ev in stream {
            match ev {
                StreamEvent::Chunk(c) if !c.delta().is_empty() => arrivals.push(t.elapsed()),
                StreamEvent::Chunk(_) => {}
                StreamEvent::Done(r) => result = Some(r),
            }
        }
        assert!(result.unwrap().is_ok(), "{}", scheme(https));
        assert_eq!(arrivals.len(), 5, "{}", scheme(https));
        let spread = arrivals[4] - arrivals[0];
        assert!(
            spread >= Duration::from_millis(450),
            "{}: chunks arrived together ({arrivals:?})",
            scheme(https)
        );
        pool.close();

        let pool = build(builder(&m, 1, 1).stream_idle_timeout_ms(0).deadline_ms(600));
        let t = Instant::now();
        let stream = pool
            .submit_stream(req(
                "a long prompt that becomes many chunks",
                json!({"chunk_delay_ms": 100, "stream_chunks": 40}),
            ))
            .unwrap();
        let mut result = None;
        for ev in stream {
            if let StreamEvent::Done(r) = ev {
                result = Some(r);
            }
        }
        let took = t.elapsed();
        match result.unwrap() {
            Err(Error::Stream { kind, .. }) => {
                assert_eq!(kind, StreamFailure::Timeout, "{}", scheme(https))
            }
            other => panic!(
                "{}: expected a stream timeout, got {other:?}",
                scheme(https)
            ),
        }
        assert!(
            took >= Duration::from_millis(550) && took < Duration::from_millis(750),
            "{}: the stream ended after {took:?} for a 600 ms deadline",
            scheme(https)
        );
        pool.close();
    }
}

#[test]
fn hostile_bodies_are_errors_not_successes() {
    for https in SCHEMES {
        let m = mock(MockConfig::default(), https);
        let pool = build(
            builder(&m, 1, 1)
                .max_attempts(1)
                .max_response_bytes(64 * 1024),
        );
        let e = pool
            .submit(req("x", json!({"malformed": true})))
            .unwrap()
            .wait()
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidResponse { .. }),
            "{}: {e}",
            scheme(https)
        );
        let e = pool
            .submit(req("x", json!({"error_in_200": true})))
            .unwrap()
            .wait()
            .unwrap_err();
        // The error inside the 200 is an error, with the code it carries.
        assert!(e.to_string().contains("HTTP 502"), "{}: {e}", scheme(https));
        // A body over max_response_bytes is refused, not buffered.
        let e = pool
            .submit(req(&"x".repeat(100 * 1024), json!({})))
            .unwrap()
            .wait()
            .unwrap_err();
        assert!(
            e.to_string().contains("max_response_bytes"),
            "{}: {e}",
            scheme(https)
        );
        // A huge SSE line is refused too.
        let mut d = None;
        for ev in pool
            .submit_stream(req("x", json!({"stream_fault": "huge_line"})))
            .unwrap()
        {
            if let StreamEvent::Done(r) = ev {
                d = Some(r);
            }
        }
        assert!(d.unwrap().is_err(), "{}", scheme(https));
        pool.close();
    }
}

#[test]
fn timeout_ms_bounds_a_trickled_attempt_as_a_whole() {
    for https in SCHEMES {
        let m = mock(MockConfig::default(), https);
        let pool = build(builder(&m, 1, 1).timeout_ms(800).max_attempts(1));
        // Headers at once, then four body chunks 500 ms apart: each read is within
        // 800 ms, the attempt as a whole is not.
        let t = Instant::now();
        let e = pool
            .submit(req(
                &"x".repeat(400),
                json!({"slow_body": true, "chunk_delay_ms": 500}),
            ))
            .unwrap()
            .wait()
            .unwrap_err();
        let took = t.elapsed();
        match &e {
            Error::Timeout { phase, .. } => {
                assert_eq!(*phase, keypool::TimeoutPhase::Attempt, "{}", scheme(https))
            }
            other => panic!("{}: expected a timeout, got {other}", scheme(https)),
        }
        assert!(
            took >= Duration::from_millis(750) && took < Duration::from_millis(900),
            "{}: the attempt ended after {took:?} for timeout_ms 800",
            scheme(https)
        );
        pool.close();
    }
}

/// A response head larger than the client accepts (20 KiB of one header; the limit is
/// 12 KiB) is a transport error that says so, over either scheme, and the connection is
/// not reused for the next request, which succeeds.
#[test]
fn a_response_head_too_big_is_said_as_such() {
    for https in SCHEMES {
        let m = mock(MockConfig::default(), https);
        m.server.set_key_rule(
            "sk-0",
            KeyRule {
                always_status: Some(200),
                headers: vec![("x-large".to_owned(), "z".repeat(20 * 1024))],
                fail_first: 1,
                ..KeyRule::default()
            },
        );
        let pool = build(
            builder(&m, 1, 1).retry(
                keypool::RetryConfig::default()
                    .prove_keys(false)
                    .max_attempts(1),
            ),
        );
        let e = pool
            .submit(req("big", json!({})))
            .unwrap()
            .wait()
            .unwrap_err();
        assert!(
            matches!(e, Error::Transport { .. }) && e.to_string().contains("header is too big"),
            "{}: {e}",
            scheme(https)
        );
        let r = pool.submit(req("next", json!({}))).unwrap().wait();
        assert!(r.is_ok(), "{}: {r:?}", scheme(https));
    }
}

/// Documented answers and hostile values through the one HTTP path, over both schemes,
/// with every key's first request a trial (probing) and an `rpm` budget on: OpenRouter's
/// moderation 403, OpenAI's `model_not_found` 404, OpenRouter's upstream 429 with
/// provider metadata and an absurd `Retry-After`, a 400 whose body echoes the keys, a
/// truncated 200, a server that stalls past the deadline. Every request gets exactly
/// one result within its deadline, no key is taken out, and no key appears anywhere.
#[test]
fn documented_and_hostile_answers_on_both_schemes_with_rate_limits_on() {
    const OR_MODERATION: &str = r#"{"error":{"code":403,"message":"openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for \"harassment\"","metadata":{"reasons":["harassment"],"flagged_input":"you are a ...","provider_name":"OpenAI","model_slug":"openai/gpt-4o"}}}"#;
    const OPENAI_404: &str = r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;
    const OR_UPSTREAM_429: &str = r#"{"error":{"code":429,"message":"Provider returned error","metadata":{"provider_name":"Acme","raw":"acme/x is temporarily rate-limited upstream. Please retry shortly."}}}"#;
    let secret = |i: usize| format!("sk-or-v1-SECRET{i}xxxxxxxxxxxxxxxxxxxxxxxx");
    let echoed = format!(
        r#"{{"error":{{"message":"bad request from {} / {} / {}","code":400}}}}"#,
        secret(0),
        secret(1),
        secret(2)
    );
    let line = |i: usize, model: &str, mock: Value| {
        Request::new(&json!({
            "model": model,
            "messages": [{"role": "user", "content": format!("line {i}")}],
            "mock": mock,
        }))
    };
    for https in SCHEMES {
        let m = mock(MockConfig::default(), https);
        let mut b = Config::builder()
            .base_url(m.server.url())
            .tls(m.tls.clone())
            .deadline_ms(2_000)
            .retry(
                keypool::RetryConfig::default()
                    .base_delay(Duration::from_millis(1))
                    .max_delay(Duration::from_millis(5)),
            );
        for i in 0..3 {
            b = b.key_config(KeyConfig::new(secret(i)).max_concurrent(2).rpm(600));
        }
        let pool = build(b);
        let special = |i: usize| match i {
            3 => Some(line(i, "m", json!({"status": 403, "body": OR_MODERATION}))),
            5 => Some(line(i, "gpt-9", json!({"status": 404, "body": OPENAI_404}))),
            7 => Some(line(
                i,
                "acme/x",
                json!({"status": 429, "body": OR_UPSTREAM_429,
                       "retry_after": "99999999999999999999999"}),
            )),
            9 => Some(line(i, "m", json!({"status": 400, "body": echoed}))),
            11 => Some(line(
                i,
                "m",
                json!({"status": 200, "body": r#"{"id":"x","choices":[{"index":0,"#}),
            )),
            13 => Some(line(i, "m", json!({"delay_ms": 20_000}))),
            _ => None,
        };
        let t0 = Instant::now();
        let results =
            pool.batch((0..20).map(|i| special(i).unwrap_or_else(|| line(i, "m", json!({})))));
        let took = t0.elapsed();
        let s = scheme(https);
        // The stalled line ends at its deadline (2 s), everything else long before.
        assert!(took < Duration::from_millis(3_000), "{s}: {took:?}");
        assert_eq!(results.len(), 20, "{s}");
        for (i, r) in results.iter().enumerate() {
            let shown = format!("{r:?}");
            assert!(!shown.contains("SECRET"), "{s}: line {i}: {shown}");
            match (i, r) {
                (3, Err(e)) => {
                    assert!(matches!(e, Error::Flagged { .. }), "{s}: {e:?}");
                    assert_eq!(e.attempts(), 1, "{s}");
                }
                (5, Err(e)) => assert_eq!(e.http_status(), Some(404), "{s}: {e}"),
                (7 | 13, Err(_)) => {}
                (9, Err(e)) => {
                    assert_eq!(e.http_status(), Some(400), "{s}: {e}");
                    assert!(!e.to_string().contains("SECRET"), "{s}: {e}");
                }
                (11, Err(e)) => {
                    assert!(matches!(e, Error::InvalidResponse { .. }), "{s}: {e:?}")
                }
                (3 | 5 | 7 | 9 | 11 | 13, Ok(_)) => panic!("{s}: line {i} succeeded"),
                (_, r) => assert!(r.is_ok(), "{s}: line {i}: {r:?}"),
            }
        }
        let stats = pool.stats();
        let text = format!("{stats:?} {}", stats.to_prometheus());
        assert!(!text.contains("SECRET"), "{s}: {text}");
        for k in &stats.keys {
            assert_eq!(
                k.disabled_reason, None,
                "{s}: key {} was taken out",
                k.label
            );
        }
        // Every key still serves.
        for r in pool.batch((0..6).map(|i| line(100 + i, "m", json!({})))) {
            assert!(r.is_ok(), "{s}: {r:?}");
        }
        pool.close();
    }
}
