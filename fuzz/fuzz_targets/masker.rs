//! Secret masking: a masked text never contains a secret it masks, `None` means no
//! secret occurs, and `Masker::for_config` hides every key of a config.
//!
//! Structured input: secrets and a text assembled from literal pieces and secrets.
//! A secret is only required to vanish when it cannot be re-formed by the masking
//! itself: it contains no `[`/`]` (every replacement starts and ends with one, so an
//! occurrence cannot straddle a replacement) and is not part of any replacement.
#![no_main]

use keypool::__fuzz::{mask, mask_for_config};
use keypool::{ApiKey, Config, KeyConfig};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Piece {
    Text(String),
    Secret(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    secrets: Vec<String>,
    labels: Vec<Option<String>>,
    pieces: Vec<Piece>,
    config: bool,
}

fn must_vanish(secret: &str, replacements: &[String]) -> bool {
    !secret.is_empty()
        && !secret.contains(['[', ']'])
        && !replacements.iter().any(|r| r.contains(secret))
}

fuzz_target!(|input: Input| {
    let secrets: Vec<String> = input.secrets.into_iter().take(64).collect();
    let mut text = String::new();
    for p in input.pieces.iter().take(256) {
        match p {
            Piece::Text(t) => text.push_str(t),
            Piece::Secret(i) if !secrets.is_empty() => {
                text.push_str(&secrets[*i as usize % secrets.len()])
            }
            Piece::Secret(_) => {}
        }
    }

    if !input.config {
        let reps: Vec<String> = (0..secrets.len()).map(|i| format!("[R{i}]")).collect();
        let pairs: Vec<(String, String)> = secrets.iter().cloned().zip(reps.clone()).collect();
        match mask(pairs, text.as_bytes()) {
            None => {
                for s in secrets.iter().filter(|s| !s.is_empty()) {
                    assert!(!text.contains(s.as_str()), "None, yet {s:?} occurs");
                }
            }
            Some(out) => {
                let out = String::from_utf8(out).expect("masking broke UTF-8");
                for s in &secrets {
                    if must_vanish(s, &reps) {
                        assert!(!out.contains(s.as_str()), "{s:?} survives in {out:?}");
                    }
                }
            }
        }
        return;
    }

    // A config as `Pool::new` would never accept it: masking must not rely on
    // validation.
    let mut config = Config::default();
    for (i, key) in secrets.iter().enumerate() {
        let mut k = KeyConfig::new(ApiKey::new(key.clone()));
        k.label = input.labels.get(i).cloned().flatten();
        config.keys.push(k);
    }
    let reps: Vec<String> = (0..config.keys.len())
        .map(|i| format!("[REDACTED:{}]", config.key_label(i)))
        .chain(std::iter::once("[REDACTED]".to_owned()))
        .collect();
    let out = mask_for_config(&config, &text);
    for s in &secrets {
        if must_vanish(s, &reps) {
            assert!(!out.contains(s.as_str()), "{s:?} survives in {out:?}");
        }
    }
});
