//! A window onto part of another device: how a partition (`vda1`) is served. Requests are range
//! checked against the window and shifted by its start; flushes pass through unchanged.

use crate::bio::Bio;
use crate::device::{check_range, BlockDevice, Extent, Limits};
use crate::error::IoError;
use crate::partition::PartitionInfo;
use std::sync::Arc;
use udm_types::Errno;

/// Sectors `[start, start + sectors)` of `inner`, served as a device of its own.
pub struct SliceDevice {
    inner: Arc<dyn BlockDevice>,
    start: u64,
    sectors: u64,
    name: String,
}

impl SliceDevice {
    /// A window of `sectors` sectors at `start`; EINVAL when it does not fit inside `inner`.
    pub fn new(
        inner: Arc<dyn BlockDevice>,
        start: u64,
        sectors: u64,
        name: impl Into<String>,
    ) -> Result<Self, IoError> {
        let size = inner.size();
        let name = name.into();
        if start > size || sectors > size - start {
            return Err(IoError::errno(
                crate::bio::BioKind::Read,
                start,
                Errno::EINVAL,
                format!(
                    "slice {name} ({sectors} sectors at {start}) does not fit in {} ({size} sectors)",
                    inner.describe()
                ),
            ));
        }
        Ok(SliceDevice {
            inner,
            start,
            sectors,
            name,
        })
    }

    /// The slice for a partition, named as Linux names it: `disk` + number, with a `p` between
    /// when the disk name ends in a digit (`vda1`, `loop0p1`, `nvme0n1p2`). Uses the length Linux
    /// exposes (two sectors for an extended-partition container).
    pub fn for_partition(
        inner: Arc<dyn BlockDevice>,
        disk: &str,
        part: &PartitionInfo,
    ) -> Result<Self, IoError> {
        let name = partition_name(disk, part.number);
        SliceDevice::new(inner, part.start, part.exposed_sectors(), name)
    }

    /// First sector of the window on the inner device.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The slice's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device this is a window of.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
}

/// Linux's partition device name: `sda` + 1 = `sda1`, `loop0` + 1 = `loop0p1`.
pub fn partition_name(disk: &str, number: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{number}")
    } else {
        format!("{disk}{number}")
    }
}

impl BlockDevice for SliceDevice {
    fn size(&self) -> u64 {
        self.sectors
    }

    fn limits(&self) -> Limits {
        self.inner.limits()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        check_range(&bio, self.sectors)?;
        if bio.is_empty_flush() {
            return self.inner.submit(bio);
        }
        let sector = bio.sector;
        let at = self.start + sector;
        self.inner
            .submit(bio.at(at))
            .map_err(|e| unshift(e, self.start))
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        if sector >= self.sectors {
            return Ok(Vec::new());
        }
        let sectors = sectors.min(self.sectors - sector);
        self.inner
            .block_status(self.start + sector, sectors)
            .map_err(|e| unshift(e, self.start))
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// Reports an inner device's error at the slice-relative sector the caller used.
fn unshift(e: IoError, start: u64) -> IoError {
    match e {
        IoError::Os { op, sector, source } => IoError::Os {
            op,
            sector: sector.saturating_sub(start),
            source,
        },
        IoError::Errno {
            op,
            sector,
            errno,
            what,
        } => IoError::Errno {
            op,
            sector: sector.saturating_sub(start),
            errno,
            what,
        },
        IoError::Misaligned { op, sector, why } => IoError::Misaligned {
            op,
            sector: sector.saturating_sub(start),
            why,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mem::{Fault, MemDevice};
    use crate::device::ExtentKind;
    use udm_types::errno::HasErrno;

    #[test]
    fn remaps_and_checks_range() {
        let mem = Arc::new(MemDevice::new(100));
        let s = SliceDevice::new(mem.clone(), 10, 20, "m1").unwrap();
        assert_eq!(s.size(), 20);
        let w = vec![5u8; 1024];
        s.submit(Bio::write(3, &w)).unwrap();
        let all = mem.contents();
        assert!(all[13 * 512..15 * 512].iter().all(|&b| b == 5));
        assert!(all[..13 * 512].iter().all(|&b| b == 0));
        let e = s.submit(Bio::write(19, &w)).unwrap_err();
        assert_eq!(e.errno(), Errno::ENOSPC);
        s.submit(Bio::flush()).unwrap();
        let ext = s.block_status(0, 100).unwrap();
        assert_eq!(ext.iter().map(|e| e.sectors).sum::<u64>(), 20);
        assert_eq!(
            ext[1],
            Extent {
                sectors: 2,
                kind: ExtentKind::Data
            }
        );
        assert!(SliceDevice::new(mem.clone(), 90, 11, "x").is_err());
        assert!(SliceDevice::new(mem.clone(), u64::MAX, 1, "x").is_err());
        mem.inject(Fault::range(15, 16, Errno::EIO));
        let mut r = vec![0u8; 512];
        match s.submit(Bio::read(5, &mut r)).unwrap_err() {
            IoError::Errno { sector, .. } => assert_eq!(sector, 5),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn names_like_linux() {
        assert_eq!(partition_name("vda", 1), "vda1");
        assert_eq!(partition_name("loop0", 5), "loop0p5");
        assert_eq!(partition_name("nvme0n1", 2), "nvme0n1p2");
    }
}
