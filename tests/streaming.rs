//! Streamed responses (`Pool::submit_stream`) against the mock's server-sent events:
//! assembly, every SSE case, retries before (never after) data reached the caller,
//! the per-key limit at the server, idle timeouts and deadlines, hostile sizes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keypool::{
    Config, ConfigBuilder, Error, HttpRequest, HttpResponse, KeyConfig, Pool, Request,
    ResponseStream, StreamEvent, StreamFailure, TimeoutPhase, Transport, TransportError,
};
use keypool_mock::{KeyRule, MockConfig, MockServer};
use serde_json::{Value, json};

fn server() -> MockServer {
    MockServer::start(MockConfig::default()).unwrap()
}

fn builder(server: &MockServer, keys: usize, per_key: usize) -> ConfigBuilder {
    let mut b = Config::builder()
        .base_url(server.url())
        .queue_capacity(4096)
        .retry(
            keypool::RetryConfig::default()
                .base_delay(Duration::from_millis(1))
                .max_delay(Duration::from_millis(5)),
        );
    for i in 0..keys {
        b = b.key_config(
            KeyConfig::new(format!("sk-s-{i}"))
                .label(format!("acct-{i}"))
                .max_concurrent(per_key),
        );
    }
    b
}

fn pool(server: &MockServer, keys: usize, per_key: usize) -> Pool {
    build(builder(server, keys, per_key))
}

/// A pool built from `b`.
fn build(b: ConfigBuilder) -> Pool {
    Pool::new(b.build().unwrap()).unwrap()
}

fn req(prompt: &str, mock: Value) -> Request {
    Request::new(&json!({
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "mock": mock,
    }))
}

/// Every event of a stream: the chunks' deltas, the chunks, and the outcome.
struct Drained {
    deltas: Vec<String>,
    chunks: Vec<keypool::StreamChunk>,
    result: keypool::RequestResult,
    done_events: usize,
}

fn drain(stream: ResponseStream) -> Drained {
    let mut d = Drained {
        deltas: Vec::new(),
        chunks: Vec::new(),
        result: Err(Error::Cancelled),
        done_events: 0,
    };
    for ev in stream {
        match ev {
            StreamEvent::Chunk(c) => {
                d.deltas.push(c.delta().to_owned());
                d.chunks.push(c);
            }
            StreamEvent::Done(r) => {
                d.done_events += 1;
                d.result = r;
            }
        }
    }
    d
}

/// Streams `req(prompt, mock)` on `pool` and drains every event.
fn stream(pool: &Pool, prompt: &str, mock: Value) -> Drained {
    drain(pool.submit_stream(req(prompt, mock)).unwrap())
}

/// The kind and `chunks_delivered` of an `Error::Stream` result; `None` for any other.
fn stream_failure(result: &keypool::RequestResult) -> Option<(StreamFailure, u64)> {
    match result {
        Err(Error::Stream {
            kind,
            chunks_delivered,
            ..
        }) => Some((*kind, *chunks_delivered)),
        _ => None,
    }
}

#[test]
fn chunks_arrive_then_the_assembled_completion_with_usage_and_ttft() {
    let server = server();
    let pool = pool(&server, 1, 2);
    let prompt = "tell me a fairly long story please";
    let d = stream(&pool, prompt, json!({"stream_chunks": 5}));
    assert_eq!(d.done_events, 1);
    let resp = d.result.as_ref().unwrap();
    // role chunk + 5 content chunks + finish chunk + usage chunk
    assert_eq!(d.chunks.len(), 8, "{:?}", d.deltas);
    assert_eq!(d.deltas.iter().filter(|s| !s.is_empty()).count(), 5);
    assert_eq!(d.deltas.concat(), format!("echo: {prompt}"));
    assert_eq!(resp.content().unwrap(), d.deltas.concat());
    let v: keypool::Value = resp.json().unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    // Usage was asked for (stream_options.include_usage) and recorded.
    let usage = resp.usage().expect("usage in the assembled body");
    assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0);
    let ks = &pool.stats().keys[0];
    assert_eq!(ks.prompt_tokens, usage.prompt_tokens);
    assert_eq!(ks.completion_tokens, usage.completion_tokens);
    assert_eq!(ks.succeeded, 1);
    assert!(resp.time_to_first_token().is_some());
    assert!(ks.ttft_p50_ms > 0.0 && ks.ttft_p99_ms >= ks.ttft_p50_ms);
    assert_eq!(d.chunks[0].seq(), 0);
    assert_eq!(d.chunks[6].finish_reason(), Some("stop"));
    assert_eq!(pool.stats().completed, 1);
}

#[test]
fn time_to_first_token_measures_the_wait_for_text() {
    let server = server();
    let pool = pool(&server, 1, 1);
    let d = stream(&pool, "hi", json!({"first_chunk_delay_ms": 150}));
    let ttft = d.result.unwrap().time_to_first_token().unwrap();
    assert!(ttft >= Duration::from_millis(150), "{ttft:?}");
    assert!(pool.stats().keys[0].ttft_p50_ms >= 140.0);
}

#[test]
fn the_callers_include_usage_is_kept() {
    let server = server();
    let pool = pool(&server, 1, 1);
    let r = Request::new(&json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "stream_options": {"include_usage": false}
    }));
    let d = drain(pool.submit_stream(r).unwrap());
    let resp = d.result.unwrap();
    assert!(resp.usage().is_none());
    assert_eq!(pool.stats().keys[0].completion_tokens, 0);
}

#[test]
fn comments_crlf_multiline_data_and_event_fields() {
    let server = server();
    let pool = pool(&server, 1, 1);
    let d = stream(
        &pool,
        "abcdefgh",
        json!({"comments": 3, "crlf": true, "multiline_data": true, "event_fields": true}),
    );
    let resp = d.result.unwrap();
    assert_eq!(resp.content().unwrap(), "echo: abcdefgh");
    assert_eq!(d.deltas.concat(), "echo: abcdefgh");
    assert!(d.chunks.iter().all(|c| c.event() == Some("chunk")));
    let ids: Vec<&str> = d.chunks.iter().map(|c| c.id().unwrap()).collect();
    assert_eq!(ids[0], "0");
    assert_eq!(ids[1], "1");
}

#[test]
fn streams_count_against_max_concurrent_at_the_server() {
    let server = server();
    let (keys, per_key) = (2, 3);
    let pool = pool(&server, keys, per_key);
    let streams: Vec<ResponseStream> = (0..24)
        .map(|i| {
            pool.submit_stream(req(
                &format!("prompt {i} with some words"),
                json!({"chunk_delay_ms": 15, "stream_chunks": 4}),
            ))
            .unwrap()
        })
        .collect();
    for s in streams {
        assert!(drain(s).result.is_ok());
    }
    for i in 0..keys {
        let rec = server.key_stats(&format!("sk-s-{i}")).unwrap();
        assert_eq!(
            rec.max_in_flight, per_key,
            "server-side max in flight, key {i}"
        );
        assert_eq!(rec.in_flight, 0);
    }
    assert_eq!(server.stats().total_requests, 24);
    assert!(pool.stats().keys.iter().all(|k| k.max_in_flight == per_key));
}

#[test]
fn a_stream_cut_before_any_event_is_retried_on_another_key() {
    let server = server();
    let pool = pool(&server, 2, 1);
    let d = stream(
        &pool,
        "retry me",
        json!({"comments": 2, "stream_fault": "truncate", "fault_keys": ["sk-s-0"]}),
    );
    let resp = d.result.unwrap();
    assert_eq!(resp.attempts(), 2);
    assert_eq!(resp.keys_tried(), &[0, 1]);
    // No text was duplicated: the caller saw exactly one copy.
    assert_eq!(d.deltas.concat(), "echo: retry me");
    assert_eq!(resp.content().unwrap(), "echo: retry me");
    let ks = pool.stats();
    assert_eq!(ks.keys[0].failed, 1);
    assert_eq!(ks.keys[0].retries, 1);
}

#[test]
fn a_stream_cut_after_data_is_not_retried_and_says_how_much_was_delivered() {
    let server = server();
    let pool = pool(&server, 2, 1);
    let d = stream(
        &pool,
        "abcdefghijklmnop",
        json!({"stream_fault": "truncate", "fault_after": 2, "fault_keys": ["sk-s-0"]}),
    );
    match &d.result {
        Err(Error::Stream {
            kind,
            chunks_delivered,
            text_bytes_delivered,
            attempts,
            key,
            ..
        }) => {
            assert_eq!(*kind, StreamFailure::Incomplete);
            assert_eq!(*chunks_delivered, d.chunks.len() as u64);
            assert_eq!(*chunks_delivered, 3); // role + 2 content chunks
            assert_eq!(*text_bytes_delivered, d.deltas.concat().len() as u64);
            assert!(*text_bytes_delivered > 0);
            assert_eq!(*attempts, 1);
            assert_eq!(key, "acct-0");
        }
        other => panic!("{other:?}"),
    }
    let e = d.result.unwrap_err();
    assert_eq!(e.code(), "stream");
    assert!(e.to_string().contains("delivered"), "{e}");
    assert_eq!(server.stats().total_requests, 1, "never retried");
}

#[test]
fn an_error_event_mid_stream_ends_it_with_the_servers_code() {
    let server = server();
    let pool = pool(&server, 2, 1);
    let d = stream(
        &pool,
        "abcdefghijklmnop",
        json!({"stream_fault": "error_event", "fault_after": 1}),
    );
    match d.result {
        Err(Error::Stream {
            kind: StreamFailure::ErrorEvent,
            status: Some(502),
            ref message,
            chunks_delivered: 2,
            ..
        }) => assert!(message.contains("Provider disconnected"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.stats().total_requests, 1);
}

#[test]
fn an_error_event_before_data_is_judged_by_its_code_and_retried() {
    let server = server();
    let pool = pool(&server, 2, 1);
    let d = stream(
        &pool,
        "hello",
        json!({"stream_fault": "error_event", "error_code": 429, "fault_keys": ["sk-s-0"]}),
    );
    let resp = d.result.unwrap();
    assert_eq!(resp.keys_tried(), &[0, 1]);
    assert_eq!(d.deltas.concat(), "echo: hello");
    let s = pool.stats();
    assert_eq!(s.keys[0].failures.rate_limited, 1);
}

#[test]
fn a_malformed_event_is_an_error() {
    let server = server();
    let pool = build(builder(&server, 1, 1).max_attempts(2));
    // After data: final at once.
    let d = stream(
        &pool,
        "abcdefgh",
        json!({"stream_fault": "malformed", "fault_after": 1}),
    );
    assert_eq!(
        stream_failure(&d.result),
        Some((StreamFailure::Malformed, 2)),
        "{:?}",
        d.result
    );
    // Before data: retried up to max_attempts, then the last attempt's error.
    let d = stream(&pool, "x", json!({"stream_fault": "malformed"}));
    assert!(d.chunks.is_empty());
    match d.result {
        Err(Error::Stream {
            kind: StreamFailure::Malformed,
            chunks_delivered: 0,
            attempts: 2,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(server.stats().total_requests, 3);
}

#[test]
fn an_idle_stream_times_out_between_chunks() {
    let server = server();
    let pool = build(
        builder(&server, 1, 1)
            .stream_idle_timeout_ms(200)
            .max_attempts(1),
    );
    let t = Instant::now();
    let d = stream(
        &pool,
        "abcdefgh",
        json!({"stream_fault": "stall", "fault_after": 1}),
    );
    assert_eq!(
        stream_failure(&d.result),
        Some((StreamFailure::Idle, 2)),
        "{:?}",
        d.result
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Stalled before any event: a timeout in phase `stream_idle`.
    let d = stream(&pool, "x", json!({"stream_fault": "stall"}));
    match d.result {
        Err(Error::Timeout {
            phase: TimeoutPhase::StreamIdle,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(pool.stats().keys[0].failures.timeout, 2);
}

#[test]
fn a_stall_before_data_is_retried_on_another_key() {
    let server = server();
    let pool = build(builder(&server, 2, 1).stream_idle_timeout_ms(150));
    let d = stream(
        &pool,
        "again",
        json!({"stream_fault": "stall", "fault_keys": ["sk-s-0"]}),
    );
    let r = d.result.unwrap();
    assert_eq!(r.keys_tried(), &[0, 1]);
    assert_eq!(d.deltas.concat(), "echo: again");
}

#[test]
fn the_deadline_bounds_a_whole_stream() {
    let server = server();
    let pool = build(
        builder(&server, 1, 1)
            .stream_idle_timeout_ms(0)
            .deadline_ms(400),
    );
    let t = Instant::now();
    let d = stream(
        &pool,
        "a long prompt that becomes many chunks",
        json!({"chunk_delay_ms": 100, "stream_chunks": 40}),
    );
    assert!(
        matches!(stream_failure(&d.result), Some((StreamFailure::Timeout, _))),
        "{:?}",
        d.result
    );
    assert!(!d.chunks.is_empty());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
fn a_huge_line_is_refused_without_buffering_it() {
    let server = server();
    let pool = build(
        builder(&server, 1, 1)
            .max_response_bytes(64 * 1024)
            .max_attempts(1),
    );
    let d = stream(
        &pool,
        "abcdefgh",
        json!({"stream_fault": "huge_line", "huge_line_bytes": 8 << 20, "fault_after": 1}),
    );
    match d.result {
        Err(Error::Stream {
            kind: StreamFailure::TooLarge,
            ref message,
            ..
        }) => assert!(message.contains("max_response_bytes"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_connection_reset_mid_stream_is_an_error_not_a_success() {
    let server = server();
    let pool = pool(&server, 1, 1);
    let d = stream(
        &pool,
        "abcdefgh",
        json!({"stream_fault": "abort", "fault_after": 2}),
    );
    assert!(
        matches!(
            stream_failure(&d.result),
            Some((StreamFailure::Interrupted | StreamFailure::Incomplete, 3))
        ),
        "{:?}",
        d.result
    );
    assert_eq!(pool.stats().keys[0].succeeded, 0);
}

#[test]
fn an_error_status_before_the_stream_is_retried_like_any_request() {
    let server = server();
    server.set_key_rule(
        "sk-s-0",
        KeyRule {
            always_status: Some(503),
            ..KeyRule::default()
        },
    );
    let pool = pool(&server, 2, 1);
    let d = stream(&pool, "x", json!({}));
    let r = d.result.unwrap();
    assert_eq!(r.keys_tried(), &[0, 1]);
    assert_eq!(pool.stats().keys[0].failures.server_error, 1);
}

#[test]
fn dropping_the_stream_frees_the_worker() {
    let server = server();
    let pool = pool(&server, 1, 1);
    let mut s = pool
        .submit_stream(req(
            "a prompt long enough for many chunks of text",
            json!({"chunk_delay_ms": 20, "stream_chunks": 40}),
        ))
        .unwrap();
    assert!(matches!(s.next(), Some(StreamEvent::Chunk(_))));
    drop(s);
    // The only worker must come back for this request well before the stream's ~800 ms.
    let t = Instant::now();
    let r = pool
        .submit(Request::chat("m", [("user", "next")]))
        .unwrap()
        .wait();
    assert!(r.is_ok(), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(pool.stats().completed, 2);
}

#[test]
fn next_timeout_waits_and_the_stream_stays_valid() {
    let server = server();
    let pool = pool(&server, 1, 1);
    let mut s = pool
        .submit_stream(req("x", json!({"delay_ms": 300})))
        .unwrap();
    match s.next_timeout(Some(Duration::from_millis(20))) {
        Err(Error::Timeout {
            phase: TimeoutPhase::Wait,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let r = s.wait().unwrap();
    assert_eq!(r.content().unwrap(), "echo: x");
}

#[test]
fn callbacks_run_on_the_worker_once_per_chunk_then_once_done() {
    let server = server();
    let pool = pool(&server, 1, 1);
    let (tx, rx) = crossbeam_channel::unbounded();
    let seen = Arc::new(AtomicU64::new(0));
    let seen2 = seen.clone();
    let text = Arc::new(parking_lot::Mutex::new(String::new()));
    let text2 = text.clone();
    pool.submit_stream_with(
        req("callbacks", json!({})),
        move |c| {
            assert!(
                std::thread::current()
                    .name()
                    .unwrap()
                    .starts_with("keypool-acct-0")
            );
            seen2.fetch_add(1, Ordering::SeqCst);
            text2.lock().push_str(c.delta());
            true
        },
        move |r| tx.send(r).unwrap(),
    )
    .unwrap();
    let r = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(r.content().unwrap(), *text.lock());
    assert!(seen.load(Ordering::SeqCst) >= 3);
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "exactly one outcome"
    );
    // A callback that stops the stream ends it as abandoned.
    let (tx, rx) = crossbeam_channel::unbounded();
    pool.submit_stream_with(
        req("stop", json!({})),
        |_| false,
        move |r| tx.send(r).unwrap(),
    )
    .unwrap();
    match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
        Err(Error::Stream {
            kind: StreamFailure::Abandoned,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn legacy_completions_stream_into_a_text_completion() {
    let server = server();
    let pool = pool(&server, 1, 1);
    let r = Request::new(&json!({"model": "m", "prompt": "legacy prompt"}))
        .with_path("/completions")
        .unwrap();
    let d = drain(pool.submit_stream(r).unwrap());
    let v: keypool::Value = d.result.unwrap().json().unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "echo: legacy prompt");
    assert_eq!(d.deltas.concat(), "echo: legacy prompt");
}

struct NoStreaming;

impl Transport for NoStreaming {
    fn send(&self, _: &HttpRequest<'_>) -> Result<HttpResponse, TransportError> {
        Ok(HttpResponse {
            status: 200,
            headers: Vec::new(),
            body: br#"{"choices":[]}"#.to_vec(),
        })
    }
}

#[test]
fn a_custom_transport_without_streaming_fails_cleanly() {
    let config = Config::builder()
        .key("sk-x", 1)
        .max_attempts(1)
        .build()
        .unwrap();
    let pool =
        Pool::with_transport(config, |_| Arc::new(NoStreaming) as Arc<dyn Transport>).unwrap();
    let d = drain(
        pool.submit_stream(Request::chat("m", [("user", "x")]))
            .unwrap(),
    );
    match d.result {
        Err(Error::Transport { ref message, .. }) => {
            assert!(message.contains("send_stream"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        pool.submit_stream(Request::new(&json!("not an object"))),
        Err(Error::InvalidRequest(_))
    ));
}
