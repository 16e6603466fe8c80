//! docs/rust.md's usage example is this crate's `usage` binary, printed verbatim: the
//! guide's block compiles as a doctest (`no_run`), and here the same program runs against
//! the bundled mock server, its base URL given as the first argument.

use std::process::Command;

use keypool_mock::{MockConfig, MockServer};

#[test]
fn the_rust_guide_prints_the_usage_binary_verbatim() {
    let guide = include_str!("../../../docs/rust.md");
    let program = include_str!("../src/bin/usage.rs");
    let block = format!("```rust,no_run\n{program}```\n");
    assert!(
        guide.contains(&block),
        "docs/rust.md must print examples/rust-user/src/bin/usage.rs verbatim in a \
         ```rust,no_run block (copy the file into the guide after changing it)"
    );
}

#[test]
fn the_usage_binary_runs_against_the_mock() {
    let server = MockServer::start(MockConfig::default()).expect("mock server");
    let out = Command::new(env!("CARGO_BIN_EXE_usage"))
        .arg(server.url())
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.starts_with("200 via key-"), "{stdout}");
    assert!(stdout.contains("\nbatch: 100/100 ok\n"), "{stdout}");
    assert!(stdout.contains("\n1101 ok, 0 retries, "), "{stdout}");
    assert!(stderr.is_empty(), "{stderr}");
}
