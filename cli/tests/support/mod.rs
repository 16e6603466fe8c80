//! Helpers shared by the `keypool` end-to-end tests: a scratch directory, the binary
//! with a clean key environment, request lines and output records.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use keypool_mock::{KeyRule, MockConfig, MockServer};
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
    /// Writes `lines` as this directory's `in.jsonl`.
    pub fn write_input(&self, lines: &[String]) {
        write_lines(&self.path("in.jsonl"), lines);
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

/// `keypool run` with both test keys from `input` to `output` (files in `dir`, or `-`)
/// against `url`.
pub fn run_cmd(dir: &Dir, input: &str, output: &str, url: &str) -> Command {
    let mut c = with_keys(keypool());
    let file = |f: &str| if f == "-" { "-".to_owned() } else { dir.s(f) };
    c.args(["run", "-i", &file(input), "-o", &file(output)])
        .args(["--base-url", url]);
    c
}

/// Fails the test if `text` (what is named by `what`) shows a test key.
pub fn assert_no_secret(what: &str, text: &str) {
    assert!(!text.contains(SECRET), "a key leaked into {what}: {text}");
}

/// Runs `c` to its exit with stdout and stderr captured; neither may show a test key.
pub fn run_to_end(mut c: Command) -> Output {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = c.output().unwrap();
    assert_no_secret("stdout", &String::from_utf8_lossy(&out.stdout));
    assert_no_secret("stderr", &String::from_utf8_lossy(&out.stderr));
    out
}

/// Spawns `c` with stdout and stderr piped.
pub fn spawn_piped(c: &mut Command) -> Child {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().unwrap()
}

/// Sends `child` SIGINT, as Ctrl-C does.
pub fn interrupt(child: &Child) {
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Reads the rest of a piped stderr of `child`.
pub fn read_stderr(child: &mut Child) -> String {
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

/// The stderr of a finished run, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A mock server with the default configuration.
pub fn default_mock() -> MockServer {
    MockServer::start(MockConfig::default()).unwrap()
}

/// Makes `server` answer every request made with `key` with HTTP `status`.
pub fn fail_key(server: &MockServer, key: &str, status: u16) {
    server.set_key_rule(
        key,
        KeyRule {
            always_status: Some(status),
            ..Default::default()
        },
    );
}

/// `n` request lines with custom ids `{prefix}-0`, `{prefix}-1`, … and content "x".
pub fn x_lines(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| line(&format!("{prefix}-{i}"), body("x", None)))
        .collect()
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
