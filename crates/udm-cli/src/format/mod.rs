//! Pure formatting, one module per command family. Every function returns the exact bytes
//! dmsetup would print (tests compare against literal strings; comments cite the lvm2 source).

pub mod deps;
pub mod disk;
pub mod error;
pub mod export;
pub mod info;
pub mod lines;
pub mod ls;
pub mod report;
pub mod targets;

/// JSON of protocol records for `--json` (pretty, one document, trailing newline).
pub fn json<T: serde::Serialize>(v: &T) -> String {
    let mut s =
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}
