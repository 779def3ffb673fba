//! Constructed tables: the targets of one table slot, dispatching requests to them.
//!
//! The table text itself (dmsetup text, concise `dm-mod.create=` syntax, argument helpers) lives
//! in udm-table, which the CLI shares without linking the data path; it is re-exported here so
//! targets and the core keep one path for it. Validation and dispatch follow
//! `drivers/md/dm-table.c` and `drivers/md/dm.c`.

use std::fmt;
use std::sync::Arc;

use udm_io::{Bio, BioFlags, BioKind, BioOp, Extent, ExtentKind, IoError, Limits};
use udm_types::SECTOR_SIZE;

use crate::catalog::TargetCatalog;
use crate::target::{CtorContext, DevRef, EventSink, Target, TargetEnv, TargetError};
pub use udm_table::{
    check_adjoin, check_count, check_extent, fuzz_parse, is_c_space, split_args, ConciseDevice,
    TableError, TableLine, TableSpec, DM_MAX_TARGETS, DM_MAX_TYPE_NAME, MAX_MINOR,
    MAX_TABLE_SECTORS,
};

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

impl Table {
    /// Constructs every line of `spec` with the targets of `catalog`, in the kernel's order
    /// of checks (zero length, size, target type, contiguity, constructor), then validates the
    /// logical block alignment of target boundaries against the stacked limits.
    pub fn build(
        spec: &TableSpec,
        catalog: &TargetCatalog,
        ctx: &mut dyn TableContext,
    ) -> Result<Table, TableError> {
        check_count(spec.lines.len())?;
        let read_only = ctx.read_only();
        let mut targets: Vec<TableTarget> = Vec::with_capacity(spec.lines.len());
        let mut next = 0u64;
        for (i, l) in spec.lines.iter().enumerate() {
            let line = i + 1;
            let end = check_extent(line, l.start, l.len)?;
            let ty = catalog.get(&l.target_type).ok_or_else(|| {
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
            let whole_read = b.kind() == BioKind::Read && !t.target.reads_split_at_max_io_len();
            if mil > 0 && !whole_read && (!abnormal || t.target.discards_split_at_max_io_len()) {
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

    /// `dmsetup table` lines (parameters with devices as `major:minor`).
    pub fn table_lines(&self) -> Vec<TableLine> {
        self.lines_with(|t| t.target.table_params())
    }

    /// `dmsetup status` lines (`params` holds the status text).
    pub fn status_lines(&self) -> Vec<TableLine> {
        self.lines_with(|t| t.target.status())
    }

    fn lines_with(&self, params: impl Fn(&TableTarget) -> String) -> Vec<TableLine> {
        self.targets
            .iter()
            .map(|t| TableLine {
                start: t.start,
                len: t.len,
                target_type: t.type_name.clone(),
                params: params(t),
            })
            .collect()
    }

    /// The table as a [`TableSpec`] (devices as `major:minor`), for printing and reloading.
    pub fn spec(&self) -> TableSpec {
        TableSpec {
            lines: self.table_lines(),
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
