//! The qcow2 header (QEMU's docs/interop/qcow2.rst): big-endian fields, header extensions and
//! the backing file name, all within the first cluster. Parsing checks every field against the
//! format and the file length before anything is allocated from it.

use crate::error::{Error, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// The end of the header extensions.
pub const EXT_END: u32 = 0;
/// The backing file format name (e.g. "qcow2").
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Host offset bits of L1 and L2 entries (bits 9..=55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount of the cluster is exactly one (L1 and standard L2 entries).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// The L2 entry describes a compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Version 3: the cluster reads as zeros, hiding the backing file.
pub const OFLAG_ZERO: u64 = 1;
/// The longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: usize = 1023;
/// QEMU's bound on the L1 table (QCOW_MAX_L1_SIZE), so a header cannot make us allocate more.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Version 2 headers are always this long.
pub const V2_HEADER_LEN: u32 = 72;
/// The fixed part of a version 3 header.
pub const V3_HEADER_LEN: u32 = 104;
/// What the writer uses: the fixed part plus the compression type byte, padded to 8.
pub const WRITE_HEADER_LEN: u32 = 112;
/// 16-bit refcounts.
pub const REFCOUNT_ORDER: u32 = 4;

/// Incompatible feature bits, by bit, with their names for error messages.
const INCOMPATIBLE: [&str; 5] = [
    "dirty bit",
    "corrupt bit",
    "external data file bit",
    "compression type bit",
    "extended L2 entries bit",
];

/// The name of incompatible feature `bit` for messages.
pub fn incompatible_name(bit: u32) -> String {
    match INCOMPATIBLE.get(bit as usize) {
        Some(n) => format!("incompatible feature {bit} ({n})"),
        None => format!("unknown incompatible feature bit {bit}"),
    }
}

/// The fields of a parsed or to-be-written header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub backing: Option<String>,
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_be_bytes(v)
}

/// Parses the header from `first`, the file's first cluster (or all of a shorter file);
/// `file_len` bounds every table the header points to.
pub fn parse(file: &str, first: &[u8], file_len: u64) -> Result<Header> {
    let corrupt = |offset: u64, what: String| Error::Corrupt {
        file: file.to_string(),
        structure: "header",
        offset,
        what,
    };
    let unsupported = |what: String| Error::Unsupported {
        file: file.to_string(),
        structure: "header",
        what,
    };
    if first.len() < 4 || be32(first, 0) != MAGIC {
        return Err(Error::NotQcow2 {
            file: file.to_string(),
            found: be32(first, 0),
        });
    }
    if first.len() < V2_HEADER_LEN as usize {
        return Err(Error::Truncated {
            file: file.to_string(),
            structure: "header",
            offset: 0,
            len: V2_HEADER_LEN.into(),
            file_len,
        });
    }
    let version = be32(first, 4);
    if version != 2 && version != 3 {
        return Err(unsupported(format!("version {version}")));
    }
    let mut h = Header {
        version,
        backing_file_offset: be64(first, 8),
        backing_file_size: be32(first, 16),
        cluster_bits: be32(first, 20),
        size: be64(first, 24),
        crypt_method: be32(first, 32),
        l1_size: be32(first, 36),
        l1_table_offset: be64(first, 40),
        refcount_table_offset: be64(first, 48),
        refcount_table_clusters: be32(first, 56),
        nb_snapshots: be32(first, 60),
        snapshots_offset: be64(first, 64),
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: REFCOUNT_ORDER,
        header_length: V2_HEADER_LEN,
        backing: None,
        backing_format: None,
    };
    if !(9..=21).contains(&h.cluster_bits) {
        return Err(corrupt(
            20,
            format!("cluster_bits {} not in 9..=21", h.cluster_bits),
        ));
    }
    let cs = 1u64 << h.cluster_bits;
    // The first cluster as far as the file has it: extensions and the name must lie in it.
    let first = &first[..first.len().min(cs as usize)];
    if version == 3 {
        if first.len() < V3_HEADER_LEN as usize {
            return Err(Error::Truncated {
                file: file.to_string(),
                structure: "header",
                offset: 0,
                len: V3_HEADER_LEN.into(),
                file_len,
            });
        }
        h.incompatible_features = be64(first, 72);
        h.compatible_features = be64(first, 80);
        h.autoclear_features = be64(first, 88);
        h.refcount_order = be32(first, 96);
        h.header_length = be32(first, 100);
        if h.header_length < V3_HEADER_LEN || h.header_length % 8 != 0 {
            return Err(corrupt(
                100,
                format!(
                    "header_length {} (at least 104, a multiple of 8)",
                    h.header_length
                ),
            ));
        }
        if u64::from(h.header_length) > first.len() as u64 {
            return Err(corrupt(
                100,
                format!("header_length {} past the first cluster", h.header_length),
            ));
        }
        if h.refcount_order > 6 {
            return Err(corrupt(
                96,
                format!("refcount_order {} > 6", h.refcount_order),
            ));
        }
    }
    if h.incompatible_features != 0 {
        let bit = h.incompatible_features.trailing_zeros();
        return Err(unsupported(incompatible_name(bit)));
    }
    if h.crypt_method != 0 {
        return Err(unsupported(format!("encryption method {}", h.crypt_method)));
    }
    check_table(
        file,
        "L1 table",
        h.l1_table_offset,
        u64::from(h.l1_size) * 8,
        cs,
        file_len,
    )?;
    if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
        return Err(corrupt(
            36,
            format!("l1_size {} over QEMU's bound", h.l1_size),
        ));
    }
    let nb_clusters = h.size.div_ceil(cs);
    let needed = nb_clusters.div_ceil(cs / 8);
    if needed > u64::from(h.l1_size) {
        return Err(corrupt(
            36,
            format!(
                "l1_size {} does not cover the virtual size {} ({needed} entries needed)",
                h.l1_size, h.size
            ),
        ));
    }
    let rt_len = u64::from(h.refcount_table_clusters)
        .checked_mul(cs)
        .ok_or_else(|| corrupt(56, "refcount_table_clusters overflows".to_string()))?;
    check_table(
        file,
        "refcount table",
        h.refcount_table_offset,
        rt_len,
        cs,
        file_len,
    )?;
    if h.refcount_table_clusters == 0 {
        return Err(corrupt(56, "no refcount table".to_string()));
    }
    parse_extensions(file, first, &mut h)?;
    if h.backing_file_offset != 0 {
        let len = h.backing_file_size as usize;
        if len > MAX_BACKING_NAME {
            return Err(corrupt(
                16,
                format!("backing file name of {len} bytes (at most 1023)"),
            ));
        }
        let start = h.backing_file_offset;
        let end = start.saturating_add(len as u64);
        if end > first.len() as u64 {
            return Err(corrupt(
                8,
                format!("backing file name at {start:#x}+{len} is past the first cluster"),
            ));
        }
        let raw = &first[start as usize..end as usize];
        let name = std::str::from_utf8(raw)
            .ok()
            .filter(|s| !s.is_empty() && !s.contains('\0'))
            .ok_or_else(|| corrupt(start, "backing file name is empty or not UTF-8".to_string()))?;
        h.backing = Some(name.to_string());
    }
    Ok(h)
}

/// A table of `len` bytes at `offset`: cluster-aligned and inside the file.
fn check_table(
    file: &str,
    structure: &'static str,
    offset: u64,
    len: u64,
    cs: u64,
    file_len: u64,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    if offset % cs != 0 {
        return Err(Error::Corrupt {
            file: file.to_string(),
            structure,
            offset,
            what: format!("offset not aligned to the cluster size {cs}"),
        });
    }
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(Error::Truncated {
            file: file.to_string(),
            structure,
            offset,
            len,
            file_len,
        });
    }
    Ok(())
}

/// Walks the header extensions (version 3 only: from `header_length` up to the backing name
/// or the end of the first cluster), keeping the backing format and skipping others.
fn parse_extensions(file: &str, first: &[u8], h: &mut Header) -> Result<()> {
    if h.version < 3 {
        return Ok(());
    }
    let mut end = first.len() as u64;
    if h.backing_file_offset != 0 {
        end = end.min(h.backing_file_offset);
    }
    let mut at = u64::from(h.header_length);
    loop {
        let corrupt = |what: String| Error::Corrupt {
            file: file.to_string(),
            structure: "header extension",
            offset: at,
            what,
        };
        if at + 8 > end {
            return Err(corrupt(
                "extensions run past the first cluster or the backing name".to_string(),
            ));
        }
        let kind = be32(first, at as usize);
        let len = u64::from(be32(first, at as usize + 4));
        if kind == EXT_END {
            return Ok(());
        }
        let data = at + 8;
        let next = data + len.div_ceil(8) * 8;
        if next > end {
            return Err(corrupt(format!(
                "extension {kind:#010x} of {len} bytes runs past its space"
            )));
        }
        if kind == EXT_BACKING_FORMAT {
            if len as usize > MAX_BACKING_NAME {
                return Err(corrupt(format!("backing format name of {len} bytes")));
            }
            let raw = &first[data as usize..(data + len) as usize];
            let f = std::str::from_utf8(raw)
                .map_err(|_| corrupt("backing format name is not UTF-8".to_string()))?;
            h.backing_format = Some(f.trim_end_matches('\0').to_string());
        }
        at = next;
    }
}

/// Serializes a version 3 header as the writer lays it out: the fixed fields, the
/// compression type byte (zlib, unused), the backing format extension when there is a backing
/// file, the end marker, then the backing name. Returns the bytes (less than one cluster).
pub fn print(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; WRITE_HEADER_LEN as usize];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    put32(&mut b, 0, MAGIC);
    put32(&mut b, 4, h.version);
    b[8..16].copy_from_slice(&h.backing_file_offset.to_be_bytes());
    put32(&mut b, 16, h.backing_file_size);
    put32(&mut b, 20, h.cluster_bits);
    b[24..32].copy_from_slice(&h.size.to_be_bytes());
    put32(&mut b, 32, h.crypt_method);
    put32(&mut b, 36, h.l1_size);
    b[40..48].copy_from_slice(&h.l1_table_offset.to_be_bytes());
    b[48..56].copy_from_slice(&h.refcount_table_offset.to_be_bytes());
    put32(&mut b, 56, h.refcount_table_clusters);
    put32(&mut b, 60, h.nb_snapshots);
    b[64..72].copy_from_slice(&h.snapshots_offset.to_be_bytes());
    b[72..80].copy_from_slice(&h.incompatible_features.to_be_bytes());
    b[80..88].copy_from_slice(&h.compatible_features.to_be_bytes());
    b[88..96].copy_from_slice(&h.autoclear_features.to_be_bytes());
    put32(&mut b, 96, h.refcount_order);
    put32(&mut b, 100, h.header_length);
    if let Some(f) = &h.backing_format {
        b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b.extend_from_slice(&(f.len() as u32).to_be_bytes());
        b.extend_from_slice(f.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
    }
    b.extend_from_slice(&[0u8; 8]);
    if let Some(name) = &h.backing {
        b.extend_from_slice(name.as_bytes());
    }
    b
}

/// Where `print` puts the backing name for a header with `backing_format`.
pub fn backing_name_offset(backing_format: Option<&str>) -> u64 {
    let ext = backing_format.map_or(0, |f| 8 + (f.len() as u64).div_ceil(8) * 8);
    u64::from(WRITE_HEADER_LEN) + ext + 8
}
