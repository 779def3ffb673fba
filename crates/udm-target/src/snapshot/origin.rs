//! `snapshot-origin <dev>`: reads pass through; a write first makes every active snapshot that
//! lacks the chunk copy it into its COW (the kernel's `do_origin` / `__origin_write`), and only
//! then reaches the origin.

use std::collections::HashSet;
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

/// Writes `bio` (absolute origin sectors) to `origin` once every snapshot of `snaps` lacking
/// one of its chunks has copied it (the kernel splits the bio at the smallest chunk size and
/// queues each piece behind its pending exceptions; here the copies of all pieces are made,
/// committed together, and the bio is then written in one piece).
pub fn origin_write(
    snaps: &[Arc<Snap>],
    origin: &dyn BlockDevice,
    bio: Bio<'_>,
) -> Result<(), IoError> {
    if let Some(step) = min_chunk(snaps) {
        ensure_copied(snaps, origin, bio.sector, bio.end(), step);
    }
    origin.submit(bio)
}

/// `__origin_write` without a bio (`origin_write_extent`): copies the chunks of
/// `[start, end)` into every active, valid, non-merging snapshot that lacks them, and waits
/// until those exceptions are committed. Failures invalidate the snapshot concerned; the origin
/// write itself always proceeds, as in the kernel.
///
/// Deadlock freedom: chunk locks are taken first, in one global order (piece by piece, and
/// within a piece in list order, largest chunk first, so by chunk start then size); exceptions
/// are allocated only once every lock is held, so a thread never blocks on a lock while it holds
/// an allocation that another thread's commit waits for.
pub fn ensure_copied(
    snaps: &[Arc<Snap>],
    origin: &dyn BlockDevice,
    start: u64,
    end: u64,
    step: u64,
) {
    let mut locked = Vec::new();
    let mut seen: HashSet<(usize, u64)> = HashSet::new();
    let mut p = start;
    while p < end {
        for (i, s) in snaps.iter().enumerate() {
            if s.merge || p >= s.table_end {
                continue;
            }
            let (chunk, cs, store) = {
                let st = s.state.read();
                if !st.valid || !st.active || st.chunk_size == 0 {
                    continue;
                }
                let chunk = p / st.chunk_size;
                if st.exceptions.contains_key(&chunk) || seen.contains(&(i, chunk)) {
                    continue;
                }
                (chunk, st.chunk_size, st.store.clone())
            };
            seen.insert((i, chunk));
            let guard = s.locks.exclusive(chunk);
            locked.push((s, chunk, cs, store, guard));
        }
        p = (p / step + 1) * step;
    }
    if locked.is_empty() {
        return;
    }
    let mut pending = Vec::new();
    for (s, chunk, cs, store, guard) in locked {
        {
            let st = s.state.read();
            if !st.valid
                || !st.active
                || st.exceptions.contains_key(&chunk)
                || !Arc::ptr_eq(&st.store, &store)
            {
                continue;
            }
        }
        let Some(ticket) = store.prepare() else {
            let mut st = s.state.write();
            s.invalidate(&mut st, "Unable to allocate exception.");
            continue;
        };
        pending.push((s, chunk, cs, store, ticket, guard));
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut have: Option<(u64, u64)> = None;
    for (s, chunk, cs, store, ticket, _) in &pending {
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
}
