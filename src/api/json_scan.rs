//! A one-pass JSON validator for the bodies the engine checks on every request: a
//! 2xx response body (is it JSON at all, and where are its top-level `choices`,
//! `usage` and `error`?) and a caller's raw request body.
//!
//! It accepts exactly what `serde_json::from_slice::<serde::de::IgnoredAny>` accepts
//! (RFC 8259: no trailing commas, no comments, no control characters in strings,
//! `\u` escapes need four hex digits but may name a lone surrogate, any depth), which
//! a unit test checks against serde_json on generated inputs and the `body_success`
//! fuzz target checks both ways. Strings are not checked for UTF-8 here: callers that
//! need it check the whole body first (`str::from_utf8` is far cheaper than a check
//! per string).
//!
//! Why not serde_json itself: skipping a ~270-byte chat completion through serde's
//! visitors (`IgnoredAny` for the values, a field enum for the keys) cost ~6,000
//! instructions per response, a quarter of all the engine spent on a request; this
//! loop costs a fraction of it and allocates nothing for nesting up to 64 levels.
//! Whatever it finds is still decoded by serde_json (the `usage` object, an embedded
//! `error`), from the few bytes this pass located.
//!
//! [`scan_value`] is the stricter reading a success body gets: what
//! `serde_json::from_slice::<serde_json::Value>` accepts, nested at most [`MAX_DEPTH`]
//! (100) levels, so whatever the engine calls a success every reader of it can parse
//! (`Response::json`, the CLI's records around it). On top of [`scan`] it refuses
//! deeper nesting, a `\u` escape naming a lone surrogate, and a number beyond `f64`
//! (`1e400`).

use std::fmt;
use std::ops::Range;

/// What the top-level value of a valid body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Top {
    /// An object (its members were reported).
    Object,
    /// An array, a string, a number, `true`, `false` or `null`.
    Other,
}

/// Why a body is not JSON, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    /// Byte offset of the first byte that cannot be read.
    pub(crate) at: usize,
    /// What was expected or found there.
    pub(crate) what: &'static str,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

/// A top-level member's key as it is in the body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Key<'a> {
    /// The text between the key's quotes, escapes not decoded.
    pub(crate) raw: &'a [u8],
    /// Whether `raw` holds an escape (`\`).
    pub(crate) escaped: bool,
}

/// Validates `b` as one JSON text and calls `member(key, value)` for each member of
/// a top-level object, in order, `value` being the byte range of its value in `b`.
/// Members are reported as they are read, so a body found invalid later may already
/// have reported some.
pub(crate) fn scan<F: FnMut(Key<'_>, Range<usize>)>(b: &[u8], member: F) -> Result<Top, Invalid> {
    scan_with::<false, F>(b, member).map(|(top, _)| top)
}

/// The deepest nesting of arrays and objects [`scan_value`] accepts. serde_json reads
/// 127 levels into a `Value` (its recursion limit is 128); 100 leaves room for the
/// envelopes a body travels in and is still read by it (a `keypool run` record adds
/// two levels). Real answers nest a dozen levels at most.
pub(crate) const MAX_DEPTH: usize = 100;

/// What [`scan_value`] reports beyond [`scan`].
pub(crate) const TOO_DEEP: &str = "arrays and objects nested deeper than 100 levels";
/// See [`TOO_DEEP`].
pub(crate) const LONE_SURROGATE: &str = "a \\u escape naming a lone surrogate";
/// See [`TOO_DEEP`].
pub(crate) const OUT_OF_RANGE: &str = "a number beyond the range of a 64-bit float";

/// [`scan`], and the first place where the JSON is past the limits of a value every
/// reader holds (`Some`): nesting deeper than [`MAX_DEPTH`], a lone surrogate escape,
/// a number beyond `f64`. Such JSON is still read to its end (its members reported),
/// so the caller decides what matters more (an embedded error does).
pub(crate) fn scan_value<F: FnMut(Key<'_>, Range<usize>)>(
    b: &[u8],
    member: F,
) -> Result<(Top, Option<Invalid>), Invalid> {
    scan_with::<true, F>(b, member)
}

fn scan_with<const VALUE: bool, F: FnMut(Key<'_>, Range<usize>)>(
    b: &[u8],
    member: F,
) -> Result<(Top, Option<Invalid>), Invalid> {
    let mut s = Scanner::<VALUE> {
        b,
        i: 0,
        stack: Stack::default(),
        limit: None,
    };
    let top = s.run(member)?;
    Ok((top, s.limit))
}

impl<const VALUE: bool> Scanner<'_, VALUE> {
    /// Notes the first value limit passed (only [`scan_value`] looks).
    #[cold]
    fn past_limit(&mut self, at: usize, what: &'static str) {
        if self.limit.is_none() {
            self.limit = Some(Invalid { at, what });
        }
    }

    fn run<F: FnMut(Key<'_>, Range<usize>)>(&mut self, mut member: F) -> Result<Top, Invalid> {
        let s = self;
        let b = s.b;
        s.ws();
        let top = if s.peek() == Some(b'{') {
            Top::Object
        } else {
            Top::Other
        };
        // The top-level member being read: its key and where its value starts.
        let mut key = (0..0, false);
        let mut value_at = 0;
        loop {
            // A value starts at `s.i`.
            match s.peek() {
                Some(b'{') => {
                    if VALUE && s.stack.len >= MAX_DEPTH {
                        s.past_limit(s.i, TOO_DEEP);
                    }
                    s.i += 1;
                    s.ws();
                    if s.peek() == Some(b'}') {
                        s.i += 1;
                    } else {
                        s.stack.push(true);
                        let k = s.key()?;
                        if s.stack.len == 1 {
                            (key, value_at) = (k, s.i);
                        }
                        continue;
                    }
                }
                Some(b'[') => {
                    if VALUE && s.stack.len >= MAX_DEPTH {
                        s.past_limit(s.i, TOO_DEEP);
                    }
                    s.i += 1;
                    s.ws();
                    if s.peek() == Some(b']') {
                        s.i += 1;
                    } else {
                        s.stack.push(false);
                        continue;
                    }
                }
                Some(b'"') => {
                    s.i += 1;
                    s.string()?;
                }
                Some(b'-' | b'0'..=b'9') => s.number()?,
                Some(b't') => s.literal(b"true")?,
                Some(b'f') => s.literal(b"false")?,
                Some(b'n') => s.literal(b"null")?,
                Some(_) => return Err(s.err("expected a JSON value")),
                None => return Err(s.err("the body ends where a value should be")),
            }
            // A value ended at `s.i`: report it if it is a top-level member's, then read
            // past the commas and closing brackets that follow.
            loop {
                let Some(in_object) = s.stack.last() else {
                    s.ws();
                    return if s.i == b.len() {
                        Ok(top)
                    } else {
                        Err(s.err("trailing characters after the JSON value"))
                    };
                };
                if in_object && s.stack.len == 1 {
                    let raw = &b[key.0.clone()];
                    member(
                        Key {
                            raw,
                            escaped: key.1,
                        },
                        value_at..s.i,
                    );
                }
                s.ws();
                match s.peek() {
                    Some(b',') => {
                        s.i += 1;
                        s.ws();
                        if in_object {
                            let k = s.key()?;
                            if s.stack.len == 1 {
                                (key, value_at) = (k, s.i);
                            }
                        }
                        break;
                    }
                    Some(b'}') if in_object => {
                        s.i += 1;
                        s.stack.pop();
                    }
                    Some(b']') if !in_object => {
                        s.i += 1;
                        s.stack.pop();
                    }
                    _ if in_object => {
                        return Err(s.err("expected ',' or '}' after an object member"));
                    }
                    _ => return Err(s.err("expected ',' or ']' after an array element")),
                }
            }
        }
    }
}

/// Validates `b` as one JSON text.
pub(crate) fn validate(b: &[u8]) -> Result<(), Invalid> {
    scan(b, |_, _| {}).map(|_| ())
}

/// Bytes that may appear in a string as they are: not `"`, not `\`, not a control
/// character (below 0x20).
const PLAIN: [bool; 256] = {
    let mut t = [true; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = false;
        c += 1;
    }
    t[b'"' as usize] = false;
    t[b'\\' as usize] = false;
    t
};

/// The index of the first byte at or after `i` that is not [`PLAIN`] (or the
/// length): eight bytes at a time, as serde_json's own string reader does. In each
/// word, a byte's high bit is set in `found` when it is a quote, a backslash or below
/// 0x20; the lowest such bit is exact (borrows only run upwards from a match).
#[inline(always)]
fn skip_plain(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(word) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        let quote = x ^ (ONES * u64::from(b'"'));
        let slash = x ^ (ONES * u64::from(b'\\'));
        let found = (quote.wrapping_sub(ONES) & !quote
            | slash.wrapping_sub(ONES) & !slash
            | x.wrapping_sub(ONES * 0x20) & !x)
            & HIGH;
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while b.get(i).is_some_and(|&c| PLAIN[c as usize]) {
        i += 1;
    }
    i
}

struct Scanner<'a, const VALUE: bool> {
    b: &'a [u8],
    i: usize,
    stack: Stack,
    /// The first value limit passed ([`scan_value`]).
    limit: Option<Invalid>,
}

impl<const VALUE: bool> Scanner<'_, VALUE> {
    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[cold]
    fn err(&self, what: &'static str) -> Invalid {
        Invalid { at: self.i, what }
    }

    #[inline(always)]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    #[inline(always)]
    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    /// A member's key and its colon, with the whitespace around: the range of the
    /// key's raw text, and whether it holds an escape.
    #[inline(always)]
    fn key(&mut self) -> Result<(Range<usize>, bool), Invalid> {
        if self.peek() != Some(b'"') {
            return Err(self.err("expected a string key"));
        }
        self.i += 1;
        let start = self.i;
        let escaped = self.string()?;
        let key = (start..self.i - 1, escaped);
        self.ws();
        if self.peek() != Some(b':') {
            return Err(self.err("expected ':' after an object key"));
        }
        self.i += 1;
        self.ws();
        Ok(key)
    }

    /// The rest of a string whose opening quote was read: ends past its closing
    /// quote. Whether it holds an escape.
    #[inline(always)]
    fn string(&mut self) -> Result<bool, Invalid> {
        let mut escaped = false;
        loop {
            self.i = skip_plain(self.b, self.i);
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    self.i += 1;
                    escaped = true;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            self.i += 1;
                            let at = self.i - 2;
                            let unit = self.hex4()?;
                            if VALUE && (0xD800..0xE000).contains(&unit) {
                                // A high surrogate must be followed by a `\u` escape
                                // of a low one; a low one alone names nothing.
                                let paired = unit < 0xDC00
                                    && self.b.get(self.i..self.i + 2) == Some(&b"\\u"[..])
                                    && {
                                        self.i += 2;
                                        (0xDC00..0xE000).contains(&self.hex4()?)
                                    };
                                if !paired {
                                    self.past_limit(at, LONE_SURROGATE);
                                }
                            }
                        }
                        Some(_) => return Err(self.err("invalid escape in a string")),
                        None => return Err(self.err("the body ends inside a string")),
                    }
                }
                Some(_) => return Err(self.err("control character in a string")),
                None => return Err(self.err("the body ends inside a string")),
            }
        }
    }

    /// Four hex digits of a `\u` escape, as a UTF-16 code unit.
    #[inline(always)]
    fn hex4(&mut self) -> Result<u32, Invalid> {
        let mut unit = 0;
        for _ in 0..4 {
            let Some(d) = self.peek().and_then(|c| char::from(c).to_digit(16)) else {
                return Err(self.err("invalid \\u escape in a string"));
            };
            unit = unit * 16 + d;
            self.i += 1;
        }
        Ok(unit)
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    #[inline(always)]
    fn number(&mut self) -> Result<(), Invalid> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let int_start = self.i;
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.i += 1;
                self.digits();
            }
            _ => return Err(self.err("invalid number")),
        }
        let int_digits = self.i - int_start;
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number: no digit after the decimal point"));
            }
            self.digits();
        }
        // The decimal exponent, when `VALUE` (bounded: only its size matters).
        let mut exponent: i64 = 0;
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            let negative = self.peek() == Some(b'-');
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number: no digit in the exponent"));
            }
            let digits = self.i;
            self.digits();
            if VALUE {
                for &d in &self.b[digits..self.i] {
                    exponent = (exponent * 10 + i64::from(d - b'0')).min(1 << 40);
                }
                if negative {
                    exponent = -exponent;
                }
            }
        }
        // Its magnitude is below 10^(int_digits + exponent): only a number that may
        // reach 1e300 can be beyond f64, and it is read again by serde_json itself
        // (whose rounding near `f64::MAX` is its own).
        if VALUE && int_digits as i64 + exponent > 300 && self.out_of_range(start) {
            self.past_limit(start, OUT_OF_RANGE);
        }
        Ok(())
    }

    /// Whether serde_json refuses the number `b[start..i]` (beyond `f64`).
    #[cold]
    fn out_of_range(&self, start: usize) -> bool {
        serde_json::from_slice::<serde_json::Value>(&self.b[start..self.i]).is_err()
    }

    #[inline(always)]
    fn literal(&mut self, word: &'static [u8]) -> Result<(), Invalid> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.err("expected a JSON value"))
        }
    }
}

/// The open containers, innermost last (`true`: an object): 64 levels in a word,
/// deeper ones in a vector (bounded by the body's length).
#[derive(Default)]
struct Stack {
    bits: u64,
    len: usize,
    deep: Vec<bool>,
}

impl Stack {
    #[inline(always)]
    fn push(&mut self, object: bool) {
        if self.len < 64 {
            let bit = 1u64 << self.len;
            if object {
                self.bits |= bit;
            } else {
                self.bits &= !bit;
            }
        } else {
            self.deep.push(object);
        }
        self.len += 1;
    }

    #[inline(always)]
    fn last(&self) -> Option<bool> {
        match self.len {
            0 => None,
            n @ 1..=64 => Some(self.bits >> (n - 1) & 1 == 1),
            _ => self.deep.last().copied(),
        }
    }

    #[inline(always)]
    fn pop(&mut self) {
        if self.len > 64 {
            self.deep.pop();
        }
        self.len -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde_accepts(b: &[u8]) -> bool {
        serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok()
    }

    fn value_accepts(b: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(b).is_ok()
    }

    /// The deepest nesting of brackets outside strings (for valid JSON: its depth).
    fn depth(b: &[u8]) -> usize {
        let (mut d, mut max, mut in_str, mut esc) = (0usize, 0, false, false);
        for &c in b {
            match (in_str, esc, c) {
                (true, true, _) => esc = false,
                (true, false, b'\\') => esc = true,
                (true, false, b'"') => in_str = false,
                (true, ..) => {}
                (false, _, b'"') => in_str = true,
                (false, _, b'[' | b'{') => {
                    d += 1;
                    max = max.max(d);
                }
                (false, _, b']' | b'}') => d = d.saturating_sub(1),
                _ => {}
            }
        }
        max
    }

    /// The first value limit `b` passes (`b` must be valid JSON).
    fn limit_of(b: &[u8]) -> Option<Invalid> {
        scan_value(b, |_, _| {}).unwrap().1
    }

    /// The two readings agree with their serde_json counterparts: both read the same
    /// JSON, and `scan_value` finds no limit passed exactly when serde_json reads a
    /// `Value` nested at most `MAX_DEPTH` levels (UTF-8 is the caller's check).
    fn check_both(b: &[u8]) -> bool {
        let ours = validate(b).is_ok();
        assert_eq!(ours, serde_accepts(b), "{:?}", String::from_utf8_lossy(b));
        let strict = scan_value(b, |_, _| {});
        assert_eq!(strict.is_ok(), ours, "{:?}", String::from_utf8_lossy(b));
        if let (Ok((_, limit)), Ok(_)) = (&strict, std::str::from_utf8(b)) {
            assert_eq!(
                limit.is_none(),
                value_accepts(b) && depth(b) <= MAX_DEPTH,
                "scan_value disagrees with Value on {:?}: {limit:?}",
                String::from_utf8_lossy(b)
            );
        }
        ours
    }

    fn members(b: &[u8]) -> Result<(Top, Vec<(String, String)>), Invalid> {
        let mut seen = Vec::new();
        let top = scan(b, |k, v| {
            assert_eq!(k.escaped, k.raw.contains(&b'\\'));
            seen.push((
                String::from_utf8_lossy(k.raw).into_owned(),
                String::from_utf8_lossy(&b[v]).into_owned(),
            ))
        })?;
        Ok((top, seen))
    }

    #[test]
    fn reports_top_level_members_with_their_value_ranges() {
        let body = br#" { "choices" : [ {"a": {"b": [1, 2]}} ], "usage":{"prompt_tokens":3},
            "x\"y": "s", "n": -1.5e3, "t": true, "z": null, "e": {} } "#;
        let (top, m) = members(body).unwrap();
        assert_eq!(top, Top::Object);
        let want = [
            ("choices", r#"[ {"a": {"b": [1, 2]}} ]"#),
            ("usage", r#"{"prompt_tokens":3}"#),
            (r#"x\"y"#, r#""s""#),
            ("n", "-1.5e3"),
            ("t", "true"),
            ("z", "null"),
            ("e", "{}"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(m, want);
        assert_eq!(members(b"[1, {\"a\": 2}]").unwrap(), (Top::Other, vec![]));
        assert_eq!(members(b" \"s\" ").unwrap(), (Top::Other, vec![]));
        assert_eq!(members(b"{}").unwrap(), (Top::Object, vec![]));
    }

    #[test]
    fn agrees_with_serde_json_on_hand_picked_inputs() {
        let cases: &[&[u8]] = &[
            b"",
            b" ",
            b"{",
            b"}",
            b"[",
            b"]",
            b"[]",
            b"{}",
            b"[,]",
            b"[1,]",
            b"{\"a\":1,}",
            b"{\"a\" 1}",
            b"{\"a\":}",
            b"{1:2}",
            b"{\"a\":1 \"b\":2}",
            b"[1 2]",
            b"01",
            b"-",
            b"-0",
            b"-01",
            b"1.",
            b"1.e5",
            b"1e",
            b"1e+",
            b"1E-7",
            b"0.5",
            b".5",
            b"+1",
            b"1e400",
            b"-0.0e-0",
            b"tru",
            b"true",
            b"truex",
            b"nul",
            b"null ",
            b"false",
            b"\"\\u12\"",
            b"\"\\u12G4\"",
            b"\"\\uD800\"",
            b"\"\\uDC00\\uD800\"",
            b"\"\\x\"",
            b"\"a\tb\"",
            b"\"a\x7fb\"",
            b"\"\xff\"",
            b"\"\\/\\b\\f\\n\\r\\t\\\\\\\"\"",
            b"\"unterminated",
            b"\"\\",
            b"{\"a\":[1,{\"b\":[]}],\"c\":\"d\"}  \n",
            b"{\"a\":1}}",
            b"[1]]",
            b"[1}",
            b"{\"a\":1]",
            b"1 2",
            b"\t\r\n 7 \t\r\n",
            b"\x0c1",
            b"[\"\\u0000\"]",
            b"{\"\":0}",
            b"[[[[[]]]]]",
            b"[[[[[]]]]",
        ];
        for &c in cases {
            check_both(c);
        }
    }

    #[test]
    fn value_limits_are_serde_jsons() {
        let nest = |d: usize, open: &str, inner: &str, close: &str| {
            format!("{}{inner}{}", open.repeat(d), close.repeat(d))
        };
        for d in [1, 50, 63, 64, 65, 99, 100, 101, 126, 127, 128, 129, 1000] {
            for (open, inner, close) in [
                ("[", "", "]"),
                ("[", "[]", "]"),
                ("{\"a\":", "1", "}"),
                ("{\"a\":", "{}", "}"),
                ("[{\"k\":", "0", "}]"),
            ] {
                let b = nest(d, open, inner, close);
                check_both(b.as_bytes());
            }
        }
        assert_eq!(limit_of(nest(100, "[", "", "]").as_bytes()), None);
        let deep = nest(101, "[", "", "]");
        let limit = limit_of(deep.as_bytes()).unwrap();
        assert_eq!((limit.what, limit.at), (TOO_DEEP, 100));
        let cases: &[&str] = &[
            r#""\ud800""#,
            r#""\uDBFF\uDFFF""#,
            r#""\ud83d\ude00""#,
            r#""\ud83d\u0041""#,
            r#""\ud83d\ud83d""#,
            r#""\ud83dx""#,
            r#""\ud83d\""#,
            r#""\ud83d\u12""#,
            r#""\ud83d\uZZZZ""#,
            r#""\udc00""#,
            r#""\ue000""#,
            r#""\ud7ff""#,
            r#"{"\ud800":1}"#,
            r#"["a\ud800b"]"#,
            "1e308",
            "1e309",
            "-1e309",
            "1e400",
            "1E+400",
            "1e-400",
            "0.0001e304",
            "0.0001e310",
            "1.7976931348623157e308",
            "1.7976931348623158e308",
            "1.7976931348623159e308",
            "17976931348623157e292",
            "123456789012345678901234567890",
            "-9223372036854775809",
            "18446744073709551616",
            "1e99999999999999999999999",
            "1e-99999999999999999999999",
            "[1,2e400]",
            "{\"a\":1e400}",
        ];
        for c in cases {
            check_both(c.as_bytes());
        }
        let long = format!("1{}", "0".repeat(400));
        check_both(long.as_bytes());
        let long = format!("1{}e-200", "0".repeat(400));
        check_both(long.as_bytes());
        assert_eq!(limit_of(b"[1e400]").unwrap().at, 1);
        assert_eq!(limit_of(br#"["\ud800"]"#).unwrap().what, LONE_SURROGATE);
        // The first limit is reported, and the rest is still read.
        let mut members = 0;
        let (top, limit) =
            scan_value(br#"{"a":1e400,"b":"\udc00","c":1}"#, |_, _| members += 1).unwrap();
        assert_eq!((top, members), (Top::Object, 3));
        assert_eq!(limit.unwrap().what, OUT_OF_RANGE);
    }

    #[test]
    fn deep_nesting_is_read_without_recursion() {
        for depth in [63, 64, 65, 200, 100_000] {
            let mut b = "[".repeat(depth);
            b.push_str(&"]".repeat(depth));
            assert!(validate(b.as_bytes()).is_ok(), "depth {depth}");
            let mut o = "{\"a\":".repeat(depth);
            o.push('1');
            o.push_str(&"}".repeat(depth));
            assert!(validate(o.as_bytes()).is_ok(), "depth {depth}");
            // Mixed kinds across the 64-level boundary: a mismatch is caught.
            let mut m = "[{\"k\":".repeat(depth / 2 + 1);
            m.push('0');
            m.push_str(&"}]".repeat(depth / 2 + 1));
            assert!(validate(m.as_bytes()).is_ok(), "depth {depth}");
            let bad = m.replacen("}]", "]}", 1);
            assert!(validate(bad.as_bytes()).is_err(), "depth {depth}");
        }
    }

    /// Generated inputs from JSON's own alphabet, mutated: the scanner and serde_json
    /// accept and refuse the same ones.
    #[test]
    fn agrees_with_serde_json_on_generated_inputs() {
        const PIECES: &[&str] = &[
            "{", "}", "[", "]", ",", ":", " ", "\"", "\"k\"", "\"v\"", "1", "0", "-", ".", "e",
            "+", "12.5e-3", "true", "false", "null", "\\", "\\u00e9", "\\uD83D", "\\n", "\\q",
            "\\uDE00", "e400", "1e309", "\t", "\n", "\u{1}", "é", "0x", "{\"a\":", "[1,", "\"s\",",
            "}]", "]}",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut accepted = 0;
        for _ in 0..200_000 {
            let n = (next() % 12) as usize;
            let mut s = String::new();
            for _ in 0..n {
                s.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            let ours = check_both(s.as_bytes());
            accepted += usize::from(ours);
        }
        // The generator must reach both verdicts often enough to mean something.
        assert!(accepted > 1_000, "only {accepted} accepted");
    }

    #[test]
    fn errors_say_where() {
        let e = validate(b"{\"a\": 1,}").unwrap_err();
        assert_eq!(e.at, 8);
        assert_eq!(e.to_string(), "expected a string key at byte 8");
        assert_eq!(
            validate(b"{\"a\": 1} x").unwrap_err().what,
            "trailing characters after the JSON value"
        );
    }
}
