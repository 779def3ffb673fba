//! Reading table text the way dmsetup does (lvm2 `libdm/dm-tools/dmsetup.c` `_parse_line`,
//! `_parse_table_lines`, `_parse_file`): from `--table`, from a file, or from stdin. The parsing
//! itself is udm-table's, the same code udmd runs, so the CLI refuses exactly what the daemon
//! refuses and sends the table in the form the daemon prints and records.

use std::io::Read;
use std::path::Path;
use udm_table::{ConciseDevice, TableError, TableSpec};
use udm_types::errno::HasErrno;

/// A table text that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A line is refused by the table parser (dmsetup's message, the cause, and the line).
    #[error("Invalid format on line {line} of table {source_name}: {}; got '{text}'", .source.msg)]
    Format {
        /// 1-based line number.
        line: usize,
        /// `--table`, the file name, or `on stdin`.
        source_name: String,
        /// The offending line.
        text: String,
        /// The parser's error.
        source: TableError,
    },
    /// A `--concise` specification is refused by the concise parser.
    #[error("Invalid concise table: {}", .0.msg)]
    Concise(#[source] TableError),
    /// The file could not be read (dmsetup: "Couldn't open '%s' for reading.").
    #[error("Couldn't open '{path}' for reading: {source}")]
    Open {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// stdin could not be read.
    #[error("Read from stdin aborted: {0}")]
    Stdin(#[source] std::io::Error),
}

impl HasErrno for InputError {
    fn errno(&self) -> udm_types::Errno {
        match self {
            InputError::Format { source, .. } | InputError::Concise(source) => source.errno(),
            InputError::Open { source, .. } | InputError::Stdin(source) => {
                udm_types::Errno::from_io(source)
            }
        }
    }
}

/// Parses table text. `source_name` names the input in errors.
pub fn parse_table(text: &str, source_name: &str) -> Result<TableSpec, InputError> {
    TableSpec::parse(text).map_err(|source| {
        let line = source.line.unwrap_or(1);
        let raw = text.split('\n').nth(line.saturating_sub(1)).unwrap_or("");
        InputError::Format {
            line,
            source_name: source_name.to_string(),
            text: raw.trim_matches(udm_table::is_c_space).to_string(),
            source,
        }
    })
}

/// Where a table comes from: `--table` wins, then a file argument, then stdin.
pub fn read_table(
    table: Option<&str>,
    file: Option<&Path>,
    stdin: &mut dyn Read,
) -> Result<TableSpec, InputError> {
    if let Some(t) = table {
        return parse_table(t, "--table");
    }
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(|source| InputError::Open {
            path: f.display().to_string(),
            source,
        })?;
        return parse_table(&text, &f.display().to_string());
    }
    let mut text = String::new();
    stdin.read_to_string(&mut text).map_err(InputError::Stdin)?;
    parse_table(&text, "on stdin")
}

/// Parses dmsetup's concise format (`create --concise`, dmsetup.c `_create_concise`):
/// `name,uuid,minor,flags,table[,table]...[;name,...]`, with udmd's `--create` parser.
pub fn parse_concise(spec: &str) -> Result<Vec<ConciseDevice>, InputError> {
    ConciseDevice::parse_list(spec).map_err(InputError::Concise)
}

#[cfg(test)]
mod tests;
