//! `era <metadata dev> <origin dev> <block size>`: passes I/O to the origin and records, per
//! era, which blocks were written, in metadata byte-compatible with Linux dm-era (K
//! dm-era-target.c, v1.0.0). A write to a block not yet marked in the current era reaches the
//! origin only after its bit is committed to the metadata device: the kernel holds the write
//! until then; here it is held in memory and acknowledged at once ([`crate::writeback`], the
//! snapshot origin's volatile write cache), so writers do not wait for a metadata commit each.
//! A flush (or PREFLUSH/FUA write) waits until every held write is on the origin, and the
//! messages and a suspend first let held writes reach it, so each is marked in the era it was
//! acknowledged in, as with the kernel.
//!
//! The in-core metadata is one object per metadata device, shared by every table that names
//! that device (a table reload reuses it instead of re-reading a superblock the old table is
//! about to change). A worker thread, started at resume and stopped at suspend, digests
//! archived writesets into the era array.

mod metadata;
mod store;

pub use metadata::{Metadata, OpError, OpenError};
pub use store::{DevStore, MAX_METADATA_BLOCKS};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use udm_io::{Bio, BioFlags, BioKind, BioOp, Extent, IoError};
use udm_types::{DevId, Errno};

use crate::args::{self, EraParams, EraStatus, FromArgs};
use crate::target::{CtorContext, DevRef, Target, TargetCaps, TargetEnv, TargetError, TargetType};
use crate::writeback::{Jobs, WriteBack};

/// Bits digested per lock hold, so writes are not stalled behind a large writeset.
const DIGEST_STEP_BITS: u64 = 4096;
/// How long the idle worker waits before checking whether its device still exists.
const WORKER_IDLE: Duration = Duration::from_millis(200);
/// Origin blocks must be fewer than 2^31 (K `valid_nr_blocks`).
const MAX_NR_BLOCKS: u64 = 1 << 31;

/// The `era` target type.
#[derive(Debug, Clone, Copy, Default)]
pub struct EraType;

struct State {
    md: Metadata,
    /// The digest worker runs (between preresume and postsuspend).
    worker: bool,
    /// Bumped at each worker start, so an old worker exits.
    worker_gen: u64,
    /// Why the metadata failed: after a failed change the in-core state may be ahead of what
    /// is on disk, so nothing more is written (writes to unmarked blocks, messages and the
    /// digest fail with EIO) until a new table reads the device again.
    failed: Option<String>,
    /// Era instances using this metadata. At 0 the next table reads the device again (a
    /// worker that briefly holds the object must not make a table skip that).
    users: usize,
}

impl State {
    /// Runs a change on the metadata unless it has failed; a failure other than a refusal
    /// made before anything changed puts the metadata in the failed state.
    fn change<T>(
        &mut self,
        f: impl FnOnce(&mut Metadata) -> Result<T, OpError>,
    ) -> Result<T, OpError> {
        if let Some(why) = &self.failed {
            return Err(OpError::Failed(why.clone()));
        }
        let r = f(&mut self.md);
        if let Err(e @ OpError::Pdata(_)) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }
}

/// The in-core metadata of one metadata device.
pub struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    /// Writes waiting for their blocks to be marked: one commit covers all that queued while
    /// the previous one ran (the kernel's `process_deferred_bios` batches them the same way).
    marks: Mutex<MarkQueue>,
    marks_cv: Condvar,
    /// The metadata's in-core writeset bits, checked by writes without the state lock.
    marked: metadata::Marks,
    /// The metadata has failed (`State::failed`), readable without the state lock: writes to
    /// unmarked blocks fail at once instead of being held for a commit that cannot happen.
    broken: AtomicBool,
}

/// The writeset bits held writes need ([`crate::writeback::Jobs`]), committed in one batch by
/// the write-back's first thread (`prepare`), so that marking the next batch overlaps applying
/// the last (the second thread only applies a batch, in order, once its bits are committed).
#[derive(Default)]
struct EraMarks {
    shared: Option<Arc<Shared>>,
    ranges: Vec<(u64, u64)>,
    /// The commit's result, once `prepare` has run.
    marked: Option<Result<(), String>>,
}

impl EraMarks {
    /// Commits the ranges not yet committed, keeping the first failure.
    fn mark_now(&mut self) {
        let ranges = std::mem::take(&mut self.ranges);
        if let (Some(s), false) = (&self.shared, ranges.is_empty()) {
            let r = s.mark(ranges).map_err(|e| e.to_string());
            self.merge(Some(r));
        }
    }

    fn merge(&mut self, r: Option<Result<(), String>>) {
        if !matches!(self.marked, Some(Err(_))) && r.is_some() {
            self.marked = r;
        }
    }
}

impl Jobs for EraMarks {
    fn append(&mut self, other: Self) {
        if self.shared.is_none() {
            self.shared = other.shared;
        }
        self.ranges.extend(other.ranges);
        self.merge(other.marked);
    }

    fn prepare(&mut self, _origin: &dyn udm_io::BlockDevice) {
        self.mark_now();
    }

    fn commit(mut self) -> Result<(), String> {
        self.mark_now();
        self.marked.unwrap_or(Ok(()))
    }
}

/// The leader of one batch: ends it when dropped (recording its result and waking writers),
/// also when the commit panicked.
struct Lead<'a> {
    shared: &'a Shared,
    id: u64,
    result: Result<(), String>,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let mut q = self.shared.marks.lock();
        if let Err(why) = &self.result {
            if q.failures.len() >= 64 {
                q.failures.pop_front();
            }
            q.failures.push_back((self.id, why.clone()));
        }
        q.done = self.id;
        q.leader = false;
        drop(q);
        self.shared.marks_cv.notify_all();
    }
}

/// Group commit of writeset bits.
struct MarkQueue {
    /// Block ranges waiting for the next commit.
    pending: Vec<(u64, u64)>,
    /// The batch that ranges queued now belong to.
    gathering: u64,
    /// The last batch whose commit has finished (well or not).
    done: u64,
    /// A writer is committing a batch.
    leader: bool,
    /// Recent batches whose commit failed, with why (a failure is rare and usually puts the
    /// metadata in the failed state, so later batches fail too).
    failures: std::collections::VecDeque<(u64, String)>,
}

/// In-core metadata by metadata device, shared by the tables of one registry.
#[derive(Default)]
struct EraRegistry {
    by_meta: Mutex<HashMap<DevId, Weak<Shared>>>,
}

fn metadata_error(e: &OpError) -> TargetError {
    let errno = match e {
        OpError::Pdata(p) => Errno(p.errno()),
        OpError::Failed(_) => Errno::EIO,
        _ => Errno::EINVAL,
    };
    TargetError::new(errno, e.to_string())
}

impl Shared {
    /// Marks the block ranges `ranges` (first, last) and returns once the bits are committed:
    /// the ranges join the batch being gathered; whoever finds no commit running commits every
    /// queued range at once while later ranges gather for the next batch.
    fn mark(&self, ranges: Vec<(u64, u64)>) -> Result<(), OpError> {
        udm_io::thread::note_device_wait();
        let mut q = self.marks.lock();
        q.pending.extend(ranges);
        let mine = q.gathering;
        while q.done < mine {
            if q.leader {
                self.marks_cv.wait(&mut q);
                continue;
            }
            q.leader = true;
            let batch = std::mem::take(&mut q.pending);
            let id = q.gathering;
            q.gathering += 1;
            drop(q);
            // Should the commit panic, the guard still ends the batch (as failed), so the
            // writers waiting for it and for the next leader are not left waiting forever.
            let mut lead = Lead {
                shared: self,
                id,
                result: Err("the writeset commit panicked".into()),
            };
            let started = std::time::Instant::now();
            let r = self.change(|md| md.mark_many(&batch));
            tracing::trace!(
                ranges = batch.len(),
                us = started.elapsed().as_micros() as u64,
                "era: writeset commit"
            );
            lead.result = r.map(|_| ()).map_err(|e| e.to_string());
            drop(lead);
            q = self.marks.lock();
        }
        // (A checkpoint may have started a new era since: the block was marked in the era
        // the write was accepted in, so the batch's own result is the answer.)
        match q.failures.iter().find(|(b, _)| *b == mine) {
            Some((_, why)) => Err(OpError::Failed(why.clone())),
            // Older failures were dropped from the record: do not guess.
            None if q.failures.len() >= 64 && q.failures.front().is_some_and(|f| f.0 > mine) => {
                Err(OpError::Failed("too many failed writeset commits".into()))
            }
            None => Ok(()),
        }
    }

    /// [`State::change`] under the state lock as a call to the kernel's worker: it first kicks
    /// off the digest of what an earlier call archived ([`Metadata::kick`]), and the digest
    /// worker is woken after it; `broken` is kept up to date.
    fn change<T>(&self, f: impl FnOnce(&mut Metadata) -> Result<T, OpError>) -> Result<T, OpError> {
        let mut st = self.state.lock();
        let r = st.change(|md| {
            md.kick();
            f(md)
        });
        self.broken.store(st.failed.is_some(), Ordering::Relaxed);
        drop(st);
        self.cv.notify_all();
        r
    }

    fn open(
        env: &TargetEnv,
        meta: &DevRef,
        block_sectors: u32,
    ) -> Result<Arc<Shared>, TargetError> {
        let reg = env.get::<EraRegistry>();
        let mut by_meta = reg.by_meta.lock();
        by_meta.retain(|_, w| w.strong_count() > 0);
        let live = by_meta.get(&meta.id).and_then(Weak::upgrade).filter(|s| {
            let st = s.state.lock();
            st.users > 0 && st.failed.is_none()
        });
        if let Some(s) = live {
            let mut st = s.state.lock();
            let on_disk = st.md.superblock().data_block_size;
            if on_disk != block_sectors {
                return Err(TargetError::invalid(
                    OpenError::BlockSize {
                        on_disk,
                        table: block_sectors,
                    }
                    .to_string(),
                ));
            }
            st.users += 1;
            drop(st);
            return Ok(s);
        }
        let md = Metadata::open(Box::new(DevStore::new(meta.dev.clone())), block_sectors)
            .map_err(|e| TargetError::new(Errno(e.errno()), format!("{}: {e}", meta.name)))?;
        let marked = md.marks();
        let s = Arc::new(Shared {
            marked,
            broken: AtomicBool::new(false),
            state: Mutex::new(State {
                md,
                worker: false,
                worker_gen: 0,
                failed: None,
                users: 1,
            }),
            cv: Condvar::new(),
            marks: Mutex::new(MarkQueue {
                pending: Vec::new(),
                gathering: 1,
                done: 0,
                leader: false,
                failures: std::collections::VecDeque::new(),
            }),
            marks_cv: Condvar::new(),
        });
        by_meta.insert(meta.id, Arc::downgrade(&s));
        Ok(s)
    }

    /// Starts the digest worker (holding only a weak reference, so it ends with the device).
    fn start_worker(self: &Arc<Self>) {
        let mut st = self.state.lock();
        st.worker = true;
        st.worker_gen += 1;
        let gen = st.worker_gen;
        drop(st);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("udm-era-digest".into())
            .spawn(move || digest_worker(&weak, gen));
        if let Err(e) = spawned {
            tracing::error!("era: cannot start the digest worker: {e}");
        }
    }

    fn stop_worker(&self) {
        self.state.lock().worker = false;
        self.cv.notify_all();
    }

    /// Waits until no archived writeset is left to digest (tests, tools); false on timeout or
    /// when the worker is not running.
    pub fn wait_digested(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while st.md.digest_pending() {
            if !st.worker || st.failed.is_some() || Instant::now() >= deadline {
                return false;
            }
            self.cv
                .wait_until(&mut st, deadline.min(Instant::now() + WORKER_IDLE));
        }
        true
    }

    /// Runs `f` on the metadata under the lock (tests: the era array, the writesets).
    pub fn with_metadata<R>(&self, f: impl FnOnce(&Metadata) -> R) -> R {
        f(&self.state.lock().md)
    }
}

/// The in-core metadata of the era device whose metadata device is `meta`, if a table holds it.
pub fn shared_metadata(env: &TargetEnv, meta: DevId) -> Option<Arc<Shared>> {
    env.get::<EraRegistry>()
        .by_meta
        .lock()
        .get(&meta)
        .and_then(Weak::upgrade)
}

fn digest_worker(weak: &Weak<Shared>, gen: u64) {
    loop {
        let Some(s) = weak.upgrade() else { return };
        let mut st = s.state.lock();
        if !st.worker || st.worker_gen != gen {
            return;
        }
        if st.failed.is_some() || !st.md.digest_pending() {
            s.cv.wait_for(&mut st, WORKER_IDLE);
            continue;
        }
        if let Err(e) = st.change(|md| Ok(md.digest_step(DIGEST_STEP_BITS)?)) {
            tracing::error!("era: digest failed: {e}");
            s.broken.store(st.failed.is_some(), Ordering::Relaxed);
        }
        drop(st);
        s.cv.notify_all();
    }
}

/// An era target instance.
pub struct Era {
    meta: DevRef,
    origin: DevRef,
    block_sectors: u32,
    len: u64,
    shared: Arc<Shared>,
    /// Writes to unmarked blocks, acknowledged and held until their bits are committed.
    wb: Arc<WriteBack<EraMarks>>,
    /// The worker generation this instance started (0 = none), stopped on drop.
    started: Mutex<u64>,
}

impl TargetType for EraType {
    fn name(&self) -> &'static str {
        "era"
    }

    fn version(&self) -> [u32; 3] {
        [1, 0, 0]
    }

    fn construct(
        &self,
        ctx: &mut dyn CtorContext,
        argv: &[String],
    ) -> Result<Box<dyn Target>, TargetError> {
        let p = EraParams::from_args(argv)?;
        let meta = args::get_device_as(ctx, &p.meta, "Error opening metadata device")?;
        let origin = args::get_device_as(ctx, &p.origin, "Error opening data device")?;
        origin.check_area(0, ctx.len())?;
        let shared = Shared::open(&ctx.env(), &meta, p.block_sectors)?;
        Ok(Box::new(Era {
            meta,
            origin,
            block_sectors: p.block_sectors,
            len: ctx.len(),
            shared,
            wb: Arc::default(),
            started: Mutex::new(0),
        }))
    }
}

impl Era {
    fn nr_blocks(&self) -> u64 {
        self.len.div_ceil(u64::from(self.block_sectors))
    }

    fn preresume_inner(&self) -> Result<(), OpError> {
        let nr = self.nr_blocks();
        let nr = u32::try_from(nr)
            .ok()
            .filter(|&n| u64::from(n) < MAX_NR_BLOCKS)
            .ok_or(OpError::TooManyBlocks(nr))?;
        self.shared.change(|md| {
            if md.nr_blocks() != nr {
                md.resize(nr)?;
                md.commit()?;
            }
            md.rollover()?;
            Ok(md.commit()?)
        })
    }
}

impl Target for Era {
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError> {
        let wb = &self.wb;
        let kind = bio.kind();
        if kind == BioKind::Read {
            let flags = bio.flags;
            let BioOp::Read(buf) = bio.op else {
                return Err(IoError::Unsupported {
                    op: kind,
                    device: "era".into(),
                });
            };
            return wb.read(&*self.origin.dev, bio.sector, buf, flags);
        }
        // A flush (or PREFLUSH) covers every acknowledged write, and reports a held one that
        // failed; a FUA write only needs to come after them.
        if kind == BioKind::Flush || bio.flags.contains(BioFlags::PREFLUSH) {
            wb.barrier()?;
        } else if bio.flags.contains(BioFlags::FUA) {
            wb.settle();
        }
        if kind == BioKind::Flush || bio.sectors() == 0 {
            return self.origin.dev.submit(bio);
        }
        let bs = u64::from(self.block_sectors);
        let (first, last) = (bio.sector / bs, (bio.end() - 1) / bs);
        // Blocks already marked need no metadata I/O, even when the metadata has failed, and
        // no lock: a commit of other blocks' bits does not hold them up. (A write that finds
        // its block marked just as a checkpoint clears the bits belongs to the era that ends:
        // it is in flight across the checkpoint.) It still comes after any overlapping held
        // write (whose bits are set at its commit, before it is applied): held behind it.
        if metadata::all_set(&self.shared.marked.read(), first, last) {
            return wb.write_through(&self.origin.dev, bio);
        }
        let failed =
            |why: String| IoError::errno(kind, bio.sector, Errno::EIO, format!("era: {why}"));
        if self.shared.broken.load(Ordering::Relaxed) {
            return Err(failed("the metadata has failed".into()));
        }
        let plain = kind == BioKind::Write && !bio.flags.contains(BioFlags::FUA);
        if let Some(data) = bio.keep_data().filter(|_| plain) {
            let shared = self.shared.clone();
            return wb.hold(&self.origin.dev, bio.sector, data, move || EraMarks {
                shared: Some(shared),
                ranges: vec![(first, last)],
                marked: None,
            });
        }
        // Discards and FUA writes: marked, then issued, as the kernel does.
        wb.wait_clear(bio.sector, bio.end());
        self.shared
            .mark(vec![(first, last)])
            .map_err(|e| failed(e.to_string()))?;
        self.origin.dev.submit(bio)
    }

    fn table_params(&self) -> String {
        EraParams {
            meta: self.meta.id.to_string(),
            origin: self.origin.id.to_string(),
            block_sectors: self.block_sectors,
        }
        .to_string()
    }

    /// As the kernel's, a call to the metadata's worker: it kicks off the digest of what was
    /// archived, reads the figures, and commits.
    fn status(&self) -> String {
        let r = self.shared.change(|md| {
            let (used, total) = md.usage();
            let line = EraStatus {
                metadata_block_sectors: udm_pdata::era::METADATA_BLOCK_SECTORS,
                used,
                total,
                current_era: md.current_era(),
                held_root: md.metadata_snap(),
            }
            .to_string();
            md.commit()?;
            Ok(line)
        });
        r.unwrap_or_else(|_| "Error".to_string())
    }

    fn message(&self, argv: &[String]) -> Result<Option<String>, TargetError> {
        let [word] = argv else {
            return Err(TargetError::invalid(
                "incorrect number of message arguments",
            ));
        };
        let op: fn(&mut Metadata) -> Result<(), OpError> =
            if word.eq_ignore_ascii_case("checkpoint") {
                Metadata::checkpoint
            } else if word.eq_ignore_ascii_case("take_metadata_snap") {
                |md| md.take_snap().map(|_| ())
            } else if word.eq_ignore_ascii_case("drop_metadata_snap") {
                Metadata::drop_snap
            } else {
                return Err(TargetError::invalid(format!(
                    "unsupported message '{word}'"
                )));
            };
        // Held writes first, so each is marked in the era it was acknowledged in and a
        // metadata snapshot shows every write acknowledged before it.
        self.wb.settle();
        self.shared
            .change(op)
            .map(|()| None)
            .map_err(|e| metadata_error(&e))
    }

    fn max_io_len(&self) -> u64 {
        u64::from(self.block_sectors)
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps {
            flush: true,
            discard: true,
            write_zeroes: false,
        }
    }

    /// Lets held writes reach the origin while I/O still flows, so the suspend itself has
    /// only what arrived meanwhile.
    fn presuspend(&self) {
        self.wb.settle();
    }

    fn postsuspend(&self) {
        self.wb.settle();
        // The worker stops first, so the writeset archived now waits for the resume to be
        // digested, as in the kernel (whose worker is stopped right after the archive).
        self.shared.stop_worker();
        let r = self.shared.change(|md| {
            md.archive()?;
            Ok(md.commit()?)
        });
        if let Err(e) = r {
            tracing::error!("era {}: archive at suspend failed: {e}", self.meta.name);
        }
    }

    fn preresume(&self) -> Result<(), TargetError> {
        self.preresume_inner().map_err(|e| metadata_error(&e))?;
        self.shared.start_worker();
        *self.started.lock() = self.shared.state.lock().worker_gen;
        Ok(())
    }

    fn devices(&self) -> Vec<DevRef> {
        vec![self.meta.clone(), self.origin.clone()]
    }

    fn drain_writeback(&self) {
        self.wb.settle();
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        self.wb.block_status(&*self.origin.dev, sector, sectors)
    }
}

impl Drop for Era {
    /// A table being destroyed still owes its acknowledged writes to the origin.
    fn drop(&mut self) {
        self.wb.settle();
        let gen = *self.started.lock();
        let mut st = self.shared.state.lock();
        st.users = st.users.saturating_sub(1);
        if gen != 0 && st.worker_gen == gen {
            st.worker = false;
        }
        drop(st);
        self.shared.cv.notify_all();
    }
}
