//! Restoring a recorded configuration never drops any of it (issue "Trustworthy daemon", item
//! 5): a disk whose file is missing is kept as unavailable, the mapped devices whose tables name
//! it keep those tables recorded, operations on them fail with ENODEV naming the file, and a retry
//! brings everything back once the file returns. Item 10a: a table may name an absolute path,
//! opened as an implicit disk, recorded, and released when no table uses it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::path::{Path, PathBuf};
use udm_core::config::RegistryConfig;
use udm_core::registry::{DiskOptions, LoadFlags, ResumeOptions, SuspendFlags};
use udm_core::Registry;
use udm_io::{Bio, BlockDevice};
use udm_target::table::TableSpec;
use udm_types::errno::HasErrno;
use udm_types::Errno;

fn spec(t: &str) -> TableSpec {
    TableSpec::parse(t).unwrap()
}

fn create(reg: &Registry, name: &str, table: &str) {
    reg.create(
        name,
        None,
        None,
        Some((&spec(table), LoadFlags::default())),
        &ResumeOptions::default(),
    )
    .unwrap();
}

/// A file of `sectors` sectors where sector `s` starts with `s` and `seed`.
fn image(p: &Path, sectors: u64, seed: u8) {
    let mut v = vec![0u8; (sectors * 512) as usize];
    for (s, c) in v.chunks_mut(512).enumerate() {
        c[..8].copy_from_slice(&(s as u64).to_le_bytes());
        c[8] = seed;
    }
    std::fs::write(p, v).unwrap();
}

fn read(reg: &Registry, dev: &str, sector: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    reg.node(dev)
        .unwrap()
        .submit(Bio::read(sector, &mut buf))
        .unwrap();
    buf
}

fn expect(sector: u64, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; 512];
    v[..8].copy_from_slice(&sector.to_le_bytes());
    v[8] = seed;
    v
}

struct Rig {
    dir: tempfile::TempDir,
    cfg: RegistryConfig,
}

impl Rig {
    fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    /// Moves d0's file away (as if its disk went missing); returns its path and where it is.
    fn move_d0_away(&self) -> (PathBuf, PathBuf) {
        let d0 = self.path("d0.img");
        let away = self.path("d0.away");
        std::fs::rename(&d0, &away).unwrap();
        (d0, away)
    }
}

/// d0 (missing later) and e0 (stays); lin on d0, top on lin, sus (suspended) on d0, mixed with a
/// live table on e0 and an inactive table on d0.
fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().join("d0.img");
    let e0 = dir.path().join("e0.img");
    image(&d0, 8192, 1);
    image(&e0, 8192, 2);
    let reg = Registry::new();
    reg.add_disk("d0", &d0, &DiskOptions::default()).unwrap();
    reg.add_disk("e0", &e0, &DiskOptions::default()).unwrap();
    create(&reg, "lin", "0 8192 linear d0 0");
    create(&reg, "top", "0 4096 linear lin 4096");
    create(&reg, "sus", "0 1024 linear d0 1024");
    reg.suspend("sus", SuspendFlags::default()).unwrap();
    create(&reg, "mixed", "0 2048 linear e0 0");
    reg.load("mixed", &spec("0 2048 linear d0 0"), LoadFlags::default())
        .unwrap();
    let cfg = reg.config();
    assert_eq!(cfg.disks.len(), 2);
    assert_eq!(cfg.mapped.len(), 4);
    Rig { dir, cfg }
}

#[test]
fn missing_disk_is_kept_with_its_dependents_and_comes_back() {
    let r = rig();
    let (d0, away) = r.move_d0_away();

    let reg = Registry::new();
    let problems = reg.restore(&r.cfg);
    assert!(!problems.is_empty());
    // Nothing recorded is lost: the configuration to save is the one restored, verbatim.
    assert_eq!(reg.config(), r.cfg, "restore dropped configuration");

    // Shown as unavailable with the reason naming the file.
    let disks = reg.disks();
    let d = disks.iter().find(|d| d.name == "d0").unwrap();
    let why = d.unavailable.as_deref().expect("d0 unavailable");
    assert!(why.contains(d0.to_str().unwrap()), "{why}");
    assert!(disks
        .iter()
        .any(|d| d.name == "e0" && d.unavailable.is_none()));
    for n in ["lin", "top", "sus", "mixed"] {
        let i = reg.info(n).unwrap();
        assert!(i.unavailable.is_some(), "{n} should be unavailable");
    }
    assert!(reg
        .devices()
        .iter()
        .any(|d| d.name == "lin" && d.unavailable.is_some()));
    // The recorded table is shown.
    let t = reg.table("lin", false).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].params, "d0 0");
    // The device whose live table does not need d0 serves; its inactive table waits.
    assert_eq!(read(&reg, "mixed", 3), expect(3, 2));
    assert!(reg.info("mixed").unwrap().live_present);

    // Operations on unavailable devices: ENODEV naming the missing file.
    let name = d0.to_str().unwrap();
    let errs = [
        reg.load("lin", &spec("0 8 zero"), LoadFlags::default())
            .unwrap_err(),
        reg.resume("sus", &ResumeOptions::default()).unwrap_err(),
        reg.suspend("lin", SuspendFlags::default()).unwrap_err(),
        reg.clear("mixed").unwrap_err(),
        reg.open_export("top", "nbd:top").err().unwrap(),
        reg.open_export("d0", "nbd:d0").err().unwrap(),
        reg.create(
            "new",
            None,
            None,
            Some((&spec("0 8 linear d0 0"), LoadFlags::default())),
            &ResumeOptions::default(),
        )
        .unwrap_err(),
        reg.retry_unavailable(Some("d0")).unwrap_err(),
    ];
    for e in errs {
        assert_eq!(e.errno(), Errno::ENODEV, "{e}");
        assert!(e.to_string().contains(name), "{e}");
    }
    assert_eq!(reg.config(), r.cfg, "failed operations changed the record");

    // The file returns: one retry brings back the disk, then its dependents in order.
    std::fs::rename(&away, &d0).unwrap();
    let back = reg.retry_unavailable(None).unwrap();
    for n in ["d0", "lin", "top", "sus", "mixed"] {
        assert!(back.iter().any(|b| b == n), "{n} not back: {back:?}");
    }
    assert!(!reg.has_unavailable());
    assert_eq!(reg.config(), r.cfg);
    assert!(reg.info("sus").unwrap().suspended, "recorded suspend state");
    assert!(reg.info("mixed").unwrap().inactive_present);
    assert_eq!(read(&reg, "top", 5), expect(4096 + 5, 1));
    assert_eq!(read(&reg, "lin", 7), expect(7, 1));
}

#[test]
fn unavailable_devices_can_be_removed_and_disk_add_brings_the_disk_back() {
    let r = rig();
    let (d0, away) = r.move_d0_away();
    let reg = Registry::new();
    reg.expect_export("top", "nbd:top");
    reg.restore(&r.cfg);
    // A recorded export holds the device like a served one; once dropped, the device can be.
    let e = reg.remove("top", false, false).unwrap_err();
    assert_eq!(e.errno(), Errno::EBUSY, "{e}");
    assert!(e.to_string().contains("nbd:top"), "{e}");
    reg.forget_export("nbd:top");
    // The user drops a device that cannot be built.
    reg.remove("top", false, false).unwrap();
    assert!(reg.info("top").is_err());
    assert_eq!(reg.config().mapped.len(), 3);
    // disk add of another file under the same name is refused; of the same file, retries.
    let other = r.path("other.img");
    image(&other, 8, 3);
    let e = reg
        .add_disk("d0", &other, &DiskOptions::default())
        .unwrap_err();
    assert_eq!(e.errno(), Errno::EBUSY, "{e}");
    let e = reg
        .add_disk("d0", &d0, &DiskOptions::default())
        .unwrap_err();
    assert_eq!(e.errno(), Errno::ENODEV, "still missing: {e}");
    std::fs::rename(&away, &d0).unwrap();
    let d = reg.add_disk("d0", &d0, &DiskOptions::default()).unwrap();
    assert!(d.unavailable.is_none());
    assert!(reg.info("lin").unwrap().unavailable.is_none());
    assert_eq!(read(&reg, "lin", 1), expect(1, 1));
    // Same device number as recorded.
    let id: udm_types::DevId = d.dev.parse().unwrap();
    assert_eq!(id.minor, r.cfg.disks[0].minor);
}

#[test]
fn absolute_path_opens_an_implicit_disk_recorded_and_released() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    image(&a, 4096, 7);
    let a = a.to_str().unwrap().to_string();
    let reg = Registry::new();
    create(&reg, "v", &format!("0 2048 linear {a} 0"));
    create(
        &reg,
        "w",
        &format!("0 1024 linear {a} 2048\n1024 1024 linear {a} 0"),
    );
    assert_eq!(read(&reg, "v", 3), expect(3, 7));
    assert_eq!(read(&reg, "w", 4), expect(2048 + 4, 7));
    let disks = reg.disks();
    assert_eq!(disks.len(), 1, "one implicit disk for one path: {disks:?}");
    assert!(disks[0].implicit);
    assert_eq!(disks[0].holders.len(), 2, "{:?}", disks[0].holders);
    let cfg = reg.config();
    assert!(cfg.disks[0].implicit);

    // A restart opens it again with the same number; its tables work.
    let reg2 = Registry::new();
    assert!(reg2.restore(&cfg).is_empty());
    assert_eq!(reg2.config(), cfg);
    assert_eq!(read(&reg2, "w", 1030), expect(1030 - 1024, 7));

    // Released when the last table naming it goes (also through a reload).
    reg.remove("v", false, false).unwrap();
    assert_eq!(reg.disks().len(), 1);
    reg.load("w", &spec("0 8 zero"), LoadFlags::default())
        .unwrap();
    reg.resume("w", &ResumeOptions::default()).unwrap();
    assert!(reg.disks().is_empty(), "{:?}", reg.disks());
    assert!(reg.config().disks.is_empty());

    // A relative unknown name is still ENODEV; a missing absolute path names the file.
    let e = reg
        .load("w", &spec("0 8 linear nosuch 0"), LoadFlags::default())
        .unwrap_err();
    assert_eq!(e.errno(), Errno::ENODEV, "{e}");
    let e = reg
        .load(
            "w",
            &spec("0 8 linear /dev/mapper/nosuch 0"),
            LoadFlags::default(),
        )
        .unwrap_err();
    assert_eq!(e.errno(), Errno::ENODEV, "{e}");
    let missing = dir.path().join("missing.img");
    let e = reg
        .load(
            "w",
            &spec(&format!("0 8 linear {} 0", missing.display())),
            LoadFlags::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("missing.img"), "{e}");
    assert!(reg.disks().is_empty());
}

#[test]
fn missing_implicit_disk_keeps_its_table() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    image(&a, 4096, 7);
    let reg = Registry::new();
    create(&reg, "v", &format!("0 2048 linear {} 0", a.display()));
    let cfg = reg.config();
    let away = dir.path().join("a.away");
    std::fs::rename(&a, &away).unwrap();
    let reg2 = Registry::new();
    assert!(!reg2.restore(&cfg).is_empty());
    assert_eq!(
        reg2.config(),
        cfg,
        "the implicit disk and its table are kept"
    );
    assert!(reg2.info("v").unwrap().unavailable.is_some());
    std::fs::rename(&away, &a).unwrap();
    reg2.retry_unavailable(Some("v")).unwrap();
    assert_eq!(read(&reg2, "v", 9), expect(9, 7));
    assert_eq!(reg2.config(), cfg);
}

#[test]
fn an_implicit_disk_a_pending_table_names_is_kept_and_others_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let (d0, a, b) = (
        dir.path().join("d0.img"),
        dir.path().join("a.img"),
        dir.path().join("b.img"),
    );
    image(&d0, 4096, 1);
    image(&a, 4096, 7);
    image(&b, 4096, 8);
    let reg = Registry::new();
    reg.add_disk("d0", &d0, &DiskOptions::default()).unwrap();
    // v needs d0 (to go missing) and the implicit a.img; w only the implicit b.img.
    create(
        &reg,
        "v",
        &format!("0 1024 linear d0 0\n1024 1024 linear {} 0", a.display()),
    );
    create(&reg, "w", &format!("0 1024 linear {} 0", b.display()));
    let cfg = reg.config();
    std::fs::rename(&d0, dir.path().join("d0.away")).unwrap();
    let reg2 = Registry::new();
    reg2.restore(&cfg);
    // a.img is held by no live table (v is pending) but v's recorded table names it.
    assert_eq!(
        reg2.config(),
        cfg,
        "the pending table's implicit disk was dropped"
    );
    // b.img goes with w, the pending table naming only d0 and a.img notwithstanding.
    reg2.remove("w", false, false).unwrap();
    let names: Vec<String> = reg2.disks().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["d0", "auto-a.img"], "{names:?}");
}

#[test]
fn deferred_removal_waits_for_the_exports_of_a_device_coming_back() {
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().join("d0.img");
    image(&d0, 2048, 1);
    let reg = Registry::new();
    reg.add_disk("d0", &d0, &DiskOptions::default()).unwrap();
    create(&reg, "dr", "0 2048 linear d0 0");
    let node = reg.open_export("dr", "nbd:dr").unwrap();
    reg.remove("dr", false, true).unwrap();
    assert!(reg.info("dr").unwrap().deferred_remove);
    let cfg = reg.config();
    drop(node);
    let away = dir.path().join("d0.away");
    std::fs::rename(&d0, &away).unwrap();
    // The daemon announces the recorded export, then restores.
    let reg2 = Registry::new();
    reg2.expect_export("dr", "nbd:dr");
    reg2.restore(&cfg);
    std::fs::rename(&away, &d0).unwrap();
    reg2.retry_unavailable(None).unwrap();
    // Still there for its export to come back to (the daemon re-adds it next).
    assert_eq!(reg2.config(), cfg);
    let export = reg2.open_export("dr", "nbd:dr").unwrap();
    assert!(reg2.info("dr").unwrap().deferred_remove);
    // The removal completes at the export's close, as recorded.
    reg2.close_export(export.id(), "nbd:dr");
    assert!(reg2.info("dr").is_err());
}

#[test]
fn a_missing_disk_answers_enxio_and_dependents_come_back_in_any_recorded_order() {
    let mut r = rig();
    // Dependents recorded before what they depend on (top before lin): the rebuild needs a
    // second pass, which it takes while each pass makes progress.
    r.cfg.mapped.reverse();
    let (d0, away) = r.move_d0_away();
    let reg = Registry::new();
    reg.restore(&r.cfg);
    assert!(reg.has_unavailable());
    // Nothing reaches it: not even a lookup of its node (the stand-in device behind it,
    // which answers ENXIO, is a second guard).
    let Err(e) = reg.node("d0") else {
        panic!("the node of a missing disk")
    };
    assert_eq!(e.errno(), Errno::ENODEV, "{e}");
    assert!(e.to_string().contains(d0.to_str().unwrap()), "{e}");
    std::fs::rename(&away, &d0).unwrap();
    reg.retry_unavailable(None).unwrap();
    assert!(
        !reg.has_unavailable(),
        "{:?}",
        reg.info("top").unwrap().unavailable
    );
    assert_eq!(read(&reg, "top", 1), expect(4097, 1));
}

#[test]
fn a_read_only_disk_is_opened_read_only_again() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.img");
    image(&p, 64, 1);
    let reg = Registry::new();
    let opts = DiskOptions {
        read_only: true,
        ..DiskOptions::default()
    };
    reg.add_disk("r", &p, &opts).unwrap();
    let again = Registry::new();
    assert!(again.restore(&reg.config()).is_empty());
    let node = again.node("r").unwrap();
    assert!(node.read_only(), "restored read-write");
    assert!(node.submit(Bio::write(0, &[0u8; 512])).is_err());
}

#[test]
fn a_named_retry_fails_only_for_that_device() {
    let r = rig();
    let (d0, _away) = r.move_d0_away();
    let reg = Registry::new();
    reg.restore(&r.cfg);
    let e = reg.retry_unavailable(Some("d0")).unwrap_err();
    assert_eq!(e.errno(), Errno::ENODEV, "{e}");
    assert!(e.to_string().contains(d0.to_str().unwrap()), "{e}");
    // Another device's retry is not failed by d0 still missing.
    reg.retry_unavailable(Some("e0")).unwrap();
    reg.retry_unavailable(None).unwrap();
    assert!(reg.has_unavailable());
}

#[test]
fn a_recorded_minor_already_taken_gives_the_disk_a_free_one() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    image(&a, 64, 1);
    image(&b, 64, 2);
    let reg = Registry::new();
    reg.add_disk("a", &a, &DiskOptions::default()).unwrap();
    reg.add_disk("b", &b, &DiskOptions::default()).unwrap();
    let mut cfg = reg.config();
    // A hand-edited (or damaged) state: both disks recorded with a's number.
    cfg.disks[1].minor = cfg.disks[0].minor;
    let again = Registry::new();
    again.restore(&cfg);
    let disks = again.disks();
    assert_eq!(disks.len(), 2, "{disks:?}");
    assert_ne!(disks[0].dev, disks[1].dev, "{disks:?}");
    assert_eq!(read(&again, "a", 3), expect(3, 1));
    assert_eq!(read(&again, "b", 3), expect(3, 2));
}
