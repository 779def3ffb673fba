//! `snapshot-origin <dev>`: reads pass through; a write first makes every active snapshot that
//! lacks the chunk copy it into its COW (the kernel's `do_origin` / `__origin_write`), and only
//! then reaches the origin.

use std::sync::Arc;

use udm_io::{Bio, BioKind, BlockDevice, IoError};

use super::snap::{copy_chunk, Snap};
use super::{min_chunk, OriginEntry, Origins};
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
        if args.len() != 1 {
            return Err(TargetError::invalid(
                "origin: incorrect number of arguments",
            ));
        }
        let dev = ctx.get_device(&args[0]).map_err(|e| {
            TargetError::new(e.errno, format!("Cannot get target device: {}", e.msg))
        })?;
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
        if bio.is_empty_flush() {
            return self.dev.dev.submit(bio);
        }
        let abs = self.begin + bio.sector;
        match bio.kind() {
            BioKind::Read => self.dev.dev.submit(bio.at(abs)),
            BioKind::Write => {
                let snaps = self.entry.snaps.read();
                origin_write(&snaps, &*self.dev.dev, bio.at(abs))
            }
            k => Err(IoError::Unsupported {
                op: k,
                device: "snapshot-origin".into(),
            }),
        }
    }

    fn table_params(&self) -> String {
        self.dev.id.to_string()
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
}

/// Writes `bio` (absolute origin sectors) to `origin`, split at the smallest chunk size of
/// `snaps`, each piece after the snapshots lacking its chunk have copied it.
pub fn origin_write(
    snaps: &[Arc<Snap>],
    origin: &dyn BlockDevice,
    bio: Bio<'_>,
) -> Result<(), IoError> {
    let Some(step) = min_chunk(snaps) else {
        return origin.submit(bio);
    };
    let mut rest = Some(bio);
    while let Some(b) = rest.take() {
        let avail = step - (b.sector & (step - 1));
        let (head, tail) = b.split(avail);
        rest = tail;
        let sector = head.sector;
        origin_write_piece(snaps, origin, sector, Some(head))?;
    }
    Ok(())
}

/// `__origin_write` for one piece that lies inside one chunk of every snapshot: copies the
/// chunk into each active, valid, non-merging snapshot that lacks it, waits until those
/// exceptions are committed, then submits `bio` (if any) to the origin.
pub fn origin_write_piece(
    snaps: &[Arc<Snap>],
    origin: &dyn BlockDevice,
    sector: u64,
    bio: Option<Bio<'_>>,
) -> Result<(), IoError> {
    let mut pending = Vec::new();
    for s in snaps {
        if s.merge || sector >= s.table_end {
            continue;
        }
        let (chunk, store) = {
            let st = s.state.read();
            if !st.valid || !st.active || st.chunk_size == 0 {
                continue;
            }
            let chunk = sector / st.chunk_size;
            if st.exceptions.contains_key(&chunk) {
                continue;
            }
            (chunk, st.store.clone())
        };
        let guard = s.locks.exclusive(chunk);
        let cs = {
            let st = s.state.read();
            if !st.valid
                || !st.active
                || st.exceptions.contains_key(&chunk)
                || !Arc::ptr_eq(&st.store, &store)
            {
                continue;
            }
            st.chunk_size
        };
        let Some(ticket) = store.prepare() else {
            let mut st = s.state.write();
            s.invalidate(&mut st, "Unable to allocate exception.");
            continue;
        };
        pending.push((s, chunk, cs, store, ticket, guard));
    }
    // Copy the chunk into every snapshot that needs it, reading the origin once per chunk
    // geometry.
    let mut buf: Vec<u8> = Vec::new();
    let mut have: Option<(u64, u64)> = None;
    for (s, chunk, cs, store, ticket, _) in pending.iter().rev() {
        let ok = copy_chunk(
            s,
            origin,
            *chunk,
            *cs,
            ticket.new_chunk,
            &mut buf,
            &mut have,
        );
        store.complete(*ticket, *chunk, ok);
    }
    for (s, chunk, _, store, ticket, guard) in pending {
        let valid = store.wait(ticket);
        s.finish(chunk, ticket.new_chunk, valid);
        drop(guard);
    }
    match bio {
        Some(b) => origin.submit(b),
        None => Ok(()),
    }
}
