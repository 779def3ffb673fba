//! The contract between the mapped-device core and a target.
//!
//! The core parses a table line, asks the catalog for the [`TargetType`] by name and calls
//! [`TargetType::construct`] with a [`CtorContext`] that opens devices (handling claims and the
//! `[interpose]` prefix) and then sends every request that falls into the target to
//! [`Target::map`], already split at the target's boundaries and at [`Target::max_io_len`], with
//! sectors relative to the target's start.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use udm_io::{Bio, BlockDevice, Extent, ExtentKind, IoError};
use udm_types::errno::HasErrno;
use udm_types::{DevId, Errno};

/// A constructor or message failure, with the kernel's errno and its `ti->error` text.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{msg}")]
pub struct TargetError {
    /// errno the kernel would return for this failure.
    pub errno: Errno,
    /// Message naming the problem (the kernel's `ti->error`, where it has one).
    pub msg: String,
}

impl TargetError {
    /// An EINVAL with `msg`.
    pub fn invalid(msg: impl Into<String>) -> Self {
        TargetError {
            errno: Errno::EINVAL,
            msg: msg.into(),
        }
    }

    /// An error with an explicit errno.
    pub fn new(errno: Errno, msg: impl Into<String>) -> Self {
        TargetError {
            errno,
            msg: msg.into(),
        }
    }
}

impl HasErrno for TargetError {
    fn errno(&self) -> Errno {
        self.errno
    }
}

/// An opened underlying device, as a target holds it.
#[derive(Clone)]
pub struct DevRef {
    /// The device number printed in table output (`major:minor`).
    pub id: DevId,
    /// The udm name of the device (for messages and `deps -o devname`).
    pub name: String,
    /// Where the target sends its I/O. For an interposed table this bypasses the interposer, so
    /// the target's own I/O is not redirected back into it.
    pub dev: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for DevRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevRef({} {})", self.name, self.id)
    }
}

impl DevRef {
    /// Size of the device in sectors.
    pub fn size(&self) -> u64 {
        self.dev.size()
    }

    /// The kernel's `device_area_is_invalid`: `[start, start + len)` must lie inside the device
    /// and be aligned to its logical block size.
    pub fn check_area(&self, start: u64, len: u64) -> Result<(), TargetError> {
        let size = self.size();
        if start >= size || len > size - start {
            return Err(TargetError::invalid(format!(
                "{}: device {} too small for target: start={start}, len={len}, dev_size={size}",
                self.name, self.id
            )));
        }
        let lbs = u64::from(self.dev.limits().logical_block_size / 512).max(1);
        if start % lbs != 0 || len % lbs != 0 {
            return Err(TargetError::invalid(format!(
                "{}: start={start}, len={len} not aligned to h/w logical block size {} of {}",
                self.name,
                lbs * 512,
                self.id
            )));
        }
        Ok(())
    }
}

/// Raises a dm event on the mapped device that owns the table (bumps its event number and wakes
/// `udmsetup wait`).
#[derive(Clone)]
pub struct EventSink(Arc<dyn Fn() + Send + Sync>);

impl EventSink {
    /// Wraps a callback.
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        EventSink(Arc::new(f))
    }

    /// A sink that goes nowhere (tests).
    pub fn none() -> Self {
        EventSink(Arc::new(|| {}))
    }

    /// Raises the event (`dm_table_event`).
    pub fn raise(&self) {
        (self.0)()
    }
}

/// State shared between targets of all tables of one registry (for example every snapshot of one
/// origin). Typed slots, one per user type, created on first use.
#[derive(Default)]
pub struct TargetEnv {
    slots: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl TargetEnv {
    /// The slot of type `T`, created with `T::default()` on first use.
    pub fn get<T: Any + Send + Sync + Default>(&self) -> Arc<T> {
        let mut slots = self.slots.lock();
        let slot = slots
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()) as Arc<dyn Any + Send + Sync>)
            .clone();
        drop(slots);
        match slot.downcast::<T>() {
            Ok(t) => t,
            // The map is keyed by TypeId, so the downcast cannot fail; a fresh value keeps this
            // path panic-free all the same.
            Err(_) => Arc::new(T::default()),
        }
    }
}

/// What the core needs while constructing a target.
#[allow(clippy::len_without_is_empty)] // a target length is never "empty": zero-length targets are refused
pub trait CtorContext {
    /// First sector of the target in the mapped device (`ti->begin`).
    fn begin(&self) -> u64;
    /// Length of the target in sectors (`ti->len`).
    fn len(&self) -> u64;
    /// True when the table is loaded read-only (`-r`).
    fn read_only(&self) -> bool;
    /// Opens a device named in the table: a udm name, `major:minor` or an absolute path,
    /// optionally with the `[interpose]` prefix. The core records the claim (or, for an interposed
    /// table, the shared open and the interposer to attach at resume).
    fn get_device(&mut self, path: &str) -> Result<DevRef, TargetError>;
    /// Where the target raises dm events.
    fn events(&self) -> EventSink;
    /// Shared state between targets.
    fn env(&self) -> Arc<TargetEnv>;
}

/// Which generic operations the core sends to a target (the kernel's `num_flush_bios`,
/// `num_discard_bios`, `num_write_zeroes_bios` being non-zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetCaps {
    /// Empty flushes are sent to the target (it flushes all its devices).
    pub flush: bool,
    /// Discards are sent; otherwise they fail with EOPNOTSUPP.
    pub discard: bool,
    /// Write-zeroes are sent; otherwise they fail with EOPNOTSUPP.
    pub write_zeroes: bool,
}

impl Default for TargetCaps {
    fn default() -> Self {
        TargetCaps {
            flush: true,
            discard: false,
            write_zeroes: false,
        }
    }
}

/// A constructed target instance: one line of a table.
pub trait Target: Send + Sync {
    /// Executes a request whose sector is relative to the target start. The request never crosses
    /// the target's end nor a multiple of [`Target::max_io_len`] (from the target start). An empty
    /// flush arrives only when [`TargetCaps::flush`] is set; FUA travels with data requests.
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError>;

    /// Constructor arguments as `dmsetup table` prints them (devices as `major:minor`).
    fn table_params(&self) -> String;

    /// What `dmsetup status` prints after `start len type`.
    fn status(&self) -> String {
        String::new()
    }

    /// Handles `dmsetup message` (`argv` is the message split into words). `Ok(Some(s))` is output
    /// for the caller.
    fn message(&self, argv: &[String]) -> Result<Option<String>, TargetError> {
        let _ = argv;
        Err(TargetError::invalid("target does not accept messages"))
    }

    /// Maximum request length in sectors, measured from the target start (0 = unlimited).
    fn max_io_len(&self) -> u64 {
        0
    }

    /// Generic operations the target accepts.
    fn caps(&self) -> TargetCaps {
        TargetCaps::default()
    }

    /// Whether reads are split at [`Target::max_io_len`] too. A target that maps a read of
    /// any length itself (the snapshot reads runs of unchanged chunks from the origin in one
    /// request) says false; writes are always split.
    fn reads_split_at_max_io_len(&self) -> bool {
        true
    }

    /// Whether discards and write-zeroes are split at [`Target::max_io_len`] like data (the
    /// kernel's `max_discard_granularity`). A target that handles a whole range itself (striped
    /// sends one request per stripe) returns false and then receives ranges split only at the
    /// target's end.
    fn discards_split_at_max_io_len(&self) -> bool {
        true
    }

    /// Called before the device is suspended (delay: release held requests).
    fn presuspend(&self) {}
    /// Called once the device is suspended and drained.
    fn postsuspend(&self) {}
    /// Puts on the target's devices every write the target has acknowledged but still holds
    /// (snapshot-origin's write-back), so that I/O no longer passing through this table (an
    /// interposer being detached) sees it.
    fn drain_writeback(&self) {}
    /// Called before the table goes live; a failure aborts the resume.
    fn preresume(&self) -> Result<(), TargetError> {
        Ok(())
    }
    /// Called when the table has gone live.
    fn resume(&self) {}

    /// Devices the target uses, for `deps`, `ls --tree` and limit stacking.
    fn devices(&self) -> Vec<DevRef>;

    /// Allocation state of a range relative to the target start (NBD `base:allocation`).
    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        let _ = sector;
        Ok(vec![Extent {
            sectors,
            kind: ExtentKind::Data,
        }])
    }
}

/// A registered target type: a name, a version and a constructor.
pub trait TargetType: Send + Sync {
    /// Name used in tables (`linear`).
    fn name(&self) -> &'static str;
    /// Version printed by `dmsetup targets`.
    fn version(&self) -> [u32; 3];
    /// Builds a target from its arguments (already split, escapes resolved).
    fn construct(
        &self,
        ctx: &mut dyn CtorContext,
        args: &[String],
    ) -> Result<Box<dyn Target>, TargetError>;
}
