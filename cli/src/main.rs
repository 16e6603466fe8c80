//! The `keypool` command: runs a JSONL file of OpenAI-style requests across many API
//! keys (`keypool run`), checks each key (`keypool check`), runs the bundled mock
//! server (`keypool mock`), and demonstrates a run against it (`keypool demo`). A thin
//! layer over the `keypool` library.

#[path = "keypool/args.rs"]
mod args;
#[path = "keypool/check.rs"]
mod check;
#[path = "keypool/demo.rs"]
mod demo;
#[path = "keypool/input.rs"]
mod input;
#[path = "keypool/keys.rs"]
mod keys;
#[path = "keypool/metrics.rs"]
mod metrics;
#[path = "keypool/mock.rs"]
mod mock;
#[path = "keypool/output.rs"]
mod output;
#[path = "keypool/progress.rs"]
mod progress;
#[path = "keypool/resume.rs"]
mod resume;
#[path = "keypool/run.rs"]
mod run;
#[path = "keypool/settings.rs"]
mod settings;
#[path = "keypool/signals.rs"]
mod signals;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command, RunArgs};
use crate::run::{Interrupted, RunOptions};

/// Exit status: usage, config or I/O error.
const EXIT_USAGE: u8 = 2;
/// Exit status: some requests failed.
const EXIT_FAILED: u8 = 1;
/// Exit status: interrupted by Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: i32 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Run(a) => cmd_run(&a),
        Command::Check(a) => check::run(&a),
        Command::Mock(a) => mock::run(&a),
        Command::Demo(a) => demo::run(&a),
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("keypool: error: {msg}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// The engine's `log` records on stderr: `-v` info, `-vv` debug, `-vvv` trace; without
/// `-v`, `RUST_LOG` as env_logger reads it; otherwise none.
fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => None,
        1 => Some(log::LevelFilter::Info),
        2 => Some(log::LevelFilter::Debug),
        _ => Some(log::LevelFilter::Trace),
    };
    let mut b = match level {
        Some(l) => {
            let mut b = env_logger::Builder::new();
            b.filter_level(l);
            b
        }
        None if std::env::var_os("RUST_LOG").is_some() => env_logger::Builder::from_default_env(),
        None => return,
    };
    let _ = b.format_timestamp_millis().try_init();
}

fn cmd_run(a: &RunArgs) -> Result<ExitCode, String> {
    let config = settings::build_config(&a.pool_flags(), |k| std::env::var(k).ok())?;
    let interrupts = signals::interrupts()?;
    let pool = keypool::Pool::new(config).map_err(|e| e.to_string())?;
    if let Some(addr) = &a.metrics_addr {
        let bound = metrics::serve(addr, pool.clone())?;
        if !a.quiet {
            eprintln!("keypool: metrics at http://{bound}/metrics");
        }
    }
    let opts = RunOptions {
        input: a.input.clone(),
        output: a.output.clone(),
        ordered: a.ordered,
        quiet: a.quiet,
        retry_failed: a.retry_failed,
        overwrite: a.overwrite,
        progress_every: std::time::Duration::from_millis(a.progress_every_ms),
    };
    let report = match run::run(&pool, &opts, &interrupts) {
        Ok(r) => r,
        Err(msg) => {
            eprintln!("keypool: error: {msg}");
            // Do not wait for requests still in flight.
            std::process::exit(EXIT_USAGE.into());
        }
    };
    if !a.quiet {
        eprint!("{}", report.summary(&a.output));
    }
    if let Some(path) = &a.stats_json {
        if let Err(e) = std::fs::write(path, report.stats_json()) {
            eprintln!(
                "keypool: error: writing --stats-json {}: {e}",
                path.display()
            );
        }
    }
    // Lines without a record are reported even when quiet: the exit status alone
    // would not say which.
    if let Some(note) = report.unrecorded_note() {
        eprint!("{note}");
    }
    match report.interrupted {
        Interrupted::No => {}
        Interrupted::Stopped => {
            pool.close();
            std::process::exit(EXIT_INTERRUPTED);
        }
        // In-flight requests past the grace period are abandoned: exit without joining.
        Interrupted::Cancelled => std::process::exit(EXIT_INTERRUPTED),
    }
    pool.close();
    Ok(if report.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}
