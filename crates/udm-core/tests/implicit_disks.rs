//! Implicit disks (udm-core/src/registry/implicit.rs): a table naming a file by its absolute
//! path opens it as a disk `auto-BASENAME`, one disk per file however often the table names it,
//! a free number each, a name that does not clash, read-only when the file refuses writes, and
//! gone when no table uses it. Written against the mutants cargo-mutants found missed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use udm_core::registry::LoadFlags;
use udm_core::Registry;
use udm_io::backend::mem::MemDevice;
use udm_testkit::core::create;

fn file(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    p
}

/// (name, path, dev, read_only) of every disk.
fn disks(reg: &Registry) -> Vec<(String, Option<PathBuf>, String, bool)> {
    reg.disks()
        .into_iter()
        .map(|d| (d.name, d.path, d.dev, d.read_only))
        .collect()
}

#[test]
fn a_path_in_a_table_is_one_disk_per_file_with_its_own_name_and_number() {
    let dir = tempfile::tempdir().unwrap();
    let a = file(dir.path(), "a.img");
    let b = file(dir.path(), "b.img");
    let reg = Registry::new();
    // A udm disk already called auto-b.img: the implicit one must not take that name.
    reg.add_disk_device("auto-b.img", Arc::new(MemDevice::new(2048)))
        .unwrap();
    let table = format!(
        "0 1024 linear {a} 0\n1024 1024 linear {a} 1024\n2048 2048 linear {b} 0",
        a = a.display(),
        b = b.display()
    );
    create(&reg, "t", &table, LoadFlags::default()).unwrap();
    let list = disks(&reg);
    let auto: Vec<_> = list.iter().filter(|d| d.1.is_some()).collect();
    assert_eq!(auto.len(), 2, "a.img named twice is one disk: {list:?}");
    let find = |p: &Path| auto.iter().find(|d| d.1.as_deref() == Some(p)).unwrap();
    let (da, db) = (find(&a), find(&b));
    assert_eq!(da.0, "auto-a.img");
    assert!(
        db.0.starts_with("auto-b.img-"),
        "auto-b.img is taken, so the number is added: {}",
        db.0
    );
    let mut devs: Vec<&str> = list.iter().map(|d| d.2.as_str()).collect();
    devs.sort_unstable();
    devs.dedup();
    assert_eq!(devs.len(), list.len(), "two disks share a number: {list:?}");
    assert!(!da.3 && !db.3, "writable files opened read-only: {list:?}");
    // Released with the table.
    reg.remove("t", false, false).unwrap();
    let left: Vec<String> = disks(&reg).into_iter().map(|d| d.0).collect();
    assert_eq!(left, ["auto-b.img"]);
}

/// `chattr +i` while it lives: even root cannot open the file for writing.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn a_file_that_refuses_writes_is_opened_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let f = file(dir.path(), "ro.img");
    // Root ignores mode bits; the immutable attribute refuses writes to root too (EPERM).
    let ok = Command::new("chattr")
        .arg("+i")
        .arg(&f)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED read-only implicit disk: chattr +i is not available here");
        return;
    }
    let _guard = Immutable(f.clone());
    if std::fs::OpenOptions::new().write(true).open(&f).is_ok() {
        eprintln!("SKIPPED read-only implicit disk: the filesystem ignores chattr +i");
        return;
    }
    let reg = Registry::new();
    let table = format!("0 2048 linear {} 0", f.display());
    create(
        &reg,
        "t",
        &table,
        LoadFlags {
            read_only: true,
            ..LoadFlags::default()
        },
    )
    .unwrap();
    let list = disks(&reg);
    let d = list
        .iter()
        .find(|d| d.1.as_deref() == Some(f.as_path()))
        .unwrap();
    assert!(d.3, "opened read-only: {list:?}");
    reg.remove("t", false, false).unwrap();
}
