//! Error-body messages: total, at most 500 bytes plus an ellipsis, one line (no
//! control characters, no whitespace but single inner spaces), deterministic.
#![no_main]

use keypool::__fuzz::{ERROR_MESSAGE_MAX_BYTES, error_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let m = error_message(data);
    assert!(
        m.len() <= ERROR_MESSAGE_MAX_BYTES,
        "{} bytes: {m:?}",
        m.len()
    );
    for c in m.chars() {
        assert!(!c.is_control(), "control character {c:?} in {m:?}");
        assert!(
            c == ' ' || !c.is_whitespace(),
            "whitespace {c:?} other than a space in {m:?}"
        );
    }
    assert!(!m.starts_with(' ') && !m.ends_with(' '), "untrimmed {m:?}");
    assert!(!m.contains("  "), "double space in {m:?}");
    if data.is_empty() {
        assert!(m.is_empty());
    }
    assert_eq!(m, error_message(data), "not deterministic");
});
