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
    /// Records read.
    pub records: u64,
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

/// Why an existing output file cannot be resumed.
#[derive(Debug)]
pub enum ScanError {
    /// Reading or repairing it failed.
    Io(std::io::Error),
    /// It holds a line that is not a keypool output record: it is not ours, and it is
    /// left untouched.
    NotOutput {
        /// 1-based line number of the first such line.
        line: u64,
    },
}

impl From<std::io::Error> for ScanError {
    fn from(e: std::io::Error) -> ScanError {
        ScanError::Io(e)
    }
}

/// The fields every keypool output record has (see `output.rs`): a `batch_req_` id, a
/// string `custom_id`, an `error` (null on success), and a `keypool` object with the
/// input `line`.
#[derive(Deserialize)]
struct Seen {
    id: String,
    custom_id: String,
    error: Option<serde::de::IgnoredAny>,
    #[allow(dead_code)] // required: its presence marks a keypool record
    keypool: SeenMeta,
}

#[derive(Deserialize)]
struct SeenMeta {
    #[allow(dead_code)]
    line: u64,
}

/// The first bytes of every record `output.rs` writes (serde keeps field order).
const RECORD_START: &[u8] = br#"{"id":"batch_req_"#;

fn parse(line: &[u8]) -> Option<Seen> {
    // UTF-8 first: `from_slice` does not check strings it skips (the `error` object),
    // so a corrupted line would pass for a record (found by the cli_resume fuzz target).
    let seen = serde_json::from_str::<Seen>(std::str::from_utf8(line).ok()?).ok()?;
    seen.id.starts_with("batch_req_").then_some(seen)
}

/// Whether `tail` could be a record cut short while being written: a prefix of a line
/// `output.rs` writes.
fn looks_like_cut_record(tail: &[u8]) -> bool {
    let n = tail.len().min(RECORD_START.len());
    n > 0 && tail[..n] == RECORD_START[..n]
}

/// Reads `path` (which exists) and checks that every line is a keypool output record;
/// if one is not, returns [`ScanError::NotOutput`] without changing a byte. Then
/// repairs the tail, only when every earlier line is a record: a complete record
/// missing only its newline gets one; a cut-off record (a crash mid-write) is removed,
/// so its request runs again. A last line that is neither is refused like any other.
pub fn scan(path: &Path) -> Result<Prior, ScanError> {
    let mut prior = Prior::default();
    let file = File::open(path)?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut buf = Vec::new();
    let mut complete_end = 0u64;
    let mut tail: Option<Vec<u8>> = None;
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        line_no += 1;
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
                prior.set(&seen.custom_id, seen.error.is_none());
                prior.records += 1;
            }
            None => return Err(ScanError::NotOutput { line: line_no }),
        }
    }
    drop(reader);
    if let Some(tail) = tail {
        let fix = match parse(tail.trim_ascii()) {
            Some(seen) => {
                prior.set(&seen.custom_id, seen.error.is_none());
                prior.records += 1;
                true
            }
            None if looks_like_cut_record(&tail) => false,
            None => return Err(ScanError::NotOutput { line: line_no }),
        };
        let mut f = OpenOptions::new().write(true).open(path)?;
        if fix {
            f.seek(SeekFrom::End(0))?;
            f.write_all(b"\n")?;
            prior.repaired = Some("added the missing newline after its last record");
        } else {
            f.set_len(complete_end)?;
            prior.repaired = Some("removed an incomplete last record (it will be re-run)");
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
            r#"{"id":"batch_req_1","custom_id":"a","error":null,"keypool":{"line":1}}"#,
            "\n",
            r#"{"id":"batch_req_2","custom_id":"b","error":{"code":"http"},"keypool":{"line":2}}"#,
            "\n\n",
            r#"{"id":"batch_req_3","custom_id":"c","error":{"code":"http"},"keypool":{"line":3}}"#,
            "\n",
            r#"{"id":"batch_req_4","custom_id":"c","error":null,"keypool":{"line":3}}"#,
            "\n",
            r#"{"id":"batch_req_5","custom_id":"d","err"#
        );
        let p = tmp("trunc", text.as_bytes());
        let prior = scan(&p).unwrap();
        assert_eq!(prior.get("a"), Some(true));
        assert_eq!(prior.get("b"), Some(false));
        assert_eq!(prior.get("c"), Some(true));
        assert_eq!(prior.get("d"), None);
        assert_eq!(prior.records, 4);
        assert!(prior.repaired.is_some());
        let after = std::fs::read_to_string(&p).unwrap();
        assert!(after.ends_with("\"line\":3}}\n"), "{after}");
        assert_eq!(after.lines().count(), 5);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn complete_tail_gets_newline() {
        let p = tmp(
            "nl",
            br#"{"id":"batch_req_1","custom_id":"a","error":null,"keypool":{"line":1}}"#,
        );
        let prior = scan(&p).unwrap();
        assert_eq!(prior.get("a"), Some(true));
        assert!(std::fs::read_to_string(&p).unwrap().ends_with("}\n"));
        let again = scan(&p).unwrap();
        assert!(again.repaired.is_none());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn foreign_files_are_refused_untouched() {
        for (name, text) in [
            ("keys", &b"sk-one\nsk-two"[..]),
            ("requests", b"{\"custom_id\":\"a\",\"body\":{}}\n"),
            (
                "mixed",
                b"{\"id\":\"batch_req_1\",\"custom_id\":\"a\",\"error\":null,\"keypool\":{\"line\":1}}\nnotes\n",
            ),
            (
                "not-utf8",
                b"{\"id\":\"batch_req_1\",\"custom_id\":\"a\",\"error\":{\"code\":\"h\xff\"},\"keypool\":{\"line\":1}}\n",
            ),
            (
                "partial",
                b"hello\n{\"id\":\"batch_req_1\",\"custom_id\":\"a",
            ),
        ] {
            let p = tmp(name, text);
            assert!(matches!(scan(&p), Err(ScanError::NotOutput { .. })), "{name}");
            assert_eq!(std::fs::read(&p).unwrap(), text, "{name}");
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn fingerprints_differ() {
        assert_ne!(fingerprint("a"), fingerprint("b"));
        assert_eq!(fingerprint("req-1"), fingerprint("req-1"));
    }
}
