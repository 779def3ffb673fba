//! The concise format of `dm-mod.create=` and `dmsetup create/table --concise`:
//! `name,uuid,minor,flags,table[,table...]` per device, devices separated by `;`.

use std::fmt;

use crate::args::scan_u32;
use crate::{is_c_space, TableError, TableSpec, MAX_MINOR};

/// One device of the concise format `name,uuid,minor,flags,table[,table...]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConciseDevice {
    /// Device name.
    pub name: String,
    /// UUID, `None` when the field is empty.
    pub uuid: Option<String>,
    /// Requested minor, `None` when the field is empty (allocate one).
    pub minor: Option<u32>,
    /// Flags `ro` (DM_READONLY_FLAG); `rw` or empty otherwise.
    pub read_only: bool,
    /// udm's `+interpose` flag suffix: the seed's DM_INTERPOSED_FLAG, as `dm_early_create`
    /// accepts it.
    pub interpose: bool,
    /// The table, one concise table field per line.
    pub table: TableSpec,
}

fn push_quoted(out: &mut String, s: &str) {
    for (i, c) in s.chars().enumerate() {
        // Leading whitespace too: the parser skips it after a separator.
        if matches!(c, ',' | ';' | '\\') || (i == 0 && is_c_space(c)) {
            out.push('\\');
        }
        out.push(c);
    }
}

impl ConciseDevice {
    /// Parses a concise list of devices separated by `;` (`dmsetup create --concise`):
    /// backslash escapes the next character, whitespace after a separating comma or semicolon
    /// is skipped, and the table lines (separated by commas) are parsed like table text.
    pub fn parse_list(text: &str) -> Result<Vec<ConciseDevice>, TableError> {
        let mut devices = Vec::new();
        let mut fields: Vec<String> = vec![String::new()];
        let mut started = false;
        let mut chars = text.chars().peekable();
        // Leading whitespace before the first device is skipped like after a ';'.
        while chars.peek().is_some_and(|c| is_c_space(*c)) {
            chars.next();
        }
        while let Some(c) = chars.next() {
            started = true;
            let field = fields.len() - 1;
            match c {
                '\\' => match chars.next() {
                    Some(n) => fields[field].push(n),
                    None => {
                        return Err(TableError::invalid(
                            None,
                            "backslash must be followed by another character at end of string",
                        ))
                    }
                },
                ',' if field < 4 => {
                    fields.push(String::new());
                    while chars.peek().is_some_and(|c| is_c_space(*c)) {
                        chars.next();
                    }
                }
                ',' => fields[field].push('\n'),
                ';' => {
                    devices.push(Self::from_fields(&fields, devices.len())?);
                    fields = vec![String::new()];
                    started = false;
                    while chars.peek().is_some_and(|c| is_c_space(*c)) {
                        chars.next();
                    }
                }
                c => fields[field].push(c),
            }
        }
        if started {
            devices.push(Self::from_fields(&fields, devices.len())?);
        }
        Ok(devices)
    }

    fn from_fields(fields: &[String], index: usize) -> Result<ConciseDevice, TableError> {
        let at = |msg: String| TableError::invalid(None, format!("device {}: {msg}", index + 1));
        let [name, uuid, minor, flags, table] = fields else {
            return Err(at(format!(
                "five comma-separated fields are required for each device \
                 (name,uuid,minor,flags,table), found {}",
                fields.len()
            )));
        };
        if name.is_empty() {
            return Err(at("empty device name".into()));
        }
        let minor = if minor.is_empty() {
            None
        } else {
            match scan_u32(minor) {
                Some(m) if m <= MAX_MINOR => Some(m),
                _ => return Err(at(format!("{name}: invalid minor {minor:?}"))),
            }
        };
        let (read_only, interpose) = match flags.as_str() {
            "" | "rw" => (false, false),
            "ro" => (true, false),
            "rw+interpose" => (false, true),
            "ro+interpose" => (true, true),
            other => {
                return Err(at(format!(
                    "{name}: invalid flags parameter '{other}': must be 'ro' or 'rw' or empty, \
                     optionally followed by '+interpose'"
                )))
            }
        };
        let table = TableSpec::parse(table).map_err(|e| TableError {
            msg: format!("device {} ({name}): {}", index + 1, e.msg),
            ..e
        })?;
        Ok(ConciseDevice {
            name: name.clone(),
            uuid: (!uuid.is_empty()).then(|| uuid.clone()),
            minor,
            read_only,
            interpose,
            table,
        })
    }

    /// Prints devices as `dmsetup table --concise` does: devices joined by `;`.
    pub fn format_list(devices: &[ConciseDevice]) -> String {
        devices
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The flags field: `ro`/`rw`, with `+interpose` for an interposed table.
    pub fn flags(&self) -> &'static str {
        match (self.read_only, self.interpose) {
            (false, false) => "rw",
            (true, false) => "ro",
            (false, true) => "rw+interpose",
            (true, true) => "ro+interpose",
        }
    }
}

impl fmt::Display for ConciseDevice {
    /// `name,uuid,minor,flags` then `,start len type params` per table line, with `,`, `;` and
    /// `\` escaped, as dmsetup prints it. A device without table lines gets an empty table
    /// field so that it parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        push_quoted(&mut s, &self.name);
        s.push(',');
        push_quoted(&mut s, self.uuid.as_deref().unwrap_or(""));
        s.push(',');
        if let Some(m) = self.minor {
            s.push_str(&m.to_string());
        }
        s.push(',');
        s.push_str(self.flags());
        if self.table.lines.is_empty() {
            s.push(',');
        }
        for l in &self.table.lines {
            s.push(',');
            s.push_str(&format!("{} {} ", l.start, l.len));
            push_quoted(&mut s, &l.target_type);
            s.push(' ');
            push_quoted(&mut s, &l.params);
        }
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concise_parse_and_print() {
        let s = "test-linear-small,,,ro,0 2097152 linear /dev/loop0 0, 2097152 2097152 linear /dev/loop1 0";
        let d = ConciseDevice::parse_list(s).unwrap();
        assert_eq!(d.len(), 1);
        assert!(d[0].read_only && !d[0].interpose);
        assert_eq!(d[0].table.lines.len(), 2);
        assert_eq!(
            d[0].to_string(),
            "test-linear-small,,,ro,0 2097152 linear /dev/loop0 0,2097152 2097152 linear /dev/loop1 0"
        );
        let two = "a,,,,0 8 zero;b,u\\,1,3,rw+interpose, 0 8 linear x\\\\y 0";
        let d = ConciseDevice::parse_list(two).unwrap();
        assert_eq!(d[1].uuid.as_deref(), Some("u,1"));
        assert_eq!(d[1].minor, Some(3));
        assert!(d[1].interpose);
        assert_eq!(d[1].table.lines[0].params, "x\\y 0");
        assert_eq!(
            ConciseDevice::format_list(&d),
            "a,,,rw,0 8 zero ;b,u\\,1,3,rw+interpose,0 8 linear x\\\\y 0"
        );
    }

    #[test]
    fn minor_is_at_most_max_minor() {
        let ok = format!("a,,{MAX_MINOR},,0 8 zero");
        assert_eq!(
            ConciseDevice::parse_list(&ok).unwrap()[0].minor,
            Some(MAX_MINOR)
        );
        let big = format!("a,,{},,0 8 zero", MAX_MINOR + 1);
        assert!(ConciseDevice::parse_list(&big).is_err());
    }
}
