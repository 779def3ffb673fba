//! `snapshot <origin> <cow> <P|PO|N> <chunk> [<#feat> discard_zeroes_cow
//! [discard_passdown_origin]]` and `snapshot-merge` (same arguments): construction,
//! registration with the origin, handover, the snapshot's data path and status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use udm_io::{Bio, BioKind, BlockDevice, Extent, ExtentKind, IoError};
use udm_types::{Errno, SECTOR_SIZE};

use super::cow::origin_write;
use super::exception::{ChunkLocks, ChunkMap, StoreCell};
use super::merge;
use super::state::{MergeCtl, Snap, SnapState};
use super::store::{self, lbs_sectors, LoadState, StoreSpec};
use super::{min_chunk, Origins};
use crate::args::{get_device_as, FromArgs, SnapshotFeatures, SnapshotParams};
use crate::target::{CtorContext, DevRef, Target, TargetCaps, TargetError, TargetType};

/// The `snapshot` (1.16.0) and `snapshot-merge` (1.5.0) target types.
pub struct SnapshotType {
    /// True for `snapshot-merge`.
    pub merge: bool,
}

fn eio(op: BioKind, sector: u64, what: &str) -> IoError {
    IoError::errno(op, sector, Errno::EIO, what)
}
impl Snap {
    /// `snapshot_map` for a piece inside one chunk (`sector` absolute).
    fn map_piece(&self, bio: Bio<'_>, cs: u64) -> Result<(), IoError> {
        let sector = bio.sector;
        let kind = bio.kind();
        let chunk = sector / cs;
        let cow = &*self.cow.dev;
        let st = self.state.read();
        if !st.valid || st.chunk_size != cs {
            return Err(eio(kind, sector, "snapshot is invalid"));
        }
        if st.overflowed && kind != BioKind::Read {
            return Err(eio(kind, sector, "snapshot overflowed"));
        }
        let known = st.exceptions.get(&chunk).copied();
        drop(st);
        match kind {
            // Reads go to `read_runs` from `map`; one that arrives here takes the same path.
            BioKind::Read => self.read_runs(bio, cs),
            BioKind::Discard => {
                let n = bio.sectors();
                let r = self.discard_piece(bio, cs, known);
                if self.discard_passdown_origin {
                    self.origin.dev.submit(Bio::discard(sector, n))?;
                }
                r
            }
            BioKind::Write => {
                if let Some(n) = known {
                    return cow.submit(bio.at(Self::remap(n, cs, sector)));
                }
                self.write_new(bio, cs, chunk)
            }
            k => Err(IoError::Unsupported {
                op: k,
                device: "snapshot".into(),
            }),
        }
    }

    /// A snapshot read (`sector` absolute): a chunk with an exception is read from the COW;
    /// a run of chunks without one is read from the origin in one request, under shared chunk
    /// locks (as `map_piece` holds one per chunk), so a 64k read of unchanged data is one
    /// origin read, not sixteen.
    fn read_runs(&self, bio: Bio<'_>, cs: u64) -> Result<(), IoError> {
        let mut rest = Some(bio);
        while let Some(b) = rest.take() {
            let (first, last) = (b.sector / cs, (b.end() - 1) / cs);
            let st = self.state.read();
            if !st.valid || st.chunk_size != cs {
                return Err(eio(BioKind::Read, b.sector, "snapshot is invalid"));
            }
            if let Some(n) = st.exceptions.get(&first).copied() {
                drop(st);
                let avail = cs - (b.sector & (cs - 1));
                let (head, tail) = b.split(avail);
                let sector = head.sector;
                self.cow.dev.submit(head.at(Self::remap(n, cs, sector)))?;
                rest = tail;
                continue;
            }
            let mut end = first;
            while end < last && !st.exceptions.contains_key(&(end + 1)) {
                end += 1;
            }
            drop(st);
            let run: Vec<u64> = (first..=end).collect();
            self.locks.shared_many(&run);
            // Copies made while we waited are exceptions now: read up to the first of them.
            let st = self.state.read();
            let valid = st.valid;
            let clean = run
                .iter()
                .take_while(|c| !st.exceptions.contains_key(c))
                .count() as u64;
            drop(st);
            if !valid || clean == 0 {
                self.locks.unlock_shared_many(&run);
                if !valid {
                    return Err(eio(BioKind::Read, b.sector, "snapshot is invalid"));
                }
                rest = Some(b);
                continue;
            }
            let len = ((first + clean) * cs).min(b.end()) - b.sector;
            let (head, tail) = b.split(len);
            let r = self.origin.dev.submit(head);
            self.locks.unlock_shared_many(&run);
            r?;
            rest = tail;
        }
        Ok(())
    }

    fn discard_piece(&self, bio: Bio<'_>, cs: u64, known: Option<u64>) -> Result<(), IoError> {
        let Some(n) = known else {
            // No exception: completing the discard avoids a pointless copy-out.
            return Ok(());
        };
        let sector = bio.sector;
        if bio.sectors() == cs {
            // zero_exception
            let zero = vec![0u8; (cs * SECTOR_SIZE) as usize];
            self.cow.dev.submit(Bio::write(n.saturating_mul(cs), &zero))
        } else {
            self.cow.dev.submit(bio.at(Self::remap(n, cs, sector)))
        }
    }

    /// A snapshot write to a chunk without an exception: allocate, copy (unless the write covers
    /// the whole chunk), commit, then write.
    fn write_new(&self, bio: Bio<'_>, cs: u64, chunk: u64) -> Result<(), IoError> {
        let sector = bio.sector;
        let _g = self.locks.exclusive(chunk);
        let st = self.state.read();
        if !st.valid {
            return Err(eio(BioKind::Write, sector, "snapshot is invalid"));
        }
        if st.overflowed {
            return Err(eio(BioKind::Write, sector, "snapshot overflowed"));
        }
        if let Some(n) = st.exceptions.get(&chunk).copied() {
            drop(st);
            return self.cow.dev.submit(bio.at(Self::remap(n, cs, sector)));
        }
        let store = st.store.clone();
        drop(st);
        let Some(ticket) = store.prepare() else {
            let mut st = self.state.write();
            if store.with(|s| s.overflow_supported()) {
                if st.valid && !st.overflowed {
                    st.overflowed = true;
                    tracing::error!("Snapshot overflowed: Unable to allocate exception.");
                }
            } else {
                self.invalidate(&mut st, "Unable to allocate exception.");
            }
            return Err(eio(BioKind::Write, sector, "snapshot is full"));
        };
        let dest = Self::remap(ticket.new_chunk, cs, sector);
        if bio.sectors() == cs {
            let ok = self.cow.dev.submit(bio.at(dest)).is_ok();
            store.complete(ticket, chunk, ok);
            let valid = store.wait(ticket);
            if self.finish(chunk, ticket.new_chunk, valid) {
                return Ok(());
            }
            return Err(eio(BioKind::Write, sector, "snapshot invalidated"));
        }
        let mut buf = Vec::new();
        let mut have = None;
        let ok = copy_chunk(
            self,
            &*self.origin.dev,
            chunk,
            cs,
            ticket.new_chunk,
            &mut buf,
            &mut have,
        );
        store.complete(ticket, chunk, ok);
        let valid = store.wait(ticket);
        if !self.finish(chunk, ticket.new_chunk, valid) {
            return Err(eio(BioKind::Write, sector, "snapshot invalidated"));
        }
        self.cow.dev.submit(bio.at(dest))
    }

    /// `snapshot_merge_map` for a piece inside one chunk.
    fn merge_map_piece(&self, bio: Bio<'_>, cs: u64) -> Result<(), IoError> {
        let sector = bio.sector;
        let chunk = sector / cs;
        match bio.kind() {
            BioKind::Discard => Ok(()),
            BioKind::Read => {
                let st = self.state.read();
                let known = if st.valid {
                    st.exceptions.get(&chunk).copied()
                } else {
                    None
                };
                drop(st);
                match known {
                    Some(n) => self.cow.dev.submit(bio.at(Self::remap(n, cs, sector))),
                    None => self.origin.dev.submit(bio),
                }
            }
            BioKind::Write => {
                let _g = self.locks.exclusive(chunk);
                let st = self.state.read();
                let known = if st.valid {
                    st.exceptions.get(&chunk).copied()
                } else {
                    None
                };
                drop(st);
                match known {
                    Some(n) => self.cow.dev.submit(bio.at(Self::remap(n, cs, sector))),
                    None => {
                        let snaps = self.entry.snaps.read();
                        origin_write(&snaps, &*self.origin.dev, bio)
                    }
                }
            }
            k => Err(IoError::Unsupported {
                op: k,
                device: "snapshot-merge".into(),
            }),
        }
    }
}

/// Copies origin chunk `chunk` (size `cs`) to COW chunk `new_chunk` with whole-chunk I/O
/// (`start_copy`: the last chunk is clipped to the origin's end). `have` caches which origin
/// range `buf` holds so several snapshots with one geometry read the origin once.
pub fn copy_chunk(
    s: &Snap,
    origin: &dyn BlockDevice,
    chunk: u64,
    cs: u64,
    new_chunk: u64,
    buf: &mut Vec<u8>,
    have: &mut Option<(u64, u64)>,
) -> bool {
    let src = chunk * cs;
    let count = cs.min(origin.size().saturating_sub(src));
    if count == 0 {
        return true;
    }
    if *have != Some((src, count)) {
        buf.resize((count * SECTOR_SIZE) as usize, 0);
        if let Err(e) = origin.submit(Bio::read(src, buf)) {
            tracing::error!("snapshot copy: reading origin failed: {e}");
            *have = None;
            return false;
        }
        *have = Some((src, count));
    }
    match s
        .cow
        .dev
        .submit(Bio::write(new_chunk.saturating_mul(cs), buf))
    {
        Ok(()) => true,
        Err(e) => {
            tracing::error!("snapshot copy: writing COW failed: {e}");
            false
        }
    }
}

/// Snapshots in `snaps` sharing `me`'s COW device: `(active one, inactive one, count)`, and
/// the merging snapshot of the origin (`__find_snapshots_sharing_cow`).
struct Sharing {
    src: Option<Arc<Snap>>,
    dest: Option<Arc<Snap>>,
    merging: Option<Arc<Snap>>,
    count: usize,
}

fn find_sharing(snaps: &[Arc<Snap>], me: &Snap) -> Sharing {
    let mut r = Sharing {
        src: None,
        dest: None,
        merging: None,
        count: 0,
    };
    for s in snaps {
        if s.merge {
            r.merging = Some(s.clone());
        }
        if s.cow.id != me.cow.id {
            continue;
        }
        if s.state.read().active {
            r.src = Some(s.clone());
        } else {
            r.dest = Some(s.clone());
        }
        r.count += 1;
    }
    r
}

/// `__insert_snapshot`: largest chunk size first.
fn insert_sorted(snaps: &mut Vec<Arc<Snap>>, s: Arc<Snap>) {
    let cs = s.state.read().chunk_size;
    let at = snaps
        .iter()
        .position(|l| l.state.read().chunk_size < cs)
        .unwrap_or(snaps.len());
    snaps.insert(at, s);
}

/// `register_snapshot` with `__validate_exception_handover`: `Ok(true)` when `s` is a handover
/// destination (its metadata will come from the live snapshot at resume).
fn register(s: &Arc<Snap>) -> Result<bool, TargetError> {
    let mut snaps = s.entry.snaps.write();
    let sh = find_sharing(&snaps, s);
    if sh.count == 2 || sh.dest.is_some() {
        return Err(TargetError::invalid(
            "Snapshot cow pairing for exception table handover failed",
        ));
    }
    let handover = match &sh.src {
        None => false,
        Some(src) => {
            if s.merge {
                if sh.merging.is_some() {
                    return Err(TargetError::invalid("A snapshot is already merging."));
                }
                let st = src.state.read();
                if !st.store.with(|x| x.supports_merge()) {
                    return Err(TargetError::invalid(
                        "Snapshot exception store does not support snapshot-merge.",
                    ));
                }
            }
            true
        }
    };
    insert_sorted(&mut snaps, s.clone());
    Ok(handover)
}

fn unregister(s: &Arc<Snap>) {
    s.entry.snaps.write().retain(|x| !Arc::ptr_eq(x, s));
}

impl TargetType for SnapshotType {
    fn name(&self) -> &'static str {
        if self.merge {
            "snapshot-merge"
        } else {
            "snapshot"
        }
    }

    fn version(&self) -> [u32; 3] {
        if self.merge {
            [1, 5, 0]
        } else {
            [1, 16, 0]
        }
    }

    fn construct(
        &self,
        ctx: &mut dyn CtorContext,
        args: &[String],
    ) -> Result<Box<dyn Target>, TargetError> {
        let p = SnapshotParams::from_args(args)?;
        let origin = get_device_as(ctx, &p.origin, "Cannot get origin device")?;
        let cow = get_device_as(ctx, &p.cow, "Cannot get COW device")?;
        if cow.id == origin.id {
            return Err(TargetError::invalid(
                "COW device cannot be the same as origin device",
            ));
        }
        let spec = StoreSpec::new(
            p.store,
            p.chunk_sectors,
            lbs_sectors(&*cow.dev),
            lbs_sectors(&*origin.dev),
        )?;
        let store = store::create(spec, cow.dev.clone());
        let entry = ctx.env().get::<Origins>().entry(origin.id);
        let snap = Arc::new(Snap {
            merge: self.merge,
            origin,
            cow,
            begin: ctx.begin(),
            table_end: ctx.begin() + ctx.len(),
            discard_zeroes_cow: p.features.discard_zeroes_cow,
            discard_passdown_origin: p.features.discard_passdown_origin,
            overflow_flag: spec.kind.overflow(),
            events: ctx.events(),
            state: RwLock::new(SnapState {
                valid: true,
                overflowed: false,
                active: false,
                merge_failed: false,
                chunk_size: 0,
                exceptions: ChunkMap::default(),
                store: Arc::new(StoreCell::new(store)),
            }),
            locks: ChunkLocks::default(),
            suspended: AtomicBool::new(false),
            dropping: AtomicBool::new(false),
            entry,
            merge_ctl: Mutex::new(MergeCtl::default()),
        });
        let handover = register(&snap)?;
        if !handover {
            let mut exceptions = ChunkMap::default();
            let store = snap.state.read().store.clone();
            let loaded = store.with(|s| {
                let r = s.read_metadata(&mut |old, new| {
                    exceptions.insert(old, new);
                });
                r.map(|l| (l, s.chunk_size()))
            });
            let (load, cs) = match loaded {
                Ok(x) => x,
                Err(e) => {
                    unregister(&snap);
                    return Err(e);
                }
            };
            if cs == 0 {
                unregister(&snap);
                return Err(TargetError::invalid("Chunk size not set"));
            }
            let mut st = snap.state.write();
            if load == LoadState::Invalid {
                tracing::warn!("Snapshot is marked invalid.");
                st.valid = false;
            }
            st.chunk_size = cs;
            st.exceptions = exceptions;
            drop(st);
            // Re-sort now that the chunk size is known.
            let mut snaps = snap.entry.snaps.write();
            snaps.retain(|x| !Arc::ptr_eq(x, &snap));
            insert_sorted(&mut snaps, snap.clone());
        }
        Ok(Box::new(SnapshotTarget { snap }))
    }
}

/// A live `snapshot` or `snapshot-merge` line.
pub struct SnapshotTarget {
    snap: Arc<Snap>,
}

impl SnapshotTarget {
    /// The shared snapshot (tests, tools).
    pub fn snap(&self) -> &Arc<Snap> {
        &self.snap
    }
}

impl Target for SnapshotTarget {
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError> {
        let s = &self.snap;
        if bio.is_empty_flush() {
            if s.merge {
                s.origin.dev.submit(Bio::flush())?;
            }
            return s.cow.dev.submit(bio);
        }
        let cs = s.state.read().chunk_size;
        if cs == 0 {
            return Err(eio(bio.kind(), bio.sector, "snapshot is not resumed"));
        }
        let abs = s.begin + bio.sector;
        if !s.merge && bio.kind() == BioKind::Read {
            return s.read_runs(bio.at(abs), cs);
        }
        let mut rest = Some(bio.at(abs));
        while let Some(b) = rest.take() {
            let avail = cs - (b.sector & (cs - 1));
            let (head, tail) = b.split(avail);
            rest = tail;
            if s.merge {
                s.merge_map_piece(head, cs)?;
            } else {
                s.map_piece(head, cs)?;
            }
        }
        Ok(())
    }

    fn table_params(&self) -> String {
        let s = &self.snap;
        let (store, chunk_sectors) = s.state.read().store.with(|x| (x.kind(), x.chunk_size()));
        SnapshotParams {
            origin: s.origin.id.to_string(),
            cow: s.cow.id.to_string(),
            store,
            chunk_sectors,
            features: SnapshotFeatures {
                discard_zeroes_cow: s.discard_zeroes_cow,
                discard_passdown_origin: s.discard_passdown_origin,
            },
        }
        .to_string()
    }

    fn status(&self) -> String {
        self.snap.status().to_string()
    }

    fn reads_split_at_max_io_len(&self) -> bool {
        // `read_runs` takes reads of any length; the merge target maps piece by piece.
        self.snap.merge
    }

    fn max_io_len(&self) -> u64 {
        let s = &self.snap;
        if s.merge {
            min_chunk(&s.entry.snaps.read()).unwrap_or(0)
        } else {
            s.state.read().chunk_size
        }
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps {
            flush: true,
            discard: self.snap.discard_zeroes_cow,
            write_zeroes: false,
        }
    }

    fn presuspend(&self) {
        if self.snap.merge {
            merge::stop_merge(&self.snap);
        }
    }

    fn postsuspend(&self) {
        self.snap.suspended.store(true, Ordering::SeqCst);
    }

    fn preresume(&self) -> Result<(), TargetError> {
        let s = &self.snap;
        let snaps = s.entry.snaps.read();
        let sh = find_sharing(&snaps, s);
        if let (Some(src), Some(_)) = (&sh.src, &sh.dest) {
            if Arc::ptr_eq(src, s) {
                return Err(TargetError::invalid(
                    "Unable to resume snapshot source until handover completes.",
                ));
            }
            if !src.suspended.load(Ordering::SeqCst) {
                return Err(TargetError::invalid(
                    "Unable to perform snapshot handover until source is suspended.",
                ));
            }
        }
        Ok(())
    }

    fn resume(&self) {
        let s = &self.snap;
        // A running merge of this origin is stopped around a handover, as the kernel does
        // while it suspends the origin.
        let merging = {
            let snaps = s.entry.snaps.read();
            snaps
                .iter()
                .find(|x| x.merge && !Arc::ptr_eq(x, s) && merge::is_running(x))
                .cloned()
        };
        if let Some(m) = &merging {
            merge::stop_merge(m);
        }
        {
            let mut snaps = s.entry.snaps.write();
            // Origin writes held for the current snapshots reach the origin before the set
            // changes (no new ones are held while the write side is taken).
            s.entry.writeback.settle();
            let sh = find_sharing(&snaps, s);
            if let (Some(src), Some(dest)) = (sh.src, sh.dest) {
                handover(&src, &dest);
            }
            snaps.retain(|x| !Arc::ptr_eq(x, s));
            insert_sorted(&mut snaps, s.clone());
            s.state.write().active = true;
        }
        s.suspended.store(false, Ordering::SeqCst);
        if let Some(m) = &merging {
            merge::start_merge(m);
        }
        if s.merge {
            merge::start_merge(s);
        }
    }

    fn devices(&self) -> Vec<DevRef> {
        vec![self.snap.origin.clone(), self.snap.cow.clone()]
    }

    /// Chunks with an exception are data; the others read from the origin and take its
    /// status. The origin is asked first: a chunk the origin changes meanwhile gets its
    /// exception before the origin is written (the copy-out order), so it is seen as data by
    /// the check that follows, never as the origin's new state.
    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        let s = &self.snap;
        let cs = s.state.read().chunk_size;
        let data = vec![Extent {
            sectors,
            kind: ExtentKind::Data,
        }];
        if cs == 0 || s.merge {
            return Ok(data);
        }
        let abs = s.begin + sector;
        let origin = s.origin.dev.block_status(abs, sectors)?;
        let st = s.state.read();
        if !st.valid {
            return Err(eio(BioKind::Read, abs, "snapshot is invalid"));
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |n: u64, kind: ExtentKind| match out.last_mut() {
            Some(l) if l.kind == kind => l.sectors += n,
            _ => out.push(Extent { sectors: n, kind }),
        };
        let mut pos = abs;
        for e in origin {
            let end = (pos + e.sectors).min(abs + sectors);
            while pos < end {
                let chunk = pos / cs;
                let next = ((chunk + 1) * cs).min(end);
                let kind = if st.exceptions.contains_key(&chunk) {
                    ExtentKind::Data
                } else {
                    e.kind
                };
                push(next - pos, kind);
                pos = next;
            }
        }
        if pos < abs + sectors {
            push(abs + sectors - pos, ExtentKind::Data);
        }
        Ok(out)
    }
}

/// `__handover_exceptions`: the destination takes the source's exceptions and store; the
/// source becomes invalid.
fn handover(src: &Arc<Snap>, dest: &Arc<Snap>) {
    let mut a = src.state.write();
    let mut b = dest.state.write();
    std::mem::swap(&mut a.exceptions, &mut b.exceptions);
    std::mem::swap(&mut a.store, &mut b.store);
    b.store
        .with(|x| x.set_overflow_supported(dest.overflow_flag));
    b.chunk_size = b.store.with(|x| x.chunk_size());
    a.chunk_size = a.store.with(|x| x.chunk_size());
    b.valid = a.valid;
    b.overflowed = a.overflowed;
    a.valid = false;
}

impl Drop for SnapshotTarget {
    fn drop(&mut self) {
        let s = &self.snap;
        {
            let snaps = s.entry.snaps.read();
            let sh = find_sharing(&snaps, s);
            if let (Some(src), Some(dest)) = (&sh.src, &sh.dest) {
                if Arc::ptr_eq(src, s) && !Arc::ptr_eq(dest, s) {
                    dest.state.write().valid = false;
                    tracing::error!("Cancelling snapshot handover.");
                }
            }
        }
        if s.merge {
            merge::stop_merge(s);
        }
        // As the kernel's destructor: off the origin's list first, so that new origin writes
        // no longer copy into this snapshot, then wait for the copies still pending (origin
        // writes held meanwhile, which reach the origin once those are committed). Settling
        // first had writers keep adding copies to wait for.
        let t0 = std::time::Instant::now();
        s.dropping.store(true, Ordering::SeqCst);
        unregister(s);
        let t1 = std::time::Instant::now();
        s.entry.writeback.settle();
        tracing::debug!(
            unregister_ms = (t1 - t0).as_secs_f64() * 1e3,
            settle_ms = t1.elapsed().as_secs_f64() * 1e3,
            "snapshot destroyed"
        );
    }
}
