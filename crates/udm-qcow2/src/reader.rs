//! Reading an image: the header and L1 table are parsed and checked against the file length at
//! open; L2 entries are read on demand. Every value from the file is checked before it is used
//! as an offset or a size, so a hostile file gives an error, never a panic or a huge allocation.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::header::{self, Header, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO};

/// Where an image's bytes come from: a file, or memory (the fuzz target and tests).
pub trait ReadAt {
    /// Fills all of `buf` from `offset`; an error if the source ends before.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The length of the source in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the source is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(Vec::len(self) as u64)
    }
}

/// State of one guest cluster in one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Not in this image: the backing file supplies it (zeros without one).
    Unallocated,
    /// Reads as zeros, hiding the backing file.
    Zero,
    /// Stored in this image's file at `host_offset`.
    Data { host_offset: u64 },
}

/// A read-only parsed image.
#[derive(Debug)]
pub struct Image<R: ReadAt = File> {
    r: R,
    name: String,
    header: Header,
    file_len: u64,
    /// The L1 entries that cover the virtual size (checked at open).
    l1: Vec<u64>,
    nb_clusters: u64,
}

impl Image {
    /// Opens the image file at `path` read-only.
    pub fn open(path: &Path) -> Result<Image> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|source| Error::Io {
            file: name.clone(),
            structure: "file",
            offset: 0,
            source,
        })?;
        Image::from_reader(file, &name)
    }
}

impl<R: ReadAt> Image<R> {
    /// Parses the image in `r`; `name` names it in errors.
    pub fn from_reader(r: R, name: &str) -> Result<Self> {
        let io = |structure: &'static str, offset: u64| {
            move |source| Error::Io {
                file: name.to_string(),
                structure,
                offset,
                source,
            }
        };
        let file_len = r.len().map_err(io("file", 0))?;
        // The first cluster holds the header, its extensions and the backing name: read 4 KiB,
        // then the rest of the cluster once cluster_bits is known (bounded by 2 MiB).
        let mut first = vec![0u8; file_len.min(4096) as usize];
        r.read_at(&mut first, 0).map_err(io("header", 0))?;
        if first.len() >= 24 {
            let bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
            if (13..=21).contains(&bits) {
                let want = file_len.min(1 << bits) as usize;
                if want > first.len() {
                    first.resize(want, 0);
                    r.read_at(&mut first[4096..], 4096)
                        .map_err(io("header", 4096))?;
                }
            }
        }
        let header = header::parse(name, &first, file_len)?;
        let cs = 1u64 << header.cluster_bits;
        let nb_clusters = header.size.div_ceil(cs);
        let needed = nb_clusters.div_ceil(cs / 8);
        // `parse` bounded l1_size (and so `needed`) by the file length and QEMU's maximum.
        let mut raw = vec![0u8; (needed * 8) as usize];
        r.read_at(&mut raw, header.l1_table_offset)
            .map_err(io("L1 table", header.l1_table_offset))?;
        let mut l1 = Vec::with_capacity(needed as usize);
        // Each L2 table serves one L1 entry (its refcount is 1 in the active table). Refusing a
        // shared one also bounds `allocated()` by the file length: a small file repeating one
        // L2 table in every L1 entry would otherwise describe billions of clusters.
        let mut seen = std::collections::HashMap::new();
        for (i, e) in raw.chunks_exact(8).enumerate() {
            let mut v = [0u8; 8];
            v.copy_from_slice(e);
            let entry = u64::from_be_bytes(v);
            let l2 = entry & OFFSET_MASK;
            let at = header.l1_table_offset + i as u64 * 8;
            if l2 != 0 {
                if l2 % cs != 0 {
                    return Err(Error::Corrupt {
                        file: name.to_string(),
                        structure: "L1 entry",
                        offset: at,
                        what: format!("L2 table offset {l2:#x} not cluster-aligned"),
                    });
                }
                if l2 + cs > file_len {
                    return Err(Error::Truncated {
                        file: name.to_string(),
                        structure: "L2 table",
                        offset: l2,
                        len: cs,
                        file_len,
                    });
                }
                if let Some(first) = seen.insert(l2, i) {
                    return Err(Error::Corrupt {
                        file: name.to_string(),
                        structure: "L1 entry",
                        offset: at,
                        what: format!("L2 table {l2:#x} is also L1 entry {first}'s"),
                    });
                }
            }
            l1.push(l2);
        }
        Ok(Image {
            r,
            name: name.to_string(),
            header,
            file_len,
            l1,
            nb_clusters,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    pub fn cluster_bits(&self) -> u32 {
        self.header.cluster_bits
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.header.cluster_bits
    }

    /// The backing file name as stored (relative to the image's directory unless absolute).
    pub fn backing(&self) -> Option<&str> {
        self.header.backing.as_deref()
    }

    /// The backing format from the header extension, if there is one.
    pub fn backing_format(&self) -> Option<&str> {
        self.header.backing_format.as_deref()
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The name errors use for this image.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of guest clusters (the last may be partial).
    pub fn nb_clusters(&self) -> u64 {
        self.nb_clusters
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Classifies the L2 entry of guest cluster `index`, stored at `at`.
    fn classify(&self, index: u64, entry: u64, at: u64) -> Result<Cluster> {
        if entry & OFLAG_COMPRESSED != 0 {
            return Err(Error::Unsupported {
                file: self.name.clone(),
                structure: "L2 entry",
                what: format!("guest cluster {index} is compressed (entry at {at:#x})"),
            });
        }
        if entry & OFLAG_ZERO != 0 {
            return Ok(Cluster::Zero);
        }
        let host = entry & OFFSET_MASK;
        if host == 0 {
            return Ok(Cluster::Unallocated);
        }
        if host % self.cluster_size() != 0 {
            return Err(Error::Corrupt {
                file: self.name.clone(),
                structure: "L2 entry",
                offset: at,
                what: format!("guest cluster {index}: host offset {host:#x} not cluster-aligned"),
            });
        }
        if host >= self.file_len {
            return Err(Error::Truncated {
                file: self.name.clone(),
                structure: "data cluster",
                offset: host,
                len: self.cluster_size(),
                file_len: self.file_len,
            });
        }
        Ok(Cluster::Data { host_offset: host })
    }

    fn check_index(&self, index: u64) -> Result<()> {
        if index >= self.nb_clusters {
            return Err(Error::OutOfRange {
                file: self.name.clone(),
                what: "cluster",
                at: index,
                size: self.header.size,
            });
        }
        Ok(())
    }

    fn read(&self, structure: &'static str, buf: &mut [u8], offset: u64) -> Result<()> {
        self.r.read_at(buf, offset).map_err(|source| Error::Io {
            file: self.name.clone(),
            structure,
            offset,
            source,
        })
    }

    /// The state of guest cluster `index` in this image.
    pub fn cluster(&self, index: u64) -> Result<Cluster> {
        self.check_index(index)?;
        let l2 = self.l1[(index / self.l2_entries()) as usize];
        if l2 == 0 {
            return Ok(Cluster::Unallocated);
        }
        let at = l2 + (index % self.l2_entries()) * 8;
        let mut e = [0u8; 8];
        self.read("L2 entry", &mut e, at)?;
        self.classify(index, u64::from_be_bytes(e), at)
    }

    /// Reads Data cluster `index` into `buf` (one cluster long). A cluster the file ends
    /// within reads as zeros past the end, as QEMU reads it.
    pub fn read_cluster(&self, index: u64, buf: &mut [u8]) -> Result<()> {
        if buf.len() as u64 != self.cluster_size() {
            return Err(Error::Invalid {
                file: self.name.clone(),
                what: format!(
                    "read_cluster: buffer of {} bytes, cluster size {}",
                    buf.len(),
                    self.cluster_size()
                ),
            });
        }
        match self.cluster(index)? {
            Cluster::Data { host_offset } => {
                let n = (self.file_len - host_offset).min(self.cluster_size()) as usize;
                let (head, tail) = buf.split_at_mut(n);
                self.read("data cluster", head, host_offset)?;
                tail.fill(0);
                Ok(())
            }
            other => Err(Error::Invalid {
                file: self.name.clone(),
                what: format!("read_cluster: guest cluster {index} is {other:?}, not data"),
            }),
        }
    }

    /// Every guest cluster that is not Unallocated, ascending.
    pub fn allocated(&self) -> Result<Vec<(u64, Cluster)>> {
        let n = self.l2_entries();
        let mut out = Vec::new();
        let mut table = vec![0u8; self.cluster_size() as usize];
        for (i, &l2) in self.l1.iter().enumerate() {
            if l2 == 0 {
                continue;
            }
            self.read("L2 table", &mut table, l2)?;
            let first = i as u64 * n;
            for (j, e) in table.chunks_exact(8).enumerate() {
                let index = first + j as u64;
                if index >= self.nb_clusters {
                    break;
                }
                let mut v = [0u8; 8];
                v.copy_from_slice(e);
                match self.classify(index, u64::from_be_bytes(v), l2 + j as u64 * 8)? {
                    Cluster::Unallocated => {}
                    c => out.push((index, c)),
                }
            }
        }
        Ok(out)
    }
}
