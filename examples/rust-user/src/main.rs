//! A downstream program: a pool over three keys, one question with parameters, a batch,
//! a stream with a window, a typed answer, and totals — the way a Rust user writes it,
//! with no `serde_json` dependency. Runs offline against the bundled mock server.
//!
//! Run: `cargo run -p keypool-rust-user`

use std::time::Duration;

use keypool::{ChatRequest, Config, KeyConfig, Pool, Request, RetryConfig, Strategy, Window};
use keypool_mock::{MockConfig, MockServer};

/// The parts of a chat completion this program reads, typed.
#[derive(serde::Deserialize)]
struct Completion {
    model: String,
    choices: Vec<Choice>,
}

#[derive(serde::Deserialize)]
struct Choice {
    message: Message,
}

#[derive(serde::Deserialize)]
struct Message {
    content: String,
}

fn run() -> Result<String, keypool::Error> {
    let server = MockServer::start(MockConfig {
        latency_ms: 5,
        ..MockConfig::default()
    })
    .expect("mock server");

    let config = Config::builder()
        .base_url(server.url())
        .strategy(Strategy::LeastLoaded)
        .key_config(
            KeyConfig::new("sk-demo-a")
                .label("team-a")
                .max_concurrent(4),
        )
        .key_config(
            KeyConfig::new("sk-demo-b")
                .label("team-b")
                .max_concurrent(4),
        )
        .key_config(
            KeyConfig::new("sk-demo-c")
                .label("personal")
                .max_concurrent(2),
        )
        .timeout(Duration::from_secs(30))
        .deadline(Duration::from_secs(60))
        .retry(
            RetryConfig::default()
                .max_attempts(4)
                .base_delay(Duration::from_millis(50)),
        )
        .build()?;
    let pool = Pool::new(config)?;
    let mut report = String::new();

    // One question with parameters, read typed.
    let topic = "tides";
    let ticket = pool.submit(
        ChatRequest::new("mock-model")
            .system("Answer in one sentence.")
            .user(format!("Explain {topic}."))
            .temperature(0.2)
            .max_tokens(64)
            .stop(["\n\n"])
            .param("seed", 7)
            .build(),
    )?;
    let response = ticket.wait()?;
    let typed: Completion = response.json()?;
    report += &format!(
        "one: {} answered via {} ({:?}): {}\n",
        typed.model,
        response.key_label(),
        response.finish_reason(),
        typed.choices[0].message.content
    );

    // A batch, in input order.
    let results =
        pool.batch((0..30).map(|i| Request::chat("mock-model", [("user", format!("q{i}"))])));
    let ok = results.iter().filter(|r| r.is_ok()).count();
    report += &format!("batch: {ok}/{} ok\n", results.len());

    // A stream of 200 with at most 16 outstanding.
    let prompts = (0..200).map(|i| Request::chat("mock-model", [("user", format!("s{i}"))]));
    let mut streamed = 0;
    for (_index, result) in pool.stream(prompts, Window::Max(16)) {
        if result.is_ok() {
            streamed += 1;
        }
    }
    report += &format!("stream: {streamed}/200 ok\n");

    let totals = pool.stats().totals();
    report += &format!(
        "totals: {} attempts, {} ok, {} tokens\n",
        totals.sent,
        totals.succeeded,
        totals.prompt_tokens + totals.completion_tokens
    );
    pool.close();
    Ok(report)
}

fn main() {
    match run() {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_program_runs() {
        let report = super::run().expect("runs");
        assert!(report.contains("batch: 30/30 ok"), "{report}");
        assert!(report.contains("stream: 200/200 ok"), "{report}");
        assert!(report.contains("totals: 231 attempts, 231 ok"), "{report}");
    }
}
