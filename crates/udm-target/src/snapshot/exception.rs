//! Synchronous stand-ins for the kernel's pending exceptions: per-chunk locks (so concurrent
//! I/O to one chunk never races a copy) and the commit sequencer (copies commit in allocation
//! order, a caller waits until the metadata holding its exception is on disk).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};

use parking_lot::{Condvar, Mutex};

use super::store::ExceptionStore;

/// A map keyed by chunk number. The data path looks chunks up many times per request, and
/// SipHash showed in profiles; this hash mixes every bit of the key into every bit of the
/// result (regular strides of chunks, such as a filesystem's per-group metadata, spread over
/// the table) and is keyed once per process, so a client cannot pick colliding chunks.
pub type ChunkMap<V> = HashMap<u64, V, ChunkHashBuilder>;

/// Builds [`ChunkHasher`]s with the process's random key.
#[derive(Clone, Copy)]
pub struct ChunkHashBuilder(u64);

impl Default for ChunkHashBuilder {
    fn default() -> Self {
        static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        ChunkHashBuilder(*KEY.get_or_init(rand::random))
    }
}

impl BuildHasher for ChunkHashBuilder {
    type Hasher = ChunkHasher;

    fn build_hasher(&self) -> ChunkHasher {
        ChunkHasher(self.0)
    }
}

/// SplitMix64's finalizer over the key and the written words.
pub struct ChunkHasher(u64);

impl ChunkHasher {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Hasher for ChunkHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = Self::mix(self.0 ^ n.wrapping_add(0x9E37_79B9_7F4A_7C15));
    }
}

/// Shared/exclusive locks on chunk numbers, created on demand.
#[derive(Default)]
pub struct ChunkLocks {
    held: Mutex<ChunkMap<(u32, bool)>>,
    cv: Condvar,
}

/// A held chunk lock; released on drop.
pub struct ChunkGuard<'a> {
    locks: &'a ChunkLocks,
    chunk: u64,
    exclusive: bool,
}

impl ChunkLocks {
    /// Waits until nobody holds `chunk` exclusively, then holds it shared (a snapshot read that
    /// goes to the origin: the kernel's `track_chunk`).
    pub fn shared(&self, chunk: u64) -> ChunkGuard<'_> {
        let mut held = self.held.lock();
        loop {
            let e = held.entry(chunk).or_insert((0, false));
            if !e.1 {
                e.0 += 1;
                break;
            }
            self.cv.wait(&mut held);
        }
        ChunkGuard {
            locks: self,
            chunk,
            exclusive: false,
        }
    }

    /// Waits until nobody holds `chunk`, then holds it exclusively (a pending exception).
    pub fn exclusive(&self, chunk: u64) -> ChunkGuard<'_> {
        self.lock_many(&[chunk]);
        ChunkGuard {
            locks: self,
            chunk,
            exclusive: true,
        }
    }

    /// Waits until none of `chunks` is held exclusively, then holds them all shared (a read
    /// of several chunks from the origin). Release with [`ChunkLocks::unlock_shared_many`].
    pub fn shared_many(&self, chunks: &[u64]) {
        let mut held = self.held.lock();
        while chunks.iter().any(|c| held.get(c).is_some_and(|e| e.1)) {
            self.cv.wait(&mut held);
        }
        for &c in chunks {
            held.entry(c).or_insert((0, false)).0 += 1;
        }
    }

    /// Releases shared holds taken with [`ChunkLocks::shared_many`].
    pub fn unlock_shared_many(&self, chunks: &[u64]) {
        let mut held = self.held.lock();
        let mut freed = false;
        for c in chunks {
            if let Some(e) = held.get_mut(c) {
                e.0 = e.0.saturating_sub(1);
                if e.0 == 0 && !e.1 {
                    held.remove(c);
                    freed = true;
                }
            }
        }
        drop(held);
        if freed {
            self.cv.notify_all();
        }
    }

    /// Waits until none of `chunks` is held, then holds them all exclusively: one wait and
    /// one lock round for the chunks of a whole write, and never some held while waiting for
    /// others of the same snapshot. Release with [`ChunkLocks::unlock_many`].
    pub fn lock_many(&self, chunks: &[u64]) {
        let mut held = self.held.lock();
        let mut since = None;
        while chunks
            .iter()
            .any(|c| held.get(c).is_some_and(|e| e.0 > 0 || e.1))
        {
            since.get_or_insert_with(std::time::Instant::now);
            self.cv.wait(&mut held);
        }
        if let Some(t) = since {
            tracing::trace!(
                chunks = chunks.len(),
                wait_ms = t.elapsed().as_secs_f64() * 1e3,
                "chunk lock waited"
            );
        }
        for &c in chunks {
            held.insert(c, (0, true));
        }
    }

    /// Releases exclusive locks taken with [`ChunkLocks::lock_many`].
    pub fn unlock_many(&self, chunks: &[u64]) {
        if chunks.is_empty() {
            return;
        }
        let mut held = self.held.lock();
        for c in chunks {
            held.remove(c);
        }
        drop(held);
        self.cv.notify_all();
    }

    fn unlock(&self, chunk: u64, exclusive: bool) {
        let mut held = self.held.lock();
        let remove = match held.get_mut(&chunk) {
            Some(e) => {
                if exclusive {
                    e.1 = false;
                } else {
                    e.0 = e.0.saturating_sub(1);
                }
                e.0 == 0 && !e.1
            }
            None => false,
        };
        if remove {
            held.remove(&chunk);
        }
        drop(held);
        self.cv.notify_all();
    }
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        self.locks.unlock(self.chunk, self.exclusive);
    }
}

/// An exception store with the kernel's completion machinery around it, plus group commit:
/// exceptions are recorded in the store's memory under the lock, and the metadata write that
/// makes them durable runs outside it, by one waiting thread (the leader) at a time; whatever
/// was recorded meanwhile goes into the next write, so concurrent writers share flushes.
pub struct StoreCell {
    inner: Mutex<Slot>,
    cv: Condvar,
}

struct Slot {
    store: Box<dyn ExceptionStore>,
    next_seq: u64,
    complete_seq: u64,
    out_of_order: BTreeMap<u64, (u64, u64, bool)>,
    /// Recorded, not yet covered by a metadata write that was taken.
    waiting: Vec<u64>,
    /// The store asked for a metadata write (kernel rule) not yet taken.
    flush: bool,
    /// A leader is performing a metadata write.
    writing: bool,
    done: ChunkMap<bool>,
}

/// A prepared exception: its sequence number and COW chunk.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    /// Allocation order.
    pub seq: u64,
    /// COW chunk allocated.
    pub new_chunk: u64,
}

impl StoreCell {
    /// Wraps a store.
    pub fn new(store: Box<dyn ExceptionStore>) -> Self {
        StoreCell {
            inner: Mutex::new(Slot {
                store,
                next_seq: 0,
                complete_seq: 0,
                out_of_order: BTreeMap::new(),
                waiting: Vec::new(),
                flush: false,
                writing: false,
                done: ChunkMap::default(),
            }),
            cv: Condvar::new(),
        }
    }

    /// Runs `f` on the store (status, drop, merge steps).
    pub fn with<R>(&self, f: impl FnOnce(&mut dyn ExceptionStore) -> R) -> R {
        let mut slot = self.inner.lock();
        f(&mut *slot.store)
    }

    /// Allocates a COW chunk; `None` when the store is full. Every ticket must be passed to
    /// [`StoreCell::complete`] exactly once.
    pub fn prepare(&self) -> Option<Ticket> {
        let mut slot = self.inner.lock();
        Self::prepare_locked(&mut slot)
    }

    /// Allocates up to `n` COW chunks under one lock (consecutive unless a metadata area or
    /// another thread's allocation intervenes); fewer when the store fills up.
    pub fn prepare_many(&self, n: usize) -> Vec<Ticket> {
        let mut slot = self.inner.lock();
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            match Self::prepare_locked(&mut slot) {
                Some(t) => v.push(t),
                None => break,
            }
        }
        v
    }

    fn prepare_locked(slot: &mut Slot) -> Option<Ticket> {
        let new_chunk = slot.store.prepare()?;
        let seq = slot.next_seq;
        slot.next_seq += 1;
        Some(Ticket { seq, new_chunk })
    }

    /// Reports the copy for `t` finished (`ok` = it succeeded): records, in allocation order,
    /// every exception whose copy has finished (the kernel's `copy_callback`). Never waits for
    /// I/O: the metadata is written by [`StoreCell::wait`].
    pub fn complete(&self, t: Ticket, old: u64, ok: bool) {
        self.complete_many(&[(t, old)], ok);
    }

    /// [`StoreCell::complete`] for several exceptions (a run copied together), under one lock.
    pub fn complete_many(&self, copies: &[(Ticket, u64)], ok: bool) {
        let mut slot = self.inner.lock();
        for &(t, old) in copies {
            slot.out_of_order.insert(t.seq, (old, t.new_chunk, ok));
        }
        let mut flush = false;
        let before = slot.complete_seq;
        loop {
            let next = slot.complete_seq;
            let Some((o, n, ok)) = slot.out_of_order.remove(&next) else {
                break;
            };
            slot.complete_seq += 1;
            slot.waiting.push(next);
            if slot.store.record(o, n, ok) {
                flush = true;
            }
        }
        if flush {
            slot.flush = true;
        }
        let recorded = slot.complete_seq != before;
        let idle = !slot.writing;
        drop(slot);
        if (flush || recorded) && idle {
            // A waiter may lead the write.
            self.cv.notify_all();
        }
    }

    /// Waits until the metadata recording `t` was written; returns whether the exception is
    /// valid (the kernel's `pending_complete(success)`). The first waiter to find a write
    /// requested and none running performs it (and only that one: it then returns or waits
    /// like the others).
    pub fn wait(&self, t: Ticket) -> bool {
        self.wait_many(&[t], false)[0]
    }

    /// [`StoreCell::wait`] for several exceptions under one lock: whether each is valid, in
    /// order. With `force`, the metadata is written as soon as they are all recorded, without
    /// waiting for the kernel's rule (nothing pending or area full): for the origin's
    /// write-back thread, which is itself the one to complete the other pending exceptions.
    /// A metadata write covers whatever is recorded, so writing early is only an extra write.
    pub fn wait_many(&self, tickets: &[Ticket], force: bool) -> Vec<bool> {
        let mut out = vec![None; tickets.len()];
        let mut left = tickets.len();
        let mut slot = self.inner.lock();
        loop {
            for (o, t) in out.iter_mut().zip(tickets) {
                if o.is_none() {
                    if let Some(v) = slot.done.remove(&t.seq) {
                        *o = Some(v);
                        left -= 1;
                    }
                }
            }
            if left == 0 {
                return out.into_iter().map(|v| v.unwrap_or(false)).collect();
            }
            let newest = tickets
                .iter()
                .zip(&out)
                .filter(|(_, o)| o.is_none())
                .map(|(t, _)| t.seq)
                .max()
                .unwrap_or(0);
            if !slot.writing && (slot.flush || (force && newest < slot.complete_seq)) {
                self.lead(&mut slot);
                continue;
            }
            self.cv.wait(&mut slot);
        }
    }

    /// One metadata write covering everything recorded so far, the lock released during I/O.
    fn lead(&self, slot: &mut parking_lot::MutexGuard<'_, Slot>) {
        slot.flush = false;
        let covered = std::mem::take(&mut slot.waiting);
        if covered.is_empty() {
            return;
        }
        slot.writing = true;
        let w = slot.store.take_write();
        let t0 = std::time::Instant::now();
        let r = parking_lot::MutexGuard::unlocked(slot, || w.run());
        tracing::trace!(
            exceptions = covered.len(),
            writes = w.len(),
            write_ms = t0.elapsed().as_secs_f64() * 1e3,
            "snapshot store: metadata written"
        );
        let valid = slot.store.finish_write(w, r);
        for s in covered {
            slot.done.insert(s, valid);
        }
        slot.writing = false;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_chunks_spread_over_the_low_bits() {
        // Chunks 128 MiB apart (4 KiB chunks), as a filesystem's per-group metadata: a
        // multiplicative hash would put them all in one bucket of a small table.
        let b = ChunkHashBuilder::default();
        let buckets: std::collections::HashSet<u64> =
            (0..1024u64).map(|i| b.hash_one(i << 15) & 1023).collect();
        assert!(
            buckets.len() > 600,
            "{} of 1024 buckets used",
            buckets.len()
        );
    }
}
