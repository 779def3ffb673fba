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
    meta: &Option<(String, MetaSel, Arc<Export>)>,
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
        // The contexts count for the export they were selected on: an export removed and
        // added again in between may have other bitmaps behind the same ids.
        meta: match meta {
            Some((n, sel, e)) if structured && n == name && Arc::ptr_eq(e, &export) => sel.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::export::{Counters, ExportConns};
    use parking_lot::Mutex;
    use udm_io::backend::mem::MemDevice;

    fn export() -> Arc<Export> {
        Arc::new(Export {
            name: "e".into(),
            dev: Arc::new(MemDevice::new(64)),
            opts: Default::default(),
            counters: Counters::default(),
            conns: Mutex::new(ExportConns {
                map: Default::default(),
                removed: false,
            }),
        })
    }

    #[test]
    fn contexts_count_only_for_the_export_they_were_selected_on() {
        let (a, b) = (export(), export());
        let sel = MetaSel {
            base: true,
            bitmaps: vec![0],
        };
        let meta = Some(("e".to_string(), sel.clone(), a.clone()));
        assert_eq!(session(a.clone(), true, &meta, "e").meta, sel);
        // The same name, another export (removed and added again between SET and GO).
        assert_eq!(session(b, true, &meta, "e").meta, MetaSel::default());
        assert_eq!(
            session(a.clone(), true, &meta, "f").meta,
            MetaSel::default()
        );
        assert_eq!(session(a, false, &meta, "e").meta, MetaSel::default());
    }
}
