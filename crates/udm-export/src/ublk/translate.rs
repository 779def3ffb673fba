//! Pure translations between udm and ublk: device limits into ublk parameters, ublk request
//! descriptors into [`Bio`]s, and results into the value committed back to the driver. Kept free
//! of I/O so it is tested without the kernel driver.

use super::abi::*;
use udm_io::{Bio, BioFlags, BlockDevice, IoError};
use udm_types::errno::HasErrno;
use udm_types::{Errno, SECTOR_SIZE};

/// Largest data buffer per request (and so largest request), in bytes.
pub(crate) const MAX_IO_BYTES: u32 = 512 * 1024;

fn shift_of(bytes: u32, fallback: u8) -> u8 {
    if bytes.is_power_of_two() && bytes >= 512 {
        bytes.trailing_zeros() as u8
    } else {
        fallback
    }
}

/// The ublk parameters that present `dev` as a kernel block device.
pub(crate) fn params_for(dev: &dyn BlockDevice, read_only: bool) -> Params {
    let limits = dev.limits();
    let lbs_shift = shift_of(limits.logical_block_size, 9).min(12);
    let pbs_shift = shift_of(limits.physical_block_size, lbs_shift).max(lbs_shift);
    let max_buf_sectors = MAX_IO_BYTES / SECTOR_SIZE as u32;
    let max_sectors = match limits.max_io_sectors {
        0 => max_buf_sectors,
        n => n.min(u64::from(max_buf_sectors)) as u32,
    };
    let mut attrs = 0;
    if read_only || dev.read_only() {
        attrs |= UBLK_ATTR_READ_ONLY;
    }
    if limits.volatile_cache {
        attrs |= UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
    }
    let mut types = UBLK_PARAM_TYPE_BASIC;
    let mut discard = ParamDiscard::default();
    if limits.discard || limits.write_zeroes {
        types |= UBLK_PARAM_TYPE_DISCARD;
        // The driver rejects a discard parameter block with a zero granularity, even when it
        // only carries write-zeroes.
        discard.discard_granularity = 1u32 << pbs_shift;
        if limits.discard {
            discard.max_discard_sectors = u32::MAX >> 9;
            discard.max_discard_segments = 1;
        }
        if limits.write_zeroes {
            discard.max_write_zeroes_sectors = u32::MAX >> 9;
        }
    }
    Params {
        len: std::mem::size_of::<Params>() as u32,
        types,
        basic: ParamBasic {
            attrs,
            logical_bs_shift: lbs_shift,
            physical_bs_shift: pbs_shift,
            io_opt_shift: pbs_shift,
            io_min_shift: lbs_shift,
            max_sectors,
            chunk_sectors: 0,
            dev_sectors: dev.size(),
            virt_boundary_mask: 0,
        },
        discard,
    }
}

/// One ublk request, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// Read `sectors` at `sector` into the tag's buffer.
    Read { sector: u64, sectors: u32 },
    /// Write `sectors` at `sector` from the tag's buffer.
    Write {
        sector: u64,
        sectors: u32,
        fua: bool,
    },
    /// Flush the device cache.
    Flush,
    /// Discard.
    Discard { sector: u64, sectors: u32 },
    /// Write zeroes (`no_unmap`: keep the range allocated).
    WriteZeroes {
        sector: u64,
        sectors: u32,
        no_unmap: bool,
    },
}

/// Decodes a descriptor; unknown operations and data requests larger than the buffer are
/// refused with the errno to commit.
pub(crate) fn decode(desc: &IoDesc, buf_len: usize) -> Result<Request, Errno> {
    let op = (desc.op_flags & 0xff) as u8;
    let flags = desc.op_flags & !0xff;
    let sector = desc.start_sector;
    let sectors = desc.nr_sectors;
    let data_fits = u64::from(sectors) * SECTOR_SIZE <= buf_len as u64;
    match op {
        UBLK_IO_OP_READ if data_fits => Ok(Request::Read { sector, sectors }),
        UBLK_IO_OP_WRITE if data_fits => Ok(Request::Write {
            sector,
            sectors,
            fua: flags & UBLK_IO_F_FUA != 0,
        }),
        UBLK_IO_OP_READ | UBLK_IO_OP_WRITE => Err(Errno::EINVAL),
        UBLK_IO_OP_FLUSH => Ok(Request::Flush),
        UBLK_IO_OP_DISCARD => Ok(Request::Discard { sector, sectors }),
        UBLK_IO_OP_WRITE_ZEROES => Ok(Request::WriteZeroes {
            sector,
            sectors,
            no_unmap: flags & UBLK_IO_F_NOUNMAP != 0,
        }),
        UBLK_IO_OP_WRITE_SAME => Err(Errno::EOPNOTSUPP),
        _ => Err(Errno::EOPNOTSUPP),
    }
}

/// Runs a decoded request on `dev` with the tag's buffer.
pub(crate) fn execute(dev: &dyn BlockDevice, req: Request, buf: &mut [u8]) -> Result<(), IoError> {
    let bytes = |s: u32| (u64::from(s) * SECTOR_SIZE) as usize;
    match req {
        Request::Read { sector, sectors } => {
            dev.submit(Bio::read(sector, &mut buf[..bytes(sectors)]))
        }
        Request::Write {
            sector,
            sectors,
            fua,
        } => {
            let flags = if fua {
                BioFlags::FUA
            } else {
                BioFlags::empty()
            };
            dev.submit(Bio::write(sector, &buf[..bytes(sectors)]).with_flags(flags))
        }
        Request::Flush => dev.submit(Bio::flush()),
        Request::Discard { sector, sectors } => {
            dev.submit(Bio::discard(sector, u64::from(sectors)))
        }
        Request::WriteZeroes {
            sector,
            sectors,
            no_unmap,
        } => {
            let flags = if no_unmap {
                BioFlags::NO_UNMAP
            } else {
                BioFlags::empty()
            };
            dev.submit(Bio::write_zeroes(sector, u64::from(sectors)).with_flags(flags))
        }
    }
}

/// The result committed for a request: bytes transferred for reads and writes, 0 for the
/// rest, or the negative errno.
pub(crate) fn commit_result(req: Result<Request, Errno>, outcome: Result<(), IoError>) -> i32 {
    let req = match req {
        Ok(r) => r,
        Err(e) => return -e.0,
    };
    if let Err(e) = outcome {
        return -e.errno().0;
    }
    match req {
        Request::Read { sectors, .. } | Request::Write { sectors, .. } => {
            (u64::from(sectors) * SECTOR_SIZE).min(i32::MAX as u64) as i32
        }
        _ => 0,
    }
}

/// Decodes, executes and reports one descriptor: the whole per-request work of a queue thread.
pub(crate) fn handle(dev: &dyn BlockDevice, desc: &IoDesc, buf: &mut [u8]) -> i32 {
    let req = decode(desc, buf.len());
    let outcome = match req {
        Ok(r) => execute(dev, r, buf),
        Err(_) => Ok(()),
    };
    if let Err(e) = &outcome {
        tracing::warn!("ublk request {desc:?} failed: {e}");
    }
    commit_result(req, outcome)
}
