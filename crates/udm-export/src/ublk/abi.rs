//! The ublk user-space ABI (`include/uapi/linux/ublk_cmd.h`), written out by hand so that the
//! build needs neither kernel headers nor libclang.

/// `_IOWR(type, nr, size)`: the ioctl-style command encoding ublk uses with
/// `UBLK_F_CMD_IOCTL_ENCODE`.
pub(crate) const fn iowr(ty: u8, nr: u8, size: usize) -> u32 {
    (3u32 << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

/// `_IOR(type, nr, size)`.
pub(crate) const fn ior(ty: u8, nr: u8, size: usize) -> u32 {
    (2u32 << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

/// Control node.
pub(crate) const CONTROL_PATH: &str = "/dev/ublk-control";

pub(crate) const UBLK_CMD_GET_DEV_INFO: u8 = 0x02;
pub(crate) const UBLK_CMD_ADD_DEV: u8 = 0x04;
pub(crate) const UBLK_CMD_DEL_DEV: u8 = 0x05;
pub(crate) const UBLK_CMD_START_DEV: u8 = 0x06;
pub(crate) const UBLK_CMD_STOP_DEV: u8 = 0x07;
pub(crate) const UBLK_CMD_SET_PARAMS: u8 = 0x08;

pub(crate) const UBLK_IO_FETCH_REQ: u8 = 0x20;
pub(crate) const UBLK_IO_COMMIT_AND_FETCH_REQ: u8 = 0x21;

/// Control commands (`UBLK_U_CMD_*`).
pub(crate) const U_CMD_GET_DEV_INFO: u32 = ior(b'u', UBLK_CMD_GET_DEV_INFO, CTRL_CMD_SIZE);
pub(crate) const U_CMD_ADD_DEV: u32 = iowr(b'u', UBLK_CMD_ADD_DEV, CTRL_CMD_SIZE);
pub(crate) const U_CMD_DEL_DEV: u32 = iowr(b'u', UBLK_CMD_DEL_DEV, CTRL_CMD_SIZE);
pub(crate) const U_CMD_START_DEV: u32 = iowr(b'u', UBLK_CMD_START_DEV, CTRL_CMD_SIZE);
pub(crate) const U_CMD_STOP_DEV: u32 = iowr(b'u', UBLK_CMD_STOP_DEV, CTRL_CMD_SIZE);
pub(crate) const U_CMD_SET_PARAMS: u32 = iowr(b'u', UBLK_CMD_SET_PARAMS, CTRL_CMD_SIZE);
/// I/O commands (`UBLK_U_IO_*`).
pub(crate) const U_IO_FETCH_REQ: u32 = iowr(b'u', UBLK_IO_FETCH_REQ, IO_CMD_SIZE);
pub(crate) const U_IO_COMMIT_AND_FETCH_REQ: u32 =
    iowr(b'u', UBLK_IO_COMMIT_AND_FETCH_REQ, IO_CMD_SIZE);

/// Completion result of a fetch: a request is ready.
pub(crate) const UBLK_IO_RES_OK: i32 = 0;
/// Completion result of a fetch when the device is going away.
pub(crate) const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

/// Offset of the I/O descriptor area in the mmap of `/dev/ublkcN`.
pub(crate) const UBLKSRV_CMD_BUF_OFFSET: i64 = 0;
/// Largest queue depth the driver accepts.
pub(crate) const UBLK_MAX_QUEUE_DEPTH: u16 = 4096;
/// Largest number of hardware queues the driver accepts.
pub(crate) const UBLK_MAX_NR_QUEUES: u16 = 4096;
/// Device state reported by GET_DEV_INFO: stopped (no disk), so it can be deleted.
pub(crate) const UBLK_S_DEV_DEAD: u16 = 0;

/// Size of one queue's slot in the descriptor mmap: the driver places queue `q` at
/// `q * cmd_buf_slot(page)`, sized for the largest depth whatever the real one is
/// (`ublk_max_cmd_buf_size()` in ublk_drv.c).
pub(crate) fn cmd_buf_slot(page: usize) -> usize {
    (usize::from(UBLK_MAX_QUEUE_DEPTH) * std::mem::size_of::<IoDesc>()).div_ceil(page) * page
}

/// Device flag: commands use the ioctl encoding.
pub(crate) const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;

pub(crate) const UBLK_IO_OP_READ: u8 = 0;
pub(crate) const UBLK_IO_OP_WRITE: u8 = 1;
pub(crate) const UBLK_IO_OP_FLUSH: u8 = 2;
pub(crate) const UBLK_IO_OP_DISCARD: u8 = 3;
pub(crate) const UBLK_IO_OP_WRITE_SAME: u8 = 4;
pub(crate) const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;

pub(crate) const UBLK_IO_F_FUA: u32 = 1 << 13;
pub(crate) const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;

pub(crate) const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
pub(crate) const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub(crate) const UBLK_ATTR_FUA: u32 = 1 << 3;

pub(crate) const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
pub(crate) const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;

/// `struct ublksrv_ctrl_cmd`: the payload of a control command (in the SQE's command area).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CtrlCmd {
    pub dev_id: u32,
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 1],
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}
pub(crate) const CTRL_CMD_SIZE: usize = 32;

impl CtrlCmd {
    /// The bytes placed in the 80-byte command area of a 128-byte SQE.
    pub fn to_cmd80(self) -> [u8; 80] {
        let mut out = [0u8; 80];
        out[0..4].copy_from_slice(&self.dev_id.to_ne_bytes());
        out[4..6].copy_from_slice(&self.queue_id.to_ne_bytes());
        out[6..8].copy_from_slice(&self.len.to_ne_bytes());
        out[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        out[16..24].copy_from_slice(&self.data[0].to_ne_bytes());
        out[24..26].copy_from_slice(&self.dev_path_len.to_ne_bytes());
        out[26..28].copy_from_slice(&self.pad.to_ne_bytes());
        out[28..32].copy_from_slice(&self.reserved.to_ne_bytes());
        out
    }
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one request, as the driver describes it in the mmapped area.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct IoDesc {
    /// Operation in bits 0-7, flags in bits 8-31.
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

/// `struct ublksrv_io_cmd`: the payload of a fetch / commit command (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    pub result: i32,
    pub addr: u64,
}
pub(crate) const IO_CMD_SIZE: usize = 16;

impl IoCmd {
    /// The bytes placed in the 16-byte command area of a 64-byte SQE.
    pub fn to_cmd16(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        out[2..4].copy_from_slice(&self.tag.to_ne_bytes());
        out[4..8].copy_from_slice(&self.result.to_ne_bytes());
        out[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        out
    }
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// The leading part of `struct ublk_params` that we set (basic and discard); `len` tells the
/// driver how much of the full structure we pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Params {
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
}
