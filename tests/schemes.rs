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
        .retry(support::fast_retry());
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
    for https in SCHEMES {
        let m = mock(MockConfig::default(), https);
        support::documented_and_hostile_answers(
            Config::builder()
                .base_url(m.server.url())
                .tls(m.tls.clone()),
            scheme(https),
        );
    }
}
