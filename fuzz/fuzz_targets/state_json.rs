//! udmd's state.json (crates/udm-daemon/src/state.rs) parsed with serde_json and restored
//! into a fresh registry whose disks are memory devices: no panic, whatever the input.
#![no_main]
use std::sync::Arc;

use serde::Deserialize;
use udm_core::config::RegistryConfig;
use udm_io::backend::mem::MemDevice;

/// The shape of the daemon's `DaemonState` (it lives in the udmd binary crate, so it is
/// mirrored here; serde ignores nothing: unknown fields are accepted there too).
#[derive(Deserialize)]
#[allow(dead_code)]
struct State {
    version: u32,
    registry: RegistryConfig,
    exports: Vec<Export>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Export {
    device: String,
    export: udm_proto::ExportKind,
    read_only: bool,
}

/// At most this many disks and mapped devices are restored (bounded time per input).
const MAX_ITEMS: usize = 16;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(state) = serde_json::from_slice::<State>(data) else {
        return;
    };
    let mut cfg = state.registry;
    if cfg.disks.len() > MAX_ITEMS || cfg.mapped.len() > MAX_ITEMS {
        return;
    }
    // Disks become memory devices of the same names; the recorded paths are never opened.
    let reg = udm_core::Registry::new();
    for d in std::mem::take(&mut cfg.disks) {
        let sectors = 64 + u64::from(d.minor % 64) * 8;
        let _ = reg.add_disk_device(&d.name, Arc::new(MemDevice::new(sectors)));
    }
    let _problems = reg.restore(&cfg);
    let again = reg.config();
    let _ = serde_json::to_vec(&again);
    for (name, _) in reg.list_mapped() {
        let _ = reg.remove(&name, true, false);
    }
});
