//! Interposition rules (issue "Live interposition"): one test per error rule, the flakey down
//! interval seen by the original device's clients, and partition-relative interposition on MBR
//! and GPT disks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use udm_core::registry::{LoadFlags, ResumeOptions};
use udm_core::Registry;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice};
use udm_target::table::TableSpec;
use udm_types::errno::HasErrno;
use udm_types::Errno;

use udm_testkit::core::{create, IP};

fn setup() -> (Registry, Arc<MemDevice>) {
    let reg = Registry::new();
    let mem = Arc::new(MemDevice::new(2048));
    reg.add_disk_device("d", mem.clone()).unwrap();
    (reg, mem)
}

#[test]
fn erange_beyond_the_device() {
    let (reg, _) = setup();
    let e = create(&reg, "ip", "0 2048 zero\n2048 100 linear d 0", IP).unwrap_err();
    assert_eq!(e.errno(), Errno::ERANGE, "{e}");
    assert!(e.to_string().contains("beyond the end of d"), "{e}");
    assert!(reg.info("ip").is_err(), "failed create leaves no device");
}

#[test]
fn ealready_second_interposer_of_one_mapped_device() {
    let (reg, _) = setup();
    let e = create(&reg, "ip", "0 1024 linear d 0\n1024 1024 linear d 1024", IP).unwrap_err();
    assert_eq!(e.errno(), Errno::EALREADY, "{e}");
}

#[test]
fn ebusy_overlapping_ranges_and_disjoint_ranges_allowed() {
    let (reg, _) = setup();
    create(&reg, "a", "0 1024 linear d 0", IP).unwrap();
    let e = create(&reg, "b", "0 1025 linear d 0", IP).unwrap_err();
    assert_eq!(e.errno(), Errno::EBUSY, "{e}");
    assert!(
        e.to_string().contains("overlaps the interposer of a"),
        "{e}"
    );
    // Disjoint: the second mapped device interposes [1024, 2048).
    create(&reg, "b", "0 1024 zero\n1024 1024 linear d 1024", IP).unwrap();
    assert_eq!(reg.info("b").unwrap().interposers.len(), 1);
    reg.remove("a", false, false).unwrap();
    reg.remove("b", false, false).unwrap();
}

#[test]
fn ebusy_claim_names_the_holder_and_suggests_interpose() {
    let (reg, _) = setup();
    let _node = reg.open_export("d", "nbd:d").unwrap();
    let e = create(&reg, "plain", "0 2048 linear d 0", LoadFlags::default()).unwrap_err();
    assert_eq!(e.errno(), Errno::EBUSY);
    let msg = e.to_string();
    assert!(
        msg.contains("export nbd:d") && msg.contains("--interpose"),
        "{msg}"
    );
    // The interposed variant works on the exported device.
    create(&reg, "ip", "0 2048 linear d 0", IP).unwrap();
    // And exporting a device that mapped devices hold is EBUSY too.
    let reg2 = Registry::new();
    reg2.add_disk_device("d2", Arc::new(MemDevice::new(64)))
        .unwrap();
    create(&reg2, "m", "0 64 linear d2 0", LoadFlags::default()).unwrap();
    let e = reg2.open_export("d2", "nbd:d2").map(|_| ()).unwrap_err();
    assert_eq!(e.errno(), Errno::EBUSY);
    assert!(e.to_string().contains("mapped device m"), "{e}");
}

#[test]
fn einval_unknown_bracket_option() {
    let (reg, _) = setup();
    let e = create(&reg, "ip", "0 2048 linear [noexcl]d 0", IP).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    assert!(e.to_string().contains("[noexcl]"), "{e}");
    // The marked form interposes exactly the marked device.
    create(
        &reg,
        "ok",
        "0 2048 linear [interpose]d 0",
        LoadFlags::default(),
    )
    .unwrap();
    assert_eq!(reg.info("ok").unwrap().interposers.len(), 1);
}

#[test]
fn flakey_down_interval_errors_clients_until_detach() {
    let (reg, mem) = setup();
    let node = reg.node("d").unwrap();
    let before = vec![0x5au8; 4096];
    node.submit(Bio::write(0, &before)).unwrap();
    // up 0 s, down 3600 s: down from the start.
    create(&reg, "fl", "0 2048 flakey d 0 0 3600", IP).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(
        node.submit(Bio::read(0, &mut buf)).is_err(),
        "down interval must error reads"
    );
    assert!(
        node.submit(Bio::write(8, &before)).is_err(),
        "down interval must error writes"
    );
    reg.remove("fl", false, false).unwrap();
    node.submit(Bio::read(0, &mut buf)).unwrap();
    assert_eq!(buf, before, "data written before the attach is intact");
    node.submit(Bio::write(8, &before)).unwrap();
    assert_eq!(&mem.contents()[4096..8192], &before[..]);
}

fn partitioned_disk(dir: &Path, label: &str) -> Option<std::path::PathBuf> {
    let p = dir.join(format!("{label}.img"));
    std::fs::File::create(&p).ok()?.set_len(16 << 20).ok()?;
    let script = format!("label: {label}\nstart=2048, size=8192\nstart=12288, size=8192\n");
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(&p)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    std::io::Write::write_all(child.stdin.as_mut()?, script.as_bytes()).ok()?;
    child.wait().ok()?.success().then_some(p)
}

#[test]
fn interposing_partition_two_redirects_only_its_io() {
    if Command::new("sfdisk").arg("--version").output().is_err() {
        eprintln!("SKIPPED interposing_partition_two_redirects_only_its_io: sfdisk (util-linux fdisk) not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for label in ["dos", "gpt"] {
        let img = partitioned_disk(dir.path(), label).expect("sfdisk image");
        let reg = Registry::new();
        let info = reg.add_disk(label, &img, &Default::default()).unwrap();
        let parts: Vec<(String, u64, u64)> = info
            .partitions
            .iter()
            .map(|p| (p.name.clone(), p.start, p.sectors))
            .collect();
        assert_eq!(
            parts,
            vec![
                (format!("{label}1"), 2048, 8192),
                (format!("{label}2"), 12288, 8192)
            ],
            "{label}"
        );
        let p2 = format!("{label}2");
        // A delay interposer on partition 2 with a marker: the mapped device is a linear over
        // partition 2 that is offset by 8 sectors, so redirected I/O lands 8 sectors further on.
        create(
            &reg,
            "ip",
            &format!("0 8184 linear {p2} 8\n8184 8 zero"),
            IP,
        )
        .unwrap();
        let n1 = reg.node(&format!("{label}1")).unwrap();
        let n2 = reg.node(&p2).unwrap();
        let a = vec![0xa1u8; 512];
        let b = vec![0xb2u8; 512];
        n1.submit(Bio::write(0, &a)).unwrap();
        n2.submit(Bio::write(0, &b)).unwrap();
        n2.submit(Bio::flush()).unwrap();
        let bytes = std::fs::read(&img).unwrap();
        // Partition 1 sector 0 = disk sector 2048: not redirected.
        assert_eq!(
            &bytes[2048 * 512..2049 * 512],
            &a[..],
            "{label}: partition 1 write misplaced"
        );
        // Partition 2 sector 0 went through the interposer: lands at partition-relative 8,
        // i.e. disk sector 12288 + 8.
        assert_eq!(
            &bytes[(12288 + 8) * 512..(12288 + 9) * 512],
            &b[..],
            "{label}: partition 2 redirect offset"
        );
        assert!(
            bytes[12288 * 512..12289 * 512].iter().all(|x| *x == 0),
            "{label}: partition 2 sector 0 untouched"
        );
        assert!(reg.info("ip").unwrap().redirected >= 1);
        // Whole-disk I/O to the partition-2 area is not redirected (the interposer sits on the partition).
        let d = reg.node(label).unwrap();
        d.submit(Bio::write(12288, &a)).unwrap();
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(&bytes[12288 * 512..12289 * 512], &a[..]);
        reg.remove("ip", false, false).unwrap();
    }
}

#[test]
fn write_zeroes_and_discard_keep_working_through_an_interposer_without_them() {
    // snapshot-origin supports neither; the device advertised both before the interposer came.
    let (reg, mem) = setup();
    let node = reg.node("d").unwrap();
    node.submit(Bio::write(0, &vec![0xffu8; 1024 * 512]))
        .unwrap();
    create(&reg, "o", "0 2048 snapshot-origin d", IP).unwrap();
    node.submit(Bio::write_zeroes(8, 2040)).unwrap();
    assert!(
        mem.contents()[8 * 512..1024 * 512].iter().all(|b| *b == 0),
        "write-zeroes emulated with zero writes"
    );
    assert!(mem.contents()[..8 * 512].iter().all(|b| *b == 0xff));
    node.submit(Bio::discard(0, 8)).unwrap();
    let fast = Bio::write_zeroes(0, 8).with_flags(udm_io::BioFlags::FAST_ZERO);
    assert_eq!(node.submit(fast).unwrap_err().errno(), Errno::EOPNOTSUPP);
}

/// The zero-write emulation of write-zeroes covers requests of several emulation chunks (2048
/// sectors each), unaligned at both ends, and FUA on the last chunk, over data written first.
#[test]
fn emulated_write_zeroes_beyond_one_chunk() {
    const SECTORS: u64 = 8192;
    let reg = Registry::new();
    let mem = Arc::new(MemDevice::new(SECTORS));
    reg.add_disk_device("d", mem.clone()).unwrap();
    let node = reg.node("d").unwrap();
    node.submit(Bio::write(0, &vec![0xffu8; (SECTORS * 512) as usize]))
        .unwrap();
    create(&reg, "o", &format!("0 {SECTORS} snapshot-origin d"), IP).unwrap();
    let mut model = vec![0xffu8; (SECTORS * 512) as usize];
    for (start, len) in [(3u64, 2048u64), (2051, 2049), (4111, 3 * 1024 + 5)] {
        node.submit(Bio::write_zeroes(start, len).with_flags(udm_io::BioFlags::FUA))
            .unwrap();
        model[(start * 512) as usize..((start + len) * 512) as usize].fill(0);
        let got = mem.contents();
        let diff = (0..SECTORS as usize).find(|s| got[s * 512..][..512] != model[s * 512..][..512]);
        assert_eq!(
            diff, None,
            "after write-zeroes of {len} sectors at {start}: sector {diff:?} differs from the model"
        );
    }
    assert!(reg.info("o").unwrap().redirected >= 3);
    reg.remove("o", false, false).unwrap();
}

#[test]
fn reload_without_interpose_and_remove_force_detach() {
    let (reg, mem) = setup();
    let node = reg.node("d").unwrap();
    create(&reg, "ip", "0 2048 linear d 0", IP).unwrap();
    assert_eq!(node.hooks().len(), 1);
    // A reload without --interpose: the table stops interposing at resume.
    reg.add_disk_device("other", Arc::new(MemDevice::new(2048)))
        .unwrap();
    reg.load(
        "ip",
        &TableSpec::parse("0 2048 linear other 0").unwrap(),
        LoadFlags::default(),
    )
    .unwrap();
    assert_eq!(node.hooks().len(), 1, "still attached until resume");
    reg.resume("ip", &ResumeOptions::default()).unwrap();
    assert!(
        node.hooks().is_empty(),
        "detached when the interposed table stopped being live"
    );
    node.submit(Bio::write(0, &[9u8; 512])).unwrap();
    assert_eq!(mem.contents()[0], 9);
    reg.remove("ip", false, false).unwrap();
    // remove --force of an interposer nobody opened is a plain remove: it detaches (the open
    // case is remove_force_of_an_open_interposer).
    create(&reg, "ip2", "0 2048 linear d 0", IP).unwrap();
    reg.remove("ip2", true, false).unwrap();
    assert!(node.hooks().is_empty());
    node.submit(Bio::read(0, &mut [0u8; 512])).unwrap();
}

/// `remove --force` of an interposer that is open (held as an NBD export holds it) does what
/// dmsetup does: the table becomes an error table and the device stays for its opener (EBUSY),
/// who now gets EIO. The error table interposes nothing, so the interposed device's own clients
/// reach it directly again. After the last close a plain remove succeeds.
#[test]
fn remove_force_of_an_open_interposer() {
    let (reg, mem) = setup();
    let node = reg.node("d").unwrap();
    create(&reg, "ip", "0 2048 linear d 0", IP).unwrap();
    let held = reg.open_export("ip", "nbd:ip").unwrap();
    node.submit(Bio::write(0, &[1u8; 512])).unwrap();
    assert!(reg.info("ip").unwrap().redirected >= 1);
    let e = reg.remove("ip", true, false).unwrap_err();
    assert_eq!(e.errno(), Errno::EBUSY, "{e}");
    assert!(e.to_string().contains("error table"), "{e}");
    let t = reg.table("ip", false).unwrap();
    let lines: Vec<_> = t
        .iter()
        .map(|l| (l.start, l.len, l.target_type.as_str()))
        .collect();
    assert_eq!(
        lines,
        [(0, 2048, "error")],
        "remove --force loads an error table"
    );
    let mut b = [0u8; 512];
    let e = held.submit(Bio::read(0, &mut b)).unwrap_err();
    assert_eq!(e.errno(), Errno::EIO, "the opener gets EIO: {e}");
    assert!(
        node.hooks().is_empty(),
        "the error table interposes nothing"
    );
    let before = reg.info("ip").unwrap().redirected;
    node.submit(Bio::write(0, &[2u8; 512])).unwrap();
    assert_eq!(mem.contents()[0], 2, "d's clients reach d directly");
    assert_eq!(reg.info("ip").unwrap().redirected, before);
    let id = held.id();
    drop(held);
    reg.close_export(id, "nbd:ip");
    reg.remove("ip", false, false).unwrap();
    assert!(reg.info("ip").is_err());
}

/// A request straddling an edge of an interposed range is split there (node.rs `route`): the
/// part outside goes to the device, only the part inside through the interposer. The
/// interposer maps the sectors before its range to `zero`, so a head sent through it would be
/// dropped.
#[test]
fn requests_straddling_an_interposed_range_are_split_at_its_edges() {
    let (reg, mem) = setup();
    let node = reg.open_export("d", "nbd:d").unwrap();
    create(&reg, "ip", "0 1024 zero\n1024 512 linear d 1024", IP).unwrap();
    let before = reg.info("ip").unwrap().redirected;
    let pattern =
        |seed: u8, n: usize| -> Vec<u8> { (0..n * 512).map(|i| (i / 512) as u8 ^ seed).collect() };
    // Across the start (1024) and across the end (1536) of d's interposed range.
    for (sector, seed) in [(1000u64, 0x5a), (1500, 0xa5)] {
        let data = pattern(seed, 100);
        node.submit(Bio::write(sector, &data)).unwrap();
        let mut back = vec![0u8; data.len()];
        mem.submit(Bio::read(sector, &mut back)).unwrap();
        assert!(
            back == data,
            "a write of sectors {sector}..{} did not reach d whole (first wrong sector {:?})",
            sector + 100,
            (0..100)
                .find(|&i| back[i * 512..][..512] != data[i * 512..][..512])
                .map(|i| sector + i as u64)
        );
        let mut via_node = vec![0u8; data.len()];
        node.submit(Bio::read(sector, &mut via_node)).unwrap();
        assert!(
            via_node == data,
            "reading {sector}..{} back through d differs",
            sector + 100
        );
    }
    // One write and one read per straddling request went through the interposer.
    assert_eq!(reg.info("ip").unwrap().redirected - before, 4);
    reg.remove("ip", false, false).unwrap();
}

/// After `rename`, what holds the device sees the new name: an open export's node, and the
/// claim messages that name the holder of a device below.
#[test]
fn rename_reaches_open_nodes_and_messages() {
    let (reg, _) = setup();
    create(&reg, "m", "0 2048 linear d 0", LoadFlags::default()).unwrap();
    let node = reg.open_export("m", "nbd:m").unwrap();
    reg.rename("m", "m2").unwrap();
    assert_eq!(node.name(), "m2");
    let e = create(&reg, "other", "0 2048 linear m2 0", LoadFlags::default()).unwrap_err();
    assert!(e.to_string().contains("m2"), "{e}");
}

/// BLOCK_STATUS of an interposed device comes from its interposer (node.rs `block_status`):
/// snapshot-origin reports every sector as data, the fresh memory device below as holes.
#[test]
fn block_status_of_an_interposed_device_comes_from_the_interposer() {
    use udm_io::ExtentKind;
    let (reg, mem) = setup();
    let node = reg.open_export("d", "nbd:d").unwrap();
    // d[1024, 2048) holds data, d[0, 1024) is a hole; the interposer maps the hole's range
    // onto the data.
    mem.submit(Bio::write(1024, &vec![7u8; 1024 * 512]))
        .unwrap();
    let holes = node.block_status(0, 1024).unwrap();
    assert!(
        holes.iter().all(|e| e.kind == ExtentKind::HoleZero),
        "{holes:?}"
    );
    create(&reg, "ip", "0 1024 linear [interpose]d 1024", IP).unwrap();
    for (sector, sectors) in [(0u64, 1024u64), (100, 50), (1000, 24)] {
        let got = node.block_status(sector, sectors).unwrap();
        assert!(
            got.iter().all(|e| e.kind == ExtentKind::Data)
                && got.iter().map(|e| e.sectors).sum::<u64>() == sectors,
            "block status of {sector}+{sectors} through the interposer: {got:?}"
        );
    }
    reg.remove("ip", false, false).unwrap();
    let after = node.block_status(0, 1024).unwrap();
    assert!(
        after.iter().all(|e| e.kind == ExtentKind::HoleZero),
        "{after:?}"
    );
}

/// BLOCK_STATUS at the edges of a partly interposed device: inside the hooked range the
/// interposer answers, outside it the device, and a request is cut at the range's edges. The
/// interposer's sectors [1280, 1536) map d[1024, 1280), where only [1024, 1100) holds data, so
/// inside the hook it reports data where d itself has holes.
#[test]
fn block_status_is_cut_at_the_edges_of_an_interposed_range() {
    use udm_io::ExtentKind::{Data, HoleZero};
    let (reg, mem) = setup();
    let node = reg.open_export("d", "nbd:d").unwrap();
    mem.submit(Bio::write(1024, &[7u8; 76 * 512])).unwrap();
    let table = "0 1280 zero\n1280 256 linear [interpose]d 1024\n1536 512 zero";
    create(&reg, "ip", table, IP).unwrap();
    let status = |sector: u64, sectors: u64| {
        node.block_status(sector, sectors)
            .unwrap()
            .iter()
            .map(|e| (e.kind, e.sectors))
            .collect::<Vec<_>>()
    };
    // Inside the hooked range: the interposer's view (d's data at 1024..).
    assert_eq!(status(1280, 16), vec![(Data, 16)]);
    // Across its start: the device alone, up to the edge.
    assert_eq!(status(1270, 20), vec![(HoleZero, 10)]);
    // Across its end: the interposer alone, up to the edge.
    assert_eq!(status(1530, 20), vec![(HoleZero, 6)]);
    // Right after it, and well before it: the device.
    assert_eq!(status(1536, 16), vec![(HoleZero, 16)]);
    assert_eq!(status(1024, 16), vec![(Data, 16)]);
    reg.remove("ip", false, false).unwrap();
}
