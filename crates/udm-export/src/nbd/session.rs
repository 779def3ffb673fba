//! What a handshake agreed on, and the sizes it advertises: what the transmission phase
//! serves a connection with.

use super::export::Export;
use super::meta::MetaSel;
use std::sync::Arc;
use udm_io::BlockDevice;
use udm_types::SECTOR_SIZE;

/// Largest request payload we accept (read and write): 32 MiB, the spec's portable maximum.
pub(crate) const MAX_BLOCK: u32 = 32 << 20;

/// Smallest unit clients may address: the device's logical block size (at least a sector).
pub(super) fn min_block(dev: &dyn BlockDevice) -> u32 {
    let l = dev.limits().logical_block_size;
    if l.is_power_of_two() && (512..=65536).contains(&l) {
        l
    } else {
        512
    }
}

/// Advertised size: the device size rounded down to the minimum block size.
pub(crate) fn export_size(e: &Export) -> u64 {
    let min = u64::from(min_block(e.dev.as_ref()));
    e.dev.size().saturating_mul(SECTOR_SIZE) / min * min
}

/// What the handshake agreed on.
pub(super) struct Session {
    pub(super) export: Arc<Export>,
    pub(super) structured: bool,
    /// Metadata contexts selected for this export.
    pub(super) meta: MetaSel,
    pub(super) size: u64,
    pub(super) min_block: u32,
    pub(super) read_only: bool,
    pub(super) max_io_bytes: usize,
    pub(super) discard: bool,
    pub(super) native_zeroes: bool,
}

/// The session of `export` as negotiated.
pub(super) fn session(
    export: Arc<Export>,
    structured: bool,
    meta: &Option<(String, MetaSel)>,
    name: &str,
) -> Session {
    let min = min_block(export.dev.as_ref());
    let limits = export.dev.limits();
    let max_io = if limits.max_io_sectors == 0 {
        usize::MAX
    } else {
        (limits.max_io_sectors.saturating_mul(SECTOR_SIZE)).min(usize::MAX as u64) as usize
    };
    Session {
        size: export_size(&export),
        structured,
        meta: match meta {
            Some((n, sel)) if structured && n == name => sel.clone(),
            _ => MetaSel::default(),
        },
        min_block: min,
        read_only: export.read_only(),
        max_io_bytes: max_io.max(min as usize),
        discard: limits.discard,
        native_zeroes: limits.write_zeroes,
        export,
    }
}
