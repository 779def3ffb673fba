//! Checks on the exceptions of a persistent store being loaded. The kernel takes every entry
//! as it is; a crafted (or corrupt) store could then map a chunk onto the header or an
//! exception area, so that a snapshot write overwrites the metadata, or beyond the COW device.
//! Stores the kernel writes never hold such entries: it allocates data chunks in order from
//! chunk 2, skips every area's chunk, refuses a chunk past the device's end, and records each
//! old chunk and each new chunk once (merging only removes entries).

use udm_types::Errno;

use crate::target::TargetError;

/// Validates exceptions as they are read ([`Checker::exception`]), then, once all are read,
/// that no old or new chunk repeats ([`Checker::duplicates`]: two sorted arrays of chunk
/// numbers rather than hash sets, so the check costs 8 bytes per exception at a time).
pub(super) struct Checker {
    /// Whole chunks on the COW device.
    chunks: u64,
    /// `epa + 1`: area `i` is chunk `1 + i * stride`.
    stride: u64,
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
        }
    }

    fn area_chunk(&self, area: u64) -> u64 {
        area.saturating_mul(self.stride).saturating_add(1)
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
    /// EINVAL when it is the header or a metadata area's chunk.
    pub(super) fn exception(
        &self,
        area: u64,
        index: u64,
        old: u64,
        new: u64,
    ) -> Result<(), TargetError> {
        let what = || describe(area, index, self.area_chunk(area), old, new);
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
        // (0 cannot occur: it ends an area.)
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
        Ok(())
    }

    /// Refuses (EINVAL) two exceptions with the same old chunk or the same new chunk. `found`
    /// is every exception in on-disk order: exception `k` is entry `k % epa` of area
    /// `k / epa`, every area but the last being full.
    pub(super) fn duplicates(&self, found: &[(u64, u64)]) -> Result<(), TargetError> {
        let epa = self.stride - 1;
        let place = |k: usize| (k as u64 / epa.max(1), k as u64 % epa.max(1));
        for new_side in [false, true] {
            let key = |e: &(u64, u64)| if new_side { e.1 } else { e.0 };
            let mut v: Vec<u64> = found.iter().map(key).collect();
            // New chunks of a store written in allocation order are already increasing.
            if !v.windows(2).all(|w| w[0] < w[1]) {
                v.sort_unstable();
            }
            let Some(dup) = v.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]) else {
                continue;
            };
            drop(v);
            let mut at = found
                .iter()
                .enumerate()
                .filter(|(_, e)| key(e) == dup)
                .map(|(k, _)| k);
            let (Some(first), Some(second)) = (at.next(), at.next()) else {
                continue;
            };
            let (a1, i1) = place(first);
            let (a2, i2) = place(second);
            let (o1, n1) = found[first];
            let (o2, n2) = found[second];
            let what = describe(a2, i2, self.area_chunk(a2), o2, n2);
            return Err(TargetError::invalid(if new_side {
                format!(
                    "{what}, but new chunk {n2} is already used by exception {i1} of metadata \
                     area {a1} (old chunk {o1})"
                )
            } else {
                format!(
                    "{what}, but old chunk {o2} already has exception {i1} of metadata area \
                     {a1} (new chunk {n1})"
                )
            }));
        }
        Ok(())
    }
}
