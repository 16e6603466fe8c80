//! The `keypool` commands printed in README.md and docs/*.md: every flag they use is one
//! `keypool … --help` documents, and README's real run — its keys file, its input line
//! and its command, as printed — works end to end against the mock (`--base-url` is the
//! one addition: the printed run goes to OpenRouter), writing a record of the shape
//! README shows.

use serde_json::Value;

mod support;
use support::*;

const PAGES: &[(&str, &str)] = &[
    ("README.md", include_str!("../../README.md")),
    (
        "docs/benchmarks.md",
        include_str!("../../docs/benchmarks.md"),
    ),
    ("docs/c.md", include_str!("../../docs/c.md")),
    ("docs/cli.md", include_str!("../../docs/cli.md")),
    (
        "docs/configuration.md",
        include_str!("../../docs/configuration.md"),
    ),
    ("docs/faults.md", include_str!("../../docs/faults.md")),
    ("docs/go.md", include_str!("../../docs/go.md")),
    ("docs/https.md", include_str!("../../docs/https.md")),
    ("docs/internals.md", include_str!("../../docs/internals.md")),
    ("docs/metrics.md", include_str!("../../docs/metrics.md")),
    ("docs/python.md", include_str!("../../docs/python.md")),
    ("docs/routing.md", include_str!("../../docs/routing.md")),
    ("docs/rust.md", include_str!("../../docs/rust.md")),
    (
        "docs/shared-limits.md",
        include_str!("../../docs/shared-limits.md"),
    ),
];

/// The fenced blocks of `page` whose info string is `lang` (fences may be indented).
fn blocks(page: &str, lang: &str) -> Vec<String> {
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
            text += l.trim_start();
            text += "\n";
        }
        if info.trim() == lang {
            out.push(text);
        }
    }
    out
}

/// The `keypool …` command lines of a page's sh blocks, continuation lines joined,
/// comments and a trailing `&` dropped, split into words.
fn commands(page: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for block in blocks(page, "sh") {
        let joined = block.replace("\\\n", " ");
        for line in joined.lines() {
            let line = line.split(" #").next().unwrap_or_default();
            let words: Vec<String> = line
                .split_whitespace()
                .filter(|w| *w != "&")
                .map(str::to_owned)
                .collect();
            if words.first().map(String::as_str) == Some("keypool") {
                out.push(words);
            }
        }
    }
    out
}

/// Whether `help` documents `flag` (followed by a space, a comma, `=` or a line end).
fn documents(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let before = help[..i].chars().next_back();
        let after = help[i + flag.len()..].chars().next();
        matches!(before, None | Some(' ' | '\n' | '['))
            && matches!(after, None | Some(' ' | ',' | '=' | '\n'))
    })
}

#[test]
fn every_printed_keypool_command_uses_documented_flags() {
    let mut checked = 0;
    for (name, page) in PAGES {
        for cmd in commands(page) {
            let sub = cmd.get(1).filter(|w| !w.starts_with('-'));
            let mut c = keypool();
            c.args(sub).arg("--help");
            let out = c.output().unwrap();
            assert!(out.status.success(), "{name}: {cmd:?}: --help failed");
            let help = String::from_utf8_lossy(&out.stdout);
            for word in &cmd[1..] {
                if word.starts_with('-') {
                    let flag = word.split('=').next().unwrap_or_default();
                    assert!(
                        documents(&help, flag),
                        "{name}: `{}` uses {flag}, which `keypool {} --help` does not document",
                        cmd.join(" "),
                        sub.map_or("", String::as_str)
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} keypool commands found");
}

#[test]
fn readme_real_run_works_as_printed_against_the_mock() {
    let readme = include_str!("../../README.md");
    let keys = blocks(readme, "text")
        .into_iter()
        .find(|b| b.contains("acct-a"))
        .expect("README prints a keys file");
    let jsons = blocks(readme, "json");
    let input = jsons
        .iter()
        .find(|b| b.contains("\"method\""))
        .expect("README prints an input line");
    let sample: Value = serde_json::from_str(
        jsons
            .iter()
            .find(|b| b.contains("\"keypool\""))
            .expect("README prints an output record"),
    )
    .unwrap();
    let cmd = commands(readme)
        .into_iter()
        .find(|c| c[1] == "run" && !c.iter().any(|w| w == "--base-url"))
        .expect("README prints the run");

    let dir = Dir::new("readme-run");
    std::fs::write(dir.path("keys.txt"), keys).unwrap();
    std::fs::write(dir.path("prompts.jsonl"), input).unwrap();
    let server = default_mock();
    let mut c = keypool();
    c.current_dir(&dir.0)
        .args(&cmd[1..])
        .args(["--base-url", &server.url()]);
    let out = run_to_end(c);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(server.stats().total_requests, 1);

    let text = std::fs::read_to_string(dir.path("results.jsonl")).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{text}");
    let record = &records[0];
    let fields = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    // The same shape as README's sample (the body is the mock's, not OpenRouter's).
    assert_eq!(fields(record), fields(&sample));
    assert_eq!(fields(&record["response"]), fields(&sample["response"]));
    assert_eq!(fields(&record["keypool"]), fields(&sample["keypool"]));
    assert_eq!(record["custom_id"], sample["custom_id"]);
    assert_eq!(record["error"], Value::Null);
    let key = record["keypool"]["key"].as_str().unwrap();
    assert!(key == "acct-a" || key == "acct-b", "{key}");
}
