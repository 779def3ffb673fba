//! The ublk control node (`/dev/ublk-control`): add, configure, start, stop and delete devices
//! with control commands sent as 128-byte io_uring command SQEs.

use super::abi::*;
use super::{os, UblkError};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use udm_types::Errno;

/// The control node and a small SQE128 ring to send it commands.
pub(crate) struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

impl Control {
    pub(crate) fn open() -> Result<Control, UblkError> {
        let file = match OpenOptions::new().read(true).write(true).open(CONTROL_PATH) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(UblkError::NoDriver),
            Err(e) => return Err(os(format!("open {CONTROL_PATH}"))(e)),
        };
        Control::with_file(file)
    }

    /// A control channel on an already open file (the control node, or any file in tests).
    pub(crate) fn with_file(file: File) -> Result<Control, UblkError> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(os("io_uring setup (SQE128) for control commands"))?;
        Ok(Control { file, ring })
    }

    /// Sends one control command and waits for its completion.
    pub(crate) fn cmd(
        &mut self,
        op: u32,
        name: &'static str,
        c: CtrlCmd,
    ) -> Result<i32, UblkError> {
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(c.to_cmd80())
            .build()
            .user_data(1);
        // SAFETY: the buffer `c.addr` points to (if any) is owned by the caller and outlives
        // this call, which waits for the command's completion before returning. The ring is
        // only used here, one command at a time, so its queue is empty.
        unsafe {
            self.ring
                .submission()
                .push(&sqe)
                .map_err(|_| os(name)(std::io::Error::other("submission queue full")))?;
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(os(format!("io_uring submit of {name}"))(e)),
            }
        }
        let res = self
            .ring
            .completion()
            .next()
            .map(|c| c.result())
            .ok_or_else(|| os(name)(std::io::Error::other("no completion")))?;
        if res < 0 {
            return Err(UblkError::Control {
                cmd: name,
                dev_id: c.dev_id,
                errno: Errno(-res),
            });
        }
        Ok(res)
    }

    /// A command with no payload.
    pub(crate) fn simple(
        &mut self,
        op: u32,
        name: &'static str,
        dev_id: u32,
    ) -> Result<i32, UblkError> {
        self.cmd(
            op,
            name,
            CtrlCmd {
                dev_id,
                queue_id: u16::MAX,
                ..CtrlCmd::default()
            },
        )
    }

    /// ADD_DEV: `info.dev_id` is the wanted id (u32::MAX: any); the driver fills in the rest.
    pub(crate) fn add(&mut self, info: &mut DevInfo) -> Result<(), UblkError> {
        self.cmd(
            U_CMD_ADD_DEV,
            "ADD_DEV",
            CtrlCmd {
                dev_id: info.dev_id,
                queue_id: u16::MAX,
                len: std::mem::size_of::<DevInfo>() as u16,
                addr: info as *mut DevInfo as u64,
                ..CtrlCmd::default()
            },
        )
        .map(drop)
    }

    /// GET_DEV_INFO of an existing device.
    pub(crate) fn info(&mut self, dev_id: u32) -> Result<DevInfo, UblkError> {
        let mut info = DevInfo::default();
        self.cmd(
            U_CMD_GET_DEV_INFO,
            "GET_DEV_INFO",
            CtrlCmd {
                dev_id,
                queue_id: u16::MAX,
                len: std::mem::size_of::<DevInfo>() as u16,
                addr: &mut info as *mut DevInfo as u64,
                ..CtrlCmd::default()
            },
        )?;
        Ok(info)
    }

    /// SET_PARAMS before START_DEV.
    pub(crate) fn set_params(&mut self, dev_id: u32, params: &Params) -> Result<(), UblkError> {
        self.cmd(
            U_CMD_SET_PARAMS,
            "SET_PARAMS",
            CtrlCmd {
                dev_id,
                queue_id: u16::MAX,
                len: std::mem::size_of::<Params>() as u16,
                addr: params as *const Params as u64,
                ..CtrlCmd::default()
            },
        )
        .map(drop)
    }

    /// Deletes the device `dev_id` if it is left over from a udmd that died (kill -9): stopped
    /// by the driver and its server process gone. A device served by a live process is not
    /// touched: that is an error naming the process.
    pub(crate) fn reclaim_stale(&mut self, dev_id: u32) -> Result<(), UblkError> {
        let info = match self.info(dev_id) {
            Ok(i) => i,
            Err(UblkError::Control { errno, .. }) if errno == Errno::ENODEV => return Ok(()),
            Err(e) => return Err(e),
        };
        let pid = info.ublksrv_pid;
        if pid > 0 && pid_alive(pid) {
            return Err(UblkError::InUse { dev_id, pid });
        }
        if info.state != UBLK_S_DEV_DEAD {
            // Live disk whose server is gone: stop it first (its I/O fails, as it would have).
            let _ = self.simple(U_CMD_STOP_DEV, "STOP_DEV", dev_id);
        }
        tracing::warn!("ublk: deleting device {dev_id} left by a udmd that ended (pid {pid})");
        self.simple(U_CMD_DEL_DEV, "DEL_DEV", dev_id).map(drop)
    }
}

/// Whether process `pid` exists (this one included: a device this udmd serves is in use).
fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
