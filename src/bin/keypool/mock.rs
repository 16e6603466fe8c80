//! `keypool mock`: the bundled mock server.

use std::process::ExitCode;

use crate::args::MockArgs;

/// Runs the mock server until Ctrl-C.
pub fn run(_a: &MockArgs) -> Result<ExitCode, String> {
    Err("the mock server is not available in this build yet".into())
}
