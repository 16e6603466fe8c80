//! Repository tasks that write into the source tree (never done by a build script).
//!
//! ```text
//! cargo run -p xtask -- header          regenerate include/keypool.h from capi/src/ffi
//! cargo run -p xtask -- header --check  fail if include/keypool.h is out of date
//! ```
//!
//! The version macros come from this crate's version, which is the workspace version
//! shared with `keypool` and `keypool-capi` (`version.workspace = true`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["header"] => header(false),
        ["header", "--check"] => header(true),
        _ => {
            eprintln!("usage: cargo run -p xtask -- header [--check]");
            ExitCode::from(2)
        }
    }
}

/// The repository root (this crate lives in `<root>/xtask`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Generates the header; writes it (only if it changed) or, with `check`, compares.
fn header(check: bool) -> ExitCode {
    let root = root();
    let capi = root.join("capi");
    let mut config = match cbindgen::Config::from_file(capi.join("cbindgen.toml")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("capi/cbindgen.toml: {e}");
            return ExitCode::FAILURE;
        }
    };
    let num = |v: &str| -> u32 { v.parse().unwrap_or(0) };
    let (major, minor, patch) = (
        num(env!("CARGO_PKG_VERSION_MAJOR")),
        num(env!("CARGO_PKG_VERSION_MINOR")),
        num(env!("CARGO_PKG_VERSION_PATCH")),
    );
    let version = env!("CARGO_PKG_VERSION");
    config.after_includes = Some(format!(
        "\n/* Version of the library this header was generated from; keypool_version()\n   \
         returns KEYPOOL_VERSION at run time. */\n\
         #define KEYPOOL_VERSION_MAJOR {major}\n\
         #define KEYPOOL_VERSION_MINOR {minor}\n\
         #define KEYPOOL_VERSION_PATCH {patch}\n\
         /* MAJOR * 10000 + MINOR * 100 + PATCH */\n\
         #define KEYPOOL_VERSION_NUMBER {}\n\
         #define KEYPOOL_VERSION \"{version}\"",
        major * 10000 + minor * 100 + patch
    ));
    let bindings = match cbindgen::Builder::new()
        .with_config(config)
        .with_src(capi.join("src/ffi/mod.rs"))
        .generate()
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cbindgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = Vec::new();
    bindings.write(&mut out);
    let path = root.join("include/keypool.h");
    let current = std::fs::read(&path).ok();
    if current.as_deref() == Some(&out[..]) {
        println!("include/keypool.h is up to date");
        return ExitCode::SUCCESS;
    }
    if check {
        eprintln!(
            "include/keypool.h is out of date: run `cargo run -p xtask -- header` and commit it"
        );
        return ExitCode::FAILURE;
    }
    if let Err(e) =
        std::fs::create_dir_all(root.join("include")).and_then(|()| std::fs::write(&path, &out))
    {
        eprintln!("could not write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    println!("wrote include/keypool.h");
    ExitCode::SUCCESS
}
