//! Typed errors: each names the block and the structure, and maps to the errno the kernel reports.

use crate::kind::Kind;

/// Everything that can go wrong reading or writing persistent-data metadata.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The block stores another location than where it was read (the kernel's ENOTBLK).
    #[error("{kind} block {block}: stored location is {found} (ENOTBLK)")]
    WrongLocation { kind: Kind, block: u64, found: u64 },
    /// The block's checksum does not match its contents (the kernel's EILSEQ).
    #[error("{kind} block {block}: checksum {stored:#010x}, computed {computed:#010x} (EILSEQ)")]
    Checksum {
        kind: Kind,
        block: u64,
        stored: u32,
        computed: u32,
    },
    /// A field holds a value the format does not allow.
    #[error("{kind} block {block}: {what}")]
    Corrupt {
        kind: Kind,
        block: u64,
        what: String,
    },
    /// A well-formed block the code does not support (the kernel's EINVAL, e.g. a version).
    #[error("{kind} block {block}: {what} (EINVAL)")]
    Unsupported {
        kind: Kind,
        block: u64,
        what: String,
    },
    /// A block number past the end of the metadata device.
    #[error("block {block} is beyond the metadata device ({nr_blocks} blocks)")]
    OutOfRange { block: u64, nr_blocks: u64 },
    /// No block is free in the last committed space map.
    #[error("metadata device full: no block free in the committed space map ({nr_blocks} blocks)")]
    NoSpace { nr_blocks: u64 },
    /// A reference count would go below zero or above the format's range.
    #[error("space map: block {block}: {what}")]
    RefCount { block: u64, what: String },
    /// A write to a block that is reachable from the committed superblock (a shadowing bug).
    #[error("block {block} written in place but not shadowed in this transaction")]
    NotShadowed { block: u64 },
    /// Transaction steps out of order (a caller bug).
    #[error("transaction: {what}")]
    Order { what: &'static str },
    /// An index past the end of an array or bitset.
    #[error("index {index} past the end ({len})")]
    Index { index: u64, len: u64 },
    /// The store failed.
    #[error("I/O on metadata block {block}: {source}")]
    Io { block: u64, source: std::io::Error },
}

impl Error {
    /// The errno the kernel returns for this condition.
    pub fn errno(&self) -> i32 {
        match self {
            Error::WrongLocation { .. } => libc::ENOTBLK,
            Error::Checksum { .. } | Error::Corrupt { .. } => libc::EILSEQ,
            Error::OutOfRange { .. } | Error::Index { .. } => libc::ERANGE,
            Error::NoSpace { .. } => libc::ENOSPC,
            Error::RefCount { .. }
            | Error::NotShadowed { .. }
            | Error::Unsupported { .. }
            | Error::Order { .. } => libc::EINVAL,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
