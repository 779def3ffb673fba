//! Pure virtio-blk translations: the feature bits and configuration space a udm device
//! presents, and request headers (plus the byte counts of their descriptor chain) decoded into
//! what to run on the device, or the status byte that refuses them. Kept free of guest memory
//! so every refusal is tested without a VMM.

use udm_io::BlockDevice;
use udm_types::SECTOR_SIZE;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
pub(crate) const HEADER_LEN: usize = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub(crate) const SEGMENT_LEN: usize = 16;
/// Discard / write-zeroes ranges per request we advertise and accept.
pub(crate) const MAX_SEGMENTS: u32 = 32;
/// Status bytes.
pub(crate) const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(crate) const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(crate) const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Bytes of the GET_ID answer.
pub(crate) const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// What the guest is told about the device; derived from the device when a client connects
/// (capacity is read live on every request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical / logical block size).
    pub physical_exp: u8,
    /// Discard is passed to the device.
    pub discard: bool,
    /// Write-zeroes is passed to the device.
    pub write_zeroes: bool,
    /// Writes are refused.
    pub read_only: bool,
    /// Virtqueues.
    pub num_queues: u16,
    /// Largest number of data segments per request.
    pub seg_max: u32,
}

impl Shape {
    /// The shape of `dev` exported with `num_queues` queues of `queue_size` entries.
    pub(crate) fn of(
        dev: &dyn BlockDevice,
        read_only: bool,
        num_queues: u16,
        queue_size: u16,
    ) -> Shape {
        let l = dev.limits();
        let blk_size = if l.logical_block_size.is_power_of_two() && l.logical_block_size >= 512 {
            l.logical_block_size
        } else {
            512
        };
        let phys = l.physical_block_size.max(blk_size);
        let physical_exp = if phys.is_power_of_two() {
            (phys / blk_size).trailing_zeros() as u8
        } else {
            0
        };
        let read_only = read_only || dev.read_only();
        Shape {
            blk_size,
            physical_exp,
            discard: l.discard && !read_only,
            write_zeroes: l.write_zeroes && !read_only,
            read_only,
            num_queues: num_queues.max(1),
            // A chain may not be longer than the queue the VMM sets up (QEMU's default is 128,
            // whatever we allow), and the header and the status take one descriptor each.
            seg_max: u32::from(queue_size.min(128)).saturating_sub(2).max(1),
        }
    }

    /// The virtio feature bits offered to the driver.
    pub(crate) fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.discard {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if self.write_zeroes {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// `struct virtio_blk_config` as the driver reads it (little-endian), for a device of
    /// `capacity` sectors with the write cache on (`writeback`) or off.
    pub(crate) fn config(&self, capacity: u64, writeback: bool) -> Vec<u8> {
        let mut c = vec![0u8; std::mem::size_of::<virtio_blk_config>()];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &capacity.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        put(20, &self.blk_size.to_le_bytes());
        put(24, &[self.physical_exp]);
        put(26, &1u16.to_le_bytes()); // min_io_size, in logical blocks
        put(28, &(1u32 << self.physical_exp).to_le_bytes()); // opt_io_size
        put(32, &[u8::from(writeback)]);
        put(34, &self.num_queues.to_le_bytes());
        let sector_align = (self.blk_size / SECTOR_SIZE as u32).max(1) << self.physical_exp;
        if self.discard {
            put(36, &(u32::MAX >> 9).to_le_bytes());
            put(40, &MAX_SEGMENTS.to_le_bytes());
            put(44, &sector_align.to_le_bytes());
        }
        if self.write_zeroes {
            put(48, &(u32::MAX >> 9).to_le_bytes());
            put(52, &MAX_SEGMENTS.to_le_bytes());
            put(56, &[1]); // write_zeroes_may_unmap
        }
        c
    }
}

/// `size` bytes of the configuration space at `offset` (zeroes past the fields we fill), or
/// `None` for a range outside the vhost-user config window.
pub(crate) fn config_window(config: &[u8], offset: u32, size: u32) -> Option<Vec<u8>> {
    let end = offset.checked_add(size)?;
    if end > vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE {
        return None;
    }
    let mut out = vec![0u8; size as usize];
    let (start, end) = (offset as usize, end as usize);
    if start < config.len() {
        let n = end.min(config.len()) - start;
        out[..n].copy_from_slice(&config[start..start + n]);
    }
    Some(out)
}

/// The `writeback` byte of a `set_config` write, when the write covers it.
pub(crate) fn writeback_in(offset: u32, buf: &[u8]) -> Option<bool> {
    let at = 32u32.checked_sub(offset)? as usize;
    buf.get(at).map(|b| *b != 0)
}

/// One decoded request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// Read `bytes` at `sector` into the writable data descriptors.
    Read { sector: u64, bytes: usize },
    /// Write `bytes` at `sector` from the readable data descriptors.
    Write { sector: u64, bytes: usize },
    /// Flush the device cache.
    Flush,
    /// Answer the device id.
    GetId,
    /// Discard (`write_zeroes: false`) or write zeroes over `segments` ranges read from the
    /// readable data descriptors.
    Ranges { write_zeroes: bool, segments: usize },
}

/// The byte counts of a descriptor chain after its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Chain {
    /// Readable bytes after the header.
    pub readable: usize,
    /// Writable bytes before the status byte.
    pub writable: usize,
}

/// Decodes a request header against the device shape and capacity; a refusal is the status
/// byte to return. `header` is `None` when the chain has fewer than 16 readable bytes.
pub(crate) fn decode(
    header: Option<[u8; HEADER_LEN]>,
    chain: Chain,
    shape: &Shape,
    capacity: u64,
) -> Result<Request, u8> {
    let h = header.ok_or(S_IOERR)?;
    let mut t = [0u8; 4];
    t.copy_from_slice(&h[0..4]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&h[8..16]);
    let sector = u64::from_le_bytes(s);
    let data = |bytes: usize| -> Result<(), u8> {
        if bytes as u64 % SECTOR_SIZE != 0 {
            return Err(S_IOERR);
        }
        in_range(sector, bytes as u64 / SECTOR_SIZE, capacity)
    };
    match u32::from_le_bytes(t) {
        VIRTIO_BLK_T_IN => {
            if chain.readable != 0 {
                return Err(S_IOERR); // data descriptors the device would have to read
            }
            data(chain.writable)?;
            Ok(Request::Read {
                sector,
                bytes: chain.writable,
            })
        }
        VIRTIO_BLK_T_OUT => {
            if chain.writable != 0 || shape.read_only {
                return Err(S_IOERR);
            }
            data(chain.readable)?;
            Ok(Request::Write {
                sector,
                bytes: chain.readable,
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
        VIRTIO_BLK_T_GET_ID => Ok(Request::GetId),
        ty @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
            let write_zeroes = ty == VIRTIO_BLK_T_WRITE_ZEROES;
            if !(if write_zeroes {
                shape.write_zeroes
            } else {
                shape.discard
            }) {
                return Err(S_UNSUPP);
            }
            let n = chain.readable / SEGMENT_LEN;
            if chain.readable % SEGMENT_LEN != 0 || n == 0 || n > MAX_SEGMENTS as usize {
                return Err(S_IOERR);
            }
            Ok(Request::Ranges {
                write_zeroes,
                segments: n,
            })
        }
        _ => Err(S_UNSUPP),
    }
}

/// One discard / write-zeroes range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Range {
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub sectors: u64,
    /// The device may deallocate (write-zeroes with the UNMAP flag; always for discard).
    pub unmap: bool,
}

/// Decodes one `struct virtio_blk_discard_write_zeroes`. Reserved flag bits, or UNMAP on a
/// discard, are UNSUPP as the specification requires; a range past the end is IOERR.
pub(crate) fn decode_range(
    raw: &[u8; SEGMENT_LEN],
    write_zeroes: bool,
    capacity: u64,
) -> Result<Range, u8> {
    let mut s = [0u8; 8];
    s.copy_from_slice(&raw[0..8]);
    let mut n = [0u8; 4];
    n.copy_from_slice(&raw[8..12]);
    let mut f = [0u8; 4];
    f.copy_from_slice(&raw[12..16]);
    let flags = u32::from_le_bytes(f);
    let allowed = if write_zeroes {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    if flags & !allowed != 0 {
        return Err(S_UNSUPP);
    }
    let sector = u64::from_le_bytes(s);
    let sectors = u64::from(u32::from_le_bytes(n));
    in_range(sector, sectors, capacity)?;
    Ok(Range {
        sector,
        sectors,
        unmap: !write_zeroes || flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
    })
}

fn in_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), u8> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(S_IOERR),
    }
}

/// The GET_ID answer: the device name, cut or zero-padded to 20 bytes.
pub(crate) fn device_id(name: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = name.len().min(ID_BYTES);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);
    id
}
