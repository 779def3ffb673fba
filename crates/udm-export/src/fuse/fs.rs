//! The FUSE filesystem of one mount: a root directory holding one regular file per exported
//! device. Requests are served by several fuser worker threads at once; the data path takes no
//! lock but the file table's read lock (to find the file) and, for writes, the file's
//! read-modify-write lock in shared mode.

use super::io::{self, Fallocate, Geometry, Scratch};
use super::sys;
use fuser::{
    AccessFlags, Errno as FuseErrno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};
use parking_lot::RwLock;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use udm_io::{BlockDevice, IoError};
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// Inode of the mount's root directory.
pub(crate) const ROOT_INO: u64 = 1;

/// How long the kernel may cache names and attributes. Short, because a mapped device's size
/// can change on resume and files come and go with `export add/remove`.
const TTL: Duration = Duration::from_secs(1);

/// Request counters of one exported file.
#[derive(Default)]
pub(crate) struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub fallocates: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// One exported device, shown as one regular file.
pub(crate) struct FileEntry {
    pub name: String,
    pub ino: u64,
    pub dev: Arc<dyn BlockDevice>,
    pub read_only: bool,
    /// Open file handles (a loop device holds one).
    pub handles: AtomicU64,
    /// Set while the file is being removed: new lookups and opens fail with ENOENT.
    pub closing: AtomicBool,
    /// Shared for aligned writes, exclusive for read-modify-write.
    pub rmw: RwLock<()>,
    pub counters: Counters,
    pub created: SystemTime,
}

impl FileEntry {
    pub(crate) fn new(
        name: &str,
        ino: u64,
        dev: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> FileEntry {
        FileEntry {
            name: name.to_string(),
            ino,
            dev,
            read_only,
            handles: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            rmw: RwLock::new(()),
            counters: Counters::default(),
            created: SystemTime::now(),
        }
    }

    fn attr(&self, uid: u32, gid: u32) -> FileAttr {
        let limits = self.dev.limits();
        let size = self.dev.size().saturating_mul(udm_types::SECTOR_SIZE);
        FileAttr {
            ino: INodeNo(self.ino),
            size,
            blocks: size / 512,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::RegularFile,
            perm: if self.read_only { 0o400 } else { 0o600 },
            nlink: 1,
            uid,
            gid,
            rdev: 0,
            blksize: limits.physical_block_size.max(512),
            flags: 0,
        }
    }
}

/// The files of one mount, shared between the mount's worker threads and [`super::FuseExports`].
pub(crate) struct MountState {
    by_name: RwLock<BTreeMap<String, Arc<FileEntry>>>,
    by_ino: RwLock<HashMap<u64, Arc<FileEntry>>>,
    next_ino: AtomicU64,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    created: SystemTime,
}

/// Why a file could not be taken out of a mount.
pub(crate) enum RemoveRefused {
    /// No such file.
    NotFound,
    /// Still open.
    Busy(u64),
}

impl MountState {
    pub(crate) fn new() -> MountState {
        let (uid, gid) = sys::owner();
        MountState {
            by_name: RwLock::new(BTreeMap::new()),
            by_ino: RwLock::new(HashMap::new()),
            next_ino: AtomicU64::new(ROOT_INO + 1),
            next_fh: AtomicU64::new(1),
            uid,
            gid,
            created: SystemTime::now(),
        }
    }

    /// Adds a file; false when the name is taken.
    pub(crate) fn insert(&self, name: &str, dev: Arc<dyn BlockDevice>, read_only: bool) -> bool {
        let mut names = self.by_name.write();
        if names.contains_key(name) {
            return false;
        }
        let ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
        let e = Arc::new(FileEntry::new(name, ino, dev, read_only));
        self.by_ino.write().insert(ino, e.clone());
        names.insert(name.to_string(), e);
        true
    }

    /// Number of files.
    pub(crate) fn len(&self) -> usize {
        self.by_name.read().len()
    }

    /// All files, in name order.
    pub(crate) fn entries(&self) -> Vec<Arc<FileEntry>> {
        self.by_name.read().values().cloned().collect()
    }

    /// Marks `name` as closing if nothing holds it open. Opens are counted under the table's
    /// read lock and this check runs under its write lock, so no open can slip in between.
    pub(crate) fn begin_remove(&self, name: &str) -> Result<Arc<FileEntry>, RemoveRefused> {
        let names = self.by_name.write();
        let e = names.get(name).ok_or(RemoveRefused::NotFound)?;
        if e.closing.load(Ordering::Acquire) {
            return Err(RemoveRefused::NotFound);
        }
        let handles = e.handles.load(Ordering::Acquire);
        if handles > 0 {
            return Err(RemoveRefused::Busy(handles));
        }
        e.closing.store(true, Ordering::Release);
        Ok(e.clone())
    }

    /// Takes a closing file out of the table for good.
    pub(crate) fn finish_remove(&self, e: &FileEntry) {
        self.by_name.write().remove(&e.name);
        self.by_ino.write().remove(&e.ino);
    }

    /// Empties the table (shutdown).
    pub(crate) fn clear(&self) {
        for e in self.by_name.write().values() {
            e.closing.store(true, Ordering::Release);
        }
        self.by_name.write().clear();
        self.by_ino.write().clear();
    }

    fn get(&self, ino: u64) -> Option<Arc<FileEntry>> {
        self.by_ino.read().get(&ino).cloned()
    }

    fn get_name(&self, name: &OsStr) -> Option<Arc<FileEntry>> {
        let name = name.to_str()?;
        self.by_name
            .read()
            .get(name)
            .filter(|e| !e.closing.load(Ordering::Acquire))
            .cloned()
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT_INO),
            size: 0,
            blocks: 0,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// The fuser filesystem of one mount.
pub(crate) struct DeviceFs {
    pub state: Arc<MountState>,
}

thread_local! {
    /// Per-worker buffer for reads and read-modify-write, reused so the data path does not
    /// allocate per request.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn fuse_errno(e: Errno) -> FuseErrno {
    FuseErrno::from_i32(e.0)
}

fn io_errno(e: &IoError) -> FuseErrno {
    fuse_errno(e.errno())
}

/// Logs a failed device request; the client sees its errno.
fn log_error(entry: &FileEntry, what: &str, e: &IoError) {
    entry.counters.errors.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(file = %entry.name, "fuse {what} failed: {e} ({})", e.errno());
}

impl DeviceFs {
    fn entry(&self, ino: INodeNo) -> Result<Arc<FileEntry>, FuseErrno> {
        self.state.get(ino.0).ok_or(FuseErrno::ENOENT)
    }
}

impl Filesystem for DeviceFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_ASYNC_DIO | InitFlags::FUSE_PARALLEL_DIROPS;
        let _ = config.add_capabilities(wanted & config.capabilities());
        // Let the kernel keep many asynchronous direct requests (loop with direct I/O) in flight.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        sys::mark_io_flusher();
        if parent.0 != ROOT_INO {
            return reply.error(FuseErrno::ENOENT);
        }
        match self.state.get_name(name) {
            Some(e) => reply.entry(&TTL, &e.attr(self.state.uid, self.state.gid), Generation(0)),
            None => reply.error(FuseErrno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        sys::mark_io_flusher();
        if ino.0 == ROOT_INO {
            return reply.attr(&TTL, &self.state.root_attr());
        }
        match self.entry(ino) {
            Ok(e) => reply.attr(&TTL, &e.attr(self.state.uid, self.state.gid)),
            Err(err) => reply.error(err),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        sys::mark_io_flusher();
        if ino.0 == ROOT_INO {
            return reply.attr(&TTL, &self.state.root_attr());
        }
        let e = match self.entry(ino) {
            Ok(e) => e,
            Err(err) => return reply.error(err),
        };
        let attr = e.attr(self.state.uid, self.state.gid);
        // A device cannot be resized through its file; truncating to its own size is harmless
        // (O_TRUNC opens of tools that write whole images). Mode, owner and times are fixed.
        if let Some(s) = size {
            if s != attr.size {
                return reply.error(FuseErrno::EPERM);
            }
        }
        reply.attr(&TTL, &attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        sys::mark_io_flusher();
        let writes = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        // The open is counted under the table's read lock (see MountState::begin_remove).
        let names = self.state.by_name.read();
        let Some(e) = self.state.get(ino.0) else {
            return reply.error(FuseErrno::ENOENT);
        };
        if e.closing.load(Ordering::Acquire) {
            return reply.error(FuseErrno::ENOENT);
        }
        if writes && e.read_only {
            return reply.error(FuseErrno::EROFS);
        }
        e.handles.fetch_add(1, Ordering::AcqRel);
        drop(names);
        let fh = self.state.next_fh.fetch_add(1, Ordering::Relaxed);
        // Direct I/O: the device may change underneath (other exports, table swaps), so the
        // kernel must not cache its pages; it also keeps loop-over-FUSE out of the page cache
        // twice and makes O_DIRECT opens (losetup --direct-io=on) work.
        reply.opened(
            FileHandle(fh),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        )
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        sys::mark_io_flusher();
        let e = match self.entry(ino) {
            Ok(e) => e,
            Err(err) => return reply.error(err),
        };
        e.counters.reads.fetch_add(1, Ordering::Relaxed);
        let geo = Geometry::of(e.dev.as_ref());
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            match io::read_at(e.dev.as_ref(), &geo, offset, u64::from(size), &mut s) {
                Ok(data) => {
                    e.counters
                        .bytes_read
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    reply.data(data);
                }
                Err(err) => {
                    log_error(&e, "read", &err);
                    reply.error(io_errno(&err));
                }
            }
            s.trim();
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        sys::mark_io_flusher();
        let e = match self.entry(ino) {
            Ok(e) => e,
            Err(err) => return reply.error(err),
        };
        e.counters.writes.fetch_add(1, Ordering::Relaxed);
        if e.read_only {
            return reply.error(FuseErrno::EROFS);
        }
        // O_SYNC / O_DSYNC writers get durable writes.
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let geo = Geometry::of(e.dev.as_ref());
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            match io::write_at(e.dev.as_ref(), &geo, offset, data, fua, &e.rmw, &mut s) {
                Ok(n) => {
                    e.counters
                        .bytes_written
                        .fetch_add(n as u64, Ordering::Relaxed);
                    reply.written(n as u32);
                }
                Err(err) => {
                    log_error(&e, "write", &err);
                    reply.error(io_errno(&err));
                }
            }
            s.trim();
        })
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): nothing is cached here, and durability is what fsync is for.
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        sys::mark_io_flusher();
        if let Some(e) = self.state.get(ino.0) {
            let _ = e
                .handles
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| h.checked_sub(1));
        }
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        sys::mark_io_flusher();
        let e = match self.entry(ino) {
            Ok(e) => e,
            Err(err) => return reply.error(err),
        };
        e.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        match e.dev.submit(udm_io::Bio::flush()) {
            Ok(()) => reply.ok(),
            Err(err) => {
                log_error(&e, "fsync", &err);
                reply.error(io_errno(&err))
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        sys::mark_io_flusher();
        if ino.0 != ROOT_INO {
            return reply.error(FuseErrno::ENOTDIR);
        }
        let mut all: Vec<(u64, FileType, String)> = vec![
            (ROOT_INO, FileType::Directory, ".".into()),
            (ROOT_INO, FileType::Directory, "..".into()),
        ];
        all.extend(
            self.state
                .entries()
                .into_iter()
                .filter(|e| !e.closing.load(Ordering::Acquire))
                .map(|e| (e.ino, FileType::RegularFile, e.name.clone())),
        );
        for (i, (ino, kind, name)) in all.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        sys::mark_io_flusher();
        let entries = self.state.entries();
        let sectors: u64 = entries.iter().map(|e| e.dev.size()).sum();
        reply.statfs(sectors, 0, 0, entries.len() as u64, 0, 4096, 255, 512)
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are enforced by the kernel (default_permissions).
        reply.ok()
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        sys::mark_io_flusher();
        let e = match self.entry(ino) {
            Ok(e) => e,
            Err(err) => return reply.error(err),
        };
        e.counters.fallocates.fetch_add(1, Ordering::Relaxed);
        if e.read_only {
            return reply.error(FuseErrno::EROFS);
        }
        let geo = Geometry::of(e.dev.as_ref());
        match io::fallocate_action(mode, offset, length, geo.size) {
            Fallocate::Nothing => reply.ok(),
            Fallocate::Refuse(errno) => reply.error(fuse_errno(errno)),
            Fallocate::Zero(zmode) => SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                match io::zero_range(e.dev.as_ref(), &geo, offset, length, zmode, &e.rmw, &mut s) {
                    Ok(()) => reply.ok(),
                    Err(err) => {
                        log_error(&e, "fallocate", &err);
                        reply.error(io_errno(&err))
                    }
                }
            }),
        }
    }
}
