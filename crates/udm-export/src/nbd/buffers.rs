//! Payload memory of a connection: the buffer pool (bounded in bytes, freed when idle), write
//! payloads received chunk by chunk (memory is committed as bytes arrive, not when a header
//! claims them), and the in-flight budget that makes the reader stop reading when the
//! connection already holds `NbdLimits::max_inflight_bytes` of unanswered requests.
//!
//! The fast path is a few atomics on the connection's own counters; the budget's mutex and
//! condvar are only touched when the reader has to wait.

use super::connection::{Conn, CHUNK};
use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use udm_io::LentBuf;

/// Buffers kept for reuse per connection.
const POOL_MAX: usize = 16;
/// Bytes kept for reuse per connection.
const POOL_BYTES: usize = 16 << 20;
/// Larger buffers are returned to the allocator rather than kept.
const POOL_BUF_MAX: usize = 4 << 20;
/// The waiting reader rechecks the budget (and whether the connection ends) this often.
const BUDGET_RECHECK: Duration = Duration::from_millis(50);

impl Conn {
    /// A buffer of `len` bytes (contents unspecified), from the pool when one is big enough.
    pub(super) fn take_buf(&self, len: usize) -> Vec<u8> {
        let mut b = self.pool_take(len);
        self.ctl.buffered.fetch_add(len as u64, Ordering::Relaxed);
        if b.len() > len {
            b.truncate(len);
        } else {
            b.resize(len, 0);
        }
        b
    }

    fn pool_take(&self, len: usize) -> Vec<u8> {
        let mut p = self.pool.lock();
        let i = match p.bufs.iter().position(|b| b.capacity() >= len) {
            Some(i) => i,
            // Payloads kept by a device (held writes) leave the pool; their buffers come back
            // through the spare list once applied.
            None => match udm_io::take_spare(len) {
                Some(b) => return b,
                None if p.bufs.is_empty() => return Vec::new(),
                None => p.bufs.len() - 1,
            },
        };
        let b = p.bufs.swap_remove(i);
        p.bytes -= b.capacity();
        self.ctl.pooled.store(p.bytes as u64, Ordering::Relaxed);
        b
    }

    /// Returns a buffer from `take_buf` or `read_payload` (kept if the pool has room).
    pub(super) fn put_buf(&self, b: Vec<u8>) {
        self.ctl
            .buffered
            .fetch_sub(b.len() as u64, Ordering::Relaxed);
        let cap = b.capacity();
        if cap == 0 || cap > POOL_BUF_MAX {
            return;
        }
        let mut p = self.pool.lock();
        if p.bufs.len() < POOL_MAX && p.bytes + cap <= POOL_BYTES {
            p.bufs.push(b);
            p.bytes += cap;
            self.ctl.pooled.store(p.bytes as u64, Ordering::Relaxed);
        }
    }

    /// Returns a write payload that was lent to the device ([`udm_io::Bio::lend`]): to the
    /// pool when nobody kept it, else it is the keeper's (and no longer this connection's).
    pub(super) fn put_lent(&self, b: LentBuf) {
        match Arc::try_unwrap(b) {
            Ok(b) => self.put_buf(b),
            Err(kept) => {
                self.ctl
                    .buffered
                    .fetch_sub(kept.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Frees the pool (idle connection, or the connection ended).
    pub(super) fn trim_pool(&self) {
        let bufs = {
            let mut p = self.pool.lock();
            p.bytes = 0;
            self.ctl.pooled.store(0, Ordering::Relaxed);
            std::mem::take(&mut p.bufs)
        };
        drop(bufs);
    }

    /// Receives a write payload of `len` bytes. Memory beyond what a pooled buffer already
    /// holds is zeroed and filled one `CHUNK` at a time, so a header claiming 32 MiB followed
    /// by a trickle commits only what arrived.
    pub(super) fn read_payload(&self, r: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
        let mut b = self.pool_take(len);
        if b.capacity() < len {
            // Allocate fresh rather than let `reserve` copy the old contents.
            b = Vec::with_capacity(len);
        }
        b.truncate(len);
        self.ctl
            .buffered
            .fetch_add(b.len() as u64, Ordering::Relaxed);
        let res = (|| {
            r.read_exact(&mut b)?;
            let mut got = b.len();
            while got < len {
                let n = (len - got).min(CHUNK);
                b.resize(got + n, 0);
                self.ctl.buffered.fetch_add(n as u64, Ordering::Relaxed);
                r.read_exact(&mut b[got..])?;
                got += n;
            }
            Ok(())
        })();
        match res {
            Ok(()) => Ok(b),
            Err(e) => {
                self.put_buf(b);
                Err(e)
            }
        }
    }

    /// Takes `cost` bytes of the in-flight budget, waiting while the connection holds more
    /// than its cap (a request alone is always admitted). False if the connection is ending.
    pub(super) fn acquire(&self, cost: u64) -> bool {
        if cost == 0 {
            return true;
        }
        let a = &self.ctl.inflight;
        let cap = self.ctl.max_inflight;
        let mut cur = a.load(Ordering::SeqCst);
        loop {
            if cur == 0 || cur.saturating_add(cost) <= cap {
                match a.compare_exchange_weak(cur, cur + cost, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => return true,
                    Err(v) => {
                        cur = v;
                        continue;
                    }
                }
            }
            // Over budget: send what is batched, then wait for replies to drain.
            self.flush_pending();
            let mut g = self.budget_mx.lock();
            self.budget_waiting.store(true, Ordering::SeqCst);
            cur = a.load(Ordering::SeqCst);
            if cur == 0 || cur.saturating_add(cost) <= cap {
                continue;
            }
            if self.ending() {
                return false;
            }
            self.budget_cv.wait_for(&mut g, BUDGET_RECHECK);
            cur = a.load(Ordering::SeqCst);
        }
    }

    /// Gives back budget taken by `acquire` (wakes the reader if it waits for it).
    pub(super) fn release(&self, cost: u64) {
        if cost == 0 {
            return;
        }
        self.ctl.inflight.fetch_sub(cost, Ordering::SeqCst);
        if self.budget_waiting.load(Ordering::SeqCst) {
            let _g = self.budget_mx.lock();
            self.budget_waiting.store(false, Ordering::SeqCst);
            self.budget_cv.notify_all();
        }
    }
}
