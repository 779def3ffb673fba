//! Write-back of held writes: a volatile write cache in front of a device, for targets whose
//! writes must wait for some metadata to be durable before they may reach the device below
//! (`snapshot-origin`: the copies of the chunks they overwrite; `era`: the writeset bits of
//! their blocks). The kernel holds each such write until its commit and only then completes
//! it; here the write is acknowledged once its data is held in memory, and two threads per
//! device then, for what is held, in batches of at most `GATHER_BYTES`, prepare the batch
//! ([`Jobs::prepare`]: the snapshot copies its chunks, reading the old data the device still
//! has, since nothing reaches it before the commit; era commits its bits there already),
//! commit it ([`Jobs::commit`], one metadata write) and only then write the held data to the
//! device (in parts of `APPLY_STEP` writes,
//! each part released when applied); preparing one batch overlaps the commit (mostly a cache
//! flush) of the last. The device below therefore never receives a write before what it
//! depends on is durable (the kernel's ordering, so a crash or power loss leaves the same
//! states as with the kernel), while writers no longer wait for a commit each.
//!
//! As the block layer allows of a volatile cache: a flush, or a write with PREFLUSH or FUA,
//! waits until every write acknowledged before it is on the device; a read sees the held
//! writes it overlaps (laid over the device's data, in order), and a write that overlaps a
//! held write is held behind it (or, on the synchronous paths, waits until it is applied), so
//! held writes are never reordered with later writes; a
//! suspend, a detach or a snapshot activation waits until nothing is held. A held write that
//! fails on the device, or whose commit fails (it is then never written: era must not let a
//! block change unrecorded), is reported by the next flush, as the page cache reports a failed
//! write-back at fsync. The memory held is bounded ([`MAX_HELD_BYTES`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use udm_io::{Bio, BioFlags, BioKind, BlockDevice, Extent, ExtentKind, IoError, KeptBuf};
use udm_types::errno::HasErrno;
use udm_types::{Errno, SECTOR_SHIFT};

/// What a held write needs before its data may reach the device; a batch's is one value.
pub trait Jobs: Default + Send + 'static {
    /// Adds another write's work to this batch's.
    fn append(&mut self, other: Self);
    /// Work before the commit, off the writers' path (the snapshot copies chunks from
    /// `dev`); it overlaps the commit of the previous batch.
    fn prepare(&mut self, dev: &dyn BlockDevice);
    /// Makes the batch's metadata durable. On an error the batch's writes are not applied
    /// (the error is reported by the next flush).
    fn commit(self) -> Result<(), String>;
    /// Prepares and commits one write on the writer's thread, when no write-back thread can
    /// be started.
    fn run_inline(mut self, dev: &dyn BlockDevice) -> Result<(), String> {
        self.prepare(dev);
        self.commit()
    }
}

/// Default of the most data held at once per device; a writer that would exceed the bound
/// waits for the commit in progress. udmd sets the bound with `--snapshot-writeback-mib` (it
/// bounds every write-back: snapshot origins and era targets).
pub const MAX_HELD_BYTES: usize = 32 << 20;

/// The bound in force (see [`set_held_limit`]).
static HELD_LIMIT: AtomicUsize = AtomicUsize::new(MAX_HELD_BYTES);

/// Sets the most data held at once per device, for every write-back (at least one
/// byte: a bound of 0 is taken as 1, which holds one write at a time).
pub fn set_held_limit(bytes: usize) {
    HELD_LIMIT.store(bytes.max(1), Ordering::Relaxed);
}

/// The most data held at once per origin.
pub fn held_limit() -> usize {
    HELD_LIMIT.load(Ordering::Relaxed)
}

/// Most writes held at once per device, whatever their size: what a settle (a suspend, a
/// snapshot's removal) waits for is mostly a cost per write (its copy, its write to the
/// device), and small writes under the byte bound alone made that queue thousands long
/// (`bench-snapshot-cycles.sh`: a snapshot's removal took 340 ms under 4k random writes, 36 ms
/// with this bound, at the same throughput in `bench-snapshot.sh`).
pub const MAX_HELD_WRITES: usize = 1024;

/// How long a write-back thread waits for more work before it exits.
const IDLE: Duration = Duration::from_millis(100);

/// The copy thread gathers writes until the oldest queued one has waited this long, or until
/// `GATHER_BYTES` are queued or somebody waits for held writes, so it copies runs and wakes
/// once per batch, not once per write. Measured from the oldest write, not from when the
/// thread looks: under steady load the next batch has gathered while the last one was being
/// prepared (era's commit there), and waiting a whole period more after it halved the
/// throughput of era's first writes.
const GATHER: Duration = Duration::from_micros(1500);

/// See [`GATHER`]; also the most one copy batch takes.
const GATHER_BYTES: usize = 4 << 20;

/// Held writes applied to the origin between two releases of what they held.
const APPLY_STEP: usize = 64;

/// Held writes of one device (see the module documentation).
pub struct WriteBack<J: Jobs> {
    st: Mutex<State<J>>,
    cv: Condvar,
    /// Wakes the copy thread (only: writers do not wake it for every write).
    copy_cv: Condvar,
}

struct State<J> {
    /// Waiting for their copies, in acknowledgement order.
    queue: VecDeque<Held<J>>,
    /// Bytes of data in `queue`.
    queued_bytes: usize,
    /// Threads waiting for held writes (flush, overlapping I/O, memory bound): no gathering.
    urgent: usize,
    /// Copied, waiting for their commit, in acknowledgement order.
    copied: VecDeque<Held<J>>,
    /// Every held write not yet applied, by first sector and sequence number: its end and
    /// data. They may overlap (applied in sequence order, laid over reads in that order).
    ranges: BTreeMap<(u64, u64), (u64, KeptBuf)>,
    /// The longest held write's sectors since `ranges` was last empty: how far before a
    /// range an overlapping one can start.
    longest: u64,
    bytes: usize,
    next_seq: u64,
    /// Every write with a smaller sequence number is on the origin.
    applied: u64,
    /// The copy thread is running.
    copier: bool,
    /// The commit thread is running.
    committer: bool,
    /// The first failure applying a held write since the last flush.
    error: Option<IoError>,
}

struct Held<J> {
    seq: u64,
    sector: u64,
    data: KeptBuf,
    origin: Arc<dyn BlockDevice>,
    jobs: J,
    /// When it was held (see [`GATHER`]).
    at: Instant,
}

impl<J: Jobs> Default for WriteBack<J> {
    fn default() -> Self {
        WriteBack {
            st: Mutex::new(State {
                queue: VecDeque::new(),
                queued_bytes: 0,
                urgent: 0,
                copied: VecDeque::new(),
                ranges: BTreeMap::new(),
                longest: 0,
                bytes: 0,
                next_seq: 0,
                applied: 0,
                copier: false,
                committer: false,
                error: None,
            }),
            cv: Condvar::new(),
            copy_cv: Condvar::new(),
        }
    }
}

impl<J> State<J> {
    /// Whether holding `len` more bytes would exceed the memory bound `limit` (a write larger
    /// than the bound is held alone), or the count bound [`MAX_HELD_WRITES`].
    fn over_bound(&self, len: usize, limit: usize) -> bool {
        self.bytes > 0 && (self.bytes + len > limit || self.ranges.len() >= MAX_HELD_WRITES)
    }

    /// The held writes overlapping `[start, end)`: (first sector, sequence number) → (end,
    /// data). Only those starting less than `longest` before `start` are looked at.
    fn overlapping(
        &self,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = (&(u64, u64), &(u64, KeptBuf))> {
        let from = start.saturating_sub(self.longest);
        self.ranges
            .range((from, 0)..(end, 0))
            .filter(move |(_, (e, _))| *e > start)
    }

    /// Whether `[start, end)` overlaps a held write.
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.overlapping(start, end).next().is_some()
    }
}

/// The write-back threads allocate and write on behalf of requests (maybe a loop device's, over
/// a FUSE export of this very device): they must not recurse into that I/O for reclaim.
fn io_flusher() {
    if let Err(e) = udm_io::thread::mark_io_flusher() {
        tracing::debug!("write-back: PR_SET_IO_FLUSHER refused: {e}");
    }
}

impl<J: Jobs> WriteBack<J> {
    /// Waits until no held write overlaps `[start, end)`: a write must reach the origin after
    /// every overlapping write acknowledged before it.
    pub fn wait_clear(&self, start: u64, end: u64) {
        let mut st = self.st.lock();
        let mut since = None;
        while st.overlaps(start, end) {
            since.get_or_insert_with(Instant::now);
            self.wait_urgent(&mut st);
        }
        if let Some(t) = since {
            tracing::trace!(wait_ms = t.elapsed().as_secs_f64() * 1e3, "clear waited");
        }
    }

    /// A write that needs nothing before it reaches `origin`: issued at once, unless it is a
    /// plain write overlapping a held write and there is room, when it is held behind that
    /// write instead of waiting for it (which would take a commit). FUA and PREFLUSH writes and
    /// those that find no room wait until no held write overlaps them ([`WriteBack::wait_clear`]),
    /// so it never waits for room.
    pub fn write_through(
        self: &Arc<Self>,
        origin: &Arc<dyn BlockDevice>,
        bio: Bio<'_>,
    ) -> Result<(), IoError> {
        let (start, end) = (bio.sector, bio.end());
        let plain = bio.kind() == BioKind::Write
            && !bio.flags.intersects(BioFlags::FUA | BioFlags::PREFLUSH);
        if plain {
            let hold = {
                let st = self.st.lock();
                st.overlaps(start, end)
                    && !st.over_bound(((end - start) << SECTOR_SHIFT) as usize, held_limit())
            };
            if let Some(data) = bio.keep_data().filter(|_| hold) {
                return self.hold(origin, start, data, J::default);
            }
        }
        self.wait_clear(start, end);
        origin.submit(bio)
    }

    /// Whether `[start, end)` overlaps a write acknowledged but not yet on the origin.
    pub fn holds(&self, start: u64, end: u64) -> bool {
        self.st.lock().overlaps(start, end)
    }

    /// Reads `buf` at `sector` from `origin` as clients must see it: the origin's content with
    /// every held write it overlaps laid over it (instead of waiting for their commit).
    pub fn read(
        &self,
        origin: &dyn BlockDevice,
        sector: u64,
        buf: &mut [u8],
        flags: BioFlags,
    ) -> Result<(), IoError> {
        let end = sector.saturating_add((buf.len() as u64) >> SECTOR_SHIFT);
        // Taken before the origin read: a held write applied meanwhile puts the same data on
        // the origin, and a write started after this read began is concurrent with it.
        let mut over: Vec<(u64, u64, KeptBuf)> = {
            let st = self.st.lock();
            st.overlapping(sector, end)
                .map(|(&(s, seq), (_, d))| (seq, s, d.clone()))
                .collect()
        };
        // Oldest first, so a later write's data lies over an earlier one's.
        over.sort_unstable_by_key(|o| o.0);
        origin.submit(Bio::read(sector, buf).with_flags(flags))?;
        for (_, s, d) in over {
            let from = s.max(sector);
            let to = (s + ((d.len() as u64) >> SECTOR_SHIFT)).min(end);
            let src = ((from - s) << SECTOR_SHIFT) as usize..((to - s) << SECTOR_SHIFT) as usize;
            let dst = ((from - sector) << SECTOR_SHIFT) as usize;
            buf[dst..dst + src.len()].copy_from_slice(&d[src]);
        }
        Ok(())
    }

    /// `dev`'s block status of `sectors` at `sector`, except that a range with a held write
    /// (acknowledged, not yet applied) is data. Checked before and after asking `dev`, so a
    /// held write applied meanwhile is seen one way or the other.
    pub fn block_status(
        &self,
        dev: &dyn BlockDevice,
        sector: u64,
        sectors: u64,
    ) -> Result<Vec<Extent>, IoError> {
        let end = sector.saturating_add(sectors);
        let held = self.holds(sector, end);
        let ext = dev.block_status(sector, sectors)?;
        if held || self.holds(sector, end) {
            return Ok(vec![Extent {
                sectors,
                kind: ExtentKind::Data,
            }]);
        }
        Ok(ext)
    }

    /// Whether `len` more bytes can be held now without exceeding the memory bound.
    pub fn has_room(&self, len: usize) -> bool {
        !self.st.lock().over_bound(len, held_limit())
    }

    /// Waits while `len` more bytes would exceed the memory bound. A snapshot origin's writer
    /// that needs copies calls it without the snapshot list and chunk locks, so that it rarely
    /// waits at the bound while holding them (a snapshot being removed waits for the list's
    /// holders, and every writer after it for that); writes that need no copy never wait.
    pub fn wait_room(&self, len: usize) {
        let mut st = self.st.lock();
        let limit = held_limit();
        let mut since = None;
        while st.over_bound(len, limit) {
            since.get_or_insert_with(Instant::now);
            self.wait_urgent(&mut st);
        }
        if let Some(t) = since {
            tracing::trace!(
                wait_ms = t.elapsed().as_secs_f64() * 1e3,
                bytes = st.bytes,
                "room waited"
            );
        }
    }

    /// Acknowledges a write that needs `jobs` done before it reaches `origin`: keeps `data`
    /// (the request's buffer where it was lent, else a copy) until the batch it joins is
    /// committed, then writes it at `sector`, after every write held before it (it may overlap
    /// them: held writes are applied in order). Waits first while the memory bound is reached
    /// (the write-back threads never wait for a writer's locks, so a caller may hold some, as
    /// the snapshot holds chunk locks). `jobs` is called
    /// under the write-back's lock, so the queue is in the order of what it does (the
    /// snapshot's exception allocation). If no write-back thread can be started, prepares,
    /// commits and writes before returning.
    pub fn hold(
        self: &Arc<Self>,
        origin: &Arc<dyn BlockDevice>,
        sector: u64,
        data: KeptBuf,
        jobs: impl FnOnce() -> J,
    ) -> Result<(), IoError> {
        let end = sector.saturating_add((data.len() as u64) >> SECTOR_SHIFT);
        let mut st = self.st.lock();
        let limit = held_limit();
        let t0 = Instant::now();
        let mut why = "";
        while st.over_bound(data.len(), limit) {
            why = "bound";
            self.wait_urgent(&mut st);
        }
        if !why.is_empty() {
            tracing::trace!(
                why,
                wait_ms = t0.elapsed().as_secs_f64() * 1e3,
                bytes = st.bytes,
                "hold waited"
            );
        }
        if !st.copier {
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("udm-wb-prep".into())
                .spawn(move || me.run_copy());
            if let Err(e) = spawned {
                drop(st);
                tracing::warn!("write-back: no thread ({e}); committing inline");
                self.wait_clear(sector, end);
                if let Err(why) = jobs().run_inline(&**origin) {
                    return Err(IoError::errno(BioKind::Write, sector, Errno::EIO, why));
                }
                return origin.submit(Bio::write(sector, &data));
            }
            st.copier = true;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let len = data.len();
        st.ranges.insert((sector, seq), (end, data.clone()));
        st.longest = st.longest.max(end - sector);
        st.bytes += len;
        let wake = st.queue.is_empty() || st.queued_bytes + len >= GATHER_BYTES;
        st.queued_bytes += len;
        st.queue.push_back(Held {
            seq,
            sector,
            data,
            origin: origin.clone(),
            jobs: jobs(),
            at: Instant::now(),
        });
        drop(st);
        if wake {
            self.copy_cv.notify_one();
        }
        Ok(())
    }

    /// Waits on the condition variable as one that needs held writes to progress: the copy
    /// thread stops gathering.
    fn wait_urgent(&self, st: &mut parking_lot::MutexGuard<'_, State<J>>) {
        st.urgent += 1;
        self.copy_cv.notify_one();
        self.cv.wait(st);
        st.urgent -= 1;
    }

    /// Waits until every write acknowledged so far is on the origin.
    pub fn settle(&self) {
        let mut st = self.st.lock();
        let target = st.next_seq;
        while st.applied < target {
            self.wait_urgent(&mut st);
        }
    }

    /// [`WriteBack::settle`], then reports (once) a held write that failed on the origin: the
    /// part of a flush that concerns held writes.
    pub fn barrier(&self) -> Result<(), IoError> {
        self.settle();
        match self.st.lock().error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The copy thread: prepares up to `GATHER_BYTES` queued in one go (the snapshot copies
    /// long runs of chunks with one read and one write each), hands the batch to the commit
    /// thread, and repeats, so preparing the next batch overlaps the commit of the last one;
    /// exits after [`IDLE`] without work.
    fn run_copy(self: Arc<Self>) {
        io_flusher();
        loop {
            let mut batch: Vec<Held<J>> = {
                let mut st = self.st.lock();
                // Until IDLE has passed without work: wake-ups without any (a waiter nudging
                // the thread, a spurious one) must not end it, or it is respawned per batch.
                let idle_end = Instant::now() + IDLE;
                while st.queue.is_empty() && !self.copy_cv.wait_until(&mut st, idle_end).timed_out()
                {
                }
                if st.queue.is_empty() {
                    st.copier = false;
                    return;
                }
                let gathered = st.queue.front().map_or_else(Instant::now, |h| h.at) + GATHER;
                if st.urgent == 0 && st.queued_bytes < GATHER_BYTES {
                    self.copy_cv.wait_until(&mut st, gathered);
                }
                // At most GATHER_BYTES per batch: memory is freed batch by batch, so a writer
                // waiting at the bound waits for one small batch, not for everything held.
                let mut taken = 0;
                let mut batch = Vec::new();
                while let Some(h) = st.queue.front() {
                    if !batch.is_empty() && taken + h.data.len() > GATHER_BYTES {
                        break;
                    }
                    taken += h.data.len();
                    batch.extend(st.queue.pop_front());
                }
                st.queued_bytes = st.queued_bytes.saturating_sub(taken);
                batch
            };
            let copy_start = Instant::now();
            let mut i = 0;
            while i < batch.len() {
                // One origin device per run of the batch (there is normally just one).
                let j = (i..batch.len())
                    .find(|&j| !Arc::ptr_eq(&batch[j].origin, &batch[i].origin))
                    .unwrap_or(batch.len());
                let mut run = J::default();
                for h in &mut batch[i..j] {
                    run.append(std::mem::take(&mut h.jobs));
                }
                run.prepare(&*batch[i].origin);
                batch[i].jobs = run;
                i = j;
            }
            tracing::trace!(
                writes = batch.len(),
                copy_ms = copy_start.elapsed().as_secs_f64() * 1e3,
                "write-back: batch prepared"
            );
            let mut st = self.st.lock();
            st.copied.extend(batch);
            if !st.committer {
                let me = self.clone();
                match std::thread::Builder::new()
                    .name("udm-wb-commit".into())
                    .spawn(move || me.run_commit())
                {
                    Ok(_) => st.committer = true,
                    Err(e) => {
                        tracing::warn!("write-back: no commit thread ({e}); inline");
                        let batch: Vec<Held<J>> = st.copied.drain(..).collect();
                        drop(st);
                        self.commit_and_apply(batch);
                        continue;
                    }
                }
            }
            drop(st);
            self.cv.notify_all();
        }
    }

    /// The commit thread: commits everything copied in one go and applies the held data;
    /// exits after [`IDLE`] without work. Its commits do not wait for the store's "nothing
    /// pending" rule: the exceptions pending meanwhile are the ones queued after this batch,
    /// which only the write-back threads complete.
    fn run_commit(self: Arc<Self>) {
        io_flusher();
        loop {
            let batch: Vec<Held<J>> = {
                let mut st = self.st.lock();
                let idle_end = Instant::now() + IDLE;
                while st.copied.is_empty() && !self.cv.wait_until(&mut st, idle_end).timed_out() {}
                if st.copied.is_empty() {
                    st.committer = false;
                    return;
                }
                st.copied.drain(..).collect()
            };
            self.commit_and_apply(batch);
        }
    }

    fn commit_and_apply(&self, mut batch: Vec<Held<J>>) {
        let mut jobs = J::default();
        for h in &mut batch {
            jobs.append(std::mem::take(&mut h.jobs));
        }
        let start = Instant::now();
        let committed = jobs.commit();
        let commit_time = start.elapsed();
        // Applied in order by this one thread: a second one measured slower (buffered writes
        // to one file take its inode lock in turn); what is on the origin is released every
        // APPLY_STEP writes (its data dropped before that part counts as applied), so readers,
        // overlapping writers and writers at the memory bound go on as soon as their part is
        // there, and the memory counted as released is.
        if let Err(why) = &committed {
            tracing::error!(
                "write-back: commit failed, {} held writes dropped: {why}",
                batch.len()
            );
        }
        let writes = batch.len();
        let mut rest = batch.into_iter();
        loop {
            let part: Vec<Held<J>> = rest.by_ref().take(APPLY_STEP).collect();
            let Some(last) = part.last().map(|h| h.seq) else {
                break;
            };
            let mut failed = committed.as_ref().err().map(|why| {
                let sector = part.first().map_or(0, |h| h.sector);
                IoError::errno(BioKind::Write, sector, Errno::EIO, why.clone())
            });
            let mut done = Vec::with_capacity(part.len());
            for h in part {
                if committed.is_ok() {
                    if let Err(e) = h.origin.submit(Bio::write(h.sector, &h.data)) {
                        tracing::error!("write-back: writing the device failed: {e}");
                        failed.get_or_insert(e);
                    }
                }
                done.push((h.sector, h.seq, h.data));
            }
            let mut st = self.st.lock();
            st.applied = last + 1;
            for (sector, seq, data) in done {
                // The map's reference first, so the buffer can go back to exports.
                st.ranges.remove(&(sector, seq));
                st.bytes = st.bytes.saturating_sub(data.len());
                udm_io::release(data);
            }
            if let Some(e) = failed {
                if st.error.is_none() {
                    st.error = Some(IoError::errno(
                        BioKind::Flush,
                        0,
                        e.errno(),
                        format!("an acknowledged write failed later: {e}"),
                    ));
                }
            }
            if st.ranges.is_empty() {
                st.longest = 0;
            }
            drop(st);
            self.cv.notify_all();
        }
        tracing::trace!(
            writes,
            commit_ms = commit_time.as_secs_f64() * 1e3,
            apply_ms = (start.elapsed() - commit_time).as_secs_f64() * 1e3,
            "write-back: batch committed and applied"
        );
    }
}
