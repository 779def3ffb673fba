//! Metadata contexts: `base:allocation` (every export) and `qemu:dirty-bitmap:NAME` (one per
//! dirty bitmap given with the export; libvirt names them `backup-<DEV>`). Pure: which contexts
//! a LIST or SET query selects, and the block-status descriptors of a bitmap, so each rule is
//! unit-tested without a connection.
//!
//! Context ids are fixed per export (base 1, bitmap `i` 2 + `i`), as qemu-nbd's are: a client
//! matches the ids of a BLOCK_STATUS reply to the names SET_META_CONTEXT returned.

use super::proto::META_BASE_ALLOCATION;
use super::NbdBitmap;

/// Name prefix of dirty-bitmap contexts (qemu's namespace).
pub const META_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// Block-status flag of a dirty-bitmap context: the range changed since the bitmap's point.
pub const STATE_DIRTY: u32 = 1;

/// Id of `base:allocation`.
pub(super) const ID_BASE: u32 = 1;

/// Contexts a session selected with SET_META_CONTEXT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct MetaSel {
    /// `base:allocation`.
    pub base: bool,
    /// Indices into the export's bitmaps.
    pub bitmaps: Vec<usize>,
}

impl MetaSel {
    /// Whether any context was selected (BLOCK_STATUS is allowed).
    pub fn any(&self) -> bool {
        self.base || !self.bitmaps.is_empty()
    }
}

/// Id of bitmap `i`.
pub(super) fn bitmap_id(i: usize) -> u32 {
    2u32.saturating_add(u32::try_from(i).unwrap_or(u32::MAX - 2))
}

/// `(id, name)` of every context `queries` select on an export with `bitmaps`, in id order.
/// SET matches exact names only; LIST also takes an empty list (everything) and the namespace
/// queries `base:`, `qemu:` and `qemu:dirty-bitmap:`. Unknown names select nothing.
pub(super) fn matching(bitmaps: &[NbdBitmap], queries: &[&str], set: bool) -> Vec<(u32, String)> {
    let all = !set && queries.is_empty();
    let wants = |name: &str, namespaces: &[&str]| {
        all || queries
            .iter()
            .any(|q| *q == name || (!set && namespaces.contains(q)))
    };
    let mut out = Vec::new();
    if wants(META_BASE_ALLOCATION, &["base:"]) {
        out.push((ID_BASE, META_BASE_ALLOCATION.to_string()));
    }
    for (i, b) in bitmaps.iter().enumerate() {
        let name = format!("{META_DIRTY_BITMAP}{}", b.name);
        if wants(&name, &["qemu:", META_DIRTY_BITMAP]) {
            out.push((bitmap_id(i), name));
        }
    }
    out
}

/// The selection that SET's reply `(id, name)` list stands for.
pub(super) fn selection(chosen: &[(u32, String)]) -> MetaSel {
    let mut sel = MetaSel::default();
    for (id, _) in chosen {
        match *id {
            ID_BASE => sel.base = true,
            id => sel.bitmaps.push((id - 2) as usize),
        }
    }
    sel
}

/// Descriptors `(length, flags)` of bitmap `b` for `len` bytes at `offset` (`len` already cut
/// to the export's end): one per run of equal state, each at most `max_desc` bytes; only the
/// first when `one` (`NBD_CMD_FLAG_REQ_ONE`).
pub(super) fn bitmap_descs(
    b: &NbdBitmap,
    offset: u64,
    len: u64,
    max_desc: u64,
    one: bool,
) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for (bytes, dirty) in b
        .bitmap
        .runs_upto(offset, len, if one { 1 } else { usize::MAX })
    {
        let flags = if dirty { STATE_DIRTY } else { 0 };
        let mut left = bytes;
        while left > 0 {
            let n = left.min(max_desc);
            out.push((n as u32, flags));
            left -= n;
        }
    }
    if out.is_empty() {
        // Past the bitmap's end (a device grown since): nothing is known dirty there.
        out.push((len.clamp(1, max_desc) as u32, 0));
    }
    if one {
        out.truncate(1);
    }
    out
}

/// `base:allocation` descriptors `(bytes, flags)` rounded to the minimum block size `min`,
/// each at most `max_desc` bytes (a multiple of `min`), neighbours of equal flags merged. A
/// block whose parts differ gets only the flags all its parts have: a block holding any data
/// is data, a hole or zero only when wholly one (a client may skip copying it). A last block
/// that the descriptors only begin is counted whole.
pub(super) fn round_descs(descs: &[(u64, u32)], min: u64, max_desc: u64) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut emit = |mut bytes: u64, flags: u32| {
        while bytes > 0 {
            match out.last_mut() {
                Some(l) if l.1 == flags && u64::from(l.0) < max_desc => {
                    let n = bytes.min(max_desc - u64::from(l.0));
                    l.0 += n as u32;
                    bytes -= n;
                }
                _ => {
                    let n = bytes.min(max_desc);
                    out.push((n as u32, flags));
                    bytes -= n;
                }
            }
        }
    };
    // The block being assembled: bytes of it seen, flags all of them have.
    let mut partial: Option<(u64, u32)> = None;
    for &(mut bytes, flags) in descs {
        if let Some((have, f)) = partial {
            let take = (min - have).min(bytes);
            bytes -= take;
            if have + take < min {
                partial = Some((have + take, f & flags));
                continue;
            }
            emit(min, f & flags);
            partial = None;
        }
        let whole = bytes / min * min;
        emit(whole, flags);
        if bytes > whole {
            partial = Some((bytes - whole, flags));
        }
    }
    if let Some((_, f)) = partial {
        emit(min, f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use udm_types::DirtyBitmap;

    fn bitmaps() -> Vec<NbdBitmap> {
        let mut b = DirtyBitmap::new(1 << 20, 65536).expect("bitmap");
        b.set(1);
        b.set(2);
        b.set(15);
        ["backup-vol", "other"]
            .iter()
            .map(|n| NbdBitmap {
                name: n.to_string(),
                bitmap: Arc::new(b.clone()),
            })
            .collect()
    }

    fn names(v: Vec<(u32, String)>) -> Vec<String> {
        v.into_iter().map(|(id, n)| format!("{id}={n}")).collect()
    }

    #[test]
    fn list_queries_select_by_namespace_and_set_by_exact_name() {
        let b = bitmaps();
        let all = [
            "1=base:allocation",
            "2=qemu:dirty-bitmap:backup-vol",
            "3=qemu:dirty-bitmap:other",
        ];
        assert_eq!(names(matching(&b, &[], false)), all);
        assert_eq!(names(matching(&b, &["qemu:"], false)), all[1..]);
        assert_eq!(
            names(matching(&b, &["qemu:dirty-bitmap:"], false)),
            all[1..]
        );
        assert_eq!(names(matching(&b, &["base:"], false)), all[..1]);
        // SET: namespaces and an empty list select nothing; exact names select themselves.
        assert!(matching(&b, &[], true).is_empty());
        assert!(matching(&b, &["qemu:", "base:"], true).is_empty());
        assert_eq!(
            names(matching(
                &b,
                &["qemu:dirty-bitmap:other", "base:allocation", "nope"],
                true
            )),
            ["1=base:allocation", "3=qemu:dirty-bitmap:other"]
        );
        assert!(matching(&b, &["qemu:dirty-bitmap:backup"], true).is_empty());
        assert!(matching(&[], &["qemu:dirty-bitmap:backup-vol"], true).is_empty());
        let sel = selection(&matching(&b, &["qemu:dirty-bitmap:other"], true));
        assert_eq!(
            sel,
            MetaSel {
                base: false,
                bitmaps: vec![1]
            }
        );
        assert!(sel.any());
        assert!(!MetaSel::default().any());
    }

    #[test]
    fn bitmap_descriptors_follow_the_runs() {
        let b = &bitmaps()[0];
        let k = 65536u32;
        assert_eq!(
            bitmap_descs(b, 0, 1 << 20, u64::from(u32::MAX), false),
            [(k, 0), (2 * k, 1), (12 * k, 0), (k, 1)]
        );
        assert_eq!(
            bitmap_descs(b, 0, 1 << 20, u64::from(u32::MAX), true),
            [(k, 0)]
        );
        assert_eq!(
            bitmap_descs(b, u64::from(k) + 512, 1024, u64::from(u32::MAX), false),
            [(1024, 1)]
        );
        // Long runs split at the descriptor limit.
        assert_eq!(
            bitmap_descs(
                b,
                3 * u64::from(k),
                12 * u64::from(k),
                5 * u64::from(k),
                false
            ),
            [(5 * k, 0), (5 * k, 0), (2 * k, 0)]
        );
    }
    #[test]
    fn rounding_keeps_a_block_with_data_data() {
        const HZ: u32 = 3;
        // 512 bytes of data inside the second 4 KiB block: that block is data, not a hole.
        let d = [(4608, HZ), (512, 0), ((1 << 20) - 5120, HZ)];
        let total: u64 = d.iter().map(|x| x.0).sum();
        let r = round_descs(&d, 4096, 1 << 30);
        assert_eq!(r, vec![(4096, HZ), (4096, 0), ((total - 8192) as u32, HZ)]);
        // A block of hole and zero parts has what they share (zero).
        assert_eq!(
            round_descs(&[(512, 2), (3584, 3), (4096, 3)], 4096, 1 << 30),
            vec![(4096, 2), (4096, 3)]
        );
        // Aligned descriptors pass, neighbours merge, max_desc splits, a begun block counts.
        assert_eq!(
            round_descs(&[(8192, 0), (4096, 0), (8192, 1), (512, 1)], 4096, 8192),
            vec![(8192, 0), (4096, 0), (8192, 1), (4096, 1)]
        );
        assert_eq!(round_descs(&[(1024, 3)], 512, 1 << 30), vec![(1024, 3)]);
        assert_eq!(round_descs(&[], 512, 1 << 30), vec![]);
    }
}
