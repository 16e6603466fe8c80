//! Input lines: OpenAI Batch API request lines, or bare request bodies.

use std::io::BufRead;

use serde_json::Value;

/// One non-blank input line, parsed.
#[derive(Debug)]
pub struct InputItem {
    /// 1-based line number in the input.
    pub line: u64,
    /// The line's `custom_id`, or `line-<n>` when it has none (or is malformed).
    pub custom_id: String,
    /// The request to send, or why the line cannot be sent.
    pub request: Result<keypool::Request, String>,
    /// The body asks for `"stream": true`: the line runs streamed
    /// (`Pool::submit_stream_with`) and its record holds the assembled completion.
    pub stream: bool,
}

/// Reads non-blank lines lazily, one at a time.
pub struct Lines<R> {
    reader: R,
    buf: Vec<u8>,
    line: u64,
}

impl<R: BufRead> Lines<R> {
    /// Wraps a reader.
    pub fn new(reader: R) -> Lines<R> {
        Lines {
            reader,
            buf: Vec::new(),
            line: 0,
        }
    }
}

impl<R: BufRead> Iterator for Lines<R> {
    /// `(line number, content)`; content is `Err` when the line is not UTF-8.
    type Item = std::io::Result<(u64, Result<String, String>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
            }
            self.line += 1;
            let text = match std::str::from_utf8(&self.buf) {
                Ok(t) => t.trim(),
                Err(_) => {
                    return Some(Ok((self.line, Err("line is not valid UTF-8".to_owned()))));
                }
            };
            if text.is_empty() {
                continue;
            }
            return Some(Ok((self.line, Ok(text.to_owned()))));
        }
    }
}

/// Whether a request body asks for a streamed answer.
fn is_stream(body: &Value) -> bool {
    body.get("stream")
        .is_some_and(|s| s != &Value::Bool(false) && !s.is_null())
}

/// The id used for a line without a `custom_id`.
pub fn line_id(line: u64) -> String {
    format!("line-{line}")
}

/// The id of a line that is not valid JSON: its `"custom_id": "…"` when that can still
/// be read (a plain string, no escapes, at most 256 bytes), else `line-<n>`. Its error
/// record then carries the id the user gave it.
fn salvaged_id(line: u64, text: &[u8]) -> String {
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let read = || -> Option<String> {
        let at = find(text, b"\"custom_id\"")? + 11;
        let rest = text.get(at..)?;
        let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
        let rest = rest.strip_prefix(b":")?;
        let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
        let rest = rest.strip_prefix(b"\"")?;
        let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
        if rest[end] != b'"' || end == 0 || end > 256 {
            return None;
        }
        let id = std::str::from_utf8(&rest[..end]).ok()?;
        (!id.chars().any(char::is_control)).then(|| id.to_owned())
    };
    read().unwrap_or_else(|| line_id(line))
}

/// Parses one non-blank line. `strip_v1`: drop a leading `/v1` from the line's `url`
/// (the base URL already ends in `/v1`).
pub fn parse_line(line: u64, text: Result<String, String>, strip_v1: bool) -> InputItem {
    let fail = |custom_id: String, msg: String| InputItem {
        line,
        custom_id,
        request: Err(format!("line {line}: {msg}")),
        stream: false,
    };
    let text = match text {
        Ok(t) => t,
        Err(msg) => return fail(line_id(line), msg),
    };
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return fail(
                salvaged_id(line, text.as_bytes()),
                format!("not valid JSON: {e}"),
            );
        }
    };
    let Value::Object(mut obj) = value else {
        return fail(line_id(line), "not a JSON object".into());
    };
    let is_envelope = obj.contains_key("custom_id") || obj.contains_key("body");
    if !is_envelope {
        let obj = Value::Object(obj);
        let req = keypool::Request::new(&obj);
        return InputItem {
            line,
            custom_id: line_id(line),
            request: Ok(req),
            stream: is_stream(&obj),
        };
    }
    let custom_id = match obj.get("custom_id") {
        None | Some(Value::Null) => line_id(line),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return fail(line_id(line), "custom_id must be a non-empty string".into());
        }
    };
    match obj.get("method") {
        None => {}
        Some(Value::String(m)) if m.eq_ignore_ascii_case("POST") => {}
        Some(_) => return fail(custom_id, "method must be \"POST\"".into()),
    }
    let url = match obj.get("url") {
        None => keypool::DEFAULT_PATH.to_owned(),
        Some(Value::String(u)) => {
            let stripped = if strip_v1 {
                u.strip_prefix("/v1").filter(|r| r.starts_with('/'))
            } else {
                None
            };
            stripped.unwrap_or(u).to_owned()
        }
        Some(_) => return fail(custom_id, "url must be a string".into()),
    };
    let body = match obj.remove("body") {
        Some(b @ Value::Object(_)) => b,
        Some(_) => return fail(custom_id, "body must be a JSON object".into()),
        None => return fail(custom_id, "missing body".into()),
    };
    let request = keypool::Request::new(&body)
        .with_path(&url)
        .map_err(|e| format!("line {line}: {e}"));
    InputItem {
        line,
        custom_id,
        request,
        stream: is_stream(&body),
    }
}

/// The id a line is known by, computed the way [`parse_line`] does, without building
/// the request: its `custom_id` when it is an envelope with a non-empty string one, else
/// `line-<n>`.
pub fn probe_line(line: u64, text: &[u8]) -> String {
    // A map, as `parse_line` reads it: only an object, and the last of duplicate
    // fields wins (a derived struct would accept an array and refuse duplicates,
    // giving such lines another id than the one they run under).
    let obj = match serde_json::from_slice::<serde_json::Map<String, Value>>(text) {
        Ok(obj) => obj,
        // Not JSON at all (as `parse_line` decides it, reading a `Value`): the id it
        // salvages for its error record.
        Err(_) if serde_json::from_slice::<Value>(text).is_err() => {
            return salvaged_id(line, text);
        }
        Err(_) => return line_id(line),
    };
    if !obj.contains_key("custom_id") && !obj.contains_key("body") {
        return line_id(line);
    }
    match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => line_id(line),
    }
}

/// What a pass over an input file found before anything is sent.
#[derive(Debug, Default)]
pub struct Prescan {
    /// Non-blank lines.
    pub lines: u64,
    /// Lines already answered by the output being resumed (not to be sent again).
    pub done: u64,
    /// Why the input is refused (duplicate ids), if it is.
    pub refused: Option<String>,
}

/// How many offending lines or ids an error message lists.
const LIST_MAX: usize = 10;

/// Reads an input file once, before anything is sent: counts its lines and those the
/// output already answers (`done(custom_id)`), and refuses duplicate `custom_id`s,
/// naming the lines. Memory: one 128-bit fingerprint per id
/// (16 B plus the set's overhead), as the resume state; a second pass runs only when a
/// duplicate was found, to name every line of the first few duplicated ids.
pub fn prescan(path: &std::path::Path, done: impl Fn(&str) -> bool) -> std::io::Result<Prescan> {
    use std::collections::{BTreeMap, HashSet};
    let open = || -> std::io::Result<Lines<std::io::BufReader<std::fs::File>>> {
        Ok(Lines::new(std::io::BufReader::with_capacity(
            1 << 16,
            std::fs::File::open(path)?,
        )))
    };
    let mut out = Prescan::default();
    let mut seen: HashSet<u128> = HashSet::new();
    let mut dups: HashSet<u128> = HashSet::new();
    for next in open()? {
        let (line, text) = next?;
        out.lines += 1;
        let id = match &text {
            Ok(t) => probe_line(line, t.as_bytes()),
            Err(_) => line_id(line),
        };
        let fp = crate::resume::fingerprint(&id);
        if !seen.insert(fp) {
            dups.insert(fp);
        } else if done(&id) {
            out.done += 1;
        }
    }
    drop(seen);
    let mut problems = Vec::new();
    if !dups.is_empty() {
        // Second pass: the lines of the first LIST_MAX duplicated ids, in input order.
        let mut named: BTreeMap<u64, (String, Vec<u64>)> = BTreeMap::new();
        let mut order: Vec<u128> = Vec::new();
        let mut by_fp: std::collections::HashMap<u128, usize> = Default::default();
        for next in open()? {
            let (line, text) = next?;
            let id = match &text {
                Ok(t) => probe_line(line, t.as_bytes()),
                Err(_) => line_id(line),
            };
            let fp = crate::resume::fingerprint(&id);
            if !dups.contains(&fp) {
                continue;
            }
            let slot = match by_fp.get(&fp) {
                Some(&s) => s,
                None if order.len() < LIST_MAX => {
                    order.push(fp);
                    by_fp.insert(fp, order.len() - 1);
                    order.len() - 1
                }
                None => continue,
            };
            named
                .entry(slot as u64)
                .or_insert_with(|| (id, Vec::new()))
                .1
                .push(line);
        }
        let mut msg = format!(
            "{} custom_id(s) appear on more than one line (each line needs its own id, \
             as in the OpenAI Batch API):",
            dups.len()
        );
        for (id, lines) in named.values() {
            let lines: Vec<String> = lines.iter().map(u64::to_string).collect();
            msg += &format!(" {id:?} on lines {};", lines.join(", "));
        }
        if dups.len() > LIST_MAX {
            msg += " …";
        }
        problems.push(msg.trim_end_matches(';').to_owned());
    }
    if !problems.is_empty() {
        out.refused = Some(format!(
            "--input {}: {}",
            path.display(),
            problems.join("; and ")
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, strip: bool) -> InputItem {
        parse_line(7, Ok(text.to_owned()), strip)
    }

    #[test]
    fn envelope_and_v1_stripping() {
        let line = r#"{"custom_id":"req-1","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#;
        let item = parse(line, true);
        assert_eq!(item.custom_id, "req-1");
        let req = item.request.unwrap();
        assert_eq!(req.path(), "/chat/completions");
        assert_eq!(req.body(), br#"{"model":"m"}"#);
        let item = parse(line, false);
        assert_eq!(item.request.unwrap().path(), "/v1/chat/completions");
        // "/v1x" is not a "/v1" prefix.
        let item = parse(r#"{"custom_id":"a","url":"/v1x","body":{}}"#, true);
        assert_eq!(item.request.unwrap().path(), "/v1x");
    }

    #[test]
    fn bare_body_gets_line_id() {
        let item = parse(r#"{"model":"m","messages":[]}"#, true);
        assert_eq!(item.custom_id, "line-7");
        assert_eq!(item.request.unwrap().path(), "/chat/completions");
    }

    #[test]
    fn malformed_lines_are_errors() {
        for (text, id, msg) in [
            ("{not json", "line-7", "not valid JSON"),
            // Found by the cli_input fuzz target: not JSON, and not an object either.
            (
                r#"["x"5 {{"custom_id":"a","body":{}}]"#,
                "a",
                "not valid JSON",
            ),
            (
                r#"{"custom_id": "req-9", "body": {"model": "m""#,
                "req-9",
                "not valid JSON",
            ),
            (
                r#"{"custom_id":"a\"b", "body": {"#,
                "line-7",
                "not valid JSON",
            ),
            ("[1,2]", "line-7", "not a JSON object"),
            (r#"{"custom_id":5,"body":{}}"#, "line-7", "custom_id"),
            (r#"{"custom_id":"x"}"#, "x", "missing body"),
            (r#"{"custom_id":"x","body":"hi"}"#, "x", "body must be"),
            (r#"{"custom_id":"x","method":"GET","body":{}}"#, "x", "POST"),
            (
                r#"{"custom_id":"x","url":"no-slash","body":{}}"#,
                "x",
                "path",
            ),
        ] {
            let item = parse(text, true);
            assert_eq!(item.custom_id, id, "{text}");
            // The pre-send scan knows the line by the same id (resume, duplicates).
            assert_eq!(probe_line(7, text.as_bytes()), id, "{text}");
            let err = item.request.unwrap_err();
            assert!(
                err.starts_with("line 7: ") && err.contains(msg),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn probe_gives_the_id_parse_gives() {
        // Found by the `cli_input` fuzz target (duplicate fields); an array is read
        // positionally by a derived struct.
        for text in [
            r#"{"custom_id":"a","custom_id":"b","body":{}}"#,
            r#"["x", {"stream": true}]"#,
            r#"{"custom_id":"x","body":{"stream":1}}"#,
            r#"{"custom_id":"","body":{}}"#,
        ] {
            let id = probe_line(7, text.as_bytes());
            let item = parse(text, true);
            assert_eq!(id, item.custom_id, "{text}");
        }
    }

    #[test]
    fn lines_skip_blanks_and_number_from_one() {
        let data = b"a\n\n  \nb\r\n\xff\nc";
        let got: Vec<_> = Lines::new(&data[..]).map(|r| r.unwrap()).collect();
        assert_eq!(
            got,
            vec![
                (1, Ok("a".to_owned())),
                (4, Ok("b".to_owned())),
                (5, Err("line is not valid UTF-8".to_owned())),
                (6, Ok("c".to_owned())),
            ]
        );
    }
}
