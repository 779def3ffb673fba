//! Checks on the exceptions of a persistent store being loaded. The kernel takes every entry
//! as it is; a crafted (or corrupt) store could then map a chunk onto the header or an
//! exception area, so that a snapshot write overwrites the metadata, or beyond the COW device.
//! Stores the kernel writes never hold such entries: it allocates data chunks in order from
//! chunk 2, skips every area's chunk, refuses a chunk past the device's end, and records each
//! old chunk and each new chunk once (merging only removes entries).

use std::collections::HashMap;

use udm_types::Errno;

use crate::target::TargetError;

/// Where an exception sits on disk: `(area, index in the area)`.
type Place = (u64, u64);

/// Validates exceptions one by one, in on-disk order.
pub(super) struct Checker {
    /// Whole chunks on the COW device.
    chunks: u64,
    /// `epa + 1`: area `i` is chunk `1 + i * stride`.
    stride: u64,
    olds: HashMap<u64, (Place, u64)>,
    news: HashMap<u64, (Place, u64)>,
}

fn describe(area: u64, index: u64, area_chunk: u64, old: u64, new: u64) -> String {
    format!(
        "Failed to read snapshot metadata: exception {index} of metadata area {area} \
         (chunk {area_chunk}) maps old chunk {old} to new chunk {new}"
    )
}

impl Checker {
    /// A checker for a COW device of `cow_sectors` sectors in chunks of `chunk_size`
    /// sectors, with `epa` exceptions per area.
    pub(super) fn new(cow_sectors: u64, chunk_size: u64, epa: u64) -> Self {
        Checker {
            chunks: cow_sectors / chunk_size.max(1),
            stride: epa + 1,
            olds: HashMap::new(),
            news: HashMap::new(),
        }
    }

    /// Refuses metadata area `area` (at chunk `area_chunk`) when it does not fit on the
    /// device: the previous area is full, which the kernel only writes after zeroing this one.
    pub(super) fn area(&self, area: u64, area_chunk: u64) -> Result<(), TargetError> {
        if area_chunk >= self.chunks {
            return Err(TargetError::new(
                Errno::ENXIO,
                format!(
                    "Failed to read snapshot metadata: metadata area {} is full but metadata \
                     area {area} (chunk {area_chunk}) lies beyond the end of the COW device \
                     ({} chunks)",
                    area.saturating_sub(1),
                    self.chunks
                ),
            ));
        }
        Ok(())
    }

    /// Checks exception `index` of area `area`: ENXIO when its new chunk is past the device,
    /// EINVAL when it is a metadata chunk or when its old or new chunk was seen before.
    pub(super) fn exception(
        &mut self,
        area: u64,
        index: u64,
        area_chunk: u64,
        old: u64,
        new: u64,
    ) -> Result<(), TargetError> {
        let what = || describe(area, index, area_chunk, old, new);
        if new >= self.chunks {
            return Err(TargetError::new(
                Errno::ENXIO,
                format!(
                    "{}, beyond the end of the COW device ({} chunks)",
                    what(),
                    self.chunks
                ),
            ));
        }
        if new == 0 {
            return Err(TargetError::invalid(format!(
                "{}, the header chunk",
                what()
            )));
        }
        if new % self.stride == 1 {
            return Err(TargetError::invalid(format!(
                "{}, which is the chunk of metadata area {}",
                what(),
                new / self.stride
            )));
        }
        if let Some(((a, i), n)) = self.olds.get(&old) {
            return Err(TargetError::invalid(format!(
                "{}, but old chunk {old} already has exception {i} of metadata area {a} \
                 (new chunk {n})",
                what()
            )));
        }
        if let Some(((a, i), o)) = self.news.get(&new) {
            return Err(TargetError::invalid(format!(
                "{}, but new chunk {new} is already used by exception {i} of metadata area {a} \
                 (old chunk {o})",
                what()
            )));
        }
        self.olds.insert(old, ((area, index), new));
        self.news.insert(new, ((area, index), old));
        Ok(())
    }
}
