//! Starting a ublk export, whether or not this build has the `ublk` feature: the feature is
//! decided here, so callers need no `cfg` (without it, EOPNOTSUPP).

use crate::export::{Export, ExportError, UblkOptions};
use std::sync::Arc;
use udm_io::BlockDevice;

/// Starts `/dev/ublkbN` for `dev` (`name` is for logs); returns the export and N, which the
/// caller records so that a restart brings back the same node.
#[cfg(feature = "ublk")]
pub fn start_ublk(
    name: &str,
    dev: Arc<dyn BlockDevice>,
    opts: &UblkOptions,
) -> Result<(Box<dyn Export>, u32), ExportError> {
    let u = crate::ublk::UblkExport::start(name, dev, opts)?;
    let id = u.dev_id();
    Ok((Box::new(u), id))
}

/// Without the `ublk` feature there is no ublk export: EOPNOTSUPP.
#[cfg(not(feature = "ublk"))]
pub fn start_ublk(
    _name: &str,
    _dev: Arc<dyn BlockDevice>,
    _opts: &UblkOptions,
) -> Result<(Box<dyn Export>, u32), ExportError> {
    Err(ExportError::UblkUnsupported)
}
