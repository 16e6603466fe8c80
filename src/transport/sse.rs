//! Server-sent events (the `text/event-stream` format), read defensively.
//!
//! Follows the WHATWG event-stream rules: lines end in LF, CRLF or a lone CR; a line
//! starting with `:` is a comment (OpenRouter sends `: OPENROUTER PROCESSING` while it
//! waits); `field: value` lines set `data` (appended, joined with LF), `event` and `id`;
//! an empty line dispatches the event; an event without data is not dispatched. At end
//! of input a pending event is discarded — except a bare `[DONE]`, which some servers
//! send without the final blank line.
//!
//! Nothing a server sends can exhaust memory: one line, and one event's data, are
//! bounded by `max` bytes (the pool's `max_response_bytes`); past it the reader stops
//! with [`SseError::TooLarge`] without buffering more.

use std::io::BufRead;

/// One dispatched event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field, if the event had one.
    pub event: Option<String>,
    /// The last `id:` field seen (the spec's "last event ID"), if any.
    pub id: Option<String>,
    /// The `data:` lines, joined with LF.
    pub data: String,
}

/// Why reading events stopped.
#[derive(Debug)]
pub(crate) enum SseError {
    /// A line or an event's data exceeded the byte cap.
    TooLarge(usize),
    /// Reading the body failed (connection reset, timeout, …).
    Io(std::io::Error),
}

/// Reads events from a buffered byte stream.
pub(crate) struct SseReader<R> {
    r: R,
    max: usize,
    /// The previous line ended in CR: a LF right after it belongs to it.
    skip_lf: bool,
    line: Vec<u8>,
    data: String,
    has_data: bool,
    event: Option<String>,
    last_id: Option<String>,
    /// Comment lines seen.
    pub comments: u64,
    /// Body bytes consumed.
    pub bytes: u64,
}

impl<R: BufRead> SseReader<R> {
    /// A reader whose lines and event data are capped at `max` bytes.
    pub(crate) fn new(r: R, max: usize) -> SseReader<R> {
        SseReader {
            r,
            max: max.max(16),
            skip_lf: false,
            line: Vec::new(),
            data: String::new(),
            has_data: false,
            event: None,
            last_id: None,
            comments: 0,
            bytes: 0,
        }
    }

    /// Reads the next line into `self.line` (without its terminator). False at end of
    /// input with no partial line pending.
    fn read_line(&mut self) -> Result<bool, SseError> {
        self.line.clear();
        let mut partial = false;
        loop {
            let buf = match self.r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SseError::Io(e)),
            };
            if buf.is_empty() {
                return Ok(partial);
            }
            let mut start = 0;
            if self.skip_lf {
                self.skip_lf = false;
                if buf[0] == b'\n' {
                    start = 1;
                }
            }
            let rest = &buf[start..];
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    if self.line.len() + i > self.max {
                        return Err(SseError::TooLarge(self.max));
                    }
                    self.line.extend_from_slice(&rest[..i]);
                    self.skip_lf = rest[i] == b'\r';
                    let used = start + i + 1;
                    self.r.consume(used);
                    self.bytes += used as u64;
                    return Ok(true);
                }
                None => {
                    if self.line.len() + rest.len() > self.max {
                        return Err(SseError::TooLarge(self.max));
                    }
                    self.line.extend_from_slice(rest);
                    let used = buf.len();
                    partial |= used > start;
                    self.r.consume(used);
                    self.bytes += used as u64;
                }
            }
        }
    }

    /// The underlying reader (with whatever it still buffers).
    pub(crate) fn into_inner(self) -> R {
        self.r
    }

    fn take_event(&mut self) -> SseEvent {
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        self.has_data = false;
        SseEvent {
            event: self.event.take(),
            id: self.last_id.clone(),
            data,
        }
    }

    /// The next event; `None` at end of input (a pending event without its blank line
    /// is dropped, unless it is `[DONE]`).
    pub(crate) fn next_event(&mut self) -> Result<Option<SseEvent>, SseError> {
        loop {
            if !self.read_line()? {
                if self.has_data && self.data.trim_end() == "[DONE]" {
                    return Ok(Some(self.take_event()));
                }
                return Ok(None);
            }
            if self.line.is_empty() {
                if self.has_data {
                    return Ok(Some(self.take_event()));
                }
                self.event = None;
                continue;
            }
            if self.line[0] == b':' {
                self.comments += 1;
                continue;
            }
            let text = String::from_utf8_lossy(&self.line);
            let (field, value) = match text.find(':') {
                Some(i) => {
                    let v = &text[i + 1..];
                    (&text[..i], v.strip_prefix(' ').unwrap_or(v))
                }
                None => (&*text, ""),
            };
            match field {
                "data" => {
                    if self.data.len() + value.len() + 1 > self.max {
                        return Err(SseError::TooLarge(self.max));
                    }
                    self.data.push_str(value);
                    self.data.push('\n');
                    self.has_data = true;
                }
                "event" => self.event = Some(value.to_owned()),
                "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
                _ => {} // `retry` and unknown fields are ignored
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &[u8], max: usize) -> (Vec<SseEvent>, Option<String>) {
        // A tiny buffer exercises lines split across reads.
        let mut r = SseReader::new(std::io::BufReader::with_capacity(3, input), max);
        let mut out = Vec::new();
        loop {
            match r.next_event() {
                Ok(Some(e)) => out.push(e),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(format!("{e:?}"))),
            }
        }
    }

    #[test]
    fn fields_comments_and_line_endings() {
        let input = b": OPENROUTER PROCESSING\r\n\r\nevent: message\rid: 7\r\ndata: {\"a\":\ndata:1}\n\ndata: [DONE]\n\n";
        let (ev, err) = events(input, 1024);
        assert_eq!(err, None);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].event.as_deref(), Some("message"));
        assert_eq!(ev[0].id.as_deref(), Some("7"));
        assert_eq!(ev[0].data, "{\"a\":\n1}");
        assert_eq!(ev[1].data, "[DONE]");
        assert_eq!(ev[1].event, None);
        assert_eq!(ev[1].id.as_deref(), Some("7"), "last event id persists");
    }

    #[test]
    fn pending_event_at_eof_is_dropped_except_done() {
        let (ev, _) = events(b"data: {\"x\":1}\n\ndata: {\"trunc", 1024);
        assert_eq!(ev.len(), 1);
        let (ev, _) = events(b"data: [DONE]", 1024);
        assert_eq!(ev[0].data, "[DONE]");
    }

    #[test]
    fn lines_and_events_are_bounded() {
        let mut long = b"data: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 10_000));
        let (ev, err) = events(&long, 100);
        assert!(ev.is_empty());
        assert!(err.unwrap().contains("TooLarge"));
        // Many short data lines in one event hit the event cap.
        let many = b"data: aaaaaaaaaa\n".repeat(50);
        let (_, err) = events(&many, 100);
        assert!(err.unwrap().contains("TooLarge"));
    }
}
