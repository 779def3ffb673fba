//! A buffered read that misses the page cache notes a device wait
//! (`udm_io::thread::note_device_wait`), so the NBD server hands the client's next requests to
//! other threads and an uncached file is read in parallel; a read the cache holds notes none
//! (and stays on the reading thread).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::os::unix::io::AsRawFd;
use udm_io::backend::file::FileDevice;
use udm_io::thread::took_device_wait;
use udm_io::{Bio, BlockDevice};

#[test]
fn uncached_reads_note_a_wait_and_cached_ones_do_not() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = dir.path().join("f.img");
    std::fs::write(&p, vec![7u8; 4 << 20]).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    f.sync_all().unwrap();
    // SAFETY: statfs fills the zeroed struct it is given; the path is NUL-terminated.
    let memory_backed = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
    };
    if memory_backed {
        eprintln!(
            "SKIPPED uncached read test: {} is on tmpfs (always cached)",
            p.display()
        );
        return;
    }
    let d = FileDevice::open(&p, false).unwrap();
    let mut buf = vec![0u8; 4096];
    d.submit(Bio::read(0, &mut buf)).unwrap();
    let _ = took_device_wait();
    d.submit(Bio::read(0, &mut buf)).unwrap();
    assert!(!took_device_wait(), "a read of cached data noted a wait");
    assert_eq!(buf, vec![7u8; 4096]);
    // Evict the (clean) pages, then read from the middle of the file.
    // SAFETY: posix_fadvise only takes the fd and a range; it touches no memory of ours.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise(DONTNEED)");
    d.submit(Bio::read(4000, &mut buf)).unwrap();
    assert!(
        took_device_wait(),
        "a read that missed the page cache noted no wait"
    );
    assert_eq!(buf, vec![7u8; 4096], "the read after the wait has the data");
}
