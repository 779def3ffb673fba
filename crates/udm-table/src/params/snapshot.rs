//! `snapshot`/`snapshot-merge <origin> <cow> <P|PO|N> <chunk_sectors> [<#feat>
//! discard_zeroes_cow [discard_passdown_origin]]` and the dm-snapshot status forms.

use std::fmt;
use std::str::FromStr;

use super::{from_str_via_args, invalid, Dev, FromArgs};
use crate::args::{scan_u64, ArgError};

/// The exception store type: `N` transient, `P` persistent, `PO` persistent with overflow
/// (a full store stops writes instead of invalidating the snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// `N`.
    Transient,
    /// `P`.
    Persistent,
    /// `PO`.
    PersistentOverflow,
}

impl StoreKind {
    /// Persistent (`P` or `PO`).
    pub fn persistent(self) -> bool {
        self != StoreKind::Transient
    }

    /// `PO`.
    pub fn overflow(self) -> bool {
        self == StoreKind::PersistentOverflow
    }
}

impl FromStr for StoreKind {
    type Err = ArgError;

    /// `dm_exception_store_create`: the type letter case-insensitively, an optional `O` after
    /// `P` (what follows is ignored, as the kernel does).
    fn from_str(kind: &str) -> Result<Self, ArgError> {
        let mut chars = kind.chars();
        let first = chars.next().map(|c| c.to_ascii_uppercase());
        let rest = chars.as_str();
        match first {
            Some('P') => match rest.chars().next().map(|c| c.to_ascii_uppercase()) {
                None => Ok(StoreKind::Persistent),
                Some('O') => Ok(StoreKind::PersistentOverflow),
                Some(_) => Err(invalid(format!(
                    "Couldn't create exception store: Unsupported persistent store option: {rest}"
                ))),
            },
            Some('N') => Ok(StoreKind::Transient),
            _ => Err(invalid(format!(
                "Couldn't create exception store: Exception store type is not P or N: {kind}"
            ))),
        }
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreKind::Transient => "N",
            StoreKind::Persistent => "P",
            StoreKind::PersistentOverflow => "PO",
        })
    }
}

/// The optional discard features.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotFeatures {
    /// `discard_zeroes_cow`.
    pub discard_zeroes_cow: bool,
    /// `discard_passdown_origin` (needs `discard_zeroes_cow`).
    pub discard_passdown_origin: bool,
}

impl FromArgs for SnapshotFeatures {
    /// `parse_snapshot_features`.
    fn from_args(args: &[String]) -> Result<Self, ArgError> {
        let mut f = SnapshotFeatures::default();
        let Some((n, rest)) = args.split_first() else {
            return Ok(f);
        };
        let n: usize = match n.parse::<u32>() {
            Ok(n @ 0..=2) => n as usize,
            _ => return Err(invalid("Invalid number of feature arguments")),
        };
        let names = rest
            .get(..n)
            .ok_or_else(|| invalid("Insufficient arguments in argument group"))?;
        for a in names {
            if a.eq_ignore_ascii_case("discard_zeroes_cow") {
                f.discard_zeroes_cow = true;
            } else if a.eq_ignore_ascii_case("discard_passdown_origin") {
                f.discard_passdown_origin = true;
            } else {
                return Err(invalid(format!("Unrecognised feature requested: {a}")));
            }
        }
        if f.discard_passdown_origin && !f.discard_zeroes_cow {
            return Err(invalid(
                "discard_passdown_origin feature depends on discard_zeroes_cow",
            ));
        }
        Ok(f)
    }
}

impl fmt::Display for SnapshotFeatures {
    /// Nothing without features, else the count and the names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = u32::from(self.discard_zeroes_cow) + u32::from(self.discard_passdown_origin);
        if n == 0 {
            return Ok(());
        }
        write!(f, "{n}")?;
        if self.discard_zeroes_cow {
            f.write_str(" discard_zeroes_cow")?;
        }
        if self.discard_passdown_origin {
            f.write_str(" discard_passdown_origin")?;
        }
        Ok(())
    }
}

/// `snapshot` and `snapshot-merge` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotParams {
    /// The origin device.
    pub origin: String,
    /// The COW device.
    pub cow: String,
    /// The store type.
    pub store: StoreKind,
    /// Chunk size in sectors; 0 in a table means "from the store's header, else the default"
    /// (the table output shows the size in use). At most `u32::MAX` in a table.
    pub chunk_sectors: u64,
    /// Discard features.
    pub features: SnapshotFeatures,
}

impl FromArgs for SnapshotParams {
    /// The syntax checks of `snapshot_ctr`; the chunk size's checks against the devices'
    /// block sizes are the constructor's.
    fn from_args(args: &[String]) -> Result<Self, ArgError> {
        let [origin, cow, store, chunk, features @ ..] = args else {
            return Err(invalid("requires 4 or more arguments"));
        };
        let features = SnapshotFeatures::from_args(features)?;
        let store = store.parse()?;
        let chunk_sectors: u32 = chunk.parse().map_err(|_| {
            invalid(format!(
                "Couldn't create exception store: Invalid chunk size {chunk}"
            ))
        })?;
        Ok(SnapshotParams {
            origin: origin.clone(),
            cow: cow.clone(),
            store,
            chunk_sectors: u64::from(chunk_sectors),
            features,
        })
    }
}

impl fmt::Display for SnapshotParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            Dev(&self.origin),
            Dev(&self.cow),
            self.store,
            self.chunk_sectors
        )?;
        if self.features != SnapshotFeatures::default() {
            write!(f, " {}", self.features)?;
        }
        Ok(())
    }
}

from_str_via_args!(SnapshotFeatures, SnapshotParams);

/// `snapshot` and `snapshot-merge` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStatus {
    /// `<allocated>/<total> <metadata>`, in sectors (header and metadata included in
    /// `allocated`; a merge is done when `allocated == metadata`).
    Usage {
        /// Sectors in use in the COW.
        allocated: u64,
        /// COW size.
        total: u64,
        /// Sectors of the header and metadata.
        metadata: u64,
    },
    /// `Invalid`: the snapshot was dropped (full non-`PO` store, I/O error).
    Invalid,
    /// `Overflow`: a `PO` store is full; reads still work.
    Overflow,
    /// `Merge failed`.
    MergeFailed,
    /// `Unknown`: the store reports no usage.
    Unknown,
}

impl FromStr for SnapshotStatus {
    type Err = ArgError;

    fn from_str(s: &str) -> Result<Self, ArgError> {
        match s {
            "Invalid" => return Ok(SnapshotStatus::Invalid),
            "Overflow" => return Ok(SnapshotStatus::Overflow),
            "Merge failed" => return Ok(SnapshotStatus::MergeFailed),
            "Unknown" => return Ok(SnapshotStatus::Unknown),
            _ => {}
        }
        let usage = s.split_once(' ').and_then(|(used, meta)| {
            let (allocated, total) = used.split_once('/')?;
            Some(SnapshotStatus::Usage {
                allocated: scan_u64(allocated)?,
                total: scan_u64(total)?,
                metadata: scan_u64(meta)?,
            })
        });
        usage.ok_or_else(|| invalid(format!("not a snapshot status: {s:?}")))
    }
}

impl fmt::Display for SnapshotStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotStatus::Usage {
                allocated,
                total,
                metadata,
            } => write!(f, "{allocated}/{total} {metadata}"),
            SnapshotStatus::Invalid => f.write_str("Invalid"),
            SnapshotStatus::Overflow => f.write_str("Overflow"),
            SnapshotStatus::MergeFailed => f.write_str("Merge failed"),
            SnapshotStatus::Unknown => f.write_str("Unknown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::strategies::{dev, round_trips};
    use super::*;
    use proptest::prelude::*;

    fn store() -> impl Strategy<Value = StoreKind> {
        prop_oneof![
            Just(StoreKind::Transient),
            Just(StoreKind::Persistent),
            Just(StoreKind::PersistentOverflow),
        ]
    }

    fn features() -> impl Strategy<Value = SnapshotFeatures> {
        (any::<bool>(), any::<bool>()).prop_map(|(z, p)| SnapshotFeatures {
            discard_zeroes_cow: z || p,
            discard_passdown_origin: p,
        })
    }

    fn status() -> impl Strategy<Value = SnapshotStatus> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(allocated, total, metadata)| {
                SnapshotStatus::Usage {
                    allocated,
                    total,
                    metadata,
                }
            }),
            Just(SnapshotStatus::Invalid),
            Just(SnapshotStatus::Overflow),
            Just(SnapshotStatus::MergeFailed),
            Just(SnapshotStatus::Unknown),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(
            origin in dev(),
            cow in dev(),
            store in store(),
            chunk_sectors in 0..=u64::from(u32::MAX),
            features in features(),
            status in status(),
        ) {
            round_trips(&SnapshotParams { origin, cow, store, chunk_sectors, features })?;
            round_trips(&status)?;
        }
    }

    #[test]
    fn kernel_forms() {
        let e = |s: &str| s.parse::<SnapshotParams>().unwrap_err().msg;
        assert_eq!(e("o c P"), "requires 4 or more arguments");
        assert_eq!(
            e("o c X 8"),
            "Couldn't create exception store: Exception store type is not P or N: X"
        );
        assert_eq!(
            e("o c Px 8"),
            "Couldn't create exception store: Unsupported persistent store option: x"
        );
        assert_eq!(
            e("o c P -1"),
            "Couldn't create exception store: Invalid chunk size -1"
        );
        assert_eq!(e("o c P 8 3 a b c"), "Invalid number of feature arguments");
        assert_eq!(e("o c P 8 2 a"), "Insufficient arguments in argument group");
        assert_eq!(
            e("o c P 8 1 discard_passdown_origin"),
            "discard_passdown_origin feature depends on discard_zeroes_cow"
        );
        let p: SnapshotParams = "253:0 253:1 po 16 1 DISCARD_ZEROES_COW".parse().unwrap();
        assert_eq!(p.to_string(), "253:0 253:1 PO 16 1 discard_zeroes_cow");
        assert_eq!(
            "16/2097152 16".parse::<SnapshotStatus>(),
            Ok(SnapshotStatus::Usage {
                allocated: 16,
                total: 2097152,
                metadata: 16
            })
        );
        for bad in [
            "",
            "16/x 16",
            "16 16",
            "16/2097152",
            "16/2097152 16 1",
            "invalid",
        ] {
            assert!(bad.parse::<SnapshotStatus>().is_err(), "{bad:?}");
        }
    }
}
