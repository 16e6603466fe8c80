//! `Config::from_json` on raw text: total; an accepted config passes `validate`; and an
//! error never contains a key present in the input.
//!
//! Keys are the `keys[].key` strings of the input when it is JSON, else whatever
//! string follows a `"key":` in it. Only realistic keys (`sk-…` with a digit) are
//! checked: error paths show plain field names (letters, `_`, `-`) by design, and
//! every real provider key has digits.
#![no_main]

use keypool::Config;
use libfuzzer_sys::fuzz_target;

/// Shaped like a real key: `sk-…`, 8+ printable ASCII characters, one a digit. (Short
/// or plain-word "keys" occur in error text on their own.)
fn keyish(s: &str) -> bool {
    s.starts_with("sk-")
        && s.len() >= 8
        && s.bytes().all(|b| (0x21..0x7f).contains(&b))
        && s.bytes().any(|b| b.is_ascii_digit())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut keys: Vec<String> = Vec::new();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        if let Some(ks) = v.get("keys").and_then(|k| k.as_array()) {
            for k in ks {
                if let Some(s) = k.get("key").and_then(|s| s.as_str()) {
                    keys.push(s.to_owned());
                }
            }
        }
    }
    // Unparsable input: whatever follows a `"key":` is a key too.
    for (i, _) in text.match_indices("\"key\"") {
        let rest = text[i + 5..].trim_start();
        let Some(rest) = rest.strip_prefix(':') else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix('"') else {
            continue;
        };
        // Only a key written without escapes (up to its closing quote): one with an
        // escape decodes to other text, and a prefix of it is not a key.
        let raw: String = rest
            .chars()
            .take_while(|c| !matches!(c, '"' | '\\'))
            .collect();
        if rest[raw.len()..].starts_with('"') {
            keys.push(raw);
        }
    }
    keys.retain(|k| keyish(k) && text.contains(k.as_str()));

    match Config::from_json(text) {
        Ok(config) => {
            config
                .validate()
                .expect("from_json accepted an invalid config");
            assert!(!config.keys.is_empty());
            // Base URLs and headers are shown by `Debug` as configured (a key pasted
            // into one is shown with it: reported, not asserted); the rest hides keys.
            let mut shown = config.clone();
            shown.headers.clear();
            shown.base_url.clear();
            for k in &mut shown.keys {
                k.headers.clear();
                k.base_url = None;
            }
            let debug = format!("{shown:?}");
            for k in &config.keys {
                let key = k.key.expose();
                if keyish(key) {
                    assert!(!debug.contains(key), "Debug shows a key");
                }
            }
        }
        Err(e) => {
            let shown = format!("{e} | {e:?}");
            for k in &keys {
                assert!(
                    !shown.contains(k.as_str()),
                    "error shows key {k:?}: {shown}"
                );
            }
        }
    }
});
