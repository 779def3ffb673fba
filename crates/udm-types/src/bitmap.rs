//! A dirty bitmap: which fixed-size blocks of a device changed since a backup point. `udm backup`
//! computes it from the era metadata and hands it to udmd in a file; udmd's NBD export serves it
//! as the metadata context `qemu:dirty-bitmap:NAME` (a set bit reads as flag 1, "dirty").
//!
//! File format (little-endian): magic `UDMDBMP1`, granularity in bytes (u64), device size in
//! bytes (u64), the bits (block `i` is bit `i % 64` of word `i / 64`), then the crc32c of
//! everything before it (u32). A damaged file is refused, never read as "nothing changed".

use crate::errno::{Errno, HasErrno};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"UDMDBMP1";
const HEADER: usize = 24;

/// Why a bitmap could not be built, read or written.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// Granularity not a power of two in 512 B ..= 1 GiB, or a zero size.
    #[error("dirty bitmap: {0}")]
    Invalid(String),
    /// A bitmap file that is not one, or is damaged.
    #[error("dirty bitmap {path}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Reading or writing the file failed.
    #[error("dirty bitmap {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl HasErrno for BitmapError {
    fn errno(&self) -> Errno {
        match self {
            BitmapError::Invalid(_) => Errno::EINVAL,
            BitmapError::Corrupt { .. } => Errno::EILSEQ,
            BitmapError::Io { source, .. } => Errno::from_io(source),
        }
    }
}

/// Changed blocks of a device of `size` bytes at `granularity` bytes per bit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    granularity: u64,
    size: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// An empty (all clean) bitmap.
    pub fn new(size: u64, granularity: u64) -> Result<DirtyBitmap, BitmapError> {
        if !granularity.is_power_of_two() || !(512..=1 << 30).contains(&granularity) {
            return Err(BitmapError::Invalid(format!(
                "granularity {granularity} is not a power of two from 512 to 1G"
            )));
        }
        if size == 0 {
            return Err(BitmapError::Invalid("device size 0".into()));
        }
        let blocks = size.div_ceil(granularity);
        let words = usize::try_from(blocks.div_ceil(64))
            .map_err(|_| BitmapError::Invalid(format!("{blocks} blocks do not fit in memory")))?;
        Ok(DirtyBitmap {
            granularity,
            size,
            words: vec![0; words],
        })
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of blocks (bits).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// Marks block `block` (ignored past the end).
    pub fn set(&mut self, block: u64) {
        if block < self.blocks() {
            self.words[(block / 64) as usize] |= 1 << (block % 64);
        }
    }

    /// Marks every block that `len` bytes at `offset` touch (clipped to the device).
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset / self.granularity;
        let last = (end - 1) / self.granularity;
        for b in first..=last {
            self.set(b);
        }
    }

    /// Whether block `block` is dirty.
    pub fn is_set(&self, block: u64) -> bool {
        block < self.blocks() && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Number of dirty blocks.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Dirty blocks, ascending.
    pub fn dirty(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let base = i as u64 * 64;
            (0..64u64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| base + b)
        })
    }

    /// Runs of equal state covering `len` bytes from `offset` (clipped to the device):
    /// `(bytes, dirty)`, adjacent runs differing.
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        self.runs_upto(offset, len, usize::MAX)
    }

    /// [`DirtyBitmap::runs`], stopping after `max` runs (the last one may then be cut short).
    /// Whole words of equal bits are skipped at once, so a long clean or dirty range costs
    /// little whatever the granularity.
    pub fn runs_upto(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset;
        while pos < end {
            let block = pos / self.granularity;
            let dirty = self.is_set(block);
            let word = self.words[(block / 64) as usize];
            let uniform = block % 64 == 0 && (word == 0 || word == u64::MAX);
            let step = if uniform { 64 } else { 1 };
            let next = ((block + step) * self.granularity).min(end);
            let n = out.len();
            match out.last_mut() {
                Some(l) if l.1 == dirty => l.0 += next - pos,
                _ if n == max => break,
                _ => out.push((next - pos, dirty)),
            }
            pos = next;
        }
        out
    }

    /// The file form (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + self.words.len() * 8 + 4);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.granularity.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        for w in &self.words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses the file form; `path` names it in errors.
    pub fn decode(b: &[u8], path: &Path) -> Result<DirtyBitmap, BitmapError> {
        let corrupt = |what: String| BitmapError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        if b.len() < HEADER + 4 || &b[..8] != MAGIC {
            return Err(corrupt(
                "not a udm dirty bitmap (bad magic or too short)".into(),
            ));
        }
        let (body, tail) = b.split_at(b.len() - 4);
        let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(corrupt(format!(
                "checksum {stored:#010x}, computed {computed:#010x}"
            )));
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let (granularity, size) = (u64_at(8), u64_at(16));
        // Check the length against the header before allocating from its values.
        let words = size.div_ceil(granularity.max(1)).div_ceil(64);
        if (body.len() - HEADER) as u64 != words.saturating_mul(8) {
            return Err(corrupt(format!(
                "{} bytes of bits for a {size}-byte device at {granularity} bytes per bit",
                body.len() - HEADER
            )));
        }
        let mut bm = DirtyBitmap::new(size, granularity).map_err(|e| corrupt(e.to_string()))?;
        for (i, w) in bm.words.iter_mut().enumerate() {
            *w = u64_at(HEADER + i * 8);
        }
        Ok(bm)
    }

    /// Reads a bitmap file.
    pub fn load(path: &Path) -> Result<DirtyBitmap, BitmapError> {
        let b = std::fs::read(path).map_err(|source| BitmapError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        DirtyBitmap::decode(&b, path)
    }

    /// Writes a bitmap file durably (a temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), BitmapError> {
        use std::io::Write;
        let io = |source| BitmapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&self.encode()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> PathBuf {
        PathBuf::from("t.bitmap")
    }

    #[test]
    fn ranges_mark_every_touched_block() {
        let mut b = DirtyBitmap::new(10 * 65536 + 100, 65536).expect("new");
        assert_eq!(b.blocks(), 11);
        b.set_range(65535, 2);
        b.set_range(10 * 65536, 1);
        b.set_range(20 * 65536, 1);
        assert_eq!(b.dirty().collect::<Vec<_>>(), vec![0, 1, 10]);
        assert_eq!(b.count(), 3);
        assert_eq!(
            b.runs(0, u64::MAX),
            vec![(2 * 65536, true), (8 * 65536, false), (100, true)]
        );
        assert_eq!(
            b.runs(2 * 65536 - 4096, 8192),
            vec![(4096, true), (4096, false)]
        );
    }

    #[test]
    fn file_form_round_trips_and_refuses_damage() {
        let mut b = DirtyBitmap::new(1 << 30, 4096).expect("new");
        for i in [0, 63, 64, 1000, (1 << 18) - 1] {
            b.set(i);
        }
        let e = b.encode();
        assert_eq!(DirtyBitmap::decode(&e, &p()).expect("decode"), b);
        for at in [0, 9, 17, 30, e.len() - 1] {
            let mut bad = e.clone();
            bad[at] ^= 1;
            assert!(matches!(
                DirtyBitmap::decode(&bad, &p()),
                Err(BitmapError::Corrupt { .. })
            ));
        }
        assert!(DirtyBitmap::decode(&e[..e.len() - 8], &p()).is_err());
        assert!(DirtyBitmap::new(100, 1000).is_err());
        assert!(DirtyBitmap::new(0, 4096).is_err());
    }
}
