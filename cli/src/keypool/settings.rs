//! Builds the library's [`keypool::Config`] from `--config`, `--keys-file`, the
//! environment and the flags that override them. All validation beyond the flags' own
//! ranges is the library's (`Config::from_json`).

use std::path::PathBuf;

use serde_json::{Map, Value, json};

use crate::keys::{KeyEntry, base_url_from_env, keys_from_env, read_keys_file};

/// Flags that shape the pool.
#[derive(Debug, Default, Clone)]
pub struct PoolFlags {
    /// `--config`: a JSON config file.
    pub config: Option<PathBuf>,
    /// `--keys-file`: replaces the config's keys.
    pub keys_file: Option<PathBuf>,
    /// `--base-url`.
    pub base_url: Option<String>,
    /// `--per-key`: `max_concurrent` of every key.
    pub per_key: Option<usize>,
    /// `--rpm`: `rpm` on every key.
    pub rpm: Option<u32>,
    /// `--tpm`: `tpm` on every key.
    pub tpm: Option<u64>,
    /// `--strategy`.
    pub strategy: Option<String>,
    /// `--max-attempts`: `retry.max_attempts`.
    pub max_attempts: Option<u32>,
    /// `--timeout-ms`: per-attempt timeout.
    pub timeout_ms: Option<u64>,
    /// `--shared`: `shared.redis_url`.
    pub shared: Option<String>,
    /// `--adaptive`: `adaptive: true` on every key.
    pub adaptive: bool,
    /// `--credits-floor`: `credits.check` on, `credits.floor` this.
    pub credits_floor: Option<f64>,
    /// `--max-cost`: `max_cost`.
    pub max_cost: Option<f64>,
    /// `--ca-file`: `tls.ca_file`.
    pub ca_file: Option<PathBuf>,
}

/// Checks the flags' own ranges, with messages naming the flag.
fn check_flags(f: &PoolFlags) -> Result<(), String> {
    let max = keypool::MAX_CONCURRENT_LIMIT;
    if let Some(n) = f.per_key {
        if n == 0 || n > max {
            return Err(format!("--per-key must be between 1 and {max}"));
        }
    }
    if f.max_attempts == Some(0) {
        return Err("--max-attempts must be at least 1".into());
    }
    if f.credits_floor.is_some_and(|x| !x.is_finite() || x < 0.0) {
        return Err("--credits-floor must be a number of dollars, 0 or more".into());
    }
    if f.max_cost.is_some_and(|x| !x.is_finite() || x < 0.0) {
        return Err("--max-cost must be a number of dollars, 0 or more".into());
    }
    if f.timeout_ms == Some(0) {
        return Err("--timeout-ms must be at least 1".into());
    }
    if let Some(s) = &f.strategy {
        if s.parse::<keypool::Strategy>().is_err() {
            return Err(format!(
                "--strategy must be first_available, round_robin or least_loaded, got {s:?}"
            ));
        }
    }
    Ok(())
}

fn key_json(k: &KeyEntry) -> Value {
    let mut o = Map::new();
    o.insert("key".into(), Value::String(k.key.clone()));
    if let Some(l) = &k.label {
        o.insert("label".into(), Value::String(l.clone()));
    }
    for (name, v) in &k.settings {
        o.insert((*name).into(), json!(v));
    }
    Value::Object(o)
}

/// Normalises and checks the final key list, whatever its source (config JSON, keys
/// file, environment): surrounding whitespace is padding and is trimmed, an inner
/// newline or space is an error that says so, and a key listed twice (under any labels)
/// is refused, naming both labels: it would double one account's concurrency. Messages
/// never quote a key.
fn check_keys(root: &mut Map<String, Value>) -> Result<(), String> {
    let Some(Value::Array(keys)) = root.get_mut("keys") else {
        return Ok(());
    };
    let mut seen: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (i, k) in keys.iter_mut().enumerate() {
        let Value::Object(k) = k else { continue };
        let label = match k.get("label") {
            Some(Value::String(l)) => l.clone(),
            _ => format!("key-{i}"),
        };
        let Some(Value::String(key)) = k.get_mut("key") else {
            continue;
        };
        let trimmed = key.trim();
        if trimmed.len() != key.len() {
            *key = trimmed.to_owned();
        }
        crate::keys::check_key(key, &format!("keys[{i}].key"))?;
        if let Some(first) = seen.insert(key.clone(), label.clone()) {
            return Err(format!(
                "the same API key is listed twice, as {first} and {label}: list each key \
                 once (twice would double that account's requests in flight)"
            ));
        }
    }
    Ok(())
}

/// Builds and validates the pool config. `env` looks environment variables up.
pub fn build_config(
    flags: &PoolFlags,
    env: impl Fn(&str) -> Option<String>,
) -> Result<keypool::Config, String> {
    check_flags(flags)?;
    let mut root = match &flags.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --config {}: {e}", path.display()))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| {
                format!(
                    "--config {}: not valid JSON (line {}, column {})",
                    path.display(),
                    e.line(),
                    e.column()
                )
            })?;
            match v {
                Value::Object(m) => m,
                _ => {
                    return Err(format!(
                        "--config {}: must be a JSON object",
                        path.display()
                    ));
                }
            }
        }
        None => Map::new(),
    };
    let config_has_keys = root
        .get("keys")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    let keys = match &flags.keys_file {
        // Both would silently drop the config's per-key settings (rpm, models, …).
        Some(_) if config_has_keys => {
            return Err(
                "--keys-file and a --config with keys[]: keep keys and their settings in one \
                 place — the config's keys[] (key, label, rpm, tpm, max_concurrent, …) or \
                 the keys file (LABEL KEY rpm=N tpm=N max_concurrent=N weight=N) with a \
                 config without keys"
                    .into(),
            );
        }
        Some(path) => Some(read_keys_file(path)?),
        None if config_has_keys => None,
        None => {
            let keys = keys_from_env(&env)?.ok_or(
                "no API keys: pass --config or --keys-file, or set KEYPOOL_API_KEYS, \
                 OPENROUTER_API_KEY or OPENAI_API_KEY",
            )?;
            // A key from the environment goes where its own client would send it
            // (an OpenAI key to OpenAI), unless the run names a base URL.
            if !root.contains_key("base_url") {
                if let Some(url) = base_url_from_env(&env) {
                    root.insert("base_url".into(), json!(url));
                }
            }
            Some(keys)
        }
    };
    if let Some(keys) = keys {
        root.insert("keys".into(), keys.iter().map(key_json).collect());
    }
    check_keys(&mut root)?;
    if let Some(url) = &flags.base_url {
        root.insert("base_url".into(), json!(url));
    }
    if let Some(s) = &flags.strategy {
        root.insert("strategy".into(), json!(s));
    }
    if let Some(ms) = flags.timeout_ms {
        root.insert("timeout_ms".into(), json!(ms));
    }
    if let Some(n) = flags.max_attempts {
        let retry = root.entry("retry").or_insert_with(|| json!({}));
        if let Value::Object(r) = retry {
            r.insert("max_attempts".into(), json!(n));
        }
    }
    if let Some(url) = &flags.shared {
        let shared = root.entry("shared").or_insert_with(|| json!({}));
        if let Value::Object(s) = shared {
            s.insert("redis_url".into(), json!(url));
        }
    }
    if let Some(floor) = flags.credits_floor {
        let credits = root.entry("credits").or_insert_with(|| json!({}));
        if let Value::Object(c) = credits {
            c.insert("check".into(), json!(true));
            c.insert("floor".into(), json!(floor));
        }
    }
    if let Some(dollars) = flags.max_cost {
        root.insert("max_cost".into(), json!(dollars));
    }
    if let Some(path) = &flags.ca_file {
        let tls = root.entry("tls").or_insert_with(|| json!({}));
        if let Value::Object(t) = tls {
            t.insert("ca_file".into(), json!(path.to_string_lossy()));
        }
    }
    if let Some(Value::Array(keys)) = root.get_mut("keys") {
        for k in keys {
            if let Value::Object(k) = k {
                if let Some(n) = flags.per_key {
                    k.insert("max_concurrent".into(), json!(n));
                }
                if let Some(n) = flags.rpm {
                    k.insert("rpm".into(), json!(n));
                }
                if let Some(n) = flags.tpm {
                    k.insert("tpm".into(), json!(n));
                }
                if flags.adaptive {
                    k.insert("adaptive".into(), json!(true));
                }
            }
        }
    }
    keypool::Config::from_json(&Value::Object(root).to_string()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn adaptive_and_credit_flags() {
        let flags = PoolFlags {
            adaptive: true,
            credits_floor: Some(0.5),
            ..PoolFlags::default()
        };
        let env = |n: &str| (n == "KEYPOOL_API_KEYS").then(|| "a sk-1,sk-2".to_owned());
        let c = build_config(&flags, env).unwrap();
        assert!(c.keys.iter().all(|k| k.adaptive));
        assert!(c.credits.check);
        assert_eq!(c.credits.floor, 0.5);
        let bad = PoolFlags {
            credits_floor: Some(-1.0),
            ..PoolFlags::default()
        };
        assert!(
            build_config(&bad, env)
                .unwrap_err()
                .contains("--credits-floor")
        );
    }

    #[test]
    fn env_keys_with_flag_overrides() {
        let flags = PoolFlags {
            base_url: Some("http://127.0.0.1:9/v1".into()),
            per_key: Some(7),
            strategy: Some("round_robin".into()),
            max_attempts: Some(1),
            ..PoolFlags::default()
        };
        let env = |n: &str| (n == "KEYPOOL_API_KEYS").then(|| "a sk-1,sk-2".to_owned());
        let c = build_config(&flags, env).unwrap();
        assert_eq!(c.keys.len(), 2);
        assert_eq!(c.key_label(0), "a");
        assert_eq!(c.key_label(1), "key-1");
        assert!(c.keys.iter().all(|k| k.max_concurrent == 7));
        assert_eq!(c.strategy, keypool::Strategy::RoundRobin);
        assert_eq!(c.retry.max_attempts, 1);
        assert_eq!(c.base_url, "http://127.0.0.1:9/v1");
    }

    #[test]
    fn shared_flag_sets_the_redis_url() {
        let flags = PoolFlags {
            shared: Some("redis://127.0.0.1:6379/0".into()),
            ..PoolFlags::default()
        };
        let env = |n: &str| (n == "KEYPOOL_API_KEYS").then(|| "sk-1".to_owned());
        let r = build_config(&flags, env);
        if cfg!(feature = "redis") {
            let c = r.unwrap();
            let s = c.shared.expect("shared");
            assert_eq!(s.redis_url, "redis://127.0.0.1:6379/0");
            assert_eq!(s.namespace, "keypool");
        } else {
            let e = r.unwrap_err();
            assert!(e.contains("shared") && e.contains("redis"), "{e}");
        }
    }

    #[test]
    fn flag_errors_name_the_flag() {
        let flags = PoolFlags {
            per_key: Some(0),
            ..PoolFlags::default()
        };
        assert_eq!(
            build_config(&flags, no_env).unwrap_err(),
            "--per-key must be between 1 and 1024"
        );
        let err = build_config(&PoolFlags::default(), no_env).unwrap_err();
        assert!(err.starts_with("no API keys"), "{err}");
    }

    #[test]
    fn config_file_keys_and_keys_file_override() {
        let dir = std::env::temp_dir().join(format!("keypool-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("pool.json");
        std::fs::write(
            &cfg,
            r#"{"base_url": "http://localhost:1/v1", "keys": [{"key": "sk-c", "label": "c", "max_concurrent": 3}], "retry": {"base_delay_ms": 10}}"#,
        )
        .unwrap();
        let flags = PoolFlags {
            config: Some(cfg.clone()),
            ..PoolFlags::default()
        };
        let c = build_config(&flags, no_env).unwrap();
        assert_eq!(
            (c.key_label(0).as_str(), c.keys[0].max_concurrent),
            ("c", 3)
        );
        // A keys file with a config that has keys: refused (it would drop the config's
        // per-key settings), saying how to do it.
        let kf = dir.join("keys.txt");
        std::fs::write(&kf, "x sk-x rpm=60 max_concurrent=2\n").unwrap();
        let flags = PoolFlags {
            config: Some(cfg),
            keys_file: Some(kf.clone()),
            max_attempts: Some(2),
            ..PoolFlags::default()
        };
        let e = build_config(&flags, no_env).unwrap_err();
        assert!(e.contains("one place") && !e.contains("sk-"), "{e}");
        // With a config without keys: the file's keys and their settings, the config's
        // other fields, and --tpm on every key.
        let bare = dir.join("bare.json");
        std::fs::write(&bare, r#"{"retry": {"base_delay_ms": 10}}"#).unwrap();
        let flags = PoolFlags {
            config: Some(bare),
            keys_file: Some(kf),
            max_attempts: Some(2),
            tpm: Some(50_000),
            ..PoolFlags::default()
        };
        let c = build_config(&flags, no_env).unwrap();
        assert_eq!(c.key_label(0), "x");
        assert_eq!((c.keys[0].rpm, c.keys[0].max_concurrent), (Some(60), 2));
        assert_eq!(c.keys[0].tpm, Some(50_000));
        assert_eq!(c.retry.base_delay_ms, 10);
        assert_eq!(c.retry.max_attempts, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
