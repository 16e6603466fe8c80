//! Regenerates `include/keypool.h` from `src/ffi/` with cbindgen.
//!
//! A cbindgen failure (e.g. the crate is mid-edit and does not parse) never fails the
//! build — rustc reports the real error — it only prints a warning and leaves the
//! committed header alone. The header is written only when its contents change, so
//! the build does not dirty the tree.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=build.rs");
    // Regenerate a deleted or hand-edited header too.
    println!("cargo:rerun-if-changed=include/keypool.h");

    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo");
    let dir = Path::new(&dir);
    let mut config = match cbindgen::Config::from_file(dir.join("cbindgen.toml")) {
        Ok(c) => c,
        Err(e) => {
            println!("cargo:warning=cbindgen.toml: {e}; include/keypool.h not regenerated");
            return;
        }
    };
    let num = |name: &str| -> u32 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (major, minor, patch) = (
        num("CARGO_PKG_VERSION_MAJOR"),
        num("CARGO_PKG_VERSION_MINOR"),
        num("CARGO_PKG_VERSION_PATCH"),
    );
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
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
        .with_src(dir.join("src/ffi/mod.rs"))
        .generate()
    {
        Ok(b) => b,
        Err(e) => {
            println!("cargo:warning=cbindgen failed ({e}); include/keypool.h not regenerated");
            return;
        }
    };
    let mut out = Vec::new();
    bindings.write(&mut out);
    let path = dir.join("include/keypool.h");
    if std::fs::read(&path).ok().as_deref() == Some(&out[..]) {
        return;
    }
    if let Err(e) =
        std::fs::create_dir_all(dir.join("include")).and_then(|()| std::fs::write(&path, &out))
    {
        println!("cargo:warning=could not write {}: {e}", path.display());
    }
}
