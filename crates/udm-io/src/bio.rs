//! The request model: one block request, with borrowed data buffers so that splitting a request
//! at target boundaries never copies data.

use crate::lent::{KeptBuf, LentBuf};
use udm_types::{SECTOR_SHIFT, SECTOR_SIZE};

bitflags::bitflags! {
    /// Request flags with the kernel's meanings (`REQ_FUA`, `REQ_PREFLUSH`, `REQ_NOUNMAP`, ...).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct BioFlags: u32 {
        /// The data must be on stable storage when the request completes.
        const FUA = 1 << 0;
        /// Flush the volatile cache before the request's data is written.
        const PREFLUSH = 1 << 1;
        /// Write-zeroes must not deallocate (NBD_CMD_FLAG_NO_HOLE).
        const NO_UNMAP = 1 << 2;
        /// Write-zeroes must fail fast with EOPNOTSUPP instead of writing zero buffers
        /// (NBD_CMD_FLAG_FAST_ZERO).
        const FAST_ZERO = 1 << 3;
    }
}

/// The operation and, for reads and writes, the data buffer (a whole number of sectors).
#[derive(Debug)]
pub enum BioOp<'a> {
    /// Fill the buffer from the device.
    Read(&'a mut [u8]),
    /// Write the buffer to the device.
    Write(&'a [u8]),
    /// Make completed writes durable. Has no range (sector and length are ignored).
    Flush,
    /// Deallocate `sectors` sectors; the contents afterwards are unspecified.
    Discard(u64),
    /// Make `sectors` sectors read back as zeroes.
    WriteZeroes(u64),
}

/// The kind of a request, without its buffer: for counters, capability checks and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BioKind {
    /// See [`BioOp::Read`].
    Read,
    /// See [`BioOp::Write`].
    Write,
    /// See [`BioOp::Flush`].
    Flush,
    /// See [`BioOp::Discard`].
    Discard,
    /// See [`BioOp::WriteZeroes`].
    WriteZeroes,
}

impl BioKind {
    /// Lower-case name as used in messages (`read`, `write`, ...).
    pub fn name(self) -> &'static str {
        match self {
            BioKind::Read => "read",
            BioKind::Write => "write",
            BioKind::Flush => "flush",
            BioKind::Discard => "discard",
            BioKind::WriteZeroes => "write-zeroes",
        }
    }

    /// True for operations that change the device contents.
    pub fn is_write_like(self) -> bool {
        matches!(
            self,
            BioKind::Write | BioKind::Discard | BioKind::WriteZeroes
        )
    }
}

impl std::fmt::Display for BioKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One block request: `op` applied at `sector` (device-relative), with `flags`.
#[derive(Debug)]
pub struct Bio<'a> {
    /// First sector, relative to the device that receives the request.
    pub sector: u64,
    /// What to do, with the data buffer where there is one.
    pub op: BioOp<'a>,
    /// FUA / PREFLUSH / write-zeroes modifiers.
    pub flags: BioFlags,
    /// The buffer a write's data lies in, when its owner lets a device keep it
    /// ([`Bio::keep_data`]); `None` for most requests.
    pub lent: Option<&'a LentBuf>,
}

impl<'a> Bio<'a> {
    /// A read of `buf.len()` bytes at `sector`.
    pub fn read(sector: u64, buf: &'a mut [u8]) -> Self {
        Bio {
            sector,
            op: BioOp::Read(buf),
            flags: BioFlags::empty(),
            lent: None,
        }
    }

    /// A write of `buf` at `sector`.
    pub fn write(sector: u64, buf: &'a [u8]) -> Self {
        Bio {
            sector,
            op: BioOp::Write(buf),
            flags: BioFlags::empty(),
            lent: None,
        }
    }

    /// An empty flush.
    pub fn flush() -> Self {
        Bio {
            sector: 0,
            op: BioOp::Flush,
            flags: BioFlags::PREFLUSH,
            lent: None,
        }
    }

    /// A discard of `sectors` at `sector`.
    pub fn discard(sector: u64, sectors: u64) -> Self {
        Bio {
            sector,
            op: BioOp::Discard(sectors),
            flags: BioFlags::empty(),
            lent: None,
        }
    }

    /// A write-zeroes of `sectors` at `sector`.
    pub fn write_zeroes(sector: u64, sectors: u64) -> Self {
        Bio {
            sector,
            op: BioOp::WriteZeroes(sectors),
            flags: BioFlags::empty(),
            lent: None,
        }
    }

    /// Returns the request with `flags` added.
    pub fn with_flags(mut self, flags: BioFlags) -> Self {
        self.flags |= flags;
        self
    }

    /// Lets devices keep this write's data (which lies in `buf`) after the request completes
    /// instead of copying it; the caller reuses `buf` only if nobody kept it
    /// (`Arc::try_unwrap`).
    pub fn lend(mut self, buf: &'a LentBuf) -> Self {
        self.lent = Some(buf);
        self
    }

    /// A write's data to keep beyond the request: shared with the lent buffer when there is
    /// one and the data lies in it (see [`KeptBuf::within`]), else copied. `None` for
    /// requests without data to write.
    pub fn keep_data(&self) -> Option<KeptBuf> {
        let BioOp::Write(data) = &self.op else {
            return None;
        };
        Some(
            self.lent
                .and_then(|b| KeptBuf::within(b, data))
                .unwrap_or_else(|| KeptBuf::copy(data)),
        )
    }

    /// The operation kind.
    pub fn kind(&self) -> BioKind {
        match self.op {
            BioOp::Read(_) => BioKind::Read,
            BioOp::Write(_) => BioKind::Write,
            BioOp::Flush => BioKind::Flush,
            BioOp::Discard(_) => BioKind::Discard,
            BioOp::WriteZeroes(_) => BioKind::WriteZeroes,
        }
    }

    /// Length in sectors (0 for a flush). A data buffer is always a whole number of sectors;
    /// a trailing partial sector is not counted.
    pub fn sectors(&self) -> u64 {
        match &self.op {
            BioOp::Read(b) => b.len() as u64 >> SECTOR_SHIFT,
            BioOp::Write(b) => b.len() as u64 >> SECTOR_SHIFT,
            BioOp::Flush => 0,
            BioOp::Discard(n) | BioOp::WriteZeroes(n) => *n,
        }
    }

    /// One past the last sector.
    pub fn end(&self) -> u64 {
        self.sector.saturating_add(self.sectors())
    }

    /// True when the request carries no range (an empty flush).
    pub fn is_empty_flush(&self) -> bool {
        matches!(self.op, BioOp::Flush)
    }

    /// A shorter-lived copy of this request that shares its buffer, for passing the same request
    /// to one device after another (a flush to every stripe, a mirrored write).
    pub fn reborrow(&mut self) -> Bio<'_> {
        let op = match &mut self.op {
            BioOp::Read(b) => BioOp::Read(b),
            BioOp::Write(b) => BioOp::Write(b),
            BioOp::Flush => BioOp::Flush,
            BioOp::Discard(n) => BioOp::Discard(*n),
            BioOp::WriteZeroes(n) => BioOp::WriteZeroes(*n),
        };
        Bio {
            sector: self.sector,
            op,
            flags: self.flags,
            lent: self.lent,
        }
    }

    /// Splits off the first `sectors` sectors. Returns `(head, tail)`; `tail` is `None` when the
    /// request is not longer than `sectors`. PREFLUSH stays on the head only, FUA on both, as the
    /// kernel's `bio_split` does. Flushes are never split.
    pub fn split(self, sectors: u64) -> (Bio<'a>, Option<Bio<'a>>) {
        if sectors == 0 || sectors >= self.sectors() || self.is_empty_flush() {
            return (self, None);
        }
        let at = (sectors * SECTOR_SIZE) as usize;
        let tail_flags = self.flags - BioFlags::PREFLUSH;
        let tail_sector = self.sector + sectors;
        let (h, t) = match self.op {
            BioOp::Read(b) => {
                let (h, t) = b.split_at_mut(at);
                (BioOp::Read(h), BioOp::Read(t))
            }
            BioOp::Write(b) => {
                let (h, t) = b.split_at(at);
                (BioOp::Write(h), BioOp::Write(t))
            }
            BioOp::Discard(n) => (BioOp::Discard(sectors), BioOp::Discard(n - sectors)),
            BioOp::WriteZeroes(n) => (BioOp::WriteZeroes(sectors), BioOp::WriteZeroes(n - sectors)),
            BioOp::Flush => unreachable!("flushes are returned unsplit above"),
        };
        (
            Bio {
                sector: self.sector,
                op: h,
                flags: self.flags,
                lent: self.lent,
            },
            Some(Bio {
                sector: tail_sector,
                op: t,
                flags: tail_flags,
                lent: self.lent,
            }),
        )
    }

    /// The same request moved to another sector (a remap).
    pub fn at(mut self, sector: u64) -> Self {
        self.sector = sector;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_read_keeps_buffers_apart() {
        let mut buf = vec![0u8; 4 * 512];
        let bio = Bio::read(10, &mut buf).with_flags(BioFlags::FUA | BioFlags::PREFLUSH);
        let (h, t) = bio.split(1);
        let t = t.unwrap();
        assert_eq!((h.sector, h.sectors()), (10, 1));
        assert_eq!((t.sector, t.sectors()), (11, 3));
        assert!(h.flags.contains(BioFlags::PREFLUSH));
        assert!(!t.flags.contains(BioFlags::PREFLUSH));
        assert!(t.flags.contains(BioFlags::FUA));
    }

    #[test]
    fn split_beyond_end_is_identity() {
        let bio = Bio::discard(0, 8);
        let (h, t) = bio.split(8);
        assert_eq!(h.sectors(), 8);
        assert!(t.is_none());
        let (f, t) = Bio::flush().split(1);
        assert!(f.is_empty_flush() && t.is_none());
    }
}
