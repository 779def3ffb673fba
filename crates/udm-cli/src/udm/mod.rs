//! `udm`: high-level workflows over the control protocol, one module per workflow: `status`,
//! `snapshot`, `track` (change tracking), `backup`; migration goes here as a sibling, each
//! exposing clap `Args`/`Subcommand` types and functions the binary calls.

pub mod backup;
pub mod snapshot;
pub mod status;
pub mod track;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// `udm [--socket PATH] [--json] <workflow>`.
#[derive(Debug, Parser)]
#[command(
    name = "udm",
    version,
    about = "High-level udm workflows (live snapshots, backup, migration) over udmd",
    long_about = "udm runs multi-step workflows on udmd's control socket: live snapshots of \
devices in use for backup, and later incremental backup and live migration. For single \
device-mapper operations use udmsetup."
)]
pub struct Cli {
    /// udmd's control socket.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print each control operation the workflow ran and how long it took, on stderr (the
    /// phases of a snapshot take or drop: attach, suspend, create, resume, remove).
    #[arg(long, global = true)]
    pub timings: bool,
    /// The workflow.
    #[command(subcommand)]
    pub command: Command,
}

/// Workflows.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Is udmd reachable, and how many disks, mapped devices and exports does it serve.
    Status,
    /// Live snapshots of devices in use: take, list, status, drop, merge.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Change tracking on a device in use (for incremental backup): start, stop, status,
    /// checkpoint.
    #[command(subcommand)]
    Track(track::TrackCommand),
    /// Full and incremental backups of devices in use as qcow2 chains: full, incremental,
    /// list, restore, verify.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        assert!(Cli::try_parse_from(["udm", "status", "--json"]).is_ok());
    }
}
