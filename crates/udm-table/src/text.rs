//! The dmsetup text format: one `<start> <len> <target_type> <params>` line per target.

use std::fmt;

use serde::{Deserialize, Serialize};
use udm_types::Errno;

use crate::{is_c_space, TableError, DM_MAX_TARGETS, DM_MAX_TYPE_NAME, MAX_TABLE_SECTORS};

fn trim_c(s: &str) -> &str {
    s.trim_matches(is_c_space)
}

/// Splits off the first whitespace-delimited token; `None` when only whitespace is left.
fn next_token(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(is_c_space);
    if s.is_empty() {
        return None;
    }
    let end = s.find(is_c_space).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

/// One table line: `<start> <len> <target_type> <params>`. The one line type of udm: a parsed
/// line, a line of `table` or `status` output (`params` is then the status text), and the
/// control protocol's line record (its JSON fields are these four names).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TableLine {
    /// First sector of the target in the mapped device.
    pub start: u64,
    /// Length in sectors.
    pub len: u64,
    /// Target type name (`linear`).
    pub target_type: String,
    /// Constructor arguments as written (split later with [`crate::split_args`]), or status.
    pub params: String,
}

impl fmt::Display for TableLine {
    /// The `dmsetup table` form, including its trailing space when `params` is empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.start, self.len, self.target_type, self.params
        )
    }
}

/// A parsed table: its target lines in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableSpec {
    /// The target lines, comments and blank lines removed.
    pub lines: Vec<TableLine>,
}

/// Parses a dmsetup number (`%llu`): decimal digits, optionally after `+`. Unlike glibc, an
/// overflowing or negative number is refused rather than wrapped.
fn parse_table_number(tok: &str) -> Option<u64> {
    let digits = tok.strip_prefix('+').unwrap_or(tok);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// dmsetup's `_parse_line` on one line: `Ok(None)` for blank and comment lines.
fn parse_line(raw: &str) -> Result<Option<TableLine>, String> {
    let s = trim_c(raw);
    if s.is_empty() || s.starts_with('#') {
        return Ok(None);
    }
    const FORMAT: &str = "invalid format: expected <start> <length> <target type> [<arguments>]";
    let (start_tok, rest) = next_token(s).ok_or(FORMAT)?;
    let (len_tok, rest) = next_token(rest).ok_or(FORMAT)?;
    let (type_tok, rest) = next_token(rest).ok_or(FORMAT)?;
    let start = parse_table_number(start_tok)
        .ok_or_else(|| format!("{FORMAT}: bad start sector {start_tok:?}"))?;
    let len =
        parse_table_number(len_tok).ok_or_else(|| format!("{FORMAT}: bad length {len_tok:?}"))?;
    if type_tok.len() >= DM_MAX_TYPE_NAME {
        return Err(format!(
            "target type name {type_tok} is too long (at most {} characters)",
            DM_MAX_TYPE_NAME - 1
        ));
    }
    let rest = rest.trim_start_matches(is_c_space);
    // dmsetup cuts the parameters at the first '#', wherever it is.
    let params = match rest.find('#') {
        Some(i) => &rest[..i],
        None => rest,
    };
    Ok(Some(TableLine {
        start,
        len,
        target_type: type_tok.to_string(),
        params: params.trim_end_matches(is_c_space).to_string(),
    }))
}

impl TableSpec {
    /// Parses table text exactly as `dmsetup create`/`load` reads it: one target per line,
    /// surrounding whitespace trimmed, blank lines and lines starting with `#` skipped, a
    /// trailing `# comment` removed. Errors carry the 1-based text line number.
    pub fn parse(text: &str) -> Result<TableSpec, TableError> {
        let mut lines = Vec::new();
        for (i, raw) in text.split('\n').enumerate() {
            match parse_line(raw) {
                Ok(Some(spec)) => lines.push(spec),
                Ok(None) => {}
                Err(msg) => return Err(TableError::invalid(Some(i + 1), msg)),
            }
        }
        Ok(TableSpec { lines })
    }

    /// Size of the mapped device the table describes (end of its last line).
    pub fn size(&self) -> u64 {
        self.lines
            .last()
            .map(|l| l.start.saturating_add(l.len))
            .unwrap_or(0)
    }

    /// The kernel's layout checks (`dm_table_create`, `dm_table_add_target`, `adjoin`): at
    /// least one and at most [`DM_MAX_TARGETS`] targets, none of zero length, contiguous from
    /// sector 0, ending at most at [`MAX_TABLE_SECTORS`].
    pub fn validate_layout(&self) -> Result<(), TableError> {
        check_count(self.lines.len())?;
        let mut next = 0u64;
        for (i, l) in self.lines.iter().enumerate() {
            let end = check_extent(i + 1, l.start, l.len)?;
            check_adjoin(i + 1, &l.target_type, l.start, next)?;
            next = end;
        }
        Ok(())
    }
}

/// Target count check of `dm_table_create`: at least one, at most [`DM_MAX_TARGETS`]. Public
/// because `Table::build` runs the checks interleaved with construction, in the kernel's order.
pub fn check_count(n: usize) -> Result<(), TableError> {
    if n == 0 {
        return Err(TableError::invalid(None, "no targets specified"));
    }
    if n > DM_MAX_TARGETS {
        return Err(TableError {
            line: None,
            errno: Errno::EOVERFLOW,
            msg: format!("too many targets: {n} > {DM_MAX_TARGETS}"),
        });
    }
    Ok(())
}

/// Zero length and overflow checks of one line; returns its end sector.
pub fn check_extent(line: usize, start: u64, len: u64) -> Result<u64, TableError> {
    if len == 0 {
        return Err(TableError::invalid(Some(line), "zero-length target"));
    }
    match start.checked_add(len) {
        Some(end) if end <= MAX_TABLE_SECTORS => Ok(end),
        _ => Err(TableError::invalid(Some(line), "too large device")),
    }
}

/// The kernel's `adjoin`: a line must start where the previous one ended.
pub fn check_adjoin(line: usize, ty: &str, start: u64, expected: u64) -> Result<(), TableError> {
    if start != expected {
        return Err(TableError::invalid(
            Some(line),
            format!("{ty}: Gap in table (target starts at {start}, expected {expected})"),
        ));
    }
    Ok(())
}

impl std::str::FromStr for TableSpec {
    type Err = TableError;

    /// Same as [`TableSpec::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TableSpec::parse(s)
    }
}

impl fmt::Display for TableSpec {
    /// The `dmsetup table` form: one line per target, each ending in a newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_skips_comments_and_blank_lines() {
        let t =
            TableSpec::parse("# header\n\n  0 10 linear 8:0 0 # comment\n\t10  5\tzero\r\n   #x\n")
                .unwrap();
        assert_eq!(t.lines.len(), 2);
        assert_eq!(t.lines[0].params, "8:0 0");
        assert_eq!(t.lines[1].target_type, "zero");
        assert_eq!(t.lines[1].params, "");
        assert_eq!(t.to_string(), "0 10 linear 8:0 0\n10 5 zero \n");
        t.validate_layout().unwrap();
    }

    #[test]
    fn parse_errors_name_the_line() {
        let e = TableSpec::parse("0 10 zero\nx 1 zero").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.to_string().starts_with("line 2: invalid format"));
    }

    #[test]
    fn unicode_space_is_not_a_separator() {
        // U+00A0 is whitespace to Rust but not to C isspace: it stays inside the token.
        let e = TableSpec::parse("0\u{a0}8 zero").unwrap_err();
        assert_eq!(e.line, Some(1));
        let t = TableSpec::parse("0 8 linear a\u{2003}b 0").unwrap();
        assert_eq!(t.lines[0].params, "a\u{2003}b 0");
    }

    #[test]
    fn type_names_are_shorter_than_the_kernel_buffer() {
        assert!(TableSpec::parse("0 8 abcdefghijklmno").is_ok());
        let e = TableSpec::parse("0 8 abcdefghijklmnop").unwrap_err();
        assert!(e.msg.contains("too long"), "{e}");
    }

    #[test]
    fn line_json_is_the_protocol_record() {
        let l = TableLine {
            start: 0,
            len: 8,
            target_type: "zero".into(),
            params: String::new(),
        };
        let j = serde_json::to_string(&l).unwrap();
        assert_eq!(j, r#"{"start":0,"len":8,"target_type":"zero","params":""}"#);
        assert_eq!(serde_json::from_str::<TableLine>(&j).unwrap(), l);
    }
}
