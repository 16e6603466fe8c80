//! Where the API keys come from: a keys file, or the environment.
//!
//! Error messages name the file and line, never the line's content: it could be a key.

use std::path::Path;

/// One key read from a keys file or the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// Optional label (`LABEL KEY`); `None` means the library's default `key-<index>`.
    pub label: Option<String>,
    /// The secret.
    pub key: String,
    /// Per-key settings from a keys-file line (`rpm=60 tpm=100000 max_concurrent=4
    /// weight=2`), in the order given.
    pub settings: Vec<(&'static str, u64)>,
}

/// The per-key settings a keys-file line may carry after its key.
const SETTINGS: [&str; 4] = ["rpm", "tpm", "max_concurrent", "weight"];

/// A `name=value` word naming a known setting with a whole number; `None` for any
/// other word (a key may contain `=`: `a=b` stays key text).
fn setting(word: &str) -> Option<Result<(&'static str, u64), String>> {
    let (name, value) = word.split_once('=')?;
    let name = SETTINGS.iter().find(|s| **s == name)?;
    Some(
        value
            .parse::<u64>()
            .map(|v| (*name, v))
            .map_err(|_| format!("{name} must be a whole number")),
    )
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("label", &self.label)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Checks one key's text (already stripped of surrounding whitespace) and names the
/// first problem: an inner newline, other whitespace, or another control character.
/// Never quotes the key.
pub fn check_key(key: &str, what: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err(format!("{what}: empty key"));
    }
    if key.contains(['\n', '\r']) {
        return Err(format!("{what}: the key contains a newline"));
    }
    if key.chars().any(char::is_whitespace) {
        return Err(format!("{what}: the key contains spaces"));
    }
    if key.chars().any(char::is_control) {
        return Err(format!("{what}: the key contains a control character"));
    }
    Ok(())
}

/// Parses one entry: `KEY`, or `LABEL KEY` (a label, whitespace, then the key).
///
/// Keys never contain whitespace (they travel in an HTTP header), so this cannot
/// mis-split: a key's own characters (`=`, `+`, `/`, `:` …) are never read as a
/// separator, and a label is never derived from key text. `what` names the entry's
/// origin for errors; no error quotes the entry.
fn parse_entry(entry: &str, what: &str) -> Result<KeyEntry, String> {
    let entry = entry.trim();
    let mut words: Vec<&str> = entry.split_whitespace().collect();
    // Trailing `rpm=60`-style words are settings (never quoted in errors: a key could
    // be mistaken for one only if it read `rpm=<digits>`).
    let mut settings = Vec::new();
    while words.len() > 1 {
        match setting(words[words.len() - 1]) {
            Some(Ok(s)) => {
                settings.insert(0, s);
                words.pop();
            }
            Some(Err(e)) => return Err(format!("{what}: {e}")),
            None => break,
        }
    }
    let mut parts = words.into_iter();
    let (label, key) = match (parts.next(), parts.next(), parts.next()) {
        (Some(key), None, _) => (None, key),
        (Some(label), Some(key), None) => (Some(label), key),
        (None, _, _) => return Err(format!("{what}: empty key")),
        _ => {
            return Err(format!(
                "{what}: expected `KEY` or `LABEL KEY` (then optional rpm=N tpm=N \
                 max_concurrent=N weight=N), found more than two words"
            ));
        }
    };
    check_key(key, what)?;
    Ok(KeyEntry {
        label: label.map(str::to_owned),
        key: key.to_owned(),
        settings,
    })
}

/// Parses a keys file's text: one key per line, `KEY` or `LABEL KEY` (separated by
/// spaces or a tab); lines whose first non-blank character is `#` and blank lines are
/// ignored; surrounding whitespace is padding. `name` is the file name used in errors.
pub fn parse_keys_file(text: &str, name: &str) -> Result<Vec<KeyEntry>, String> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        keys.push(parse_entry(line, &format!("{name}:{}", i + 1))?);
    }
    if keys.is_empty() {
        return Err(format!("{name}: no keys found"));
    }
    Ok(keys)
}

/// Reads and parses a keys file.
pub fn read_keys_file(path: &Path) -> Result<Vec<KeyEntry>, String> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --keys-file {name}: {e}"))?;
    parse_keys_file(&text, &name)
}

/// Keys from the environment: `KEYPOOL_API_KEYS` (comma-separated, each `KEY` or
/// `LABEL KEY`), else `OPENROUTER_API_KEY`, else `OPENAI_API_KEY` (one key). Surrounding
/// whitespace is padding everywhere. `Ok(None)` when none is set. `get` looks a variable
/// up (a parameter so tests need not touch the process environment).
pub fn keys_from_env(
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<Vec<KeyEntry>>, String> {
    if let Some(list) = get("KEYPOOL_API_KEYS").filter(|v| !v.trim().is_empty()) {
        let mut keys = Vec::new();
        for (i, entry) in list.split(',').enumerate() {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            keys.push(parse_entry(
                entry,
                &format!("KEYPOOL_API_KEYS entry {}", i + 1),
            )?);
        }
        if keys.is_empty() {
            return Err("KEYPOOL_API_KEYS: no keys found".into());
        }
        return Ok(Some(keys));
    }
    for var in ["OPENROUTER_API_KEY", "OPENAI_API_KEY"] {
        if let Some(key) = get(var) {
            let key = key.trim();
            if !key.is_empty() {
                check_key(key, var)?;
                return Ok(Some(vec![KeyEntry {
                    label: None,
                    key: key.to_owned(),
                    settings: Vec::new(),
                }]));
            }
        }
    }
    Ok(None)
}

/// OpenAI's API, where an `OPENAI_API_KEY` goes unless `OPENAI_BASE_URL` says otherwise.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// The base URL that belongs with the environment's key, when the run names none: an
/// `OPENAI_API_KEY` goes to `OPENAI_BASE_URL` or OpenAI's API — never to the default
/// base (OpenRouter), a third party for that key — and an `OPENROUTER_API_KEY` to
/// `OPENROUTER_BASE_URL` when set, as their official clients do. `None` for
/// `KEYPOOL_API_KEYS` (the config's base URL applies) or when no key is set. Follows
/// [`keys_from_env`]'s precedence.
pub fn base_url_from_env(get: impl Fn(&str) -> Option<String>) -> Option<String> {
    let set = |var: &str| get(var).filter(|v| !v.trim().is_empty());
    if set("KEYPOOL_API_KEYS").is_some() {
        return None;
    }
    if set("OPENROUTER_API_KEY").is_some() {
        return set("OPENROUTER_BASE_URL").map(|u| u.trim().to_owned());
    }
    set("OPENAI_API_KEY")?;
    Some(set("OPENAI_BASE_URL").map_or_else(|| OPENAI_BASE_URL.to_owned(), |u| u.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_openai_key_goes_to_openai() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            base_url_from_env(env(&[("OPENAI_API_KEY", "sk-oa")])).as_deref(),
            Some(OPENAI_BASE_URL)
        );
        assert_eq!(
            base_url_from_env(env(&[
                ("OPENAI_API_KEY", "sk-oa"),
                ("OPENAI_BASE_URL", " http://127.0.0.1:8000/v1 ")
            ]))
            .as_deref(),
            Some("http://127.0.0.1:8000/v1")
        );
        // OpenRouter's key wins (keys_from_env's order) and keeps the default base.
        assert_eq!(
            base_url_from_env(env(&[
                ("OPENAI_API_KEY", "sk-oa"),
                ("OPENROUTER_API_KEY", "sk-or")
            ])),
            None
        );
        assert_eq!(
            base_url_from_env(env(&[
                ("OPENROUTER_API_KEY", "sk-or"),
                ("OPENROUTER_BASE_URL", "http://127.0.0.1:9/api/v1")
            ]))
            .as_deref(),
            Some("http://127.0.0.1:9/api/v1")
        );
        assert_eq!(
            base_url_from_env(env(&[
                ("KEYPOOL_API_KEYS", "sk-1"),
                ("OPENAI_API_KEY", "sk-oa")
            ])),
            None
        );
        assert_eq!(base_url_from_env(env(&[])), None);
    }

    fn entry(label: Option<&str>, key: &str) -> KeyEntry {
        KeyEntry {
            label: label.map(str::to_owned),
            key: key.to_owned(),
            settings: Vec::new(),
        }
    }

    #[test]
    fn a_keys_file_line_may_carry_its_settings() {
        let keys = parse_keys_file(
            "a sk-1 rpm=60 tpm=100000\nsk-2 max_concurrent=8\nb c2st== weight=3\nsk-x=1\n",
            "k",
        )
        .unwrap();
        assert_eq!(keys[0].settings, vec![("rpm", 60), ("tpm", 100_000)]);
        assert_eq!(
            (keys[0].label.as_deref(), keys[0].key.as_str()),
            (Some("a"), "sk-1")
        );
        assert_eq!(keys[1].settings, vec![("max_concurrent", 8)]);
        assert_eq!(keys[2].key, "c2st==");
        assert_eq!(keys[2].settings, vec![("weight", 3)]);
        // `=` in a key that is no setting stays key text.
        assert_eq!(
            (keys[3].key.as_str(), keys[3].settings.len()),
            ("sk-x=1", 0)
        );
        let err = parse_keys_file("a sk-1 rpm=fast\n", "k").unwrap_err();
        assert_eq!(err, "k:1: rpm must be a whole number");
        let err = parse_keys_file("a sk-secret extra rpm=5\n", "k").unwrap_err();
        assert!(
            err.starts_with("k:1: expected") && !err.contains("secret"),
            "{err}"
        );
    }

    #[test]
    fn keys_file_lines_labels_comments_blanks() {
        let text =
            "# my keys\n\nsk-one\n  acct-b \t sk-two  \n   # indented comment\r\nsk-three\r\n\n";
        let keys = parse_keys_file(text, "keys.txt").unwrap();
        assert_eq!(
            keys,
            vec![
                entry(None, "sk-one"),
                entry(Some("acct-b"), "sk-two"),
                entry(None, "sk-three"),
            ]
        );
    }

    #[test]
    fn keys_file_errors_name_the_line_not_the_key() {
        let err = parse_keys_file("sk-ok\na b sk-secret-1\n", "k.txt").unwrap_err();
        assert!(err.starts_with("k.txt:2: expected"), "{err}");
        let err = parse_keys_file("sk-secret\u{7}x\n", "k.txt").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
        let err = parse_keys_file("# only comments\n\n", "k.txt").unwrap_err();
        assert_eq!(err, "k.txt: no keys found");
    }

    #[test]
    fn equals_signs_are_key_text_never_a_separator() {
        let keys = parse_keys_file("c2stYWJj==\nlbl sk-abc=def\na=b\n", "k").unwrap();
        assert_eq!(
            keys,
            vec![
                entry(None, "c2stYWJj=="),
                entry(Some("lbl"), "sk-abc=def"),
                entry(None, "a=b"),
            ]
        );
    }

    #[test]
    fn newline_in_env_key_says_newline_and_padding_is_trimmed() {
        let err = keys_from_env(|n: &str| (n == "OPENAI_API_KEY").then(|| "sk-a\nsk-b".into()))
            .unwrap_err();
        assert_eq!(err, "OPENAI_API_KEY: the key contains a newline");
        let got = keys_from_env(|n: &str| (n == "OPENAI_API_KEY").then(|| " sk-a\n".into()));
        assert_eq!(got.unwrap(), Some(vec![entry(None, "sk-a")]));
    }

    #[test]
    fn env_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(keys_from_env(env(&[])).unwrap(), None);
        assert_eq!(
            keys_from_env(env(&[("OPENAI_API_KEY", "sk-oa")])).unwrap(),
            Some(vec![entry(None, "sk-oa")])
        );
        assert_eq!(
            keys_from_env(env(&[
                ("OPENAI_API_KEY", "sk-oa"),
                ("OPENROUTER_API_KEY", "sk-or")
            ]))
            .unwrap(),
            Some(vec![entry(None, "sk-or")])
        );
        assert_eq!(
            keys_from_env(env(&[
                ("OPENROUTER_API_KEY", "sk-or"),
                ("KEYPOOL_API_KEYS", "sk-1, b sk-2,,")
            ]))
            .unwrap(),
            Some(vec![entry(None, "sk-1"), entry(Some("b"), "sk-2")])
        );
        assert!(keys_from_env(env(&[("KEYPOOL_API_KEYS", "a b c")])).is_err());
        // Blank values fall through.
        assert_eq!(
            keys_from_env(env(&[("KEYPOOL_API_KEYS", " "), ("OPENAI_API_KEY", "k")])).unwrap(),
            Some(vec![entry(None, "k")])
        );
    }
}
