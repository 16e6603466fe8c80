use std::time::Duration;

use keypool::{ChatRequest, Config, Pool, Request, Strategy, Window};

fn main() -> Result<(), keypool::Error> {
    // OpenRouter, or the base URL given as the first argument (a local vLLM, the mock).
    let base_url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "https://openrouter.ai/api/v1".to_owned());
    let config = Config::builder()
        .base_url(base_url)
        .strategy(Strategy::FirstAvailable)
        .key("sk-or-key-a", 8) // key, max_concurrent
        .key("sk-or-key-b", 8)
        .header("X-Title", "my tool")
        .deadline(Duration::from_secs(120)) // a request's whole life, queueing and retries included
        .build()?;
    let pool = Pool::new(config)?;

    // One request: a ticket.
    let question = ChatRequest::new("openai/gpt-4o-mini")
        .system("Answer briefly.")
        .user("Say hi")
        .temperature(0.2)
        .max_tokens(50);
    let response = pool.submit(question.build())?.wait()?;
    println!(
        "{} via {}: {:?} ({:?})",
        response.status(),
        response.key_label(),
        response.content(),
        response.finish_reason()
    );

    // A batch: one result per request, in input order; a failure never hides the others.
    let prompts =
        (0..100).map(|i| Request::chat("openai/gpt-4o-mini", [("user", format!("#{i}"))]));
    let results = pool.batch(prompts);
    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!("batch: {ok}/{} ok", results.len());

    // A stream for batches too big for memory: (input index, result) as they complete,
    // with at most a window of requests outstanding.
    let prompts = (0..1000).map(|i| Request::chat("openai/gpt-4o-mini", [("user", i.to_string())]));
    for (index, result) in pool.stream(prompts, Window::Auto) {
        if let Err(e) = result {
            eprintln!("request {index}: {e}");
        }
    }

    let totals = pool.stats().totals(); // summed over keys; per key: pool.stats().keys
    println!(
        "{} ok, {} retries, {} tokens",
        totals.succeeded,
        totals.retries,
        totals.prompt_tokens + totals.completion_tokens
    );
    pool.close(); // in-flight finish, queued get Cancelled, threads joined
    Ok(())
}
