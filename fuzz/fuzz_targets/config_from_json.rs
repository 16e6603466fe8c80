//! `Config::from_json` on raw text: total; an accepted config passes `validate`; and an
//! error never contains a key present in the input.
//!
//! Keys are the `keys[].key` strings of the input when it is JSON, plus anything
//! shaped like a real key (`sk-…` with a digit, 8+ characters) anywhere in it. Only
//! keys with a digit are checked: error paths show plain field names (letters, `_`,
//! `-`) by design, and every real provider key has digits.
#![no_main]

use keypool::Config;
use libfuzzer_sys::fuzz_target;

fn keyish(s: &str) -> bool {
    s.len() >= 8 && s.bytes().any(|b| b.is_ascii_digit())
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
    for (i, _) in text.match_indices("sk-") {
        let tok: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            .collect();
        keys.push(tok);
    }
    keys.retain(|k| keyish(k) && text.contains(k.as_str()));

    match Config::from_json(text) {
        Ok(config) => {
            config
                .validate()
                .expect("from_json accepted an invalid config");
            assert!(!config.keys.is_empty());
            // Header names and values are shown by `Debug` as configured (a key pasted
            // into a header is the user's choice); everything else must hide keys.
            let mut shown = config.clone();
            shown.headers.clear();
            shown.keys.iter_mut().for_each(|k| k.headers.clear());
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
