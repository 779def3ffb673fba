//! A [`TableContext`] over in-process devices, for tests of targets and of code built on
//! tables: devices are registered under a name with a fake `major:minor` (major 8, minors
//! 0, 16, 32, ... like `sda`, `sdb`, ...) and resolved by name, `/dev/NAME`, or
//! `major:minor`. The `[interpose]` prefix is accepted and ignored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use udm_io::backend::mem::MemDevice;
use udm_io::device::check_range;
use udm_io::{Bio, BioOp, BlockDevice, Extent, ExtentKind, IoError, Limits};
use udm_types::{DevId, Errno, SECTOR_SIZE};

use crate::catalog::TargetCatalog;
use crate::table::{Table, TableContext, TableError, TableSpec};
use crate::target::{DevRef, EventSink, TargetEnv, TargetError};

/// Major number of the fake devices.
pub const TEST_MAJOR: u32 = 8;

/// Resolves table device names to registered devices; counts events; records every open.
pub struct TestContext {
    devices: Vec<DevRef>,
    read_only: bool,
    env: Arc<TargetEnv>,
    events: Arc<AtomicU64>,
    /// Every `get_device` call: `(target begin, target len, path as written)`.
    pub opened: Vec<(u64, u64, String)>,
}

/// Another name for [`TestContext`], for memory-device based tests.
pub type MemContext = TestContext;

impl Default for TestContext {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for TestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestContext")
            .field("devices", &self.devices)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl TestContext {
    /// An empty context (read-write, fresh shared target state).
    pub fn new() -> Self {
        TestContext {
            devices: Vec::new(),
            read_only: false,
            env: Arc::new(TargetEnv::default()),
            events: Arc::new(AtomicU64::new(0)),
            opened: Vec::new(),
        }
    }

    /// Registers `dev` as `name` with the next fake device number.
    pub fn add_device(&mut self, name: &str, dev: Arc<dyn BlockDevice>) -> DevRef {
        let minor = self
            .devices
            .iter()
            .filter(|d| d.id.major == TEST_MAJOR)
            .map(|d| d.id.minor + 16)
            .max()
            .unwrap_or(0);
        self.add_device_with_id(name, DevId::new(TEST_MAJOR, minor), dev)
    }

    /// Registers `dev` as `name` with an explicit device number (replacing an entry with the
    /// same name).
    pub fn add_device_with_id(
        &mut self,
        name: &str,
        id: DevId,
        dev: Arc<dyn BlockDevice>,
    ) -> DevRef {
        self.devices.retain(|d| d.name != name);
        let r = DevRef {
            id,
            name: name.to_string(),
            dev,
        };
        self.devices.push(r.clone());
        r
    }

    /// Creates and registers a zeroed memory device of `sectors` sectors.
    pub fn add_mem(&mut self, name: &str, sectors: u64) -> Arc<MemDevice> {
        let m = Arc::new(MemDevice::new(sectors));
        self.add_device(name, m.clone());
        m
    }

    /// Creates and registers a sparse device of `sectors` sectors (kernel-documentation sizes).
    pub fn add_sparse(&mut self, name: &str, sectors: u64) -> Arc<SparseDevice> {
        let d = Arc::new(SparseDevice::new(sectors));
        self.add_device(name, d.clone());
        d
    }

    /// The registered device `name`.
    pub fn device(&self, name: &str) -> Option<DevRef> {
        self.devices.iter().find(|d| d.name == name).cloned()
    }

    /// Loads following tables read-only (or not).
    pub fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
    }

    /// Replaces the shared target state (to share it between several contexts).
    pub fn set_env(&mut self, env: Arc<TargetEnv>) {
        self.env = env;
    }

    /// Number of dm events raised by targets built with this context.
    pub fn events_raised(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    /// Parses `text` and builds it with the built-in targets.
    pub fn build(&mut self, text: &str) -> Result<Table, TableError> {
        self.build_with(text, &TargetCatalog::with_builtins())
    }

    /// Parses `text` and builds it with the types of `catalog`.
    pub fn build_with(&mut self, text: &str, catalog: &TargetCatalog) -> Result<Table, TableError> {
        let spec = TableSpec::parse(text)?;
        Table::build(&spec, catalog, self)
    }

    fn resolve(&self, path: &str) -> Result<DevRef, TargetError> {
        let path = path.strip_prefix("[interpose]").unwrap_or(path);
        if let Ok(id) = path.parse::<DevId>() {
            return self
                .devices
                .iter()
                .find(|d| d.id == id)
                .cloned()
                .ok_or_else(|| TargetError::new(Errno::ENXIO, format!("{path}: no such device")));
        }
        let name = path.strip_prefix("/dev/").unwrap_or(path);
        self.device(name)
            .ok_or_else(|| TargetError::new(Errno::ENOENT, format!("{path}: no such device")))
    }
}

impl TableContext for TestContext {
    fn get_device(&mut self, begin: u64, len: u64, path: &str) -> Result<DevRef, TargetError> {
        self.opened.push((begin, len, path.to_string()));
        self.resolve(path)
    }

    fn events(&self) -> EventSink {
        let c = self.events.clone();
        EventSink::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        })
    }

    fn env(&self) -> Arc<TargetEnv> {
        self.env.clone()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

/// A device that stores only the sectors written to it (others read as zeroes), so tests can
/// use the sizes of the kernel documentation examples without allocating them.
pub struct SparseDevice {
    size: u64,
    limits: Limits,
    sectors: Mutex<HashMap<u64, Vec<u8>>>,
}

impl SparseDevice {
    /// A zeroed device of `sectors` sectors.
    pub fn new(sectors: u64) -> Self {
        Self::with_limits(sectors, Limits::default())
    }

    /// A zeroed device with explicit limits.
    pub fn with_limits(sectors: u64, limits: Limits) -> Self {
        SparseDevice {
            size: sectors,
            limits,
            sectors: Mutex::new(HashMap::new()),
        }
    }

    /// Contents of `count` sectors from `sector` (zeroes where never written).
    pub fn read_sectors(&self, sector: u64, count: u64) -> Vec<u8> {
        let map = self.sectors.lock();
        let mut out = Vec::with_capacity((count * SECTOR_SIZE) as usize);
        for s in sector..sector + count {
            match map.get(&s) {
                Some(d) => out.extend_from_slice(d),
                None => out.resize(out.len() + SECTOR_SIZE as usize, 0),
            }
        }
        out
    }

    /// Number of sectors holding written data.
    pub fn written_sectors(&self) -> usize {
        self.sectors.lock().len()
    }
}

impl BlockDevice for SparseDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        check_range(&bio, self.size)?;
        let ss = SECTOR_SIZE as usize;
        let start = bio.sector;
        let n = bio.sectors();
        let mut map = self.sectors.lock();
        match bio.op {
            BioOp::Read(buf) => {
                for (i, chunk) in buf.chunks_mut(ss).enumerate() {
                    match map.get(&(start + i as u64)) {
                        Some(d) => chunk.copy_from_slice(&d[..chunk.len()]),
                        None => chunk.fill(0),
                    }
                }
            }
            BioOp::Write(buf) => {
                for (i, chunk) in buf.chunks(ss).enumerate() {
                    let mut d = vec![0u8; ss];
                    d[..chunk.len()].copy_from_slice(chunk);
                    map.insert(start + i as u64, d);
                }
            }
            BioOp::Flush => {}
            BioOp::Discard(_) | BioOp::WriteZeroes(_) => {
                for s in start..start + n {
                    map.remove(&s);
                }
            }
        }
        Ok(())
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        let map = self.sectors.lock();
        let end = sector.saturating_add(sectors).min(self.size);
        let kind = |s: u64| {
            if map.contains_key(&s) {
                ExtentKind::Data
            } else {
                ExtentKind::HoleZero
            }
        };
        if sector >= end {
            return Ok(Vec::new());
        }
        let first = kind(sector);
        // One run, scanned at most this far, keeps huge queries cheap.
        let limit = end.min(sector + 65536);
        let mut s = sector + 1;
        while s < limit && kind(s) == first {
            s += 1;
        }
        Ok(vec![Extent {
            sectors: s - sector,
            kind: first,
        }])
    }

    fn describe(&self) -> String {
        format!("sparse test device ({} sectors)", self.size)
    }
}
