//! Write buffers a device may keep after the request completes, instead of copying them: the
//! snapshot origin's write-back holds acknowledged writes until their chunks are copied, and
//! an export that receives a write into a buffer of its own (NBD) can lend that buffer rather
//! than have it copied. The export gives the buffer up for reuse only when nobody kept it; a
//! keeper done with a buffer hands it to a small process-wide spare list ([`release`]) that
//! exports take from ([`take_spare`]), so a held write does not cost its export a fresh
//! allocation (zeroing, page faults, and a munmap with its TLB shootdowns when freed).

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::Arc;

use parking_lot::Mutex;

/// Most bytes of spare buffers kept (what stays allocated after a burst of held writes).
const SPARE_BYTES: usize = 8 << 20;
/// Most spare buffers kept.
const SPARE_MAX: usize = 128;

/// Buffers keepers are done with, oldest first, for exports to reuse; bytes by capacity.
static SPARE: Mutex<(VecDeque<Vec<u8>>, usize)> = Mutex::new((VecDeque::new(), 0));

/// Gives `k` back: when it held the last reference to its buffer, the buffer joins the spare
/// list, whose oldest buffers are freed to make room (so buffers of an earlier workload, say
/// 4 KiB writes, do not fill it while 64 KiB ones are freed); one over the bound is freed.
pub fn release(k: KeptBuf) {
    let Ok(v) = Arc::try_unwrap(k.buf) else {
        return;
    };
    let cap = v.capacity();
    if cap == 0 || cap > SPARE_BYTES {
        return;
    }
    let old = {
        let mut sp = SPARE.lock();
        let mut old = Vec::new();
        while sp.0.len() >= SPARE_MAX || sp.1 + cap > SPARE_BYTES {
            let Some(o) = sp.0.pop_front() else { break };
            sp.1 -= o.capacity();
            old.push(o);
        }
        sp.0.push_back(v);
        sp.1 += cap;
        old
    };
    drop(old);
}

/// A spare buffer of at least `len` bytes' capacity and at most twice that (so that keeping
/// a slice of it passes [`KeptBuf::within`]); its contents are unspecified.
pub fn take_spare(len: usize) -> Option<Vec<u8>> {
    let mut sp = SPARE.lock();
    let i =
        sp.0.iter()
            .position(|b| b.capacity() >= len && b.capacity() / 2 <= len)?;
    let v = sp.0.swap_remove_back(i)?;
    sp.1 -= v.capacity();
    Some(v)
}

/// A whole buffer an export lends with its writes ([`crate::Bio::lend`]).
pub type LentBuf = Arc<Vec<u8>>;

/// Part of a buffer, kept: a held write's data, shared without copying.
#[derive(Clone, Debug)]
pub struct KeptBuf {
    buf: LentBuf,
    start: usize,
    len: usize,
}

impl KeptBuf {
    /// A copy of `data` (for a write whose buffer was not lent).
    pub fn copy(data: &[u8]) -> Self {
        KeptBuf {
            len: data.len(),
            buf: Arc::new(data.to_vec()),
            start: 0,
        }
    }

    /// `data` kept without copying if it lies within `buf` and is at least half of its
    /// allocation (capacity, not length: a reused buffer may be much larger than its payload),
    /// so a small write does not pin a large allocation beyond what a keeper counts; `None`
    /// otherwise.
    pub fn within(buf: &LentBuf, data: &[u8]) -> Option<Self> {
        let base = buf.as_ptr() as usize;
        let at = data.as_ptr() as usize;
        let start = at.checked_sub(base)?;
        let end = start.checked_add(data.len())?;
        if end > buf.len() || data.len() < buf.capacity().div_ceil(2) {
            return None;
        }
        Some(KeptBuf {
            buf: buf.clone(),
            start,
            len: data.len(),
        })
    }
}

impl Deref for KeptBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_buffers_are_reused_by_size_and_the_oldest_make_room() {
        let buf: LentBuf = Arc::new(vec![3u8; 3 << 20]);
        let a = KeptBuf::within(&buf, &buf[..]).expect("whole");
        let b = a.clone();
        drop(buf);
        release(a);
        assert!(take_spare(3 << 20).is_none(), "b still keeps it");
        release(b);
        assert!(take_spare(7 << 20).is_none(), "too small");
        assert!(take_spare(1 << 20).is_none(), "too large");
        let v = take_spare(2 << 20).expect("the released buffer");
        assert_eq!(v.capacity(), 3 << 20);
        assert!(take_spare(2 << 20).is_none(), "taken once");
        // The oldest make room for new ones: a list full of small buffers takes a big one.
        // (One test, since the list is process-wide.)
        for _ in 0..SPARE_MAX {
            release(KeptBuf::copy(&[1u8; 100]));
        }
        let buf: LentBuf = Arc::new(vec![0u8; 5 << 20]);
        let k = KeptBuf::within(&buf, &buf[..]).expect("whole");
        drop(buf);
        release(k);
        assert!(
            take_spare(5 << 20).is_some(),
            "a full list took the new buffer"
        );
    }

    #[test]
    fn keeps_only_slices_of_the_lent_buffer() {
        let buf: LentBuf = Arc::new((0..=255u8).cycle().take(4096).collect());
        let k = KeptBuf::within(&buf, &buf[1024..4096]).expect("three quarters of it");
        assert_eq!(&*k, &buf[1024..4096]);
        assert_eq!(Arc::strong_count(&buf), 2);
        assert!(KeptBuf::within(&buf, &buf[0..1024]).is_none(), "a quarter");
        let other = vec![7u8; 4096];
        assert!(KeptBuf::within(&buf, &other).is_none(), "another buffer");
        assert!(KeptBuf::within(&buf, &other[..]).is_none());
        let mut roomy = Vec::with_capacity(1 << 20);
        roomy.extend_from_slice(&other);
        let roomy: LentBuf = Arc::new(roomy);
        assert!(
            KeptBuf::within(&roomy, &roomy[..]).is_none(),
            "4 KiB of a 1 MiB allocation"
        );
        drop(k);
        let c = KeptBuf::copy(&other[..512]);
        assert_eq!(&*c, &other[..512]);
    }
}
