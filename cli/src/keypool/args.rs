//! Command-line arguments (clap derive). Every flag's help states its default.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::settings::PoolFlags;

/// `keypool --version`: the version, and the optional features this binary was built
/// with (`redis`: `--shared`).
#[cfg(feature = "redis")]
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (features: redis)");
#[cfg(not(feature = "redis"))]
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Spread LLM API requests across many API keys.
///
/// keypool runs a JSONL file of OpenAI-style requests (OpenAI's Batch format) across
/// all your keys at once — OpenRouter, OpenAI or any OpenAI-compatible server — each
/// key held to its own number of requests in flight, with retries on other keys,
/// resume after an interruption, and per-key statistics.
#[derive(Debug, Parser)]
#[command(name = "keypool", version = VERSION, propagate_version = true, after_help = TOP_EXAMPLES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// Log what keypool does on stderr: -v keys disabled, parked, cooling and other
    /// warnings and notes, -vv each retry and its reason, -vvv everything. Without it,
    /// RUST_LOG (e.g. RUST_LOG=keypool=debug) is honoured; default: no log lines.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// Examples shown under `keypool --help`.
const TOP_EXAMPLES: &str = "\
Examples:
  keypool demo                                     # try it offline, no key needed
  keypool run --keys-file keys.txt -i prompts.jsonl -o results.jsonl
  OPENAI_API_KEY=sk-... keypool run -i prompts.jsonl -o results.jsonl
  keypool run -c pool.json -i prompts.jsonl -o results.jsonl --ca-file corp-ca.pem
  keypool check --keys-file keys.txt               # is every key accepted, with credit?
  keypool mock --port 8080                         # a local OpenAI-compatible mock";

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a JSONL file of requests (OpenAI Batch API format) across all keys.
    Run(RunArgs),
    /// Check every key: accepted or rejected, credit left and limit, models reachable.
    Check(CheckArgs),
    /// Run the bundled mock OpenAI-compatible server on loopback until Ctrl-C.
    Mock(MockArgs),
    /// Demonstrate keypool against the in-process mock server (4 fake keys, 200 prompts).
    Demo(DemoArgs),
}

/// `keypool run`.
#[derive(Debug, Args)]
#[command(after_long_help = RUN_AFTER_HELP)]
pub struct RunArgs {
    /// Input JSONL file, `-` for stdin. Each line is an OpenAI Batch API request line
    /// ({"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
    /// "body": {...}}) or a bare request body (its custom_id is then `line-<n>`).
    /// Blank lines are skipped; a malformed line gets an error record.
    #[arg(long, short = 'i', value_name = "FILE")]
    pub input: PathBuf,

    /// Output JSONL file, `-` for stdout. Records are appended; when the file exists,
    /// requests it already answers are skipped (resume). An existing file that is not
    /// keypool output is refused and left untouched. Stdout cannot resume.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,

    /// Pool config as JSON (the library's format: base_url, strategy, keys[], retry,
    /// timeouts...). Flags below override it. Default: none (keys from --keys-file or
    /// the environment).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// File with one API key per line: `KEY`, or `LABEL KEY` (a label, spaces, the key;
    /// `=` is part of a key, never a separator), optionally followed by that key's
    /// settings `rpm=N tpm=N max_concurrent=N weight=N`; `#` comment lines and blank
    /// lines are ignored. Not with a --config that has keys (one place for keys and
    /// their settings). Default: the config's keys,
    /// else $KEYPOOL_API_KEYS (comma-separated, each `KEY` or `LABEL KEY`), else
    /// $OPENROUTER_API_KEY, else $OPENAI_API_KEY.
    #[arg(long, value_name = "FILE")]
    pub keys_file: Option<PathBuf>,

    /// Base URL the request paths are appended to. Default: the config's base_url;
    /// with keys from $OPENAI_API_KEY, $OPENAI_BASE_URL or https://api.openai.com/v1
    /// (an OpenAI key never goes to a third party by default); with
    /// $OPENROUTER_API_KEY, $OPENROUTER_BASE_URL if set; else
    /// https://openrouter.ai/api/v1. When it ends in /v1, a line's url
    /// "/v1/chat/completions" is sent to <base>/chat/completions.
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,

    /// Requests in flight per key (1-1024). Default: each key's max_concurrent from
    /// the config, else 4.
    #[arg(long, value_name = "N")]
    pub per_key: Option<usize>,

    /// Requests per minute per key (every key). Default: each key's rpm from the config
    /// or its keys-file line (`rpm=N`), else none.
    #[arg(long, value_name = "N")]
    pub rpm: Option<u32>,

    /// Tokens per minute per key (every key). Default: each key's tpm from the config or
    /// its keys-file line (`tpm=N`), else none.
    #[arg(long, value_name = "N")]
    pub tpm: Option<u64>,

    /// How to pick a key for each request: first_available, round_robin or
    /// least_loaded. Default: the config's strategy, else first_available.
    #[arg(long, value_name = "STRATEGY")]
    pub strategy: Option<String>,

    /// Attempts per request, the first included (1 = no retries). Default: the config's
    /// retry.max_attempts, else 3.
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,

    /// Timeout of one HTTP attempt in milliseconds. Default: the config's timeout_ms,
    /// else 600000.
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u64>,

    /// Share every key's limits (max_concurrent, rpm, tpm, cooldowns, disabled keys)
    /// with every other run using the same Redis, e.g. redis://10.0.0.5:6379/0, so runs
    /// on several machines split one key set safely. Sets the config's
    /// shared.redis_url (its other shared fields apply). Needs a keypool built with
    /// the `redis` feature. Default: the config's shared, else none.
    #[arg(long, value_name = "REDIS_URL")]
    pub shared: Option<String>,

    /// Learn each key's concurrency (sets `adaptive: true` on every key): start at 1,
    /// grow while answered, cut on 429, never above the key's max_concurrent.
    #[arg(long)]
    pub adaptive: bool,

    /// Check each key's balance at GET <base>/key (OpenRouter) before its first request
    /// and after a 402, and park a key whose credit left is at or below this many
    /// dollars (sets credits.check and credits.floor).
    #[arg(long, value_name = "DOLLARS")]
    pub credits_floor: Option<f64>,

    /// Stop spending at this many dollars: once the responses' summed cost (their
    /// usage.cost, else estimated from the config's prices) reaches it, nothing more is
    /// sent and every line not yet sent is recorded with the error budget_exhausted.
    /// Requests already in flight finish (sets the config's max_cost).
    #[arg(long, value_name = "DOLLARS")]
    pub max_cost: Option<f64>,

    /// A PEM file of CA certificates to trust for https:// besides the system's (a
    /// private CA, a TLS-inspecting proxy's); sets the config's tls.ca_file.
    /// SSL_CERT_FILE and SSL_CERT_DIR are honoured too, as curl does. Default: the
    /// config's tls.ca_file, else none.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// Write records in input order instead of completion order. Results that finish
    /// early wait in a reorder buffer bounded by the run's window (twice the total
    /// per-key concurrency): when it is full, reading pauses until the oldest request
    /// finishes, so one slow request slows the run. Default: off.
    #[arg(long)]
    pub ordered: bool,

    /// Re-run requests whose last record in the output is a failure; the new record is
    /// appended after the old one, and the last record per custom_id wins. Default: off
    /// (failed requests already in the output are skipped).
    #[arg(long)]
    pub retry_failed: bool,

    /// Replace an existing --output file instead of resuming it. Default: off.
    #[arg(long)]
    pub overwrite: bool,

    /// Print nothing on stderr (no progress bar, notes or summary); errors that stop
    /// the run are still reported. Default: off. The bar is also off when stderr is not
    /// a terminal.
    #[arg(long, short = 'q')]
    pub quiet: bool,

    /// Write the run's final statistics as JSON to FILE when it ends (also when
    /// interrupted): the records written (ok, failed, skipped, unrecorded), elapsed
    /// seconds, and the pool's `Stats` (per key and group: attempts, 429s, queue and
    /// latency percentiles, tokens, cost, learned limits, state). Keys appear by
    /// label only. Default: none.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,

    /// Serve the pool's metrics in the Prometheus text format at
    /// http://ADDR/metrics while the run lasts (e.g. 127.0.0.1:9464; port 0 picks a
    /// free one, printed on stderr): requests by key and outcome, in flight, queue
    /// depth, duration histograms, tokens, cost, key state. Labels only, never keys.
    /// Default: off.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,

    /// Without a terminal on stderr (and not --quiet), a progress line at most every
    /// this many milliseconds. Default: 10000.
    #[arg(long, value_name = "MS", default_value_t = 10_000, hide = true)]
    pub progress_every_ms: u64,
}

const RUN_AFTER_HELP: &str = "\
Output line (one per input line):
  {\"id\": \"batch_req_...\", \"custom_id\": \"req-1\",
   \"response\": {\"status_code\": 200, \"request_id\": \"...\", \"body\": {...}},
   \"error\": null,
   \"keypool\": {\"key\": \"acct-a\", \"attempts\": 1, \"latency_ms\": 412, \"line\": 1}}
  On failure, \"error\" is {\"code\": \"...\", \"message\": \"...\"} and \"response\" is null or
  holds the HTTP error response. \"key\" is the key's label; keys are never printed.

Input: each custom_id must be unique (duplicates are refused, naming the lines).
Lines with \"stream\": true run streamed; their record holds the assembled
chat.completion body (with usage), like any other line. A stream cut short, malformed
or ended by an error event is an error record (code \"stream\") that --retry-failed
redoes.

Resume: run the same command again (it prints \"resuming: N done, M to go\"). Lines
whose custom_id already has a record are skipped, the rest are appended; a last record
cut short by a crash is removed first. Only keypool output is resumed: any other
existing file is refused untouched. --overwrite starts afresh.

Ctrl-C: the first stops sending at once (requests read but not sent are left for the
resume) and waits for the requests in flight; the second abandons them. Either way the
output is a valid file to resume from.

Exit status: 0 every line has a successful record, 1 some failed (they are in the
output) or some lines read have no record (named on stderr), 2 usage, config, input or
I/O error, 130 interrupted.";

impl RunArgs {
    /// The flags that shape the pool.
    pub fn pool_flags(&self) -> PoolFlags {
        PoolFlags {
            config: self.config.clone(),
            keys_file: self.keys_file.clone(),
            base_url: self.base_url.clone(),
            per_key: self.per_key,
            rpm: self.rpm,
            tpm: self.tpm,
            strategy: self.strategy.clone(),
            max_attempts: self.max_attempts,
            timeout_ms: self.timeout_ms,
            shared: self.shared.clone(),
            adaptive: self.adaptive,
            credits_floor: self.credits_floor,
            max_cost: self.max_cost,
            ca_file: self.ca_file.clone(),
        }
    }
}

/// `keypool check`.
#[derive(Debug, Args)]
#[command(after_long_help = CHECK_AFTER_HELP)]
pub struct CheckArgs {
    /// Pool config as JSON, as for `keypool run` (its keys, base_url, per-key
    /// base_url, headers, models and tls are used). Default: none.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// File with one API key per line, as for `keypool run` (`KEY` or `LABEL KEY`, then
    /// optional settings). Default: the config's keys, else $KEYPOOL_API_KEYS, else
    /// $OPENROUTER_API_KEY, else $OPENAI_API_KEY.
    #[arg(long, value_name = "FILE")]
    pub keys_file: Option<PathBuf>,

    /// Base URL the routes are appended to (<base>/key, <base>/models,
    /// <base>/chat/completions). Default: as for `keypool run` (the config's base_url;
    /// $OPENAI_BASE_URL or https://api.openai.com/v1 for $OPENAI_API_KEY;
    /// $OPENROUTER_BASE_URL or https://openrouter.ai/api/v1 otherwise).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,

    /// A PEM file of CA certificates to trust for https:// besides the system's; sets
    /// the config's tls.ca_file. SSL_CERT_FILE and SSL_CERT_DIR are honoured too.
    /// Default: the config's tls.ca_file, else none.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// Time allowed for each request of the check (connect included), in milliseconds;
    /// a server that stalls longer leaves the key "unknown". The config's timeout_ms
    /// (meant for completions) is not used. Default: 15000.
    #[arg(long, value_name = "MS", default_value_t = 15_000)]
    pub timeout_ms: u64,

    /// Also send each key one minimal chat completion (max_tokens 1; it may cost a
    /// fraction of a cent) and require it to succeed. Default: off (no completion is
    /// sent).
    #[arg(long)]
    pub probe: bool,

    /// The model --probe asks for (mapped by a key's model_map). A key with a
    /// `models` list that does not serve it is probed with its first listed model.
    /// Default: each key's first configured model; needed when a key has none.
    #[arg(long, value_name = "MODEL", requires = "probe")]
    pub model: Option<String>,

    /// One JSON object per key instead of text: {"key", "status", "usable", "credit":
    /// {"limit", "limit_remaining", "usage", "unlimited", "is_free_tier",
    /// "limit_reset", "rate_limit"}, "models", "models_served", "probe": {"ok",
    /// "latency_ms"}, "notes": [...]}. Default: text.
    #[arg(long)]
    pub json: bool,

    /// No summary line on stderr. Default: off.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

const CHECK_AFTER_HELP: &str = "\
Output (stdout, one line per key, in config order; keys appear by label only):
  acct-a  ok         credit $4.90 left of $5.00 (used $0.10); 312 models listed
  acct-b  rejected   GET /key: HTTP 401: User not found.
  acct-c  no-credit  credit $0.00 left of $1.00 (used $1.00); 312 models listed
  acct-d  unknown    GET /key: timed out (attempt); GET /models: timed out (attempt)

Status: ok (the server accepted the key and it has credit), rejected (401 or 403),
no-credit (402, or OpenRouter's limit_remaining at 0), unknown (no answer said: a
server error, a timeout, or a server with neither /key nor /models — try --probe).
Credit is read from GET <base>/key (OpenRouter); the model count from GET
<base>/models. Without --probe no completion is sent.

Exit status: 0 every key is usable (ok), 1 some key is not, 2 usage or config error.

Examples:
  keypool check --keys-file keys.txt
  OPENROUTER_API_KEY=sk-or-... keypool check --probe --model openai/gpt-4o-mini
  keypool check -c pool.json --json";

impl CheckArgs {
    /// The flags that shape the pool config (keys, base URL, TLS).
    pub fn pool_flags(&self) -> PoolFlags {
        PoolFlags {
            config: self.config.clone(),
            keys_file: self.keys_file.clone(),
            base_url: self.base_url.clone(),
            ca_file: self.ca_file.clone(),
            ..PoolFlags::default()
        }
    }
}

/// `keypool mock`.
#[derive(Debug, Args)]
#[command(after_long_help = "Prints its base URL (http://127.0.0.1:PORT/v1, or \
https:// with --tls) as the only line on stdout and serves until Ctrl-C. A request \
body containing \"mock\": {\"status\": 500} is answered with that status. It also \
answers GET <base>/key (OpenRouter's credit shape) and GET <base>/models.

With --tls, the CA certificate to trust is written to a file whose path is printed \
on stderr:
  keypool mock --tls --ca-out mock-ca.pem
  keypool run --base-url https://127.0.0.1:PORT/v1 --ca-file mock-ca.pem ...")]
pub struct MockArgs {
    /// Port to listen on (127.0.0.1 only); 0 picks a free port.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Fixed latency before each answer, in milliseconds.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub latency_ms: u64,
    /// Extra uniform random latency, 0..=MS milliseconds.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub jitter_ms: u64,
    /// Fraction of requests answered 429, 0.0-1.0.
    #[arg(long, default_value_t = 0.0, value_name = "F", value_parser = rate)]
    pub fail_429_rate: f64,
    /// retry-after-ms hint of 429 answers: a value or a range A-B; 0 sends no hint.
    #[arg(long, default_value = "0", value_name = "A[-B]", value_parser = range)]
    pub retry_after_ms: (u64, u64),
    /// Fraction answered 500.
    #[arg(long, default_value_t = 0.0, value_name = "F", value_parser = rate)]
    pub fail_500_rate: f64,
    /// Fraction answered 502.
    #[arg(long, default_value_t = 0.0, value_name = "F", value_parser = rate)]
    pub fail_502_rate: f64,
    /// Fraction answered 503.
    #[arg(long, default_value_t = 0.0, value_name = "F", value_parser = rate)]
    pub fail_503_rate: f64,
    /// Fraction of connections closed without a response.
    #[arg(long, default_value_t = 0.0, value_name = "F", value_parser = rate)]
    pub drop_rate: f64,
    /// Fraction answered after an extra --slow-ms delay.
    #[arg(long, default_value_t = 0.0, value_name = "F", value_parser = rate)]
    pub slow_rate: f64,
    /// The extra delay of slow answers, in milliseconds.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub slow_ms: u64,
    /// Fraction answered 200 with a body that is not valid JSON.
    #[arg(long, default_value_t = 0.0, value_name = "F", value_parser = rate)]
    pub malformed_rate: f64,
    /// Fraction answered 200 with an {"error": ...} body (as OpenRouter sometimes does).
    #[arg(long, default_value_t = 0.0, value_name = "F", value_parser = rate)]
    pub error_in_200_rate: f64,
    /// Seed of the fault random generator. Default: random.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Server worker threads.
    #[arg(long, default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=256))]
    pub threads: u64,
    /// Answer 429 to a key's requests above N in flight (a hidden capacity).
    #[arg(long, value_name = "N")]
    pub key_capacity: Option<usize>,
    /// Dollars each success costs: reported as usage.cost and debited from the key's
    /// balance at GET /v1/key.
    #[arg(long, default_value_t = 0.0, value_name = "DOLLARS")]
    pub cost_per_request: f64,
    /// Serve https:// with a certificate signed by a CA generated at start; the CA's
    /// PEM is written to --ca-out and its path printed on stderr (trust it with
    /// `keypool run --ca-file`, tls.ca_file or SSL_CERT_FILE). Default: plain http://.
    #[arg(long)]
    pub tls: bool,
    /// Where --tls writes the CA certificate (PEM); `-` prints it on stderr instead.
    /// Default: keypool-mock-ca-PORT.pem in the temp directory, removed at exit.
    #[arg(long, value_name = "FILE", requires = "tls")]
    pub ca_out: Option<PathBuf>,
}

fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err("expected a number between 0 and 1".into()),
    }
}

fn range(s: &str) -> Result<(u64, u64), String> {
    let num = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|_| "expected milliseconds, or a range A-B".to_owned())
    };
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(s)?, num(s)?),
    };
    if a > b {
        return Err(format!("empty range {s}"));
    }
    Ok((a, b))
}

/// `keypool demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of prompts to run.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}
