//! Tables: the dmsetup text format, the kernel's `dm-mod.create=` concise format, and a
//! constructed table that dispatches requests to its targets.
//!
//! Parsing follows dmsetup's `_parse_line` (text) and `_create_concise` (concise) and the
//! kernel's `dm_split_args`; validation and dispatch follow `drivers/md/dm-table.c` and
//! `drivers/md/dm.c`. Where the C code silently wraps an overflowing number, udm refuses it.

use std::fmt;
use std::sync::Arc;

use udm_io::{Bio, BioFlags, BioKind, BioOp, Extent, ExtentKind, IoError, Limits};
use udm_types::errno::HasErrno;
use udm_types::{Errno, SECTOR_SIZE};

use crate::registry::TargetRegistry;
use crate::target::{CtorContext, DevRef, EventSink, Target, TargetEnv, TargetError};

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

// ---------------------------------------------------------------------------------------------
// Text format
// ---------------------------------------------------------------------------------------------

/// C `isspace` in the "C" locale: the separators of dmsetup and of the kernel's argument split.
pub fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

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

/// One table line: `<start> <len> <target_type> <params>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetSpec {
    /// First sector of the target in the mapped device.
    pub start: u64,
    /// Length in sectors.
    pub len: u64,
    /// Target type name (`linear`).
    pub target_type: String,
    /// Constructor arguments as written (split later with [`split_args`]).
    pub params: String,
}

impl fmt::Display for TargetSpec {
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
    pub lines: Vec<TargetSpec>,
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
fn parse_line(raw: &str) -> Result<Option<TargetSpec>, String> {
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
    Ok(Some(TargetSpec {
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

fn check_count(n: usize) -> Result<(), TableError> {
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
fn check_extent(line: usize, start: u64, len: u64) -> Result<u64, TableError> {
    if len == 0 {
        return Err(TableError::invalid(Some(line), "zero-length target"));
    }
    match start.checked_add(len) {
        Some(end) if end <= MAX_TABLE_SECTORS => Ok(end),
        _ => Err(TableError::invalid(Some(line), "too large device")),
    }
}

fn check_adjoin(line: usize, ty: &str, start: u64, expected: u64) -> Result<(), TableError> {
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

/// The kernel's `dm_split_args`: splits on whitespace; a backslash makes the next character
/// literal (a trailing lone backslash stays as it is).
pub fn split_args(params: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = params.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| is_c_space(*c)) {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut tok = String::new();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some(n) => tok.push(n),
                    None => tok.push('\\'),
                }
                continue;
            }
            if is_c_space(c) {
                break;
            }
            tok.push(c);
        }
        out.push(tok);
    }
}

/// Argument helpers with the kernel's parsing rules, shared by every target constructor.
pub mod args {
    use crate::target::{CtorContext, DevRef, TargetError};

    /// `sscanf(s, "%llu%c")` == 1: decimal digits only. Overflow is refused (the kernel wraps).
    pub fn scan_u64(s: &str) -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }

    /// `sscanf(s, "%u%c")` == 1: decimal digits only, within `u32`.
    pub fn scan_u32(s: &str) -> Option<u32> {
        scan_u64(s).and_then(|v| u32::try_from(v).ok())
    }

    /// `kstrtouint(s, 10)`: an optional `+`, decimal digits, an optional trailing newline.
    pub fn kstrtouint(s: &str) -> Option<u32> {
        let s = s.strip_suffix('\n').unwrap_or(s);
        scan_u32(s.strip_prefix('+').unwrap_or(s))
    }

    /// `dm_get_device` with the kernel's `Device lookup failed` message, keeping the cause
    /// (and its errno: EBUSY for an exported device, ENOENT for an unknown one...).
    pub fn get_device(ctx: &mut dyn CtorContext, path: &str) -> Result<DevRef, TargetError> {
        get_device_as(ctx, path, "Device lookup failed")
    }

    /// `dm_get_device` failing with `what` followed by the cause.
    pub fn get_device_as(
        ctx: &mut dyn CtorContext,
        path: &str,
        what: &str,
    ) -> Result<DevRef, TargetError> {
        ctx.get_device(path)
            .map_err(|e| TargetError::new(e.errno, format!("{what}: {}", e.msg)))
    }

    /// A start sector argument (`Invalid device sector` otherwise), as linear, delay and
    /// flakey read it.
    pub fn sector(s: &str) -> Result<u64, TargetError> {
        scan_u64(s).ok_or_else(|| TargetError::invalid("Invalid device sector"))
    }

    /// The kernel's `struct dm_arg_set`: arguments consumed front to back.
    #[derive(Debug, Clone)]
    pub struct ArgSet<'a> {
        args: &'a [String],
    }

    impl<'a> ArgSet<'a> {
        /// All of `args`.
        pub fn new(args: &'a [String]) -> Self {
            ArgSet { args }
        }

        /// Arguments left.
        pub fn remaining(&self) -> usize {
            self.args.len()
        }

        /// `dm_shift_arg`: the next argument, if any.
        pub fn shift(&mut self) -> Option<&'a str> {
            let (first, rest) = self.args.split_first()?;
            self.args = rest;
            Some(first.as_str())
        }

        /// `dm_read_arg`: the next argument as a `u32` in `[min, max]`, else `error`.
        pub fn read_arg(&mut self, min: u32, max: u32, error: &str) -> Result<u32, TargetError> {
            self.read(min, max, error, false)
        }

        /// `dm_read_arg_group`: like [`ArgSet::read_arg`], and the value must not exceed the
        /// number of arguments left after it.
        pub fn read_arg_group(
            &mut self,
            min: u32,
            max: u32,
            error: &str,
        ) -> Result<u32, TargetError> {
            self.read(min, max, error, true)
        }

        fn read(
            &mut self,
            min: u32,
            max: u32,
            error: &str,
            grouped: bool,
        ) -> Result<u32, TargetError> {
            let v = self
                .shift()
                .and_then(scan_u32)
                .filter(|v| *v >= min && *v <= max)
                .filter(|v| !grouped || *v as usize <= self.remaining());
            v.ok_or_else(|| TargetError::invalid(error))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Concise format (dm-mod.create=, dmsetup create/table --concise)
// ---------------------------------------------------------------------------------------------

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
            match args::scan_u32(minor) {
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

// ---------------------------------------------------------------------------------------------
// Constructed tables
// ---------------------------------------------------------------------------------------------

/// What the core provides while a whole table is constructed; [`Table::build`] adapts it into
/// one [`CtorContext`] per line.
pub trait TableContext {
    /// Opens a device named by the target `[begin, begin + len)` (see
    /// [`CtorContext::get_device`]).
    fn get_device(&mut self, begin: u64, len: u64, path: &str) -> Result<DevRef, TargetError>;
    /// Where targets raise dm events.
    fn events(&self) -> EventSink;
    /// State shared between targets of all tables.
    fn env(&self) -> Arc<TargetEnv>;
    /// True when the table is loaded read-only.
    fn read_only(&self) -> bool;
}

struct LineCtx<'a> {
    begin: u64,
    len: u64,
    inner: &'a mut dyn TableContext,
}

impl CtorContext for LineCtx<'_> {
    fn begin(&self) -> u64 {
        self.begin
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn get_device(&mut self, path: &str) -> Result<DevRef, TargetError> {
        self.inner.get_device(self.begin, self.len, path)
    }
    fn events(&self) -> EventSink {
        self.inner.events()
    }
    fn env(&self) -> Arc<TargetEnv> {
        self.inner.env()
    }
}

/// One constructed line of a table.
pub struct TableTarget {
    /// First sector in the mapped device.
    pub start: u64,
    /// Length in sectors.
    pub len: u64,
    /// Target type name, as printed by `table` and `status`.
    pub type_name: String,
    /// The target instance.
    pub target: Box<dyn Target>,
}

impl fmt::Debug for TableTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.start,
            self.len,
            self.type_name,
            self.target.table_params()
        )
    }
}

/// A constructed table: the targets of one table slot of a mapped device. Requests are split
/// at target boundaries and at each target's `max_io_len`, as `dm.c` does.
#[derive(Debug)]
pub struct Table {
    targets: Vec<TableTarget>,
    limits: Limits,
    read_only: bool,
}

/// `(start, len, type, params)` of one line of `table` or `status` output.
pub type TableLine = (u64, u64, String, String);

impl Table {
    /// Constructs every line of `spec` with the targets of `registry`, in the kernel's order
    /// of checks (zero length, size, target type, contiguity, constructor), then validates the
    /// logical block alignment of target boundaries against the stacked limits.
    pub fn build(
        spec: &TableSpec,
        registry: &TargetRegistry,
        ctx: &mut dyn TableContext,
    ) -> Result<Table, TableError> {
        check_count(spec.lines.len())?;
        let read_only = ctx.read_only();
        let mut targets: Vec<TableTarget> = Vec::with_capacity(spec.lines.len());
        let mut next = 0u64;
        for (i, l) in spec.lines.iter().enumerate() {
            let line = i + 1;
            let end = check_extent(line, l.start, l.len)?;
            let ty = registry.get(&l.target_type).ok_or_else(|| {
                TableError::invalid(
                    Some(line),
                    format!("{}: unknown target type", l.target_type),
                )
            })?;
            check_adjoin(line, &l.target_type, l.start, next)?;
            next = end;
            let args = split_args(&l.params);
            let mut lctx = LineCtx {
                begin: l.start,
                len: l.len,
                inner: &mut *ctx,
            };
            let target = ty.construct(&mut lctx, &args).map_err(|e| TableError {
                line: Some(line),
                errno: e.errno,
                msg: format!("{}: {}", l.target_type, e.msg),
            })?;
            targets.push(TableTarget {
                start: l.start,
                len: l.len,
                type_name: l.target_type.clone(),
                target,
            });
        }
        let limits = stack_limits(&targets);
        validate_block_alignment(&targets, limits.logical_block_size)?;
        Ok(Table {
            targets,
            limits,
            read_only,
        })
    }

    /// Size of the mapped device in sectors.
    pub fn size(&self) -> u64 {
        self.targets.last().map(|t| t.start + t.len).unwrap_or(0)
    }

    /// Stacked queue limits: the largest logical and physical block size of all devices, the
    /// smallest non-zero maximum request size, discard and write-zeroes only where every
    /// target accepts them, a volatile cache when any device has one.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// True when the table was loaded read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The targets in order.
    pub fn targets(&self) -> &[TableTarget] {
        &self.targets
    }

    /// Number of targets (`Number of targets:` of `info`).
    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    fn index_of(&self, sector: u64) -> Option<usize> {
        let i = self.targets.partition_point(|t| t.start + t.len <= sector);
        (i < self.targets.len()).then_some(i)
    }

    /// The target containing `sector`.
    pub fn target_at(&self, sector: u64) -> Option<&TableTarget> {
        self.index_of(sector).map(|i| &self.targets[i])
    }

    /// Executes one request: an empty flush goes to every target that takes flushes; a flush
    /// with data is sent as an empty flush first, then as data without PREFLUSH; data requests
    /// are split at target boundaries and `max_io_len` and sent with target-relative sectors.
    /// Every piece is attempted; the first error (in sector order) is returned.
    pub fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        if bio.is_empty_flush() {
            return self.flush_all();
        }
        if let BioOp::Read(b) = &bio.op {
            check_whole_sectors(bio.kind(), bio.sector, b.len())?;
        }
        if let BioOp::Write(b) = &bio.op {
            check_whole_sectors(bio.kind(), bio.sector, b.len())?;
        }
        udm_io::device::check_range(&bio, self.size())?;
        let mut bio = bio;
        if bio.flags.contains(BioFlags::PREFLUSH) {
            self.flush_all()?;
            bio.flags.remove(BioFlags::PREFLUSH);
        }
        let mut first_err = None;
        let mut cur = Some(bio);
        while let Some(b) = cur.take() {
            if b.sectors() == 0 {
                break;
            }
            let Some(idx) = self.index_of(b.sector) else {
                break;
            };
            let t = &self.targets[idx];
            let off = b.sector - t.start;
            let mut max = t.len - off;
            let mil = t.target.max_io_len();
            let abnormal = matches!(b.kind(), BioKind::Discard | BioKind::WriteZeroes);
            if mil > 0 && (!abnormal || t.target.discards_split_at_max_io_len()) {
                max = max.min(mil - off % mil);
            }
            let (head, tail) = b.split(max);
            cur = tail;
            if let Err(e) = Self::map_piece(t, head.at(off)) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn map_piece(t: &TableTarget, bio: Bio<'_>) -> Result<(), IoError> {
        let caps = t.target.caps();
        let supported = match bio.kind() {
            BioKind::Discard => caps.discard,
            BioKind::WriteZeroes => caps.write_zeroes,
            _ => true,
        };
        if !supported {
            return Err(IoError::Unsupported {
                op: bio.kind(),
                device: format!("{} target at sector {}", t.type_name, t.start),
            });
        }
        t.target.map(bio)
    }

    /// Sends an empty flush to every target whose caps include flush; all are attempted.
    fn flush_all(&self) -> Result<(), IoError> {
        let mut first_err = None;
        for t in &self.targets {
            if t.target.caps().flush {
                if let Err(e) = t.target.map(Bio::flush()) {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Allocation state of `[sector, sector + sectors)`, asked of each target in turn. The
    /// answer covers at least one sector and at most the range; adjacent extents of the same
    /// kind are merged.
    pub fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        let size = self.size();
        if sector >= size || sectors > size - sector {
            return Err(IoError::OutOfRange {
                op: BioKind::Read,
                sector,
                sectors,
                size,
            });
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = sector;
        let end = sector + sectors;
        while pos < end {
            let Some(idx) = self.index_of(pos) else { break };
            let t = &self.targets[idx];
            let off = pos - t.start;
            let n = (t.len - off).min(end - pos);
            let ext = t.target.block_status(off, n)?;
            let mut covered = 0u64;
            for e in ext {
                let len = e.sectors.min(n - covered);
                if len == 0 {
                    continue;
                }
                push_extent(&mut out, len, e.kind);
                covered += len;
            }
            if covered == 0 {
                push_extent(&mut out, n, ExtentKind::Data);
                covered = n;
            }
            pos += covered;
            if covered < n {
                break;
            }
        }
        Ok(out)
    }

    /// `dmsetup table` lines: `(start, len, type, params)`.
    pub fn table_lines(&self) -> Vec<TableLine> {
        self.targets
            .iter()
            .map(|t| (t.start, t.len, t.type_name.clone(), t.target.table_params()))
            .collect()
    }

    /// `dmsetup status` lines: `(start, len, type, status)`.
    pub fn status_lines(&self) -> Vec<TableLine> {
        self.targets
            .iter()
            .map(|t| (t.start, t.len, t.type_name.clone(), t.target.status()))
            .collect()
    }

    /// The table as a [`TableSpec`] (devices as `major:minor`), for printing and reloading.
    pub fn spec(&self) -> TableSpec {
        TableSpec {
            lines: self
                .table_lines()
                .into_iter()
                .map(|(start, len, target_type, params)| TargetSpec {
                    start,
                    len,
                    target_type,
                    params,
                })
                .collect(),
        }
    }

    /// `dmsetup message`: sent to the target containing `sector`.
    pub fn message(&self, sector: u64, argv: &[String]) -> Result<Option<String>, TargetError> {
        let t = self
            .target_at(sector)
            .ok_or_else(|| TargetError::invalid("Target message sector outside device."))?;
        t.target.message(argv)
    }

    /// Devices used by all targets, each once, in order of first use (`deps`).
    pub fn devices(&self) -> Vec<DevRef> {
        let mut out: Vec<DevRef> = Vec::new();
        for t in &self.targets {
            for d in t.target.devices() {
                if !out.iter().any(|o| o.id == d.id) {
                    out.push(d);
                }
            }
        }
        out
    }

    /// Calls every target's presuspend hook.
    pub fn presuspend(&self) {
        for t in &self.targets {
            t.target.presuspend();
        }
    }

    /// Calls every target's postsuspend hook.
    pub fn postsuspend(&self) {
        for t in &self.targets {
            t.target.postsuspend();
        }
    }

    /// Calls every target's drain_writeback hook.
    pub fn drain_writeback(&self) {
        for t in &self.targets {
            t.target.drain_writeback();
        }
    }

    /// Calls every target's preresume hook, stopping at the first failure (which aborts the
    /// resume).
    pub fn preresume(&self) -> Result<(), TargetError> {
        for t in &self.targets {
            t.target.preresume()?;
        }
        Ok(())
    }

    /// Calls every target's resume hook.
    pub fn resume(&self) {
        for t in &self.targets {
            t.target.resume();
        }
    }
}

fn check_whole_sectors(op: BioKind, sector: u64, len: usize) -> Result<(), IoError> {
    if len as u64 % SECTOR_SIZE != 0 {
        return Err(IoError::Misaligned {
            op,
            sector,
            why: "buffer is not a whole number of sectors",
        });
    }
    Ok(())
}

fn push_extent(out: &mut Vec<Extent>, sectors: u64, kind: ExtentKind) {
    match out.last_mut() {
        Some(e) if e.kind == kind => e.sectors += sectors,
        _ => out.push(Extent { sectors, kind }),
    }
}

/// Logical block size of the devices of one target, in bytes (512 without devices).
fn target_lbs(t: &TableTarget) -> u32 {
    t.target
        .devices()
        .iter()
        .map(|d| d.dev.limits().logical_block_size)
        .max()
        .unwrap_or(512)
        .max(512)
}

fn stack_limits(targets: &[TableTarget]) -> Limits {
    let mut lbs = 512u32;
    let mut pbs = 512u32;
    let mut max_io = 0u64;
    let mut volatile_cache = false;
    let mut discard = true;
    let mut write_zeroes = true;
    for t in targets {
        let caps = t.target.caps();
        discard &= caps.discard;
        write_zeroes &= caps.write_zeroes;
        for d in t.target.devices() {
            let l = d.dev.limits();
            lbs = lbs.max(l.logical_block_size);
            pbs = pbs.max(l.physical_block_size);
            if l.max_io_sectors != 0 && (max_io == 0 || l.max_io_sectors < max_io) {
                max_io = l.max_io_sectors;
            }
            volatile_cache |= l.volatile_cache;
        }
    }
    Limits {
        logical_block_size: lbs,
        physical_block_size: pbs.max(lbs),
        max_io_sectors: max_io,
        discard,
        write_zeroes,
        volatile_cache,
    }
}

/// The kernel's `validate_hardware_logical_block_alignment`: any request aligned to the
/// table's logical block size must split into pieces each target's devices accept.
fn validate_block_alignment(targets: &[TableTarget], lbs_bytes: u32) -> Result<(), TableError> {
    let dev_lbs = u64::from(lbs_bytes / 512).max(1);
    let mut next_target_start = 0u64;
    let mut remaining = 0u64;
    let mut at = targets.len();
    for (i, t) in targets.iter().enumerate() {
        let ti_lbs = u64::from(target_lbs(t) / 512).max(1);
        if remaining < t.len && remaining % ti_lbs != 0 {
            at = i;
            break;
        }
        next_target_start = (next_target_start + t.len % dev_lbs) % dev_lbs;
        remaining = if next_target_start != 0 {
            dev_lbs - next_target_start
        } else {
            0
        };
    }
    if remaining != 0 {
        let idx = at.min(targets.len().saturating_sub(1));
        if let Some(t) = targets.get(idx) {
            return Err(TableError::invalid(
                Some(idx + 1),
                format!(
                    "{}: start sect {} len {} not aligned to h/w logical block size {}",
                    t.type_name, t.start, t.len, lbs_bytes
                ),
            ));
        }
    }
    Ok(())
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
    fn arg_helpers_follow_the_kernel() {
        use super::args::*;
        assert_eq!(scan_u64("0012"), Some(12));
        assert_eq!(scan_u64("+1"), None);
        assert_eq!(scan_u64("1 "), None);
        assert_eq!(scan_u64("18446744073709551616"), None);
        assert_eq!(scan_u32("4294967296"), None);
        assert_eq!(kstrtouint("+7\n"), Some(7));
        assert_eq!(kstrtouint("-7"), None);
        let v: Vec<String> = ["2", "a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut a = ArgSet::new(&v);
        assert_eq!(a.read_arg_group(0, 5, "e").unwrap(), 2);
        assert_eq!(a.shift(), Some("a"));
        let mut a = ArgSet::new(&v[..2]);
        assert_eq!(
            a.read_arg_group(0, 5, "too many").unwrap_err().msg,
            "too many"
        );
        let mut a = ArgSet::new(&v);
        assert_eq!(a.read_arg(3, 5, "low").unwrap_err().msg, "low");
        assert_eq!(a.remaining(), 3);
    }

    #[test]
    fn split_args_like_the_kernel() {
        assert_eq!(
            split_args("  a  b\\ c\td\\\\ e\\"),
            ["a", "b c", "d\\", "e\\"]
        );
        assert!(split_args(" \t ").is_empty());
    }

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
}
