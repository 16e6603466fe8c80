//! `keypool demo`.

use std::process::ExitCode;

use crate::args::DemoArgs;

/// Runs the demo.
pub fn run(_a: &DemoArgs) -> Result<ExitCode, String> {
    Err("the demo is not available in this build yet".into())
}
