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

/// The id used for a line without a `custom_id`.
pub fn line_id(line: u64) -> String {
    format!("line-{line}")
}

/// Parses one non-blank line. `strip_v1`: drop a leading `/v1` from the line's `url`
/// (the base URL already ends in `/v1`).
pub fn parse_line(line: u64, text: Result<String, String>, strip_v1: bool) -> InputItem {
    let fail = |custom_id: String, msg: String| InputItem {
        line,
        custom_id,
        request: Err(format!("line {line}: {msg}")),
    };
    let text = match text {
        Ok(t) => t,
        Err(msg) => return fail(line_id(line), msg),
    };
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return fail(line_id(line), format!("not valid JSON: {e}")),
    };
    let Value::Object(mut obj) = value else {
        return fail(line_id(line), "not a JSON object".into());
    };
    let is_envelope = obj.contains_key("custom_id") || obj.contains_key("body");
    if !is_envelope {
        let req = keypool::Request::new(&Value::Object(obj));
        return InputItem {
            line,
            custom_id: line_id(line),
            request: Ok(req),
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
    }
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
            let err = item.request.unwrap_err();
            assert!(
                err.starts_with("line 7: ") && err.contains(msg),
                "{text}: {err}"
            );
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
