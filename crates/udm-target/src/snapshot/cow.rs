//! The copy-on-write engine of an origin's writes (the kernel's `__origin_write`): locks the
//! chunks that snapshots lack, allocates their exceptions, copies the origin data into each
//! COW and commits. Used by `snapshot-origin`, by `snapshot-merge` writes to unmerged chunks,
//! by the merge worker and by the write-back of acknowledged origin writes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use udm_io::{Bio, BlockDevice, IoError};
use udm_types::SECTOR_SIZE;

use super::exception::{StoreCell, Ticket};
use super::state::Snap;
use super::store::StoreKind;
use crate::writeback::Jobs;

/// Writes `bio` (absolute origin sectors) to `origin` once every snapshot of `snaps` lacking
/// one of its chunks has copied it (the kernel splits the bio at the smallest chunk size and
/// queues each piece behind its pending exceptions; here the copies of all pieces are made,
/// committed together, and the bio is then written in one piece).
pub fn origin_write(
    snaps: &[Arc<Snap>],
    origin: &dyn BlockDevice,
    bio: Bio<'_>,
) -> Result<(), IoError> {
    ensure_copied(snaps, origin, bio.sector, bio.end());
    origin.submit(bio)
}

/// `__origin_write` without a bio (`origin_write_extent`): copies the chunks of
/// `[start, end)` into every active, valid, non-merging snapshot that lacks them, and waits
/// until those exceptions are committed. Failures invalidate the snapshot concerned; the origin
/// write itself always proceeds, as in the kernel.
///
/// Deadlock freedom: chunk locks are taken first, snapshot by snapshot in list order, all
/// chunks of one snapshot at once; exceptions are allocated only once every lock is held, so a
/// thread never blocks on a lock while it holds an allocation that another thread's commit
/// waits for.
pub fn ensure_copied(snaps: &[Arc<Snap>], origin: &dyn BlockDevice, start: u64, end: u64) {
    copy_and_commit(origin, lock_chunks(snaps, start, end));
}

/// The rest of [`ensure_copied`] once the chunks are locked: allocate, copy, wait for the
/// commit (the kernel's rule).
pub fn copy_and_commit(origin: &dyn BlockDevice, locked: Vec<Locked>) {
    let pending = allocate(locked);
    copy_runs(origin, &pending);
    commit(pending, false);
}

/// The copies of held origin writes, for the write-back ([`crate::writeback`]): prepared by
/// copying their chunks, committed without the store's "nothing pending" rule (the exceptions
/// pending meanwhile are those queued after the batch, which only the write-back completes).
#[derive(Default)]
pub struct Copies(pub Vec<Pending>);

impl Jobs for Copies {
    fn append(&mut self, other: Self) {
        self.0.extend(other.0);
    }

    fn prepare(&mut self, origin: &dyn BlockDevice) {
        copy_runs(origin, &self.0);
    }

    /// Failures invalidate the snapshot concerned; the origin write proceeds, as in the kernel.
    fn commit(self) -> Result<(), String> {
        commit(self.0, true);
        Ok(())
    }

    fn run_inline(self, origin: &dyn BlockDevice) -> Result<(), String> {
        copy_runs(origin, &self.0);
        commit(self.0, false);
        Ok(())
    }
}

/// The first step of [`ensure_copied`]: locks the chunks of `[start, end)` that some active,
/// valid, non-merging snapshot lacks, and returns them (none locked when nothing needs a copy).
pub fn lock_chunks(snaps: &[Arc<Snap>], start: u64, end: u64) -> Vec<Locked> {
    let mut locked = Vec::new();
    for s in snaps {
        let stop = end.min(s.table_end);
        if s.merge || start >= stop {
            continue;
        }
        let (cs, store, chunks) = {
            let st = s.state.read();
            if !st.valid || !st.active || st.chunk_size == 0 {
                continue;
            }
            let cs = st.chunk_size;
            let chunks: Vec<u64> = (start / cs..=(stop - 1) / cs)
                .filter(|c| !st.exceptions.contains_key(c))
                .collect();
            (cs, st.store.clone(), chunks)
        };
        if chunks.is_empty() {
            continue;
        }
        s.locks.lock_many(&chunks);
        // Re-check now that nobody else can be making these exceptions.
        let st = s.state.read();
        if !st.valid || !st.active || !Arc::ptr_eq(&st.store, &store) {
            drop(st);
            s.locks.unlock_many(&chunks);
            continue;
        }
        let (done, todo): (Vec<u64>, Vec<u64>) = chunks
            .into_iter()
            .partition(|c| st.exceptions.contains_key(c));
        drop(st);
        s.locks.unlock_many(&done);
        locked.extend(todo.into_iter().map(|chunk| Locked {
            s: s.clone(),
            chunk,
            cs,
            store: store.clone(),
            held: true,
        }));
    }
    locked
}

/// Whether every chunk of `locked` goes to a transient store: such a store makes nothing
/// durable, so its exceptions need no metadata write to wait for and a writer may make the
/// copies itself ([`copy_and_commit`]) rather than hold its write.
pub fn all_transient(locked: &[Locked]) -> bool {
    let mut last: Option<&Arc<StoreCell>> = None;
    locked.iter().all(|l| {
        if last.is_some_and(|s| Arc::ptr_eq(s, &l.store)) {
            return true;
        }
        last = Some(&l.store);
        l.store.with(|x| x.kind()) == StoreKind::Transient
    })
}

/// The second step of [`ensure_copied`]: allocates the exceptions of `cand` (invalidating a
/// snapshot whose store is full). Every result must go through [`copy_runs`] without waiting
/// on anything in between: the store's commit rule waits for them.
pub fn allocate(mut cand: Vec<Locked>) -> Vec<Pending> {
    // Allocate each store's chunks under one lock and in chunk order, so a run of origin
    // chunks gets a run of COW chunks and is copied with one write.
    cand.sort_by_key(|l| (Arc::as_ptr(&l.store) as usize, l.chunk));
    let mut tickets: Vec<Option<Ticket>> = vec![None; cand.len()];
    let mut i = 0;
    while i < cand.len() {
        let j = (i..cand.len())
            .find(|&j| !Arc::ptr_eq(&cand[j].store, &cand[i].store))
            .unwrap_or(cand.len());
        let got = cand[i].store.prepare_many(j - i);
        for (k, t) in tickets[i..j].iter_mut().enumerate() {
            *t = got.get(k).copied();
        }
        i = j;
    }
    let mut pending = Vec::with_capacity(cand.len());
    for (l, ticket) in cand.into_iter().zip(tickets) {
        let Some(ticket) = ticket else {
            let mut st = l.s.state.write();
            l.s.invalidate(&mut st, "Unable to allocate exception.");
            continue;
        };
        pending.push(Pending { l, ticket });
    }
    pending
}

/// The last step of [`ensure_copied`]: waits until the exceptions of `pending` are committed
/// and installs them (releasing their chunk locks). `force`: write the metadata without
/// waiting for the store's rule (see [`StoreCell::wait_many`]).
pub fn commit(pending: Vec<Pending>, force: bool) {
    if pending.is_empty() {
        return;
    }
    // Wait per store; with several stores (several snapshots), in parallel, so that their
    // metadata flushes overlap instead of adding up.
    let mut groups: Vec<Vec<Pending>> = Vec::new();
    for p in pending {
        match groups.iter_mut().find(|g| {
            g.first()
                .is_some_and(|q| Arc::ptr_eq(&q.l.store, &p.l.store))
        }) {
            Some(g) => g.push(p),
            None => groups.push(vec![p]),
        }
    }
    if groups.len() <= 1 {
        groups.into_iter().for_each(|g| finish_all(g, force));
        return;
    }
    let slots: Vec<Mutex<Option<Vec<Pending>>>> =
        groups.into_iter().map(|g| Mutex::new(Some(g))).collect();
    let run = |slot: &Mutex<Option<Vec<Pending>>>| {
        if let Some(g) = slot.lock().take() {
            finish_all(g, force);
        }
    };
    std::thread::scope(|sc| {
        for slot in &slots[1..] {
            let spawned = std::thread::Builder::new()
                .name("udm-snap-wait".into())
                .spawn_scoped(sc, || run(slot));
            if spawned.is_err() {
                run(slot);
            }
        }
        run(&slots[0]);
    });
}

/// Exceptions installed (and their chunks unlocked) per lock round by [`finish_all`].
const FINISH_SLICE: usize = 256;

/// Waits for the commits of `group` (one store) and installs them; releases the chunk locks.
fn finish_all(group: Vec<Pending>, force: bool) {
    let Some(first) = group.first() else {
        return;
    };
    let store = first.l.store.clone();
    let tickets: Vec<Ticket> = group.iter().map(|p| p.ticket).collect();
    let valid = store.wait_many(&tickets, force);
    // Per snapshot (normally the store's one), under one lock each; each pending exception
    // keeps its validity through the sort (`valid` follows `tickets`, so `group`'s order).
    debug_assert_eq!(valid.len(), group.len());
    let mut group: Vec<(Pending, bool)> = group.into_iter().zip(valid).collect();
    group.sort_by_key(|(p, _)| Arc::as_ptr(&p.l.s) as usize);
    let mut i = 0;
    while i < group.len() {
        let j = (i..group.len())
            .find(|&j| !Arc::ptr_eq(&group[j].0.l.s, &group[i].0.l.s))
            .unwrap_or(group.len());
        let done: Vec<(u64, u64, bool)> = group[i..j]
            .iter()
            .map(|(p, v)| (p.l.chunk, p.ticket.new_chunk, *v))
            .collect();
        let s = group[i].0.l.s.clone();
        // In slices, each installed before its chunks are unlocked: origin writers look up
        // exceptions under the state lock, so a batch of thousands installed under one write
        // lock would hold them all up for milliseconds.
        for (d, ps) in done
            .chunks(FINISH_SLICE)
            .zip(group[i..j].chunks_mut(FINISH_SLICE))
        {
            s.finish_many(d);
            let chunks: Vec<u64> = ps.iter().map(|(p, _)| p.l.chunk).collect();
            s.locks.unlock_many(&chunks);
            for (p, _) in ps {
                p.l.held = false;
            }
        }
        i = j;
    }
}

/// A chunk of a snapshot locked exclusively by an origin write; released on drop unless
/// released already (with others, by [`finish_all`]).
pub struct Locked {
    s: Arc<Snap>,
    chunk: u64,
    cs: u64,
    store: Arc<StoreCell>,
    held: bool,
}

impl Drop for Locked {
    fn drop(&mut self) {
        if self.held {
            self.s.locks.unlock_many(&[self.chunk]);
        }
    }
}

/// An exception being made by an origin write (copied, maybe not committed); its chunk lock is
/// released on drop.
pub struct Pending {
    l: Locked,
    ticket: Ticket,
}

/// Longest run copied with one read and one write.
const MAX_RUN_SECTORS: u64 = 8192;

/// Copies the chunks of `pending` from `origin` and reports each copy to its store: one read
/// of the origin and one COW write per run of consecutive chunks of one snapshot that got
/// consecutive COW chunks (up to [`MAX_RUN_SECTORS`]). The third step of [`ensure_copied`].
pub fn copy_runs(origin: &dyn BlockDevice, pending: &[Pending]) {
    let osize = origin.size();
    let start = |p: &Pending| p.l.chunk.saturating_mul(p.l.cs);
    let end = |p: &Pending| {
        p.l.chunk
            .saturating_add(1)
            .saturating_mul(p.l.cs)
            .min(osize)
    };
    let mut order: Vec<&Pending> = pending.iter().collect();
    order.sort_by_key(|p| (Arc::as_ptr(&p.l.s) as usize, p.l.chunk));
    let mut cache = OriginCache::default();
    // Several snapshots copy the same range for one write (rounded to each one's chunk): read
    // the range they all need once when it is short, instead of once per snapshot.
    if let (Some(f), Some(l)) = (order.first(), order.last()) {
        if !Arc::ptr_eq(&f.l.s, &l.l.s) {
            let lo = order.iter().map(|p| start(p)).min().unwrap_or(0);
            let hi = order.iter().map(|p| end(p)).max().unwrap_or(0);
            if hi > lo && hi - lo <= MAX_RUN_SECTORS {
                // A failure here is the runs' to report, each on its own read.
                let _ = cache.read(origin, lo, hi);
            }
        }
    }
    let mut i = 0;
    while i < order.len() {
        let first = order[i];
        let mut j = i + 1;
        while j < order.len() {
            let (a, b) = (order[j - 1], order[j]);
            if !Arc::ptr_eq(&a.l.s, &b.l.s)
                || !Arc::ptr_eq(&a.l.store, &b.l.store)
                || b.l.chunk != a.l.chunk + 1
                || b.ticket.new_chunk != a.ticket.new_chunk + 1
                || end(b).saturating_sub(start(first)) > MAX_RUN_SECTORS
            {
                break;
            }
            j += 1;
        }
        let (src, stop) = (start(first), end(order[j - 1]));
        // A transient snapshot being destroyed needs its exceptions completed, not filled
        // (its destructor waits for them; under load that was a queue of copies to make).
        let unread = first.l.s.dropping.load(Ordering::SeqCst)
            && first.l.store.with(|x| x.kind()) == StoreKind::Transient;
        let ok = stop <= src || unread || {
            match cache.read(origin, src, stop) {
                Err(e) => {
                    tracing::error!("snapshot copy: reading origin failed: {e}");
                    false
                }
                Ok(data) => match first.l.s.cow.dev.submit(Bio::write(
                    first.ticket.new_chunk.saturating_mul(first.l.cs),
                    data,
                )) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!("snapshot copy: writing COW failed: {e}");
                        false
                    }
                },
            }
        };
        let copies: Vec<(Ticket, u64)> =
            order[i..j].iter().map(|p| (p.ticket, p.l.chunk)).collect();
        first.l.store.complete_many(&copies, ok);
        i = j;
    }
}

/// The last origin range read for copies, kept for the next run that falls within it.
#[derive(Default)]
struct OriginCache {
    buf: Vec<u8>,
    /// The sectors `buf` holds (empty when it holds nothing valid).
    have: (u64, u64),
}

impl OriginCache {
    /// Origin sectors `[src, stop)`, read unless the last read covers them.
    fn read(&mut self, origin: &dyn BlockDevice, src: u64, stop: u64) -> Result<&[u8], IoError> {
        if !(self.have.0 <= src && stop <= self.have.1) {
            self.have = (0, 0);
            self.buf.resize(((stop - src) * SECTOR_SIZE) as usize, 0);
            origin.submit(Bio::read(src, &mut self.buf))?;
            self.have = (src, stop);
        }
        let at = |x: u64| ((x - self.have.0) * SECTOR_SIZE) as usize;
        Ok(&self.buf[at(src)..at(stop)])
    }
}
