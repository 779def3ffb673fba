//! The one errno table. Every crate's error type maps to an [`Errno`]; this module maps an errno to
//! the NBD wire code, so the control protocol, NBD, FUSE and ublk all report the same cause.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A positive Linux errno value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Errno(pub i32);

impl Errno {
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM);
    /// No such file or directory.
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    /// Input/output error.
    pub const EIO: Errno = Errno(libc::EIO);
    /// No such device or address (dm: device does not exist).
    pub const ENXIO: Errno = Errno(libc::ENXIO);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    /// Permission denied.
    pub const EACCES: Errno = Errno(libc::EACCES);
    /// Device or resource busy.
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    /// Already exists.
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    /// No such device.
    pub const ENODEV: Errno = Errno(libc::ENODEV);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// File too large.
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    /// No space left on device.
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    /// Read-only file system / device.
    pub const EROFS: Errno = Errno(libc::EROFS);
    /// Result out of range (interposer beyond the device).
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    /// Value too large (dm table too big).
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW);
    /// Operation not supported.
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
    /// Transport endpoint shut down.
    pub const ESHUTDOWN: Errno = Errno(libc::ESHUTDOWN);
    /// Operation already in progress (second interposer of one mapped device).
    pub const EALREADY: Errno = Errno(libc::EALREADY);
    /// Resource temporarily unavailable.
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    /// Interrupted.
    pub const EINTR: Errno = Errno(libc::EINTR);
    /// Not a typewriter: unknown ioctl/command.
    pub const ENOTTY: Errno = Errno(libc::ENOTTY);
    /// Protocol error.
    pub const EPROTO: Errno = Errno(libc::EPROTO);
    /// No data available.
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    /// Timer expired (an operation gave up waiting).
    pub const ETIMEDOUT: Errno = Errno(libc::ETIMEDOUT);
    /// Illegal byte sequence: a checksum mismatch (the kernel's persistent-data uses it so).
    pub const EILSEQ: Errno = Errno(libc::EILSEQ);
    /// Block device required: metadata found at the wrong location.
    pub const ENOTBLK: Errno = Errno(libc::ENOTBLK);
    /// Protocol not available.
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);

    /// The symbolic name, e.g. `EBUSY`, for messages and JSON.
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EIO => "EIO",
            libc::ENXIO => "ENXIO",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::ENODEV => "ENODEV",
            libc::EINVAL => "EINVAL",
            libc::EFBIG => "EFBIG",
            libc::ENOSPC => "ENOSPC",
            libc::EROFS => "EROFS",
            libc::ERANGE => "ERANGE",
            libc::EOVERFLOW => "EOVERFLOW",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::ESHUTDOWN => "ESHUTDOWN",
            libc::EALREADY => "EALREADY",
            libc::EAGAIN => "EAGAIN",
            libc::EINTR => "EINTR",
            libc::ENOTTY => "ENOTTY",
            libc::EPROTO => "EPROTO",
            libc::ENODATA => "ENODATA",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::EILSEQ => "EILSEQ",
            libc::ENOTBLK => "ENOTBLK",
            libc::ENOSYS => "ENOSYS",
            libc::ENOTDIR => "ENOTDIR",
            libc::EISDIR => "EISDIR",
            libc::EMFILE => "EMFILE",
            libc::ENAMETOOLONG => "ENAMETOOLONG",
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::EPIPE => "EPIPE",
            libc::ENOTCONN => "ENOTCONN",
            _ => "E?",
        }
    }

    /// The errno carried by an OS error, `EIO` when it has none.
    pub fn from_io(e: &std::io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }

    /// The NBD wire error (protocol document, "Error values"): the spec's small set; anything
    /// else is reported as `EIO`, except `EROFS`/`EACCES`, which NBD spells `EPERM`.
    pub fn to_nbd(self) -> u32 {
        match self.0 {
            libc::EPERM | libc::EROFS | libc::EACCES => 1,
            libc::EIO => 5,
            libc::ENOMEM => 12,
            libc::EINVAL | libc::ERANGE => 22,
            libc::ENOSPC | libc::EFBIG => 28,
            libc::EOVERFLOW => 75,
            libc::EOPNOTSUPP => 95,
            libc::ESHUTDOWN => 108,
            _ => 5,
        }
    }

    /// The process exit status a CLI uses for this error (always non-zero).
    pub fn exit_code(self) -> i32 {
        1
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())
    }
}

/// Every typed error in udm implements this, so boundaries (NBD replies, control-protocol
/// responses, FUSE replies) can report the kernel-compatible cause without string matching.
pub trait HasErrno {
    /// The errno that best describes this error.
    fn errno(&self) -> Errno;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_codes() {
        assert_eq!(Errno::EIO.to_nbd(), 5);
        assert_eq!(Errno::EROFS.to_nbd(), 1);
        assert_eq!(Errno::ENOSPC.to_nbd(), 28);
        assert_eq!(Errno::EOPNOTSUPP.to_nbd(), 95);
        assert_eq!(Errno::EBUSY.to_nbd(), 5);
        assert_eq!(Errno::EBUSY.name(), "EBUSY");
    }
}
