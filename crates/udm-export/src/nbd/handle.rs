//! One NBD export as an [`crate::Export`]: an entry in the daemon's shared [`NbdServer`].

use super::{NbdError, NbdExportOptions, NbdServer};
use crate::{Export, ExportError, ExportStats};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use udm_io::BlockDevice;

/// The `nbd+unix` URI of export `name` on the Unix socket `socket`.
pub fn unix_uri(name: &str, socket: &Path) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

/// An export offered by a shared [`NbdServer`].
pub struct NbdExport {
    server: Arc<NbdServer>,
    name: String,
    /// The server's Unix socket, for the location shown.
    socket: PathBuf,
}

impl NbdExport {
    /// Offers `dev` under `name` on `server`, whose Unix socket is `socket`.
    pub fn start(
        server: &Arc<NbdServer>,
        name: &str,
        dev: Arc<dyn BlockDevice>,
        opts: NbdExportOptions,
        socket: &Path,
    ) -> Result<NbdExport, NbdError> {
        server.add_export(name, dev, opts)?;
        Ok(NbdExport {
            server: server.clone(),
            name: name.to_string(),
            socket: socket.to_path_buf(),
        })
    }
}

impl Export for NbdExport {
    fn kind(&self) -> &'static str {
        "nbd"
    }

    fn location(&self) -> String {
        unix_uri(&self.name, &self.socket)
    }

    fn stats(&self) -> ExportStats {
        let Some(s) = self
            .server
            .exports()
            .into_iter()
            .find(|s| s.name == self.name)
        else {
            return ExportStats::default();
        };
        let st = &s.stats;
        ExportStats {
            clients: s.clients as u64,
            requests: st.reads
                + st.writes
                + st.flushes
                + st.trims
                + st.write_zeroes
                + st.caches
                + st.block_status
                + st.unknown,
            errors: st.errors,
            bytes_read: st.bytes_read,
            bytes_written: st.bytes_written,
        }
    }

    /// Withdraws the export (bounded, see [`NbdServer::remove_export`]); nothing to do once
    /// the whole server has shut down, which disconnected every client at once.
    fn stop(self: Box<Self>) -> Result<(), ExportError> {
        if self.server.is_shut() {
            return Ok(());
        }
        Ok(self.server.remove_export(&self.name)?)
    }
}
