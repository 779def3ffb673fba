//! Typed errors: each names the image file and the structure (with its offset where there is
//! one), and maps to the errno a caller reports.

/// Everything that can go wrong writing or reading a qcow2 image or chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `Writer::create` on a path that exists: an earlier point is never overwritten.
    #[error("{file}: already exists (EEXIST)")]
    Exists { file: String },
    /// A plan or a call the writer cannot carry out (a caller bug or bad input).
    #[error("{file}: {what} (EINVAL)")]
    Invalid { file: String, what: String },
    /// The file does not start with the qcow2 magic (or an interrupted, unfinished image).
    #[error("{file}: not a qcow2 image: magic {found:#010x} (EINVAL)")]
    NotQcow2 { file: String, found: u32 },
    /// A well-formed image using something this code does not handle (version, encryption,
    /// a feature bit, compressed clusters, a backing format).
    #[error("{file}: {structure}: unsupported: {what} (EINVAL)")]
    Unsupported {
        file: String,
        structure: &'static str,
        what: String,
    },
    /// A structure holds a value the format does not allow.
    #[error("{file}: {structure} at {offset:#x}: {what} (EILSEQ)")]
    Corrupt {
        file: String,
        structure: &'static str,
        offset: u64,
        what: String,
    },
    /// A structure extends past the end of the file.
    #[error("{file}: {structure} at {offset:#x}+{len:#x} is past the end of the file ({file_len:#x}) (EIO)")]
    Truncated {
        file: String,
        structure: &'static str,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    /// A backing chain that cannot be followed (loop, depth, format, cluster size).
    #[error("{file}: backing chain: {what} (EINVAL)")]
    Chain { file: String, what: String },
    /// A guest cluster or byte range past the virtual size.
    #[error("{file}: guest {what} {at:#x} is past the virtual size {size:#x} (EINVAL)")]
    OutOfRange {
        file: String,
        what: &'static str,
        at: u64,
        size: u64,
    },
    /// The file failed.
    #[error("{file}: I/O on {structure} at {offset:#x}: {source}")]
    Io {
        file: String,
        structure: &'static str,
        offset: u64,
        source: std::io::Error,
    },
}

impl Error {
    /// The errno for this condition: EINVAL for bad input or unsupported images, EEXIST,
    /// EILSEQ for corrupt structures, EIO for truncated files, the OS errno for I/O failures.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Exists { .. } => libc::EEXIST,
            Error::Invalid { .. }
            | Error::NotQcow2 { .. }
            | Error::Unsupported { .. }
            | Error::Chain { .. }
            | Error::OutOfRange { .. } => libc::EINVAL,
            Error::Corrupt { .. } => libc::EILSEQ,
            Error::Truncated { .. } => libc::EIO,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
