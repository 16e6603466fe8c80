//! The CLI's input lines (`cli/src/keypool/input.rs`, included as source): the line
//! reader numbers and trims lines faithfully; `parse_line` is total and its errors name
//! the line; and the pre-scan's cheap `probe_line` gives every line the same id as `parse_line`, which the duplicate-id check and resume rely on.
//!
//! Input: a whole input file; every line is also parsed.
#![no_main]

#[allow(dead_code)]
#[path = "../../cli/src/keypool/input.rs"]
mod input;
#[allow(dead_code)]
#[path = "../../cli/src/keypool/resume.rs"]
mod resume;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let physical = data.split(|&b| b == b'\n').count() - usize::from(data.ends_with(b"\n"));
    let mut last = 0u64;
    for next in input::Lines::new(data) {
        let (line, text) = next.expect("reading a slice cannot fail");
        assert!(
            line > last && line as usize <= physical,
            "line {line} after {last}"
        );
        last = line;
        if let Ok(t) = &text {
            assert!(!t.is_empty() && t.trim() == t, "{t:?}");
        }
        for strip in [false, true] {
            let item = input::parse_line(line, text.clone(), strip);
            assert_eq!(item.line, line);
            assert!(!item.custom_id.is_empty());
            if let Err(e) = &item.request {
                assert!(e.starts_with(&format!("line {line}: ")), "{e}");
            }
            let Ok(t) = &text else {
                assert_eq!(item.custom_id, input::line_id(line));
                continue;
            };
            let id = input::probe_line(line, t.as_bytes());
            assert_eq!(id, item.custom_id, "probe and parse disagree on {t:?}");
        }
    }
});
