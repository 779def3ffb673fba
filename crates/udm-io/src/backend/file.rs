//! Regular files and block devices, with positioned reads and writes.

use crate::bio::{Bio, BioFlags, BioKind, BioOp};
use crate::device::{check_range, check_writable, BlockDevice, Extent, ExtentKind, Limits};
use crate::error::IoError;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use udm_types::SECTOR_SIZE;

/// A regular file served as a block device (buffered I/O).
pub struct FileDevice {
    file: File,
    path: PathBuf,
    sectors: u64,
    read_only: bool,
}

impl FileDevice {
    /// Opens an existing file; its size is rounded down to whole sectors.
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let len = file.metadata()?.len();
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            sectors: len / SECTOR_SIZE,
            read_only,
        })
    }

    fn os(bio: &Bio<'_>, e: std::io::Error) -> IoError {
        IoError::os(bio.kind(), bio.sector, e)
    }

    fn fallocate(&self, bio: &Bio<'_>, mode: libc::c_int) -> Result<(), IoError> {
        let off = (bio.sector * SECTOR_SIZE) as libc::off_t;
        let len = (bio.sectors() * SECTOR_SIZE) as libc::off_t;
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.file.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if r != 0 {
            return Err(Self::os(bio, std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.sectors
    }

    fn limits(&self) -> Limits {
        Limits {
            ..Limits::default()
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        check_range(&bio, self.sectors)?;
        check_writable(&bio, self.read_only, &|| self.describe())?;
        let off = bio.sector * SECTOR_SIZE;
        let fua = bio.flags.contains(BioFlags::FUA);
        if bio.flags.contains(BioFlags::PREFLUSH) || bio.is_empty_flush() {
            self.file.sync_data().map_err(|e| Self::os(&bio, e))?;
        }
        match &bio.op {
            BioOp::Read(_) | BioOp::Flush => {}
            BioOp::Write(buf) => self
                .file
                .write_all_at(buf, off)
                .map_err(|e| Self::os(&bio, e))?,
            BioOp::Discard(_) => {
                self.fallocate(&bio, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)?
            }
            BioOp::WriteZeroes(_) => {
                let mode = if bio.flags.contains(BioFlags::NO_UNMAP) {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                self.fallocate(&bio, mode)?
            }
        }
        if let BioOp::Read(buf) = bio.op {
            self.file
                .read_exact_at(buf, off)
                .map_err(|e| IoError::os(BioKind::Read, off / SECTOR_SIZE, e))?;
        } else if fua && bio.kind() != BioKind::Flush {
            self.file
                .sync_data()
                .map_err(|e| IoError::os(BioKind::Write, off / SECTOR_SIZE, e))?;
        }
        Ok(())
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        Ok(vec![Extent {
            sectors: sectors.min(self.sectors.saturating_sub(sector)),
            kind: ExtentKind::Data,
        }])
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
