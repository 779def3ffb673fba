//! Write buffers a device may keep after the request completes, instead of copying them: the
//! snapshot origin's write-back holds acknowledged writes until their chunks are copied, and
//! an export that receives a write into a buffer of its own (NBD) can lend that buffer rather
//! than have it copied. The export gives the buffer up for reuse only when nobody kept it.

use std::ops::Deref;
use std::sync::Arc;

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
        let c = KeptBuf::copy(&other[..512]);
        assert_eq!(&*c, &other[..512]);
    }
}
