//! One FUSE file as an [`crate::Export`]: a file in a mount of the daemon's shared
//! [`FuseExports`].

use super::{FuseError, FuseExports};
use crate::{Detached, Export, ExportError, ExportStats};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use udm_io::BlockDevice;

/// The file `dir/name` serving one device.
pub struct FuseExport {
    exports: Arc<FuseExports>,
    /// The directory as given (the location shown is `dir/name`).
    dir: PathBuf,
    name: String,
    /// The file is gone already ([`Export::detach`]).
    removed: bool,
}

impl FuseExport {
    /// Exports `dev` as `dir/name` through `exports` (see [`FuseExports::add`]).
    pub fn start(
        exports: &Arc<FuseExports>,
        dir: &Path,
        name: &str,
        dev: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> Result<FuseExport, FuseError> {
        exports.add(dir, name, dev, read_only)?;
        Ok(FuseExport {
            exports: exports.clone(),
            dir: dir.to_path_buf(),
            name: name.to_string(),
            removed: false,
        })
    }
}

impl Export for FuseExport {
    fn kind(&self) -> &'static str {
        "fuse"
    }

    fn location(&self) -> String {
        self.dir.join(&self.name).display().to_string()
    }

    fn stats(&self) -> ExportStats {
        let list = self.exports.list();
        let Some(s) = list
            .iter()
            .find(|s| s.dir == self.dir && s.name == self.name)
        else {
            return ExportStats::default();
        };
        ExportStats {
            clients: s.open_handles,
            requests: s.reads + s.writes + s.fsyncs + s.fallocates,
            errors: s.errors,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
        }
    }

    /// Removes the file now: FUSE never waits for its users, it refuses with EBUSY while the
    /// file is open (a loop device attached).
    fn detach(&mut self) -> Result<Detached, ExportError> {
        self.exports.remove(&self.dir, &self.name)?;
        self.removed = true;
        Ok(Detached::Done)
    }

    /// Removes the file unless [`Export::detach`] did; a file already unmounted by
    /// [`FuseExports::shutdown`] is not an error.
    fn stop(self: Box<Self>) -> Result<(), ExportError> {
        if self.removed {
            return Ok(());
        }
        match self.exports.remove(&self.dir, &self.name) {
            Ok(()) | Err(FuseError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
