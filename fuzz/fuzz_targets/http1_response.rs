//! The lean HTTP/1.1 client's response reader (`transport::http1::read_response`):
//! never panics on any server bytes; the body stays within the limit; only kept
//! headers come back, with lowercase names; the answer does not depend on how the
//! bytes are split into reads.
//!
//! Input: the first byte picks the read size (1 + byte), the second the body limit
//! (`byte * 64`); the rest is what the server sent.
#![no_main]

use keypool::__fuzz::http1_response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (step, limit, wire) = match data {
        [s, l, rest @ ..] => (1 + usize::from(*s), u64::from(*l) * 64, rest),
        _ => return,
    };
    let split = http1_response(wire, step, limit);
    let whole = http1_response(wire, usize::MAX, limit);
    if let Ok((status, headers, body, _)) = &whole {
        assert!((200..1000).contains(status), "{status}");
        assert!(body.len() as u64 <= limit, "{} > {limit}", body.len());
        for (k, _) in headers {
            assert!(!k.bytes().any(|b| b.is_ascii_uppercase()), "{k}");
        }
    }
    // The reuse verdict may differ (extra bytes seen or not); nothing else may.
    assert_eq!(
        split.as_ref().map(|(s, h, b, _)| (s, h, b)).ok(),
        whole.as_ref().map(|(s, h, b, _)| (s, h, b)).ok(),
        "read size {step}"
    );
});
