//! `snapshot-origin <dev>`: reads pass through; a write first makes every active snapshot that
//! lacks the chunk copy it into its COW (the kernel's `do_origin` / `__origin_write`), and only
//! then reaches the origin.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use udm_io::{Bio, BioKind, BlockDevice, IoError};

use udm_types::SECTOR_SIZE;

use super::exception::{ChunkGuard, StoreCell, Ticket};
use super::snap::Snap;
use super::{min_chunk, OriginEntry, Origins};
use crate::target::{CtorContext, DevRef, Target, TargetCaps, TargetError, TargetType};

/// The `snapshot-origin` target type (version 1.9.0).
pub struct OriginType;

impl TargetType for OriginType {
    fn name(&self) -> &'static str {
        "snapshot-origin"
    }

    fn version(&self) -> [u32; 3] {
        [1, 9, 0]
    }

    fn construct(
        &self,
        ctx: &mut dyn CtorContext,
        args: &[String],
    ) -> Result<Box<dyn Target>, TargetError> {
        if args.len() != 1 {
            return Err(TargetError::invalid(
                "origin: incorrect number of arguments",
            ));
        }
        let dev = ctx.get_device(&args[0]).map_err(|e| {
            TargetError::new(e.errno, format!("Cannot get target device: {}", e.msg))
        })?;
        let entry = ctx.env().get::<Origins>().entry(dev.id);
        Ok(Box::new(OriginTarget {
            dev,
            begin: ctx.begin(),
            entry,
        }))
    }
}

/// A live `snapshot-origin` line.
pub struct OriginTarget {
    dev: DevRef,
    begin: u64,
    entry: Arc<OriginEntry>,
}

impl Target for OriginTarget {
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError> {
        if bio.is_empty_flush() {
            return self.dev.dev.submit(bio);
        }
        let abs = self.begin + bio.sector;
        match bio.kind() {
            BioKind::Read => self.dev.dev.submit(bio.at(abs)),
            BioKind::Write => {
                let snaps = self.entry.snaps.read();
                origin_write(&snaps, &*self.dev.dev, bio.at(abs))
            }
            k => Err(IoError::Unsupported {
                op: k,
                device: "snapshot-origin".into(),
            }),
        }
    }

    fn table_params(&self) -> String {
        self.dev.id.to_string()
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps {
            flush: true,
            discard: false,
            write_zeroes: false,
        }
    }

    fn devices(&self) -> Vec<DevRef> {
        vec![self.dev.clone()]
    }
}

/// Writes `bio` (absolute origin sectors) to `origin` once every snapshot of `snaps` lacking
/// one of its chunks has copied it (the kernel splits the bio at the smallest chunk size and
/// queues each piece behind its pending exceptions; here the copies of all pieces are made,
/// committed together, and the bio is then written in one piece).
pub fn origin_write(
    snaps: &[Arc<Snap>],
    origin: &dyn BlockDevice,
    bio: Bio<'_>,
) -> Result<(), IoError> {
    if let Some(step) = min_chunk(snaps) {
        ensure_copied(snaps, origin, bio.sector, bio.end(), step);
    }
    origin.submit(bio)
}

/// `__origin_write` without a bio (`origin_write_extent`): copies the chunks of
/// `[start, end)` into every active, valid, non-merging snapshot that lacks them, and waits
/// until those exceptions are committed. Failures invalidate the snapshot concerned; the origin
/// write itself always proceeds, as in the kernel.
///
/// Deadlock freedom: chunk locks are taken first, in one global order (piece by piece, and
/// within a piece in list order, largest chunk first, so by chunk start then size); exceptions
/// are allocated only once every lock is held, so a thread never blocks on a lock while it holds
/// an allocation that another thread's commit waits for.
pub fn ensure_copied(
    snaps: &[Arc<Snap>],
    origin: &dyn BlockDevice,
    start: u64,
    end: u64,
    step: u64,
) {
    let mut locked = Vec::new();
    let mut seen: HashSet<(usize, u64)> = HashSet::new();
    let mut p = start;
    while p < end {
        for (i, s) in snaps.iter().enumerate() {
            if s.merge || p >= s.table_end {
                continue;
            }
            let (chunk, cs, store) = {
                let st = s.state.read();
                if !st.valid || !st.active || st.chunk_size == 0 {
                    continue;
                }
                let chunk = p / st.chunk_size;
                if st.exceptions.contains_key(&chunk) || seen.contains(&(i, chunk)) {
                    continue;
                }
                (chunk, st.chunk_size, st.store.clone())
            };
            seen.insert((i, chunk));
            let guard = s.locks.exclusive(chunk);
            locked.push((s, chunk, cs, store, guard));
        }
        p = (p / step + 1) * step;
    }
    if locked.is_empty() {
        return;
    }
    let mut cand = Vec::with_capacity(locked.len());
    for (s, chunk, cs, store, guard) in locked {
        {
            let st = s.state.read();
            if !st.valid
                || !st.active
                || st.exceptions.contains_key(&chunk)
                || !Arc::ptr_eq(&st.store, &store)
            {
                continue;
            }
        }
        cand.push((s, chunk, cs, store, guard));
    }
    // Allocate each store's chunks under one lock, so a run of origin chunks usually gets a
    // run of COW chunks and is copied with one write.
    let mut tickets: Vec<Option<Ticket>> = vec![None; cand.len()];
    let mut taken = vec![false; cand.len()];
    for i in 0..cand.len() {
        if taken[i] {
            continue;
        }
        let same: Vec<usize> = (i..cand.len())
            .filter(|&j| !taken[j] && Arc::ptr_eq(&cand[j].3, &cand[i].3))
            .collect();
        let got = cand[i].3.prepare_many(same.len());
        for (k, &j) in same.iter().enumerate() {
            taken[j] = true;
            tickets[j] = got.get(k).copied();
        }
    }
    let mut pending = Vec::with_capacity(cand.len());
    for ((s, chunk, cs, store, guard), ticket) in cand.into_iter().zip(tickets) {
        let Some(ticket) = ticket else {
            let mut st = s.state.write();
            s.invalidate(&mut st, "Unable to allocate exception.");
            continue;
        };
        pending.push(Pending {
            s,
            chunk,
            cs,
            store,
            ticket,
            _guard: guard,
        });
    }
    copy_runs(origin, &pending);
    // Wait per store; with several stores (several snapshots), in parallel, so that their
    // metadata flushes overlap instead of adding up.
    let mut groups: Vec<Vec<Pending<'_>>> = Vec::new();
    for p in pending {
        match groups
            .iter_mut()
            .find(|g| g.first().is_some_and(|q| Arc::ptr_eq(&q.store, &p.store)))
        {
            Some(g) => g.push(p),
            None => groups.push(vec![p]),
        }
    }
    if groups.len() <= 1 {
        groups.into_iter().for_each(finish_all);
        return;
    }
    let slots: Vec<Mutex<Option<Vec<Pending<'_>>>>> =
        groups.into_iter().map(|g| Mutex::new(Some(g))).collect();
    let run = |slot: &Mutex<Option<Vec<Pending<'_>>>>| {
        if let Some(g) = slot.lock().take() {
            finish_all(g);
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

/// Waits for the commits of `group` (one store) and installs them; releases the chunk locks.
fn finish_all(group: Vec<Pending<'_>>) {
    for p in group {
        let valid = p.store.wait(p.ticket);
        p.s.finish(p.chunk, p.ticket.new_chunk, valid);
    }
}

/// An exception being made by [`ensure_copied`]; its chunk lock is released on drop.
struct Pending<'a> {
    s: &'a Arc<Snap>,
    chunk: u64,
    cs: u64,
    store: Arc<StoreCell>,
    ticket: Ticket,
    _guard: ChunkGuard<'a>,
}

/// Copies the chunks of `pending` from `origin` and reports each copy to its store: one read
/// of the origin span they cover, then one COW write per run of consecutive chunks of one
/// snapshot that got consecutive COW chunks.
fn copy_runs(origin: &dyn BlockDevice, pending: &[Pending<'_>]) {
    let osize = origin.size();
    let start = |p: &Pending<'_>| p.chunk.saturating_mul(p.cs);
    let end = |p: &Pending<'_>| p.chunk.saturating_add(1).saturating_mul(p.cs).min(osize);
    let lo = pending.iter().map(start).min().unwrap_or(0);
    let hi = pending.iter().map(end).max().unwrap_or(0);
    let mut buf = vec![0u8; (hi.saturating_sub(lo) * SECTOR_SIZE) as usize];
    let read_ok = buf.is_empty()
        || match origin.submit(Bio::read(lo, &mut buf)) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("snapshot copy: reading origin failed: {e}");
                false
            }
        };
    // Each snapshot's entries together (stable: a store's entries stay in allocation order,
    // which is the order its commits are reported in).
    let mut order: Vec<&Pending<'_>> = pending.iter().collect();
    order.sort_by_key(|p| Arc::as_ptr(p.s) as usize);
    let mut i = 0;
    while i < order.len() {
        let first = order[i];
        let mut j = i + 1;
        while j < order.len() {
            let (a, b) = (order[j - 1], order[j]);
            if !Arc::ptr_eq(a.s, b.s)
                || !Arc::ptr_eq(&a.store, &b.store)
                || b.chunk != a.chunk + 1
                || b.ticket.new_chunk != a.ticket.new_chunk + 1
            {
                break;
            }
            j += 1;
        }
        let (src, stop) = (start(first), end(order[j - 1]));
        let ok = read_ok
            && (stop <= src || {
                let bytes =
                    &buf[((src - lo) * SECTOR_SIZE) as usize..((stop - lo) * SECTOR_SIZE) as usize];
                match first.s.cow.dev.submit(Bio::write(
                    first.ticket.new_chunk.saturating_mul(first.cs),
                    bytes,
                )) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!("snapshot copy: writing COW failed: {e}");
                        false
                    }
                }
            });
        for p in &order[i..j] {
            p.store.complete(p.ticket, p.chunk, ok);
        }
        i = j;
    }
}
