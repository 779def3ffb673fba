//! Argument helpers of the target constructors: the kernel's parsing rules from udm-table,
//! plus the device lookups that need a constructor context. A leaf: targets use it without
//! depending on the table that dispatches to them.

pub use udm_table::args::*;
pub use udm_table::params::*;

use crate::target::{CtorContext, DevRef, TargetError};

impl From<ArgError> for TargetError {
    fn from(e: ArgError) -> Self {
        TargetError::invalid(e.msg)
    }
}

/// `dm_get_device` with the kernel's `Device lookup failed` message, keeping the cause
/// (and its errno: EBUSY for an exported device, ENOENT for an unknown one...).
pub fn get_device(ctx: &mut dyn CtorContext, path: &str) -> Result<DevRef, TargetError> {
    get_device_as(ctx, path, "Device lookup failed")
}

/// `dm_get_device` failing with `what` followed by the cause.
pub fn get_device_as(
    ctx: &mut dyn CtorContext,
    path: &str,
    what: &str,
) -> Result<DevRef, TargetError> {
    ctx.get_device(path)
        .map_err(|e| TargetError::new(e.errno, format!("{what}: {}", e.msg)))
}
