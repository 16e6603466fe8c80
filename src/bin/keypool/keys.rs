//! Where the API keys come from: a keys file, or the environment.
//!
//! Error messages name the file and line, never the line's content: it could be a key.

use std::path::Path;

/// One key read from a keys file or the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// Optional label (`label=key`); `None` means the library's default `key-<index>`.
    pub label: Option<String>,
    /// The secret.
    pub key: String,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("label", &self.label)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Parses one `key` or `label=key` entry. `what` names its origin for errors.
fn parse_entry(entry: &str, what: &str) -> Result<KeyEntry, String> {
    match entry.split_once('=') {
        Some((label, key)) => {
            let (label, key) = (label.trim(), key.trim());
            if label.is_empty() {
                return Err(format!("{what}: empty label before '='"));
            }
            if key.is_empty() {
                return Err(format!("{what}: empty key after '='"));
            }
            if label.chars().any(char::is_whitespace) {
                return Err(format!("{what}: label must not contain spaces"));
            }
            Ok(KeyEntry {
                label: Some(label.to_owned()),
                key: key.to_owned(),
            })
        }
        None => {
            if entry.chars().any(char::is_whitespace) {
                return Err(format!("{what}: a key must not contain spaces"));
            }
            Ok(KeyEntry {
                label: None,
                key: entry.to_owned(),
            })
        }
    }
}

/// Parses a keys file's text: one key per line, optionally `label=key`; lines whose
/// first non-blank character is `#` and blank lines are ignored. `name` is the file
/// name used in errors.
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

/// Keys from the environment: `KEYPOOL_API_KEYS` (comma-separated, each `key` or
/// `label=key`), else `OPENROUTER_API_KEY`, else `OPENAI_API_KEY`. `Ok(None)` when none
/// is set. `get` looks a variable up (a parameter so tests need not touch the process
/// environment).
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
                return Ok(Some(vec![KeyEntry {
                    label: None,
                    key: key.to_owned(),
                }]));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(label: Option<&str>, key: &str) -> KeyEntry {
        KeyEntry {
            label: label.map(str::to_owned),
            key: key.to_owned(),
        }
    }

    #[test]
    fn keys_file_lines_labels_comments_blanks() {
        let text =
            "# my keys\n\nsk-one\n  acct-b = sk-two  \n   # indented comment\r\nsk-three\r\n\n";
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
        let err = parse_keys_file("sk-ok\n=sk-secret-1\n", "k.txt").unwrap_err();
        assert_eq!(err, "k.txt:2: empty label before '='");
        let err = parse_keys_file("a=\n", "k.txt").unwrap_err();
        assert_eq!(err, "k.txt:1: empty key after '='");
        let err = parse_keys_file("sk-secret 2\n", "k.txt").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
        let err = parse_keys_file("# only comments\n\n", "k.txt").unwrap_err();
        assert_eq!(err, "k.txt: no keys found");
    }

    #[test]
    fn key_may_contain_equals_after_the_label() {
        let keys = parse_keys_file("lbl=sk-abc=def\n", "k").unwrap();
        assert_eq!(keys, vec![entry(Some("lbl"), "sk-abc=def")]);
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
                ("KEYPOOL_API_KEYS", "sk-1, b=sk-2,,")
            ]))
            .unwrap(),
            Some(vec![entry(None, "sk-1"), entry(Some("b"), "sk-2")])
        );
        assert!(keys_from_env(env(&[("KEYPOOL_API_KEYS", "=x")])).is_err());
        // Blank values fall through.
        assert_eq!(
            keys_from_env(env(&[("KEYPOOL_API_KEYS", " "), ("OPENAI_API_KEY", "k")])).unwrap(),
            Some(vec![entry(None, "k")])
        );
    }
}
