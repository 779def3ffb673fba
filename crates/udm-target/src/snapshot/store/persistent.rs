//! The persistent exception store (`P`, `PO`): the on-disk format and write ordering of the
//! kernel's `dm-snap-persistent.c`, so a COW device written here loads in Linux and back.
//!
//! Layout, in chunks of `chunk_size` sectors: chunk 0 is the header (`SnAp`, valid, version 1,
//! chunk size); metadata area `i` is chunk `1 + i * (epa + 1)`, followed by the `epa` data chunks
//! of its exceptions, where `epa = chunk_size * 512 / 16`. An area is an array of
//! `{le64 old_chunk, le64 new_chunk}`; the first entry with `new_chunk == 0` ends it.

use std::sync::Arc;

use udm_io::{BioFlags, BlockDevice, IoError};
use udm_types::{Errno, SECTOR_SIZE};

use super::check::Checker;
use super::DEFAULT_CHUNK_SECTORS;
use super::{
    check_chunk_size, chunk_io, lbs_sectors, ExceptionStore, LoadState, MetaStep, MetaWrite,
    StoreKind,
};
use crate::target::TargetError;

/// `SNAP_MAGIC`: "SnAp" read as a little-endian u32.
pub const SNAP_MAGIC: u32 = 0x7041_6e53;
/// `SNAPSHOT_DISK_VERSION`.
pub const DISK_VERSION: u32 = 1;
/// `NUM_SNAPSHOT_HDR_CHUNKS`.
const HDR_CHUNKS: u64 = 1;
/// Size of one on-disk exception.
const DE_SIZE: usize = 16;

/// The persistent store's state (`struct pstore`).
pub struct Persistent {
    cow: Arc<dyn BlockDevice>,
    chunk_size: u64,
    overflow: bool,
    valid: bool,
    version: u32,
    epa: u64,
    next_free: u64,
    current_area: u64,
    current_committed: u64,
    pending_count: u64,
    area: Vec<u8>,
    /// The in-memory area holds entries not yet handed to a [`MetaWrite`].
    dirty: bool,
    /// Areas that became full, `(index, contents)`, not yet handed to a [`MetaWrite`].
    sealed: Vec<(u64, Vec<u8>)>,
    /// Area-sized buffers back from finished writes.
    spare: Vec<Vec<u8>>,
}

impl Persistent {
    /// `persistent_ctr`: nothing is read until [`ExceptionStore::read_metadata`].
    pub fn new(cow: Arc<dyn BlockDevice>, chunk_size: u64, overflow: bool) -> Self {
        Persistent {
            cow,
            chunk_size,
            overflow,
            valid: true,
            version: DISK_VERSION,
            epa: 0,
            next_free: HDR_CHUNKS + 1,
            current_area: 0,
            current_committed: 0,
            pending_count: 0,
            area: Vec::new(),
            dirty: false,
            sealed: Vec::new(),
            spare: Vec::new(),
        }
    }

    fn chunk_bytes(&self) -> usize {
        (self.chunk_size * SECTOR_SIZE) as usize
    }

    fn stride(&self) -> u64 {
        self.epa + 1
    }

    /// Chunk number of metadata area `area`.
    pub fn area_location(&self, area: u64) -> u64 {
        HDR_CHUNKS.saturating_add(self.stride().saturating_mul(area))
    }

    fn skip_metadata(&mut self) {
        if self.next_free % self.stride() == HDR_CHUNKS {
            self.next_free += 1;
        }
    }

    fn write_header(&self) -> Result<(), IoError> {
        let mut buf = vec![0u8; self.chunk_bytes()];
        encode_header(&mut buf, self.valid, self.version, self.chunk_size);
        chunk_io(
            &*self.cow,
            0,
            self.chunk_size,
            &mut buf,
            true,
            BioFlags::empty(),
        )
    }

    fn zero_disk_area(&self, area: u64) -> Result<(), IoError> {
        let mut zero = vec![0u8; self.chunk_bytes()];
        chunk_io(
            &*self.cow,
            self.area_location(area),
            self.chunk_size,
            &mut zero,
            true,
            BioFlags::empty(),
        )
    }

    fn area_io(&mut self, write: bool, flags: BioFlags) -> Result<(), IoError> {
        let chunk = self.area_location(self.current_area);
        let mut area = std::mem::take(&mut self.area);
        let r = chunk_io(&*self.cow, chunk, self.chunk_size, &mut area, write, flags);
        self.area = area;
        r
    }

    /// A zeroed area-sized buffer, reused when one is spare.
    fn buffer(&mut self) -> Vec<u8> {
        match self.spare.pop() {
            Some(mut b) => {
                b.fill(0);
                b
            }
            None => vec![0u8; self.chunk_bytes()],
        }
    }

    fn read_exception(&self, index: u64) -> (u64, u64) {
        decode_exception(&self.area, index as usize)
    }

    fn write_exception(&mut self, index: u64, old: u64, new: u64) {
        let off = index as usize * DE_SIZE;
        self.area[off..off + 8].copy_from_slice(&old.to_le_bytes());
        self.area[off + 8..off + 16].copy_from_slice(&new.to_le_bytes());
    }

    /// Reads areas 0, 1, ... up to the first one not full, checking every exception
    /// ([`Checker`]) before any is reported: a refused store reports none and is not written.
    fn read_exceptions(&mut self, add: &mut dyn FnMut(u64, u64)) -> Result<(), TargetError> {
        let mut buf = vec![0u8; self.chunk_bytes()];
        let check = Checker::new(self.cow.size(), self.chunk_size, self.epa);
        let mut found = Vec::new();
        self.current_area = 0;
        loop {
            let chunk = self.area_location(self.current_area);
            check.area(self.current_area, chunk)?;
            chunk_io(
                &*self.cow,
                chunk,
                self.chunk_size,
                &mut buf,
                false,
                BioFlags::empty(),
            )
            .map_err(io_err)?;
            let mut full = true;
            for i in 0..self.epa {
                let (old, new) = decode_exception(&buf, i as usize);
                if new == 0 {
                    self.current_committed = i;
                    full = false;
                    break;
                }
                check.exception(self.current_area, i, old, new)?;
                if self.next_free <= new {
                    self.next_free = new.saturating_add(1);
                }
                found.push((old, new));
            }
            if !full {
                // Whatever follows the end marker is not an exception: it must not become
                // one when the next commit overwrites the marker (the kernel's own areas are
                // zero there).
                let end = self.current_committed as usize * DE_SIZE;
                buf[end..].fill(0);
                self.area.copy_from_slice(&buf);
                break;
            }
            self.current_area += 1;
        }
        check.duplicates(&found)?;
        self.skip_metadata();
        for (old, new) in found {
            add(old, new);
        }
        Ok(())
    }
}

/// Writes the 16-byte header at the start of `buf`.
pub fn encode_header(buf: &mut [u8], valid: bool, version: u32, chunk_size: u64) {
    buf[0..4].copy_from_slice(&SNAP_MAGIC.to_le_bytes());
    buf[4..8].copy_from_slice(&u32::from(valid).to_le_bytes());
    buf[8..12].copy_from_slice(&version.to_le_bytes());
    buf[12..16].copy_from_slice(&(chunk_size as u32).to_le_bytes());
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Entry `i` of an area: `(old_chunk, new_chunk)`.
pub fn decode_exception(area: &[u8], i: usize) -> (u64, u64) {
    let off = i * DE_SIZE;
    (le64(area, off), le64(area, off + 8))
}

fn io_err(e: IoError) -> TargetError {
    TargetError::new(
        udm_types::errno::HasErrno::errno(&e),
        format!("Failed to read snapshot metadata: {e}"),
    )
}

impl ExceptionStore for Persistent {
    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn overflow_supported(&self) -> bool {
        self.overflow
    }

    fn set_overflow_supported(&mut self, on: bool) {
        self.overflow = on;
    }

    fn read_metadata(&mut self, add: &mut dyn FnMut(u64, u64)) -> Result<LoadState, TargetError> {
        // read_header
        let supplied = self.chunk_size != 0;
        if !supplied {
            self.chunk_size = DEFAULT_CHUNK_SECTORS.max(lbs_sectors(&*self.cow));
        }
        // A chunk larger than the COW device cannot be read (and is not worth a huge buffer).
        if self.chunk_size > self.cow.size() {
            return Err(TargetError::new(
                Errno::EIO,
                format!(
                    "Failed to read snapshot metadata: chunk size {} is larger than the COW device ({} sectors)",
                    self.chunk_size,
                    self.cow.size()
                ),
            ));
        }
        let mut hdr = vec![0u8; self.chunk_bytes()];
        chunk_io(
            &*self.cow,
            0,
            self.chunk_size,
            &mut hdr,
            false,
            BioFlags::empty(),
        )
        .map_err(io_err)?;
        let magic = le32(&hdr, 0);
        let new_snapshot = magic == 0;
        if !new_snapshot {
            if magic != SNAP_MAGIC {
                tracing::warn!("Invalid or corrupt snapshot");
                return Err(TargetError::new(
                    Errno::ENXIO,
                    "Failed to read snapshot metadata: Invalid or corrupt snapshot",
                ));
            }
            self.valid = le32(&hdr, 4) != 0;
            self.version = le32(&hdr, 8);
            let chunk = u64::from(le32(&hdr, 12));
            if chunk != self.chunk_size {
                if supplied {
                    tracing::warn!(
                        "chunk size {chunk} in device metadata overrides table chunk size of {}.",
                        self.chunk_size
                    );
                }
                if chunk > self.cow.size() {
                    return Err(TargetError::invalid(format!(
                        "Failed to read snapshot metadata: invalid on-disk chunk size {chunk}: larger than the COW device."
                    )));
                }
                check_chunk_size(chunk, lbs_sectors(&*self.cow), 1).map_err(|m| {
                    TargetError::invalid(format!(
                        "Failed to read snapshot metadata: invalid on-disk chunk size {chunk}: {m}."
                    ))
                })?;
                self.chunk_size = chunk;
            }
        }
        self.epa = self.chunk_size * SECTOR_SIZE / DE_SIZE as u64;
        self.area = vec![0u8; self.chunk_bytes()];
        if new_snapshot {
            self.write_header().map_err(|e| {
                TargetError::new(
                    udm_types::errno::HasErrno::errno(&e),
                    format!("Failed to read snapshot metadata: write_header failed: {e}"),
                )
            })?;
            self.current_area = 0;
            self.zero_disk_area(0).map_err(|e| {
                TargetError::new(
                    udm_types::errno::HasErrno::errno(&e),
                    format!("Failed to read snapshot metadata: zero_disk_area(0) failed: {e}"),
                )
            })?;
            return Ok(LoadState::Valid);
        }
        if self.version != DISK_VERSION {
            return Err(TargetError::invalid(format!(
                "Failed to read snapshot metadata: unable to handle snapshot disk version {}",
                self.version
            )));
        }
        if !self.valid {
            return Ok(LoadState::Invalid);
        }
        self.read_exceptions(add)?;
        Ok(LoadState::Valid)
    }

    fn prepare(&mut self) -> Option<u64> {
        let size = self.cow.size();
        let need = self
            .next_free
            .checked_add(1)?
            .checked_mul(self.chunk_size)?;
        if size < need {
            return None;
        }
        let new = self.next_free;
        self.next_free += 1;
        self.skip_metadata();
        self.pending_count += 1;
        Some(new)
    }

    fn record(&mut self, old: u64, new: u64, valid: bool) -> bool {
        if !valid {
            self.valid = false;
        }
        let i = self.current_committed;
        self.write_exception(i, old, new);
        self.current_committed += 1;
        self.dirty = true;
        self.pending_count = self.pending_count.saturating_sub(1);
        let full = self.current_committed == self.epa;
        if full {
            // Later entries go to the next area in memory; on disk it is zeroed (or written
            // with its entries so far), then this area written, in one MetaWrite (writes run
            // one at a time in the order taken).
            let fresh = self.buffer();
            let area = std::mem::replace(&mut self.area, fresh);
            self.sealed.push((self.current_area, area));
            self.current_area += 1;
            self.current_committed = 0;
            self.dirty = false;
        }
        full || self.pending_count == 0
    }

    fn take_write(&mut self) -> MetaWrite {
        let sealed = std::mem::take(&mut self.sealed);
        if !self.valid {
            self.dirty = false;
            self.spare.extend(sealed.into_iter().map(|(_, b)| b));
            return MetaWrite::none(false);
        }
        let cs = self.chunk_size;
        let mut steps = Vec::with_capacity(sealed.len() + 1);
        let mut sealed = sealed.into_iter();
        let Some((first, first_buf)) = sealed.next() else {
            // The kernel's commit: the current area, after a cache flush (its exceptions'
            // data first), with FUA.
            if self.dirty {
                let mut buf = self.buffer();
                buf.copy_from_slice(&self.area);
                steps.push(MetaStep {
                    sector: self.area_location(self.current_area).saturating_mul(cs),
                    buf,
                    flags: BioFlags::PREFLUSH | BioFlags::FUA,
                });
                self.dirty = false;
            }
            return MetaWrite::new(self.cow.clone(), steps);
        };
        // Area `first` (the current area at the last write: on disk not full, so a reader
        // stops there) became full. The areas after it are written first, plainly: the later
        // full ones, then the current one with its entries so far, or zeroed (which is the
        // kernel's zeroing of the next area, and its end marker). None of them is reachable
        // until `first` is written full, last, after a cache flush (PREFLUSH: every data chunk
        // and every area before it are durable) and with FUA. One flush pair however many
        // areas filled; when one filled and nothing was recorded after it, this is exactly
        // the kernel's sequence (zero the next area, then write the full one).
        for (idx, buf) in sealed {
            steps.push(MetaStep {
                sector: self.area_location(idx).saturating_mul(cs),
                buf,
                flags: BioFlags::empty(),
            });
        }
        let mut buf = self.buffer();
        buf.copy_from_slice(&self.area);
        steps.push(MetaStep {
            sector: self.area_location(self.current_area).saturating_mul(cs),
            buf,
            flags: BioFlags::empty(),
        });
        self.dirty = false;
        steps.push(MetaStep {
            sector: self.area_location(first).saturating_mul(cs),
            buf: first_buf,
            flags: BioFlags::PREFLUSH | BioFlags::FUA,
        });
        MetaWrite::new(self.cow.clone(), steps)
    }

    fn finish_write(&mut self, w: MetaWrite, r: Result<(), IoError>) -> bool {
        if let Err(e) = &r {
            tracing::error!("snapshot metadata write failed: {e}");
            self.valid = false;
        }
        let valid = w.valid() && r.is_ok();
        for s in w.into_steps() {
            if self.spare.len() < 4 {
                self.spare.push(s.buf);
            }
        }
        valid
    }

    fn drop_snapshot(&mut self) {
        self.valid = false;
        if let Err(e) = self.write_header() {
            tracing::warn!("write header failed: {e}");
        }
    }

    fn usage(&self) -> (u64, u64, u64) {
        (
            self.next_free.saturating_mul(self.chunk_size),
            self.cow.size(),
            (self.current_area + 1 + HDR_CHUNKS) * self.chunk_size,
        )
    }

    fn kind(&self) -> StoreKind {
        if self.overflow {
            StoreKind::PersistentOverflow
        } else {
            StoreKind::Persistent
        }
    }

    fn supports_merge(&self) -> bool {
        true
    }

    fn prepare_merge(&mut self) -> Result<Option<(u64, u64, u64)>, IoError> {
        if self.current_committed == 0 {
            if self.current_area == 0 {
                return Ok(None);
            }
            self.current_area -= 1;
            self.area_io(false, BioFlags::empty())?;
            self.current_committed = self.epa;
        }
        let (last_old, last_new) = self.read_exception(self.current_committed - 1);
        let mut n = 1;
        while n < self.current_committed {
            let (o, nw) = self.read_exception(self.current_committed - 1 - n);
            if o != last_old.wrapping_sub(n) || nw != last_new.wrapping_sub(n) {
                break;
            }
            n += 1;
        }
        Ok(Some((last_old, last_new, n)))
    }

    fn commit_merge(&mut self, n: u64) -> Result<(), IoError> {
        let n = n.min(self.current_committed);
        for i in 0..n {
            self.write_exception(self.current_committed - 1 - i, 0, 0);
        }
        self.area_io(true, BioFlags::PREFLUSH | BioFlags::FUA)?;
        self.current_committed -= n;
        self.next_free = self.area_location(self.current_area) + self.current_committed + 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use udm_io::backend::mem::MemDevice;
    use udm_io::Bio;

    fn dev(sectors: u64) -> Arc<MemDevice> {
        Arc::new(MemDevice::new(sectors))
    }

    #[test]
    fn new_store_writes_header_and_zero_area() {
        let cow = dev(1024);
        let mut p = Persistent::new(cow.clone(), 8, false);
        assert_eq!(p.read_metadata(&mut |_, _| {}).unwrap(), LoadState::Valid);
        let c = cow.contents();
        assert_eq!(
            &c[0..16],
            &[0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0]
        );
        assert_eq!(p.usage(), (16, 1024, 16));
        assert_eq!(p.epa, 256);
    }

    #[test]
    fn allocation_skips_metadata_and_reloads() {
        let cow = dev(8 * 600);
        let mut p = Persistent::new(cow.clone(), 8, false);
        p.read_metadata(&mut |_, _| {}).unwrap();
        let mut got = Vec::new();
        for old in 0..300u64 {
            let new = p.prepare().unwrap();
            assert_ne!(new % 257, 1, "allocated a metadata chunk");
            got.push((old, new));
            assert_eq!(p.commit(old, new, true), Some(true));
        }
        assert_eq!(got[254].1, 256);
        assert_eq!(got[255].1, 257);
        assert_eq!(got[256].1, 259);
        let mut q = Persistent::new(cow.clone(), 0, false);
        let mut loaded = Vec::new();
        q.read_metadata(&mut |o, n| loaded.push((o, n))).unwrap();
        assert_eq!(loaded, got);
        assert_eq!(q.chunk_size, 8);
        assert_eq!(q.next_free, p.next_free);
        assert_eq!(q.current_area, 1);
        assert_eq!(q.usage(), p.usage());
    }

    #[test]
    fn area_written_only_when_nothing_pending_or_full() {
        let cow = dev(8 * 600);
        let mut p = Persistent::new(cow.clone(), 8, false);
        p.read_metadata(&mut |_, _| {}).unwrap();
        let area0 = 8 * 512..16 * 512;
        let a = p.prepare().unwrap();
        let b = p.prepare().unwrap();
        assert_eq!(
            p.commit(10, a, true),
            None,
            "b still pending: nothing written"
        );
        assert!(cow.contents()[area0.clone()].iter().all(|&x| x == 0));
        let flushes = cow.count(udm_io::BioKind::Write);
        assert_eq!(p.commit(11, b, true), Some(true));
        assert_eq!(cow.count(udm_io::BioKind::Write), flushes + 1);
        let c = cow.contents();
        assert_eq!(decode_exception(&c[area0.clone()], 0), (10, a));
        assert_eq!(decode_exception(&c[area0.clone()], 1), (11, b));
        // Fill area 0 with junk in area 1's place first: it must be zeroed before area 0 is
        // written full.
        let junk = vec![0xffu8; 4096];
        cow.submit(Bio::write(257 * 8 + 8, &junk)).unwrap();
        let mut pend = Vec::new();
        for i in 2..256u64 {
            pend.push((i, p.prepare().unwrap()));
        }
        let mut written = 0;
        for (i, n) in pend {
            if p.commit(100 + i, n, true).is_some() {
                written += 1;
            }
        }
        assert_eq!(written, 1, "one write when the area became full");
        assert!(cow.contents()[258 * 8 * 512..259 * 8 * 512]
            .iter()
            .all(|&x| x == 0));
        assert_eq!(p.usage().2, 24, "now in area 1");
    }

    /// Loads a store from `image` and returns its exceptions.
    fn load(image: &[u8]) -> Vec<(u64, u64)> {
        let cow = dev(image.len() as u64 / 512);
        cow.submit(Bio::write(0, image)).unwrap();
        let mut p = Persistent::new(cow, 0, false);
        let mut got = Vec::new();
        p.read_metadata(&mut |o, n| got.push((o, n))).unwrap();
        got
    }

    #[test]
    fn several_areas_filled_at_once_stay_consistent_at_any_crash_point() {
        let cow = dev(8 * 1200);
        let mut p = Persistent::new(cow.clone(), 8, false);
        p.read_metadata(&mut |_, _| {}).unwrap();
        let mut all = Vec::new();
        for old in 0..100u64 {
            let new = p.prepare().unwrap();
            all.push((old, new));
            assert_eq!(p.commit(old, new, true), Some(true));
        }
        // Stale junk where areas 1 and 2 go: never read while area 0 is not full on disk.
        let junk = vec![0x5au8; 4096];
        for area in 1..3 {
            cow.submit(Bio::write(p.area_location(area) * 8, &junk))
                .unwrap();
        }
        let before = cow.contents();
        // 700 more in one write: areas 0 (rest), 1 and 2 fill, area 3 gets 32.
        let news: Vec<u64> = (0..700).map(|_| p.prepare().unwrap()).collect();
        let mut flush = false;
        for (i, &new) in news.iter().enumerate() {
            flush = p.record(1000 + i as u64, new, true);
            all.push((1000 + i as u64, new));
        }
        assert!(flush);
        let w = p.take_write();
        let steps = w.into_steps();
        let flags: Vec<BioFlags> = steps.iter().map(|s| s.flags).collect();
        let pf = BioFlags::PREFLUSH | BioFlags::FUA;
        let none = BioFlags::empty();
        assert_eq!(
            flags,
            vec![none, none, none, pf],
            "one flush pair, area 0 last"
        );
        assert_eq!(steps[3].sector, p.area_location(0) * 8);
        // A crash before the last step: any subset of the plain writes reached the disk.
        for mask in 0..8u32 {
            let mut img = before.clone();
            for (i, st) in steps[..3].iter().enumerate() {
                if mask & (1 << i) != 0 {
                    let a = (st.sector * 512) as usize;
                    img[a..a + st.buf.len()].copy_from_slice(&st.buf);
                }
            }
            assert_eq!(
                load(&img),
                all[..100],
                "crash with writes {mask:#b} on disk"
            );
        }
        let mut img = before.clone();
        for st in &steps {
            let a = (st.sector * 512) as usize;
            img[a..a + st.buf.len()].copy_from_slice(&st.buf);
        }
        assert_eq!(load(&img), all, "after the write");
    }

    #[test]
    fn bad_magic_is_enxio_and_untouched() {
        let cow = dev(64);
        let junk = vec![0xabu8; 512];
        cow.submit(Bio::write(0, &junk)).unwrap();
        let before = cow.contents();
        let mut p = Persistent::new(cow.clone(), 8, false);
        let e = p.read_metadata(&mut |_, _| {}).unwrap_err();
        assert_eq!(e.errno, Errno::ENXIO);
        assert_eq!(cow.contents(), before);
    }

    #[test]
    fn absurd_chunk_sizes_are_refused_without_allocating() {
        let cow = dev(64);
        let mut h = vec![0u8; 512];
        encode_header(&mut h, true, 1, 1 << 21);
        cow.submit(Bio::write(0, &h)).unwrap();
        let mut p = Persistent::new(cow.clone(), 8, false);
        let e = p.read_metadata(&mut |_, _| {}).unwrap_err();
        assert!(e.msg.contains("on-disk chunk size"), "{}", e.msg);
        encode_header(&mut h, true, 1, 0);
        cow.submit(Bio::write(0, &h)).unwrap();
        let mut p = Persistent::new(cow.clone(), 8, false);
        assert!(p.read_metadata(&mut |_, _| {}).is_err());
        let mut p = Persistent::new(cow.clone(), 1 << 20, false);
        assert!(p.read_metadata(&mut |_, _| {}).is_err());
    }

    #[test]
    fn bad_version_is_einval() {
        let cow = dev(64);
        let mut h = vec![0u8; 512];
        encode_header(&mut h, true, 2, 8);
        cow.submit(Bio::write(0, &h)).unwrap();
        let mut p = Persistent::new(cow.clone(), 8, false);
        assert_eq!(
            p.read_metadata(&mut |_, _| {}).unwrap_err().errno,
            Errno::EINVAL
        );
    }
}
