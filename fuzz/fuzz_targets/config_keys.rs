//! `Config::from_json` on structured configs with keys pasted everywhere a user might
//! paste them (labels, URLs, headers, unknown fields, strategy), optionally cut short:
//! an error never contains a key that is present in the input.
//!
//! Keys look like real ones: `sk-` and at least one digit (error paths show plain
//! field names, letters `_` `-`, by design; real keys have digits).
#![no_main]

use keypool::Config;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

#[derive(Arbitrary, Debug)]
enum Part {
    Lit(String),
    Key(u8),
}

/// A string made of literal text and keys.
#[derive(Arbitrary, Debug)]
struct Frag(Vec<Part>);

#[derive(Arbitrary, Debug)]
struct KeyIn {
    /// Key body: kept to `[A-Za-z0-9._-]`, prefixed `sk-` and suffixed with a digit.
    body: String,
    label: Option<Frag>,
    base_url: Option<Frag>,
    headers: Vec<(Frag, Frag)>,
    max_concurrent: Option<i64>,
    rpm: Option<i64>,
    extra: Option<(Frag, Frag)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    keys: Vec<KeyIn>,
    base_url: Option<Frag>,
    strategy: Option<Frag>,
    headers: Vec<(Frag, Frag)>,
    extra: Option<(Frag, Frag)>,
    timeout_ms: Option<i64>,
    /// Cut the JSON text to this many bytes (a config pasted halfway).
    cut: Option<u16>,
}

fn render(f: &Frag, keys: &[String]) -> String {
    let mut s = String::new();
    for p in f.0.iter().take(16) {
        match p {
            Part::Lit(t) => s.push_str(t),
            Part::Key(i) if !keys.is_empty() => s.push_str(&keys[*i as usize % keys.len()]),
            Part::Key(_) => s.push_str("sk-none-1"),
        }
    }
    s
}

fn headers(h: &[(Frag, Frag)], keys: &[String]) -> Value {
    let mut m = Map::new();
    for (n, v) in h.iter().take(4) {
        m.insert(render(n, keys), Value::String(render(v, keys)));
    }
    Value::Object(m)
}

fuzz_target!(|input: Input| {
    let keys: Vec<String> = input
        .keys
        .iter()
        .take(4)
        .enumerate()
        .map(|(i, k)| {
            let body: String = k
                .body
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                .take(200)
                .collect();
            format!("sk-{body}{i}")
        })
        .collect();

    let mut root = Map::new();
    if let Some(u) = &input.base_url {
        root.insert("base_url".into(), Value::String(render(u, &keys)));
    }
    if let Some(s) = &input.strategy {
        root.insert("strategy".into(), Value::String(render(s, &keys)));
    }
    if !input.headers.is_empty() {
        root.insert("headers".into(), headers(&input.headers, &keys));
    }
    if let Some(t) = input.timeout_ms {
        root.insert("timeout_ms".into(), json!(t));
    }
    if let Some((n, v)) = &input.extra {
        root.insert(render(n, &keys), Value::String(render(v, &keys)));
    }
    let mut ks = Vec::new();
    for (k, key) in input.keys.iter().zip(&keys) {
        let mut m = Map::new();
        m.insert("key".into(), Value::String(key.clone()));
        if let Some(l) = &k.label {
            m.insert("label".into(), Value::String(render(l, &keys)));
        }
        if let Some(u) = &k.base_url {
            m.insert("base_url".into(), Value::String(render(u, &keys)));
        }
        if !k.headers.is_empty() {
            m.insert("headers".into(), headers(&k.headers, &keys));
        }
        if let Some(n) = k.max_concurrent {
            m.insert("max_concurrent".into(), json!(n));
        }
        if let Some(n) = k.rpm {
            m.insert("rpm".into(), json!(n));
        }
        if let Some((n, v)) = &k.extra {
            // An unknown field; never one that replaces `key` (the property is about
            // the keys actually configured).
            m.entry(render(n, &keys))
                .or_insert_with(|| Value::String(render(v, &keys)));
        }
        ks.push(Value::Object(m));
    }
    root.insert("keys".into(), Value::Array(ks));
    let mut text = Value::Object(root).to_string();
    if let Some(cut) = input.cut {
        let mut cut = (cut as usize).min(text.len());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }

    if let Err(e) = Config::from_json(&text) {
        let shown = format!("{e} | {e:?}");
        for k in keys.iter().filter(|k| text.contains(k.as_str())) {
            assert!(
                !shown.contains(k.as_str()),
                "error shows key {k:?}: {shown}"
            );
        }
    }
});
