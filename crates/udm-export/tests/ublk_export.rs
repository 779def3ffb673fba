//! The ublk export against the kernel driver. Needs root and `ublk_drv` (/dev/ublk-control);
//! without them it prints that it skipped. Build with `--features ublk`.
#![cfg(feature = "ublk")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use udm_export::ublk::{UblkExport, UblkOptions};
use udm_io::backend::mem::MemDevice;

#[test]
fn ublk_block_device_reads_and_writes_reach_the_device() {
    if !Path::new("/dev/ublk-control").exists() {
        eprintln!("SKIPPED: skipped: no ublk_drv (/dev/ublk-control is absent)");
        return;
    }
    // SAFETY: geteuid has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: not root");
        return;
    }
    let mem = Arc::new(MemDevice::new(2048));
    let export = UblkExport::start("ublk-test", mem.clone(), &UblkOptions::default()).unwrap();
    let path = export.path().to_path_buf();
    assert!(path.to_string_lossy().starts_with("/dev/ublkb"));
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&data, 4096).unwrap();
        f.sync_all().unwrap();
        assert_eq!(&mem.contents()[4096..4096 + 65536], &data[..]);
        let mut back = vec![0u8; 65536];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
    }
    export.stop().unwrap();
    assert!(!path.exists());
}
