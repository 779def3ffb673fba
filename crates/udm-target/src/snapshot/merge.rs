//! The merge worker of `snapshot-merge` (`snapshot_merge_next_chunks` / `merge_callback`):
//! repeatedly takes the last run of consecutive exceptions, makes the other snapshots of the
//! origin copy those chunks first, copies COW -> origin, flushes the origin, clears the entries
//! on disk (FLUSH|FUA), then drops them from memory. It runs on its own thread from resume to
//! presuspend; a reload continues from the on-disk state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use udm_io::{Bio, BlockDevice, IoError};
use udm_types::SECTOR_SIZE;

use super::cow::ensure_copied;
use super::state::Snap;

/// Largest single COW -> origin copy (a long run of consecutive chunks is copied in pieces).
const COPY_PIECE_SECTORS: u64 = 4096;

/// True while the worker runs (`RUNNING_MERGE`).
pub fn is_running(s: &Snap) -> bool {
    s.merge_ctl
        .lock()
        .handle
        .as_ref()
        .is_some_and(|h| !h.is_finished())
}

/// Starts the worker if it is not running (`start_merge`).
pub fn start_merge(s: &Arc<Snap>) {
    let mut ctl = s.merge_ctl.lock();
    if let Some(h) = &ctl.handle {
        if !h.is_finished() {
            return;
        }
    }
    if let Some(h) = ctl.handle.take() {
        join_worker(h);
    }
    let stop = Arc::new(AtomicBool::new(false));
    ctl.stop = stop.clone();
    let snap = s.clone();
    let spawned = std::thread::Builder::new()
        .name("snapshot-merge".into())
        .spawn(move || {
            // A panic must not end the merge silently, with the status still showing progress.
            let run = std::panic::AssertUnwindSafe(|| merge_loop(&snap, &stop));
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!("the merge thread panicked: shutting down merge");
                snap.state.write().merge_failed = true;
                snap.events.raise();
            }
        });
    match spawned {
        Ok(h) => ctl.handle = Some(h),
        Err(e) => {
            tracing::error!("cannot start the merge thread: {e}");
            s.state.write().merge_failed = true;
        }
    }
}

/// Stops the worker and waits for it (`stop_merge`); the current step finishes first.
pub fn stop_merge(s: &Snap) {
    let h = {
        let mut ctl = s.merge_ctl.lock();
        ctl.stop.store(true, Ordering::SeqCst);
        ctl.handle.take()
    };
    if let Some(h) = h {
        if h.thread().id() != std::thread::current().id() {
            join_worker(h);
        }
    }
}

/// Joins a finished or stopping worker. Its panics are caught inside it; one that escaped
/// anyway is logged here, not dropped.
fn join_worker(h: JoinHandle<()>) {
    if h.join().is_err() {
        tracing::error!("the merge thread panicked");
    }
}

fn merge_loop(s: &Arc<Snap>, stop: &AtomicBool) {
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match merge_step(s) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!("{e}: shutting down merge");
                s.state.write().merge_failed = true;
                s.events.raise();
                return;
            }
        }
    }
}

/// One merge step; `Ok(false)` when there is nothing (more) to merge.
fn merge_step(s: &Arc<Snap>) -> Result<bool, String> {
    let (valid, store, cs) = {
        let st = s.state.read();
        (st.valid, st.store.clone(), st.chunk_size)
    };
    if !valid {
        tracing::error!("Snapshot is invalid: can't merge");
        return Ok(false);
    }
    let next = store
        .with(|x| x.prepare_merge())
        .map_err(|e| format!("Read error in exception store: {e}"))?;
    let Some((last_old, last_new, n)) = next else {
        tracing::info!("Merge complete.");
        s.events.raise();
        return Ok(false);
    };
    let corrupt = || format!("Corrupt exception store: exception ({last_old}, {last_new}) x{n}");
    let old = last_old
        .checked_add(1)
        .and_then(|x| x.checked_sub(n))
        .ok_or_else(corrupt)?;
    let new = last_new
        .checked_add(1)
        .and_then(|x| x.checked_sub(n))
        .ok_or_else(corrupt)?;
    let origin: &dyn BlockDevice = &*s.origin.dev;
    let io_size = n.checked_mul(cs).ok_or_else(corrupt)?;
    let dest = old.checked_mul(cs).ok_or_else(corrupt)?;
    let src = new.checked_mul(cs).ok_or_else(corrupt)?;
    if dest >= origin.size() {
        return Err(corrupt());
    }
    let count = io_size.min(origin.size().saturating_sub(dest));
    // origin_write_extent: other snapshots copy the chunks before the origin changes.
    {
        let snaps = s.entry.snaps.read();
        ensure_copied(&snaps, origin, dest, dest + io_size);
    }
    // Writes to these chunks wait until they are merged.
    let guards: Vec<_> = (old..old + n).map(|c| s.locks.exclusive(c)).collect();
    copy(s, src, dest, count).map_err(|e| format!("Read/Write error: {e}"))?;
    origin
        .submit(Bio::flush())
        .map_err(|e| format!("Flush after merge failed: {e}"))?;
    store
        .with(|x| x.commit_merge(n))
        .map_err(|e| format!("Write error in exception store: {e}"))?;
    {
        let mut st = s.state.write();
        for c in old..old + n {
            if st.exceptions.remove(&c).is_none() {
                return Err(format!(
                    "Corruption detected: exception for block {c} is on disk but not in memory"
                ));
            }
        }
    }
    drop(guards);
    Ok(true)
}

fn copy(s: &Snap, src: u64, dest: u64, count: u64) -> Result<(), IoError> {
    let mut buf = Vec::new();
    let mut off = 0;
    while off < count {
        let n = COPY_PIECE_SECTORS.min(count - off);
        buf.resize((n * SECTOR_SIZE) as usize, 0);
        s.cow.dev.submit(Bio::read(src + off, &mut buf))?;
        s.origin.dev.submit(Bio::write(dest + off, &buf))?;
        off += n;
    }
    Ok(())
}
