//! In-process registry helpers for tests that drive `udm_core::Registry` without udmd.

use udm_core::registry::{LoadFlags, ResumeOptions};
use udm_core::Registry;
use udm_target::table::TableSpec;

/// Load flags of an interposer (`create --interpose`).
pub const IP: LoadFlags = LoadFlags {
    read_only: false,
    interpose: true,
};

/// Load flags of a plain read-write table.
pub const PLAIN: LoadFlags = LoadFlags {
    read_only: false,
    interpose: false,
};

/// `create NAME --table TABLE` (with `flags`), resumed at once.
pub fn create(reg: &Registry, name: &str, table: &str, flags: LoadFlags) -> udm_core::Result<()> {
    let spec = TableSpec::parse(table).map_err(udm_core::CoreError::from)?;
    reg.create(
        name,
        None,
        None,
        Some((&spec, flags)),
        &ResumeOptions::default(),
    )
    .map(|_| ())
}
