//! Every JSON block printed in README.md and docs/*.md is checked here as what it
//! claims to be: a pool config (or a fragment of one) parses with `Config::from_json`,
//! an input line has the OpenAI Batch request shape, an output record has the shape
//! `keypool run` writes. (Rust blocks are doctests, see `src/lib.rs`; the C, C++ and Go
//! programs and the install commands are run by `examples/run-ffi-tests.sh`; the Python
//! block by `python/tests/test_docs.py`.)

use keypool::Config;
use keypool::serde_json::{self, Value};

const PAGES: &[(&str, &str)] = &[
    ("README.md", include_str!("../README.md")),
    ("docs/benchmarks.md", include_str!("../docs/benchmarks.md")),
    ("docs/c.md", include_str!("../docs/c.md")),
    (
        "docs/cancellation.md",
        include_str!("../docs/cancellation.md"),
    ),
    ("docs/cli-check.md", include_str!("../docs/cli-check.md")),
    ("docs/cli.md", include_str!("../docs/cli.md")),
    (
        "docs/configuration.md",
        include_str!("../docs/configuration.md"),
    ),
    ("docs/faults.md", include_str!("../docs/faults.md")),
    ("docs/go.md", include_str!("../docs/go.md")),
    ("docs/https.md", include_str!("../docs/https.md")),
    ("docs/internals.md", include_str!("../docs/internals.md")),
    ("docs/metrics.md", include_str!("../docs/metrics.md")),
    ("docs/python.md", include_str!("../docs/python.md")),
    ("docs/routing.md", include_str!("../docs/routing.md")),
    ("docs/rust.md", include_str!("../docs/rust.md")),
    (
        "docs/shared-limits.md",
        include_str!("../docs/shared-limits.md"),
    ),
];

/// The fenced blocks of a page: (info string, text).
fn blocks(page: &str) -> Vec<(&str, String)> {
    let mut out = Vec::new();
    let mut lines = page.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let mut text = String::new();
        for l in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            text += l;
            text += "\n";
        }
        out.push((info.trim(), text));
    }
    out
}

#[test]
fn every_guide_is_listed() {
    let mut on_disk: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/docs"))
        .unwrap()
        .map(|e| format!("docs/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|n| n.ends_with(".md"))
        .collect();
    on_disk.sort();
    let listed: Vec<&str> = PAGES
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| n.starts_with("docs/"))
        .collect();
    assert_eq!(
        on_disk, listed,
        "tests/docs.rs must list every docs/*.md (and src/lib.rs include it as a doctest)"
    );
}

#[test]
fn every_json_block_is_what_it_claims() {
    let mut checked = 0;
    for (name, page) in PAGES {
        for (info, text) in blocks(page) {
            if info != "json" {
                continue;
            }
            let trimmed = text.trim();
            // A fragment of a config (`"shared": {…}`) is checked inside a whole one.
            let whole = if trimmed.starts_with('"') {
                format!(r#"{{"keys": [{{"key": "sk-test"}}], {trimmed}}}"#)
            } else {
                trimmed.to_owned()
            };
            let value: Value = serde_json::from_str(&whole)
                .unwrap_or_else(|e| panic!("{name}: a json block is not JSON ({e}):\n{text}"));
            let obj = value
                .as_object()
                .unwrap_or_else(|| panic!("{name}: a json block is not an object:\n{text}"));
            if obj.contains_key("keypool") {
                // An output record of `keypool run`.
                for field in ["id", "custom_id", "response", "error", "keypool"] {
                    assert!(
                        obj.contains_key(field),
                        "{name}: record without {field}:\n{text}"
                    );
                }
                let meta = &obj["keypool"];
                for field in ["key", "attempts", "latency_ms", "line"] {
                    assert!(
                        meta.get(field).is_some(),
                        "{name}: record's keypool without {field}"
                    );
                }
                assert!(
                    obj["error"].is_null()
                        == obj["response"]["status_code"]
                            .as_u64()
                            .is_some_and(|s| s < 300),
                    "{name}: a record is a success (error null, 2xx) or a failure:\n{text}"
                );
            } else if obj.contains_key("custom_id") {
                // An input line (OpenAI Batch request).
                assert_eq!(obj["method"], "POST", "{name}: {text}");
                assert!(
                    obj["url"].as_str().is_some_and(|u| u.starts_with("/v1/")),
                    "{name}: {text}"
                );
                assert!(obj["body"]["model"].is_string(), "{name}: {text}");
                assert!(obj["body"]["messages"].is_array(), "{name}: {text}");
            } else {
                // A pool config, as `Config::from_json`, the C ABI and the CLI read it.
                match Config::from_json(&whole) {
                    Ok(_) => {}
                    // Without the `redis` feature a config with `shared` is refused, as
                    // docs/shared-limits.md says, naming the feature.
                    Err(keypool::Error::Config { field, message })
                        if !cfg!(feature = "redis")
                            && obj.contains_key("shared")
                            && field == "shared"
                            && message.contains("`redis` cargo feature") => {}
                    Err(e) => panic!("{name}: a config block does not parse: {e}\n{text}"),
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} json blocks found");
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a page's headings (outside fenced blocks).
fn anchors(page: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in page.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.push(slug(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn every_relative_link_resolves() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for (name, page) in PAGES {
        let dir = root.join(name).parent().unwrap().to_owned();
        for (i, _) in page.match_indices("](") {
            let rest = &page[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
            let file = if path.is_empty() {
                root.join(name)
            } else {
                dir.join(path)
            };
            assert!(
                file.exists(),
                "{name}: link to {target}: no {}",
                file.display()
            );
            if !anchor.is_empty() {
                let text = std::fs::read_to_string(&file).unwrap();
                assert!(
                    anchors(&text).iter().any(|a| a == anchor),
                    "{name}: link to {target}: no such heading"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} links found");
}
