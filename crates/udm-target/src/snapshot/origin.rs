//! `snapshot-origin <dev>`: reads pass through; a write first makes every active snapshot that
//! lacks the chunk copy it into its COW (the kernel's `do_origin` / `__origin_write`), and only
//! then reaches the origin; the copies are [`super::cow`]'s. Plain writes that need copies
//! into persistent stores are acknowledged once held and written to the origin after the
//! commit (see [`super::writeback`]); those whose copies all go to transient stores, which
//! have nothing to make durable, are copied and written by their writer, as in the kernel.

use std::sync::Arc;

use udm_io::{Bio, BioFlags, BioKind, BioOp, BlockDevice, Extent, IoError};
use udm_types::SECTOR_SHIFT;

use super::cow::{all_transient, allocate, copy_and_commit, lock_chunks, origin_write, Copies};
use super::{OriginEntry, Origins};
use crate::args::{get_device_as, FromArgs, OriginParams};
use crate::target::{CtorContext, DevRef, Target, TargetCaps, TargetError, TargetType};

/// The `snapshot-origin` target type (version 1.9.0).
pub struct OriginType;

impl TargetType for OriginType {
    fn name(&self) -> &'static str {
        "snapshot-origin"
    }

    fn version(&self) -> [u32; 3] {
        [1, 9, 0]
    }

    fn construct(
        &self,
        ctx: &mut dyn CtorContext,
        args: &[String],
    ) -> Result<Box<dyn Target>, TargetError> {
        let p = OriginParams::from_args(args)?;
        let dev = get_device_as(ctx, &p.dev, "Cannot get target device")?;
        let entry = ctx.env().get::<Origins>().entry(dev.id);
        Ok(Box::new(OriginTarget {
            dev,
            begin: ctx.begin(),
            entry,
        }))
    }
}

/// A live `snapshot-origin` line.
pub struct OriginTarget {
    dev: DevRef,
    begin: u64,
    entry: Arc<OriginEntry>,
}

impl Target for OriginTarget {
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError> {
        let wb = &self.entry.writeback;
        if bio.is_empty_flush() {
            wb.barrier()?;
            return self.dev.dev.submit(bio);
        }
        let abs = self.begin + bio.sector;
        let end = abs.saturating_add(bio.sectors());
        match bio.kind() {
            BioKind::Read => {
                let flags = bio.flags;
                let BioOp::Read(buf) = bio.op else {
                    return Err(IoError::Unsupported {
                        op: bio.kind(),
                        device: "snapshot-origin".into(),
                    });
                };
                wb.read(&*self.dev.dev, abs, buf, flags)
            }
            BioKind::Write => {
                if bio.flags.intersects(BioFlags::PREFLUSH | BioFlags::FUA) {
                    // Ordered after every acknowledged write, and durable when acknowledged:
                    // the kernel's path. A PREFLUSH is a flush, so it reports a held write
                    // that failed; a FUA write leaves that to the next flush.
                    if bio.flags.contains(BioFlags::PREFLUSH) {
                        wb.barrier()?;
                    } else {
                        wb.settle();
                    }
                    let snaps = self.entry.snaps.read();
                    return origin_write(&snaps, &*self.dev.dev, bio.at(abs));
                }
                let len = ((end - abs) << SECTOR_SHIFT) as usize;
                let (snaps, locked) = loop {
                    let snaps = self.entry.snaps.read();
                    if snaps.iter().any(|s| s.merge) {
                        // A merge moves data into the origin: keep its writes synchronous.
                        wb.wait_clear(abs, end);
                        return origin_write(&snaps, &*self.dev.dev, bio.at(abs));
                    }
                    let locked = lock_chunks(&snaps, abs, end);
                    if locked.is_empty() {
                        // Nothing to copy: straight to the origin, or held behind an
                        // overlapping held write (never waiting for room).
                        return wb.write_through(&self.dev.dev, bio.at(abs));
                    }
                    if all_transient(&locked) {
                        // Nothing to make durable: this writer copies (a read and a COW write)
                        // and writes in its own thread, after any held write it overlaps, as
                        // the kernel's origin writes do. Held, 4k random writes outran the
                        // write-back's one applier and waited for room in steps of its
                        // releases (bench-snapshot-cycles: a transient snapshot's take and
                        // drop under load), and a drop waited for its backlog.
                        wb.wait_clear(abs, end);
                        copy_and_commit(&*self.dev.dev, locked);
                        let r = self.dev.dev.submit(bio.at(abs));
                        drop(snaps);
                        return r;
                    }
                    if wb.has_room(len) {
                        break (snaps, locked);
                    }
                    // At the memory bound: wait for room without the snapshot list or chunk
                    // locks (nothing is allocated yet), so that a snapshot being removed, and
                    // every writer behind it, does not wait for this one; then look again.
                    drop(locked);
                    drop(snaps);
                    wb.wait_room(len);
                };
                let Some(data) = bio.keep_data() else {
                    return Err(IoError::Unsupported {
                        op: bio.kind(),
                        device: "snapshot-origin".into(),
                    });
                };
                // Still under the read side of `snaps`: no snapshot becomes active before this
                // write is held (and so settled by the activation).
                let r = wb.hold(&self.dev.dev, abs, data, || Copies(allocate(locked)));
                drop(snaps);
                r
            }
            k => Err(IoError::Unsupported {
                op: k,
                device: "snapshot-origin".into(),
            }),
        }
    }

    /// Settles held writes while I/O still flows, so that the settle after the device stops
    /// taking I/O (postsuspend) only has what arrived meanwhile: a suspend (snapshot take, an
    /// interposer detach) holds the origin's clients for that much less.
    fn presuspend(&self) {
        self.entry.writeback.settle();
    }

    fn postsuspend(&self) {
        self.entry.writeback.settle();
    }

    fn drain_writeback(&self) {
        self.entry.writeback.settle();
    }

    fn table_params(&self) -> String {
        OriginParams {
            dev: self.dev.id.to_string(),
        }
        .to_string()
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps {
            flush: true,
            discard: false,
            write_zeroes: false,
        }
    }

    fn devices(&self) -> Vec<DevRef> {
        vec![self.dev.clone()]
    }

    /// The origin's status, except that a range with a write acknowledged but not yet applied
    /// (held while its copies are made) is data. Checked before and after asking the origin,
    /// so a held write applied meanwhile is seen one way or the other.
    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        self.entry
            .writeback
            .block_status(&*self.dev.dev, self.begin + sector, sectors)
    }
}

impl Drop for OriginTarget {
    /// A table being destroyed still owes its acknowledged writes to the origin.
    fn drop(&mut self) {
        self.entry.writeback.settle();
    }
}
