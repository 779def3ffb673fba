//! 4096-byte metadata blocks: the store trait (memory and file), little-endian field access, and
//! the kernel's validators (self-location, then crc32c with a per-structure salt).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};
pub use crate::kind::Kind;

/// Metadata block size in bytes (`DM_..._METADATA_BLOCK_SIZE`).
pub const BLOCK_SIZE: usize = 4096;

/// One metadata block.
pub type Block = [u8; BLOCK_SIZE];

/// A zeroed block on the heap.
pub fn zeroed() -> Box<Block> {
    Box::new([0u8; BLOCK_SIZE])
}

/// `dm_bm_checksum(&b[4], 4092, salt)`: the kernel's raw crc32c (no final inversion) xor the salt.
pub fn checksum(b: &Block, kind: Kind) -> u32 {
    crc32c::crc32c(&b[4..]) ^ 0xFFFF_FFFF ^ kind.salt()
}

/// Stores `location` and the checksum, as the kernel's `prepare_for_write` does.
pub fn seal(b: &mut Block, kind: Kind, location: u64) {
    put_u64(b, kind.blocknr_offset(), location);
    let c = checksum(b, kind);
    put_u32(b, 0, c);
}

/// The kernel's `check` order: location first (ENOTBLK), then the checksum (EILSEQ).
pub fn validate(b: &Block, kind: Kind, location: u64) -> Result<()> {
    let found = get_u64(b, kind.blocknr_offset());
    if found != location {
        return Err(Error::WrongLocation {
            kind,
            block: location,
            found,
        });
    }
    let stored = get_u32(b, 0);
    let computed = checksum(b, kind);
    if stored != computed {
        return Err(Error::Checksum {
            kind,
            block: location,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Little-endian u32 at `off` (callers pass offsets inside the block).
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// Little-endian u64 at `off`.
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Where metadata blocks live. Block `n` is at byte `n * 4096`.
pub trait BlockStore: Send {
    /// Size of the store in blocks.
    fn nr_blocks(&self) -> u64;
    fn read(&self, block: u64) -> Result<Box<Block>>;
    fn write(&mut self, block: u64, data: &Block) -> Result<()>;
    /// Makes every write so far durable (the commit's ordering point).
    fn flush(&mut self) -> Result<()>;
}

fn check_range(block: u64, nr_blocks: u64) -> Result<()> {
    if block >= nr_blocks {
        return Err(Error::OutOfRange { block, nr_blocks });
    }
    Ok(())
}

/// Reads `block` and validates it as `kind`.
pub fn read_validated(store: &dyn BlockStore, block: u64, kind: Kind) -> Result<Box<Block>> {
    let b = store.read(block)?;
    validate(&b, kind, block)?;
    Ok(b)
}

/// A sparse store in memory (unwritten blocks read as zeros), for tests and fuzzing. Clones
/// share the blocks (a test keeps one to look at what a transaction wrote); `deep_copy` does not.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Clone, Debug, Default)]
struct MemInner {
    blocks: HashMap<u64, Box<Block>>,
    nr_blocks: u64,
    flushes: u64,
    /// Every write in order: (block, flushes before it).
    log: Vec<(u64, u64)>,
}

impl MemStore {
    pub fn new(nr_blocks: u64) -> MemStore {
        let m = MemStore::default();
        m.lock().nr_blocks = nr_blocks;
        m
    }

    fn lock(&self) -> MutexGuard<'_, MemInner> {
        // A panic elsewhere cannot leave the map half-updated: every change is one insert.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An independent copy (a crash image).
    pub fn deep_copy(&self) -> MemStore {
        MemStore {
            inner: Arc::new(Mutex::new(self.lock().clone())),
        }
    }

    /// A store holding `bytes` (rounded down to whole blocks).
    pub fn from_bytes(bytes: &[u8]) -> MemStore {
        let m = MemStore::new((bytes.len() / BLOCK_SIZE) as u64);
        for (i, c) in bytes.chunks_exact(BLOCK_SIZE).enumerate() {
            let mut b = zeroed();
            b.copy_from_slice(c);
            m.lock().blocks.insert(i as u64, b);
        }
        m
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let g = self.lock();
        let mut out = vec![0u8; g.nr_blocks as usize * BLOCK_SIZE];
        for (&i, b) in &g.blocks {
            out[i as usize * BLOCK_SIZE..(i as usize + 1) * BLOCK_SIZE].copy_from_slice(&b[..]);
        }
        out
    }

    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    /// Every write so far: (block, number of flushes before it).
    pub fn write_log(&self) -> Vec<(u64, u64)> {
        self.lock().log.clone()
    }

    /// Overwrites a block behind the transaction manager's back (to corrupt it in tests).
    pub fn poke(&self, block: u64, data: &Block) {
        self.lock().blocks.insert(block, Box::new(*data));
    }
}

impl BlockStore for MemStore {
    fn nr_blocks(&self) -> u64 {
        self.lock().nr_blocks
    }

    fn read(&self, block: u64) -> Result<Box<Block>> {
        let g = self.lock();
        check_range(block, g.nr_blocks)?;
        Ok(g.blocks.get(&block).cloned().unwrap_or_else(zeroed))
    }

    fn write(&mut self, block: u64, data: &Block) -> Result<()> {
        let mut g = self.lock();
        check_range(block, g.nr_blocks)?;
        let f = g.flushes;
        g.log.push((block, f));
        g.blocks.insert(block, Box::new(*data));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.lock().flushes += 1;
        Ok(())
    }
}

/// A store on a file or block device; flush is fdatasync.
pub struct FileStore {
    file: File,
    nr_blocks: u64,
}

impl FileStore {
    /// Uses the whole blocks of `file` (a partial last block is ignored, as the kernel does).
    pub fn new(file: File) -> Result<FileStore> {
        let len = file
            .metadata()
            .map_err(|source| Error::Io { block: 0, source })?
            .len();
        Ok(FileStore {
            file,
            nr_blocks: len / BLOCK_SIZE as u64,
        })
    }

    pub fn open(path: &std::path::Path, writable: bool) -> Result<FileStore> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| Error::Io { block: 0, source })?;
        FileStore::new(file)
    }
}

impl BlockStore for FileStore {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    fn read(&self, block: u64) -> Result<Box<Block>> {
        check_range(block, self.nr_blocks)?;
        let mut b = zeroed();
        self.file
            .read_exact_at(&mut b[..], block * BLOCK_SIZE as u64)
            .map_err(|source| Error::Io { block, source })?;
        Ok(b)
    }

    fn write(&mut self, block: u64, data: &Block) -> Result<()> {
        check_range(block, self.nr_blocks)?;
        self.file
            .write_all_at(&data[..], block * BLOCK_SIZE as u64)
            .map_err(|source| Error::Io { block, source })
    }

    fn flush(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|source| Error::Io { block: 0, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn location_is_checked_before_checksum() {
        let mut b = zeroed();
        seal(&mut b, Kind::BtreeNode, 7);
        validate(&b, Kind::BtreeNode, 7).expect("sealed block validates");
        let e = validate(&b, Kind::BtreeNode, 8).expect_err("wrong location");
        assert_eq!(e.errno(), libc::ENOTBLK);
        b[100] ^= 1;
        let e = validate(&b, Kind::BtreeNode, 7).expect_err("bad checksum");
        assert_eq!(e.errno(), libc::EILSEQ);
        // The salt is part of the checksum: another kind does not validate.
        b[100] ^= 1;
        assert!(validate(&b, Kind::Bitmap, 7).is_err());
    }

    #[test]
    fn array_block_location_at_16() {
        let mut b = zeroed();
        seal(&mut b, Kind::ArrayBlock, 3);
        assert_eq!(get_u64(&b[..], 16), 3);
        assert_eq!(get_u64(&b[..], 8), 0);
    }
}
