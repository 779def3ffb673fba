//! The state directory: what a user set up (disks, tables, exports), written atomically after
//! every change so that a restart — a crash included — restores it.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use udm_core::config::RegistryConfig;
use udm_proto::ExportKind;

/// Format version of state.json.
pub const STATE_VERSION: u32 = 1;

/// An export as recorded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportConfig {
    /// Exported device.
    pub device: String,
    /// Kind and its parameters.
    pub export: ExportKind,
    /// Read-only.
    pub read_only: bool,
}

/// Everything recorded.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonState {
    /// Format version.
    pub version: u32,
    /// Disks and mapped devices.
    pub registry: RegistryConfig,
    /// Exports.
    pub exports: Vec<ExportConfig>,
}

/// Path of the state file.
pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

/// Reads the state; an absent file is an empty state.
pub fn load(dir: &Path) -> Result<DaemonState> {
    let path = state_file(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DaemonState::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let st: DaemonState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    anyhow::ensure!(
        st.version == STATE_VERSION,
        "{} has format version {}, this udmd reads {}",
        path.display(),
        st.version,
        STATE_VERSION
    );
    Ok(st)
}

/// Writes the state atomically (temporary file, fsync, rename, fsync of the directory).
pub fn save(dir: &Path, state: &DaemonState) -> Result<()> {
    let path = state_file(dir);
    let tmp = dir.join(".state.json.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut text = serde_json::to_vec_pretty(state)?;
    text.push(b'\n');
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path()).unwrap(), DaemonState::default());
        let st = DaemonState {
            version: STATE_VERSION,
            registry: RegistryConfig::default(),
            exports: vec![ExportConfig {
                device: "a".into(),
                export: ExportKind::Nbd {
                    name: None,
                    insecure_tcp: false,
                    bitmaps: Vec::new(),
                },
                read_only: false,
            }],
        };
        save(d.path(), &st).unwrap();
        assert_eq!(load(d.path()).unwrap(), st);
        std::fs::write(state_file(d.path()), "{garbage").unwrap();
        assert!(load(d.path()).is_err());
    }
}
