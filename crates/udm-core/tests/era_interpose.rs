//! era interposed on a device in use (`era META [interpose]DEV BS`): the device's own clients'
//! writes pass through era and are tracked, era by era; removing the interposer leaves the
//! metadata with every write in its era.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::sync::Arc;

use udm_core::registry::LoadFlags;
use udm_core::Registry;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice};
use udm_target::era::{DevStore, Metadata};
use udm_testkit::core::create;

#[test]
fn era_interposed_on_an_exported_device_tracks_its_clients_writes() {
    let reg = Registry::new();
    let data = Arc::new(MemDevice::new(2048));
    let meta = Arc::new(MemDevice::new(8 * 64));
    reg.add_disk_device("d", data.clone()).unwrap();
    reg.add_disk_device("m", meta.clone()).unwrap();
    let _export = reg.open_export("d", "nbd:d").unwrap();
    create(
        &reg,
        "trk",
        "0 2048 era m [interpose]d 128",
        LoadFlags::default(),
    )
    .unwrap();
    assert_eq!(reg.info("trk").unwrap().interposers.len(), 1);
    let status = |reg: &Registry| reg.status("trk", false).unwrap()[0].params.clone();
    assert!(status(&reg).ends_with(" 1 -"), "{}", status(&reg));
    let node = reg.node("d").unwrap();
    node.submit(Bio::write(3 * 128, &[3u8; 4096])).unwrap();
    reg.message("trk", 0, &["checkpoint".to_string()]).unwrap();
    assert!(status(&reg).ends_with(" 2 -"), "{}", status(&reg));
    node.submit(Bio::write(5 * 128 + 8, &[5u8; 512])).unwrap();
    assert_eq!(
        data.contents()[3 * 65536],
        3,
        "the write reached the device"
    );
    reg.remove("trk", false, false).unwrap();
    let md = Metadata::open(Box::new(DevStore::new(meta.clone())), 128).unwrap();
    let mut want = vec![0u32; 16];
    want[3] = 1;
    want[5] = 2;
    assert_eq!(md.logical_eras().unwrap(), want);
}
