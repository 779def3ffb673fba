//! Filesystem freeze around a switch (FIFREEZE/FITHAW on a mount point), for `--freeze`.

use crate::error::{CoreError, Result};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use udm_types::Errno;

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A frozen filesystem; thawed when dropped.
pub struct Frozen {
    file: std::fs::File,
    path: PathBuf,
}

impl Frozen {
    /// Freezes the filesystem mounted at `mountpoint` (syncs it first, as the kernel does).
    pub fn freeze(mountpoint: &Path) -> Result<Frozen> {
        let file = std::fs::File::open(mountpoint).map_err(|e| {
            CoreError::new(
                Errno::from_io(&e),
                format!("cannot open {}: {e}", mountpoint.display()),
            )
        })?;
        // SAFETY: FIFREEZE takes an int argument that the kernel ignores; the fd is valid.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FIFREEZE as _, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Err(CoreError::new(
                Errno::from_io(&e),
                format!("cannot freeze {}: {e}", mountpoint.display()),
            ));
        }
        tracing::debug!(mountpoint = %mountpoint.display(), "filesystem frozen");
        Ok(Frozen {
            file,
            path: mountpoint.to_path_buf(),
        })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: FITHAW takes an int argument that the kernel ignores; the fd is valid.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), FITHAW as _, 0) };
        if r != 0 {
            tracing::error!(mountpoint = %self.path.display(), "FITHAW failed: {}", std::io::Error::last_os_error());
        }
    }
}
