//! Table text without the data path: the dmsetup text format, the kernel's `dm-mod.create=`
//! concise format, the kernel's argument helpers and every target's typed arguments and status
//! ([`params`]). udmd (through udm-target) and the CLI both parse with this crate, so they
//! cannot disagree about what a table or a status line is.
//!
//! Parsing follows dmsetup's `_parse_line` (text) and `_create_concise` (concise) and the
//! kernel's `dm_split_args`; layout checks follow `drivers/md/dm-table.c`. Where the C code
//! silently wraps an overflowing number, udm refuses it.

pub mod args;
mod concise;
pub mod params;
mod text;

pub use args::split_args;
pub use concise::ConciseDevice;
pub use text::{check_adjoin, check_count, check_extent, TableLine, TableSpec};

use udm_types::errno::HasErrno;
use udm_types::Errno;

/// Most targets one table may hold (`DM_MAX_TARGETS`, dm-core.h); more is EOVERFLOW.
pub const DM_MAX_TARGETS: usize = 1_048_576;

/// Size of the kernel's target type name buffer (`DM_MAX_TYPE_NAME`); names must be shorter.
pub const DM_MAX_TYPE_NAME: usize = 16;

/// Largest end sector of a table (`LLONG_MAX >> SECTOR_SHIFT`, `dm_table_add_target`).
pub const MAX_TABLE_SECTORS: u64 = (i64::MAX as u64) >> 9;

/// Minors are 20 bits in the kernel (`MINORBITS`); the concise format refuses larger ones.
pub const MAX_MINOR: u32 = (1 << 20) - 1;

/// A table that cannot be parsed, validated or constructed. `line` is the 1-based number of the
/// text line (parsing) or of the target line (validation, construction) at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{msg}", line_prefix(.line))]
pub struct TableError {
    /// Line at fault, where one is.
    pub line: Option<usize>,
    /// errno the kernel (or dmsetup) would report.
    pub errno: Errno,
    /// What is wrong (the kernel's message where it has one).
    pub msg: String,
}

fn line_prefix(line: &Option<usize>) -> String {
    match line {
        Some(n) => format!("line {n}: "),
        None => String::new(),
    }
}

impl TableError {
    /// An EINVAL at `line`.
    pub fn invalid(line: Option<usize>, msg: impl Into<String>) -> Self {
        TableError {
            line,
            errno: Errno::EINVAL,
            msg: msg.into(),
        }
    }
}

impl HasErrno for TableError {
    fn errno(&self) -> Errno {
        self.errno
    }
}

/// C `isspace` in the "C" locale: the separators of dmsetup and of the kernel's argument split.
/// Unicode spaces are not separators (dmsetup reads bytes).
pub fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// Parses arbitrary bytes as table text and as concise text, printing whatever parses; never
/// panics. A target for fuzzers and property tests.
pub fn fuzz_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(spec) = TableSpec::parse(&text) {
        let _ = spec.validate_layout();
        let printed = spec.to_string();
        let _ = TableSpec::parse(&printed);
        for l in &spec.lines {
            let _ = split_args(&l.params);
        }
    }
    if let Ok(devs) = ConciseDevice::parse_list(&text) {
        let printed = ConciseDevice::format_list(&devs);
        let _ = ConciseDevice::parse_list(&printed);
    }
}
