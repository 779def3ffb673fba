//! Reading table text the way dmsetup does (lvm2 `libdm/dm-tools/dmsetup.c` `_parse_line`,
//! `_parse_table_lines`, `_parse_file`): from `--table`, from a file, or from stdin; leading and
//! trailing blanks trimmed, blank lines and lines starting with `#` skipped, a `#` comment cut
//! off the parameters, each line `<start> <length> <target> [<args>]`.

use std::io::Read;
use std::path::Path;

/// A table text that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A line is not `<start> <length> <target> [<args>]` (dmsetup's message, plus the line).
    #[error("Invalid format on line {line} of table {source_name}: expected '<start> <length> <target> [<args>]', got '{text}'")]
    Format {
        /// 1-based line number.
        line: usize,
        /// `--table`, the file name, or `on stdin`.
        source_name: String,
        /// The offending line.
        text: String,
    },
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

impl udm_types::errno::HasErrno for InputError {
    fn errno(&self) -> udm_types::Errno {
        match self {
            InputError::Format { .. } => udm_types::Errno::EINVAL,
            InputError::Open { source, .. } | InputError::Stdin(source) => {
                udm_types::Errno::from_io(source)
            }
        }
    }
}

/// One parsed table line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableLine {
    /// First sector.
    pub start: u64,
    /// Sectors.
    pub len: u64,
    /// Target type.
    pub target_type: String,
    /// Arguments (comment removed, trimmed).
    pub params: String,
}

impl TableLine {
    /// `start len type params` (no trailing blank when there are no params).
    pub fn to_text(&self) -> String {
        if self.params.is_empty() {
            format!("{} {} {}", self.start, self.len, self.target_type)
        } else {
            format!(
                "{} {} {} {}",
                self.start, self.len, self.target_type, self.params
            )
        }
    }
}

fn parse_u64(w: &str) -> Option<u64> {
    // sscanf %llu accepts an optional '+'.
    let w = w.strip_prefix('+').unwrap_or(w);
    if w.is_empty() || !w.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    w.parse().ok()
}

/// Parses table text. `source_name` names the input in errors.
pub fn parse_table(text: &str, source_name: &str) -> Result<Vec<TableLine>, InputError> {
    let mut out = Vec::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || InputError::Format {
            line: i + 1,
            source_name: source_name.to_string(),
            text: line.to_string(),
        };
        let mut rest = line;
        let mut word = || {
            let r = rest.trim_start();
            let end = r.find(char::is_whitespace).unwrap_or(r.len());
            let (w, tail) = r.split_at(end);
            rest = tail;
            w
        };
        let start = parse_u64(word()).ok_or_else(bad)?;
        let len = parse_u64(word()).ok_or_else(bad)?;
        let ttype = word().to_string();
        if ttype.is_empty() {
            return Err(bad());
        }
        let params = rest.split('#').next().unwrap_or("").trim().to_string();
        out.push(TableLine {
            start,
            len,
            target_type: ttype,
            params,
        });
    }
    Ok(out)
}

/// Joins parsed lines into the table text sent to udmd.
pub fn table_text(lines: &[TableLine]) -> String {
    lines
        .iter()
        .map(TableLine::to_text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where a table comes from: `--table` wins, then a file argument, then stdin.
pub fn read_table(
    table: Option<&str>,
    file: Option<&Path>,
    stdin: &mut dyn Read,
) -> Result<Vec<TableLine>, InputError> {
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

/// One device of a `--concise` specification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConciseDevice {
    /// Name.
    pub name: String,
    /// UUID (empty field = none).
    pub uuid: Option<String>,
    /// Requested minor (udm assigns its own; kept for reporting).
    pub minor: Option<u32>,
    /// `ro` flag.
    pub read_only: bool,
    /// udm: `ro+interpose` / `rw+interpose`, as udmd's `--create` accepts.
    pub interpose: bool,
    /// Table lines, newline-separated.
    pub table: String,
}

/// Parses dmsetup's concise format (`create --concise`, dmsetup.c `_create_concise`):
/// `name,uuid,minor,flags,table[,table]...[;name,...]`, backslash quoting the next character,
/// blanks after separating commas and semicolons skipped.
pub fn parse_concise(spec: &str) -> Result<Vec<ConciseDevice>, String> {
    let mut devices = Vec::new();
    let mut fields: Vec<String> = vec![String::new()];
    let chars: Vec<char> = spec.chars().collect();
    let mut i = 0;
    let finish = |fields: &mut Vec<String>,
                  devices: &mut Vec<ConciseDevice>|
     -> Result<(), String> {
        if fields.len() != 5 {
            return Err(format!(
                "Five comma-separated fields are required for each device (parsed {}: {})",
                fields.len(),
                fields.join(" | ")
            ));
        }
        let flags = fields[3].as_str();
        let (base, interpose) = match flags.strip_suffix("+interpose") {
            Some(b) => (b, true),
            None => (flags, false),
        };
        let read_only = match base {
            "ro" => true,
            "rw" | "" => false,
            _ => {
                return Err(format!(
                    "Invalid flags parameter '{flags}' must be 'ro' or 'rw' or empty (udm: optionally +interpose)."
                ))
            }
        };
        let minor = match fields[2].as_str() {
            "" => None,
            m => Some(
                m.parse::<u32>()
                    .map_err(|_| format!("Invalid minor '{m}'."))?,
            ),
        };
        devices.push(ConciseDevice {
            name: fields[0].clone(),
            uuid: (!fields[1].is_empty()).then(|| fields[1].clone()),
            minor,
            read_only,
            interpose,
            table: fields[4].clone(),
        });
        *fields = vec![String::new()];
        Ok(())
    };
    while i < chars.len() {
        let c = chars[i];
        let last = fields.len() - 1;
        if c == '\\' {
            match chars.get(i + 1) {
                Some(&n) => fields[last].push(n),
                None => {
                    return Err(
                        "Backslash must be followed by another character at end of string.".into(),
                    )
                }
            }
            i += 2;
            // dmsetup checks for the end of a device after each character.
            if i >= chars.len() {
                finish(&mut fields, &mut devices)?;
            }
            continue;
        }
        if c == ',' && fields.len() < 5 {
            fields.push(String::new());
            i += 1;
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            continue;
        }
        if c == ',' {
            fields[last].push('\n');
            i += 1;
            continue;
        }
        if c == ';' || i + 1 == chars.len() {
            if c != ';' {
                fields[last].push(c);
            }
            i += 1;
            finish(&mut fields, &mut devices)?;
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            continue;
        }
        fields[last].push(c);
        i += 1;
    }
    if fields.len() > 1 || !fields[0].is_empty() {
        return Err(format!(
            "Incomplete entry: five comma-separated fields are required for each device (parsed: {})",
            fields.join(" | ")
        ));
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmsetup_parsing_rules() {
        let t = "  # comment\n\n0 100 linear /dev/vda 0   # trailing\n100 8 zero\n\t100+ \n";
        let err = parse_table(t, "f").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("Invalid format on line 5 of table f"));
        let t = "  # comment\n\n0 100 linear /dev/vda 0   # trailing\n100 8 zero\n";
        let l = parse_table(t, "f").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].params, "/dev/vda 0");
        assert_eq!(table_text(&l), "0 100 linear /dev/vda 0\n100 8 zero");
    }

    #[test]
    fn bad_numbers_and_missing_type() {
        assert!(parse_table("x 1 zero", "s").is_err());
        assert!(parse_table("0 -1 zero", "s").is_err());
        assert!(parse_table("0 8", "s").is_err());
        assert!(parse_table("", "s").unwrap().is_empty());
    }

    #[test]
    fn sources() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "0 8 zero\n").unwrap();
        let mut empty: &[u8] = b"0 1 error\n";
        assert_eq!(
            read_table(Some("0 2 zero"), Some(&f), &mut empty).unwrap()[0].len,
            2
        );
        assert_eq!(read_table(None, Some(&f), &mut empty).unwrap()[0].len, 8);
        assert_eq!(read_table(None, None, &mut empty).unwrap()[0].len, 1);
        assert!(read_table(None, Some(&dir.path().join("nope")), &mut empty).is_err());
    }

    #[test]
    fn concise_format() {
        // The example of dmsetup's usage text.
        let d = parse_concise("dev1,,,,0 100 linear 253:1 0,100 100 error;dev2,,,ro,0 1 error")
            .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].name, "dev1");
        assert_eq!(d[0].table, "0 100 linear 253:1 0\n100 100 error");
        assert!(!d[0].read_only);
        assert!(d[1].read_only);
        assert_eq!(d[1].table, "0 1 error");
        let d = parse_concise("a\\,b,U, 7, rw+interpose, 0 8 linear vda 0;").unwrap();
        assert_eq!(d[0].name, "a,b");
        assert_eq!(d[0].uuid.as_deref(), Some("U"));
        assert_eq!(d[0].minor, Some(7));
        assert!(d[0].interpose);
        assert!(parse_concise("a,,,xx,0 1 zero").is_err());
        assert!(parse_concise("a,,0 1 zero").is_err());
        assert!(parse_concise("").unwrap().is_empty());
    }
}
