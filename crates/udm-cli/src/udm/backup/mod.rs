//! `udm backup`: full and incremental backups of a device in use, as a chain of qcow2 images
//! any QEMU tool reads (`chain`), taken from a live snapshot read over NBD with the changed
//! blocks as a dirty bitmap (`run`, `copy`, `nbd`), and restored or verified against the
//! checksums recorded at backup time (`restore`).

pub mod chain;
pub mod copy;
pub mod nbd;
pub mod restore;
pub mod run;

use clap::{Args, Subcommand};
use std::path::PathBuf;

pub use chain::{Kind, Manifest, Point};
pub use restore::{ReadReport, RestoreArgs};
pub use run::RunArgs;

/// What a long operation reports as it goes.
#[derive(Clone, Debug)]
pub enum Progress {
    /// A step worth a line.
    Note(String),
    /// Bytes copied (or read) so far, of `total`.
    Copied {
        /// So far.
        done: u64,
        /// In all.
        total: u64,
    },
}

/// `udm backup ...`.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up every block of a device in use (point 0 of a new chain, or a new full point);
    /// starts change tracking for the incrementals that follow.
    #[command(after_help = "Examples:
  udm backup full vol --to /srv/backup/vol
  udm backup full vol --to /srv/backup/vol --freeze /mnt/data")]
    Full(RunArgs),
    /// Back up the blocks written since the previous point (needs `udm track start`, which
    /// `full` does).
    #[command(after_help = "Examples:
  udm backup incremental vol --to /srv/backup/vol
  udm backup incremental vol --to /srv/backup/vol --auto --json")]
    Incremental(RunArgs),
    /// The points of a backup directory.
    List {
        /// The backup directory.
        dir: PathBuf,
    },
    /// Write a point back to a file, a block device or a udm device.
    #[command(after_help = "Examples:
  udm backup restore /srv/backup/vol --to /tmp/vol.img
  udm backup restore /srv/backup/vol --point 2 --to vol --force")]
    Restore(RestoreArgs),
    /// Check every cluster of a point (through its chain) against the checksums recorded when
    /// it was taken.
    Verify(VerifyArgs),
}

/// `udm backup verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The backup directory.
    pub dir: PathBuf,
    /// The point (default: the latest).
    #[arg(long)]
    pub point: Option<u32>,
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of seconds since the epoch (Howard Hinnant's civil_from_days).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The human form of `list`.
pub fn format_list(m: &Manifest) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut out = format!(
        "device {} ({:.1} MiB, {} KiB clusters)\n{:>5}  {:<11}  {:>20}  {:>12}  {:>12}  {:>12}  {:>8}  {}\n",
        m.device,
        mib(m.size),
        m.cluster_size / 1024,
        "POINT",
        "KIND",
        "CREATED (UTC)",
        "CHANGED MiB",
        "DATA MiB",
        "IMAGE MiB",
        "DIGEST",
        "FILE"
    );
    for p in &m.points {
        out.push_str(&format!(
            "{:>5}  {:<11}  {:>20}  {:>12.1}  {:>12.1}  {:>12.1}  {:>8}  {}\n",
            p.n,
            match p.kind {
                Kind::Full => "full",
                Kind::Incremental => "incremental",
            },
            utc(p.created),
            mib(p.changed_bytes),
            mib(p.data_bytes),
            mib(p.image_bytes),
            p.digest,
            p.file
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_796_147_881), "2026-12-01 17:58:01");
    }
}
