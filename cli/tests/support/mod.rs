//! Helpers shared by the `keypool` end-to-end tests: a scratch directory, the binary
//! with a clean key environment, request lines and output records.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

pub const SECRET: &str = "SECRET";
pub const KEY_A: &str = "sk-test-SECRET-alpha";
pub const KEY_B: &str = "sk-test-SECRET-beta";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keypool")
}

/// A fresh directory for one test, removed when dropped.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("keypool-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
    pub fn s(&self, f: &str) -> String {
        self.path(f).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `keypool` with a clean key environment.
pub fn keypool() -> Command {
    let mut c = Command::new(bin());
    c.env_remove("KEYPOOL_API_KEYS")
        .env_remove("OPENROUTER_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .stdin(Stdio::null());
    c
}

pub fn with_keys(mut c: Command) -> Command {
    c.env("KEYPOOL_API_KEYS", format!("alpha {KEY_A},beta {KEY_B}"));
    c
}

pub fn body(content: &str, mock: Option<Value>) -> Value {
    let mut b = json!({"model": "m", "messages": [{"role": "user", "content": content}]});
    if let Some(m) = mock {
        b["mock"] = m;
    }
    b
}

pub fn line(id: &str, body: Value) -> String {
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
        .to_string()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

pub fn records(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record {l:?}: {e}")))
        .collect()
}

pub fn read_records(path: &Path) -> Vec<Value> {
    records(&std::fs::read_to_string(path).unwrap())
}

pub fn id(r: &Value) -> &str {
    r["custom_id"].as_str().unwrap()
}

pub fn ok(r: &Value) -> bool {
    r["error"].is_null()
}
