//! What a user set up, in a form that can be written to the state directory and replayed after a
//! restart: disks, mapped devices with their tables and states. Exports are recorded by the
//! daemon beside it.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A disk as it was added.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskConfig {
    /// Name.
    pub name: String,
    /// Backing file or block device.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Minor number, so `major:minor` stays the same across restarts.
    pub minor: u32,
    /// Opened on demand because a table names its path; released when no table uses it.
    #[serde(default)]
    pub implicit: bool,
}

/// A table in one slot, as text plus the load flags.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TableConfig {
    /// dmsetup table text (devices as given at load time).
    pub text: String,
    /// Loaded with `-r`.
    pub read_only: bool,
    /// Loaded with `--interpose`.
    pub interposed: bool,
}

/// A mapped device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MappedConfig {
    /// Name.
    pub name: String,
    /// UUID, if set.
    pub uuid: Option<String>,
    /// Minor number.
    pub minor: u32,
    /// Live table.
    pub live: Option<TableConfig>,
    /// Inactive table.
    pub inactive: Option<TableConfig>,
    /// Suspended at the time of recording.
    pub suspended: bool,
    /// Marked for deferred removal.
    pub deferred_remove: bool,
}

/// Everything the registry holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Disks in creation order.
    pub disks: Vec<DiskConfig>,
    /// Mapped devices in creation order.
    pub mapped: Vec<MappedConfig>,
}
