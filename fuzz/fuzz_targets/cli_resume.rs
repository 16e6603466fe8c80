//! The CLI's resume scan (`cli/src/keypool/resume.rs`, included as source) on an
//! arbitrary existing output file: a refused file is left byte for byte; an accepted
//! one keeps its complete lines and is at most repaired (a newline added or a cut last
//! record removed); scanning again changes nothing and finds the same answers; the
//! last record of each `custom_id` wins.
#![no_main]

#[allow(dead_code)]
#[path = "../../cli/src/keypool/resume.rs"]
mod resume;

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("keypool-fuzz-resume-{}", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let result = resume::scan(&path);
    let after = std::fs::read(&path).unwrap();
    match result {
        Err(resume::ScanError::NotOutput { line }) => {
            assert_eq!(after, data, "a refused file was changed");
            assert!(line >= 1);
        }
        Err(resume::ScanError::Io(e)) => panic!("I/O error on a plain file: {e}"),
        Ok(prior) => {
            let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            match prior.repaired {
                None => assert_eq!(after, data),
                Some(_) if after.len() > data.len() => {
                    assert_eq!(&after[..data.len()], data);
                    assert_eq!(&after[data.len()..], b"\n");
                }
                Some(_) => assert_eq!(after, &data[..complete]),
            }
            assert!(after.is_empty() || after.ends_with(b"\n"));
            // Oracle: each line's custom_id and whether its error is null, last wins.
            let mut want: HashMap<String, bool> = HashMap::new();
            for line in after.split(|&b| b == b'\n') {
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let v: serde_json::Value =
                    serde_json::from_slice(line).expect("accepted a line that is not JSON");
                let id = v["custom_id"]
                    .as_str()
                    .expect("accepted a record without custom_id");
                want.insert(id.to_owned(), v["error"].is_null());
            }
            for (id, ok) in &want {
                assert_eq!(prior.get(id), Some(*ok), "{id:?}");
            }
            let again = resume::scan(&path).expect("a repaired file is refused");
            assert!(again.repaired.is_none(), "a second repair");
            assert_eq!(again.records, prior.records);
            assert_eq!(std::fs::read(&path).unwrap(), after);
            for id in want.keys() {
                assert_eq!(again.get(id), prior.get(id));
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});
