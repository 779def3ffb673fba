//! Settings for threads that storage I/O waits on.

/// `prctl(PR_SET_IO_FLUSHER)` (Linux 5.6): not in every libc version, so spelled out here.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Marks the calling thread as an I/O flusher: its allocations never recurse into filesystem or
/// block I/O for reclaim (PF_MEMALLOC_NOIO) and it is exempt from dirty-page throttling
/// (PF_LOCAL_THROTTLE), as the kernel's own loop workers are. A thread that a request served to
/// a loop device over our own FUSE export waits on needs this, or reclaim may wait on itself.
/// Needs CAP_SYS_RESOURCE; the error says why it was refused.
pub fn mark_io_flusher() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only changes flags of the calling thread.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

thread_local! {
    static WAITED_FOR_DEVICE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Called by a device while it executes a request that waits: for a metadata commit (an era
/// target's first write to a block) or for its own I/O (a file read that missed the page
/// cache). Such waits overlap when requests arrive together, so the issuer should give the
/// device several requests at once rather than one at a time.
pub fn note_device_wait() {
    WAITED_FOR_DEVICE.with(|w| w.set(true));
}

/// Whether a request executed on this thread since the last call waited for the device (and
/// forgets it).
pub fn took_device_wait() -> bool {
    WAITED_FOR_DEVICE.with(|w| w.replace(false))
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_waits_are_per_thread_and_taken_once() {
        assert!(!super::took_device_wait());
        super::note_device_wait();
        std::thread::spawn(|| assert!(!super::took_device_wait()))
            .join()
            .expect("thread");
        assert!(super::took_device_wait());
        assert!(!super::took_device_wait());
    }
}
