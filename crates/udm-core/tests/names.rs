//! How devices are found and named (udm-core/src/registry/lookup.rs, lifecycle.rs, query.rs):
//! uuids (dm's 1 to 128 characters, unique, set once), lookups by uuid, requested minors, and
//! the ways a table names a device (name, `major:minor`, `/dev/mapper/NAME`, `/dev/udm/NAME`,
//! a disk's path). Written against the mutants cargo-mutants found missed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::sync::Arc;

use udm_core::registry::{LoadFlags, ResumeOptions};
use udm_core::{CoreError, Registry};
use udm_io::backend::mem::MemDevice;
use udm_testkit::core::create;
use udm_types::errno::HasErrno;
use udm_types::Errno;

fn errno(r: Result<impl Sized, CoreError>) -> Errno {
    match r {
        Ok(_) => panic!("succeeded where an error was expected"),
        Err(e) => e.errno(),
    }
}

fn empty(reg: &Registry, name: &str, uuid: Option<&str>, minor: Option<u32>) -> Errno {
    match reg.create(name, uuid, minor, None, &ResumeOptions::default()) {
        Ok(_) => Errno(0),
        Err(e) => e.errno(),
    }
}

#[test]
fn uuids_are_checked_unique_and_set_once() {
    let reg = Registry::new();
    assert_eq!(
        empty(&reg, "a", Some(""), None),
        Errno::EINVAL,
        "empty uuid"
    );
    let long = "u".repeat(129);
    assert_eq!(
        empty(&reg, "a", Some(&long), None),
        Errno::EINVAL,
        "129 characters"
    );
    let max = "u".repeat(128);
    assert_eq!(
        empty(&reg, "a", Some(&max), None),
        Errno(0),
        "128 characters"
    );
    assert_eq!(reg.name_by_uuid(&max).as_deref(), Some("a"));
    assert_eq!(reg.name_by_uuid("other"), None);
    assert_eq!(
        empty(&reg, "b", Some(&max), None),
        Errno::EBUSY,
        "uuid taken"
    );
    assert_eq!(empty(&reg, "b", None, None), Errno(0));
    assert_eq!(
        errno(reg.set_uuid("b", &max)),
        Errno::EBUSY,
        "uuid taken (EBUSY, as dm_hash_insert)"
    );
    assert_eq!(errno(reg.set_uuid("b", "")), Errno::EINVAL);
    reg.set_uuid("b", "U-b").unwrap();
    assert_eq!(reg.name_by_uuid("U-b").as_deref(), Some("b"));
    assert_eq!(errno(reg.set_uuid("b", "U-c")), Errno::EINVAL, "set once");
    assert_eq!(reg.info("b").unwrap().uuid.as_deref(), Some("U-b"));
}

#[test]
fn a_requested_minor_is_given_or_refused() {
    let reg = Registry::new();
    assert_eq!(empty(&reg, "a", None, Some(7)), Errno(0));
    assert_eq!(reg.info("a").unwrap().minor, 7);
    assert_eq!(
        empty(&reg, "b", None, Some(7)),
        Errno::EBUSY,
        "minor 7 in use"
    );
    assert!(reg.info("b").is_err(), "nothing created");
    assert_eq!(empty(&reg, "b", None, None), Errno(0));
    assert_eq!(reg.info("b").unwrap().minor, 0, "the lowest free minor");
}

#[test]
fn a_table_names_a_device_every_way_dmsetup_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let reg = Registry::new();
    let d = reg.add_disk("d", &path, &Default::default()).unwrap();
    reg.add_disk_device("mem", Arc::new(MemDevice::new(2048)))
        .unwrap();
    let names = [
        "mem".to_string(),
        "/dev/mapper/mem".to_string(),
        "/dev/udm/mem".to_string(),
        path.to_string_lossy().into_owned(),
        // Not as recorded, but the same file once canonical.
        link.to_string_lossy().into_owned(),
        d.dev.clone(),
    ];
    for (i, n) in names.iter().enumerate() {
        let name = format!("t{i}");
        create(
            &reg,
            &name,
            &format!("0 1024 linear {n} 0"),
            LoadFlags::default(),
        )
        .unwrap_or_else(|e| panic!("a table naming {n}: {e}"));
        let deps = reg.deps(&name, false).unwrap();
        assert_eq!(deps.len(), 1, "{n}: {deps:?}");
    }
    // The path and the number name the file disk, not a new implicit one.
    let disks: Vec<String> = reg.disks().into_iter().map(|d| d.name).collect();
    assert_eq!(disks, ["d", "mem"], "{disks:?}");
    // A name that is nothing: ENODEV naming it.
    let e = create(
        &reg,
        "bad",
        "0 8 linear nothing-here 0",
        LoadFlags::default(),
    )
    .unwrap_err();
    assert_eq!(e.errno(), Errno::ENODEV, "{e}");
}
