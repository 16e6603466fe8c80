//! Resuming: what an existing output file already answers, and repairing a last line
//! cut short by a crash.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;

use serde::Deserialize;

/// A 127-bit fingerprint of a `custom_id` (the lowest bit is 0): a million ids cost
/// ~40 MiB instead of the strings themselves, and a collision (about 2^-88 for a
/// million ids) is negligible.
pub fn fingerprint(custom_id: &str) -> u128 {
    let mut a = std::hash::DefaultHasher::new();
    custom_id.hash(&mut a);
    let mut b = std::hash::DefaultHasher::new();
    0x6b70_u16.hash(&mut b);
    custom_id.hash(&mut b);
    ((u128::from(a.finish()) << 64) | u128::from(b.finish())) & !1
}

/// What an existing output file holds.
#[derive(Default)]
pub struct Prior {
    /// Per answered `custom_id`: its fingerprint, with the lowest bit set when its
    /// last record is a success.
    state: HashSet<u128>,
    /// Lines that were not records (skipped with a warning).
    pub bad_lines: u64,
    /// What was done to a last line without its newline, if anything.
    pub repaired: Option<&'static str>,
}

impl Prior {
    /// `Some(true)` when answered successfully, `Some(false)` when its last record is a
    /// failure, `None` when not answered.
    pub fn get(&self, custom_id: &str) -> Option<bool> {
        let fp = fingerprint(custom_id);
        if self.state.contains(&(fp | 1)) {
            Some(true)
        } else if self.state.contains(&fp) {
            Some(false)
        } else {
            None
        }
    }

    /// Records that `custom_id`'s latest record is a success (`ok`) or a failure.
    fn set(&mut self, custom_id: &str, ok: bool) {
        let fp = fingerprint(custom_id);
        self.state.remove(&(fp | u128::from(!ok)));
        self.state.insert(fp | u128::from(ok));
    }
}

#[derive(Deserialize)]
struct Seen {
    custom_id: String,
    #[serde(default)]
    error: serde_json::Value,
}

fn parse(line: &[u8]) -> Option<Seen> {
    serde_json::from_slice::<Seen>(line).ok()
}

/// Reads `path` (which exists) and repairs its tail: a complete record missing only its
/// newline gets one; an incomplete last line (a crash mid-write) is cut off, so its
/// request runs again.
pub fn scan(path: &Path) -> std::io::Result<Prior> {
    let mut prior = Prior::default();
    let file = File::open(path)?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut buf = Vec::new();
    let mut complete_end = 0u64;
    let mut tail: Option<Vec<u8>> = None;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            tail = Some(std::mem::take(&mut buf));
            break;
        }
        complete_end += n as u64;
        let line = buf.trim_ascii();
        if line.is_empty() {
            continue;
        }
        match parse(line) {
            Some(seen) => {
                prior.set(&seen.custom_id, seen.error.is_null());
            }
            None => prior.bad_lines += 1,
        }
    }
    drop(reader);
    if let Some(tail) = tail {
        let mut f = OpenOptions::new().write(true).open(path)?;
        match parse(tail.trim_ascii()) {
            Some(seen) => {
                prior.set(&seen.custom_id, seen.error.is_null());
                f.seek(SeekFrom::End(0))?;
                f.write_all(b"\n")?;
                prior.repaired = Some("added the missing newline after its last record");
            }
            None => {
                f.set_len(complete_end)?;
                prior.repaired = Some("removed an incomplete last line (it will be re-run)");
            }
        }
        f.sync_all()?;
    }
    Ok(prior)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, content: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("keypool-resume-{}-{name}", std::process::id()));
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn last_record_wins_and_truncated_tail_is_cut() {
        let text = concat!(
            r#"{"custom_id":"a","error":null}"#,
            "\n",
            r#"{"custom_id":"b","error":{"code":"http"}}"#,
            "\n",
            "garbage\n",
            r#"{"custom_id":"c","error":{"code":"http"}}"#,
            "\n",
            r#"{"custom_id":"c","error":null}"#,
            "\n",
            r#"{"custom_id":"d","err"#
        );
        let p = tmp("trunc", text.as_bytes());
        let prior = scan(&p).unwrap();
        assert_eq!(prior.get("a"), Some(true));
        assert_eq!(prior.get("b"), Some(false));
        assert_eq!(prior.get("c"), Some(true));
        assert_eq!(prior.get("d"), None);
        assert_eq!(prior.bad_lines, 1);
        assert!(prior.repaired.is_some());
        let after = std::fs::read_to_string(&p).unwrap();
        assert!(after.ends_with("\"error\":null}\n"), "{after}");
        assert_eq!(after.lines().count(), 5);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn complete_tail_gets_newline() {
        let p = tmp("nl", br#"{"custom_id":"a","error":null}"#);
        let prior = scan(&p).unwrap();
        assert_eq!(prior.get("a"), Some(true));
        assert!(std::fs::read_to_string(&p).unwrap().ends_with("}\n"));
        let again = scan(&p).unwrap();
        assert!(again.repaired.is_none());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn fingerprints_differ() {
        assert_ne!(fingerprint("a"), fingerprint("b"));
        assert_eq!(fingerprint("req-1"), fingerprint("req-1"));
    }
}
