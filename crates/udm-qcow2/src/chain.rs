//! A top image and its backing files. A guest byte comes from the first image, top down, whose
//! cluster is Data or Zero; an image's bytes past its own virtual size read as zeros and hide
//! everything below it (QEMU reads a shorter backing file as zeros past its end).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::reader::{Cluster, Image};

/// The deepest chain `Chain::open` follows.
pub const MAX_DEPTH: usize = 256;

/// An image and its backing files, top first.
#[derive(Debug)]
pub struct Chain {
    images: Vec<Image>,
    paths: Vec<PathBuf>,
}

impl Chain {
    /// Opens `top` and follows backing names relative to each image's directory. Refuses
    /// (EINVAL naming the file) loops, more than 256 backing files, backing formats other than
    /// qcow2 and images whose cluster size differs from the top's. A backing file without a
    /// format extension is opened as qcow2 (and refused if it is not one).
    pub fn open(top: &Path) -> Result<Chain> {
        let mut images = Vec::new();
        let mut paths = Vec::new();
        let mut seen = HashSet::new();
        let mut path = top.to_path_buf();
        loop {
            let name = path.display().to_string();
            let canonical = path.canonicalize().map_err(|source| Error::Io {
                file: name.clone(),
                structure: "file",
                offset: 0,
                source,
            })?;
            if !seen.insert(canonical) {
                return Err(Error::Chain {
                    file: name,
                    what: "loop: the image is already in the chain".to_string(),
                });
            }
            let image = Image::open(&path)?;
            if let Some(first) = images.first() {
                let first: &Image = first;
                if image.cluster_bits() != first.cluster_bits() {
                    return Err(Error::Chain {
                        file: name,
                        what: format!(
                            "cluster size {} differs from the top's {}",
                            image.cluster_size(),
                            first.cluster_size()
                        ),
                    });
                }
            }
            let next = match (image.backing(), image.backing_format()) {
                (None, _) => None,
                (Some(b), fmt) => {
                    if let Some(f) = fmt.filter(|f| *f != "qcow2") {
                        return Err(Error::Chain {
                            file: name,
                            what: format!("backing file {b} has format {f}, not qcow2"),
                        });
                    }
                    let dir = path.parent().unwrap_or(Path::new(""));
                    Some(dir.join(b))
                }
            };
            images.push(image);
            paths.push(path);
            match next {
                None => break,
                Some(n) => {
                    if images.len() > MAX_DEPTH {
                        return Err(Error::Chain {
                            file: top.display().to_string(),
                            what: format!("more than {MAX_DEPTH} backing files"),
                        });
                    }
                    path = n;
                }
            }
        }
        Ok(Chain { images, paths })
    }

    /// The top image's virtual size.
    pub fn size(&self) -> u64 {
        self.images[0].size()
    }

    /// The images, top first.
    pub fn images(&self) -> &[Image] {
        &self.images
    }

    /// The paths of the images as followed, top first.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    fn top(&self) -> &Image {
        &self.images[0]
    }

    /// Which image (an index into `images()`) and state supply guest cluster `index`; None
    /// means zeros everywhere, including past the end of a smaller backing file. At cluster
    /// granularity: a cluster a smaller image ends within is partly zeros, which `read` applies.
    pub fn resolve(&self, index: u64) -> Result<Option<(usize, Cluster)>> {
        let top = self.top();
        if index >= top.nb_clusters() {
            return Err(Error::OutOfRange {
                file: top.name().to_string(),
                what: "cluster",
                at: index,
                size: top.size(),
            });
        }
        for (i, image) in self.images.iter().enumerate() {
            if index >= image.nb_clusters() {
                return Ok(None);
            }
            match image.cluster(index)? {
                Cluster::Unallocated => {}
                c => return Ok(Some((i, c))),
            }
        }
        Ok(None)
    }

    /// Reads `buf.len()` bytes at guest `offset` through the chain (zeros where nothing is
    /// allocated). EINVAL if the range goes past the virtual size.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let top = self.top();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > top.size())
        {
            return Err(Error::OutOfRange {
                file: top.name().to_string(),
                what: "byte range ending",
                at: offset.saturating_add(buf.len() as u64),
                size: top.size(),
            });
        }
        let cs = top.cluster_size();
        let bits = top.cluster_bits();
        let mut cluster = vec![0u8; cs as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = pos >> bits;
            let within = (pos - (index << bits)) as usize;
            let n = (cs as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            self.read_cluster_through(index, &mut cluster)?;
            out.copy_from_slice(&cluster[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// Guest cluster `index` through the chain, with every image's bytes past the smallest
    /// virtual size above or at it as zeros.
    fn read_cluster_through(&self, index: u64, buf: &mut [u8]) -> Result<()> {
        let start = index << self.top().cluster_bits();
        let mut limit = u64::MAX;
        for image in &self.images {
            limit = limit.min(image.size());
            if start >= limit {
                break;
            }
            match image.cluster(index)? {
                Cluster::Unallocated => continue,
                Cluster::Zero => break,
                Cluster::Data { .. } => {
                    image.read_cluster(index, buf)?;
                    let keep = (limit - start).min(buf.len() as u64) as usize;
                    buf[keep..].fill(0);
                    return Ok(());
                }
            }
        }
        buf.fill(0);
        Ok(())
    }
}
