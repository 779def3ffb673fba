//! Partition tables checked against real tools: images written by `sfdisk`, compared with
//! `sfdisk --json` and with what the kernel itself registers for a loop device (`losetup -P`);
//! plus property tests feeding garbage and mutated tables to the parser.
#![allow(clippy::unwrap_used)] // tests may unwrap

use proptest::prelude::*;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use udm_io::backend::file::FileDevice;
use udm_io::partition::{
    crc32, parse_image, read_partitions, PartitionInfo, PartitionKind, TableKind,
};
use udm_io::slice::SliceDevice;
use udm_io::{Bio, BlockDevice};
use udm_testkit::host::{find_tool_in, have_tool, tool_cmd, LoopDev};

/// The sfdisk cross-checks do not skip for a user whose PATH lacks /usr/sbin and /sbin (the
/// Debian default for non-root): the tools are looked up there too.
#[test]
fn sbin_tools_found_without_sbin_on_path() {
    for t in ["sfdisk", "losetup", "blockdev"] {
        let installed = ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(t).exists());
        if !installed {
            eprintln!(
                "SKIPPED sbin_tools_found_without_sbin_on_path: {t} is not in /usr/sbin or /sbin"
            );
            continue;
        }
        assert!(
            find_tool_in(t, "/usr/local/bin:/usr/bin:/bin").is_some(),
            "{t} is installed in an sbin directory but not found with a non-root PATH"
        );
    }
}

/// Runs `sfdisk [extra] img < script`; false (after printing SKIPPED) without sfdisk.
fn sfdisk(img: &Path, extra: &[&str], script: &str) -> bool {
    if !have_tool("sfdisk") {
        eprintln!("SKIPPED: sfdisk is not installed (Debian package fdisk)");
        return false;
    }
    let mut child = tool_cmd("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .args(extra)
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// `(number, start, size, type)` per partition from `sfdisk --json`, in 512-byte sectors.
fn sfdisk_json(img: &Path, extra: &[&str]) -> (String, Vec<(u32, u64, u64, String)>) {
    let out = tool_cmd("sfdisk")
        .args(extra)
        .arg("--json")
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &v["partitiontable"];
    let unit = t["sectorsize"].as_u64().unwrap_or(512) / 512;
    let prefix = img.display().to_string();
    let parts = t["partitions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let node = p["node"].as_str().unwrap();
                    let rest = node.strip_prefix(&prefix).unwrap();
                    let number = rest.trim_start_matches('p').parse().unwrap();
                    (
                        number,
                        p["start"].as_u64().unwrap() * unit,
                        p["size"].as_u64().unwrap() * unit,
                        p["type"].as_str().unwrap().to_uppercase(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (t["label"].as_str().unwrap().to_string(), parts)
}

/// `(number, start, sectors)` per partition from `partx --show` (libblkid's reading).
fn partx(img: &Path) -> Option<Vec<(u32, u64, u64)>> {
    if !have_tool("partx") {
        eprintln!("SKIPPED: partx is not installed (Debian package util-linux)");
        return None;
    }
    let out = tool_cmd("partx")
        .args(["--show", "--noheadings", "--output", "NR,START,SECTORS"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Vec<(u32, u64, u64)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            (f[0] as u32, f[1], f[2])
        })
        .collect();
    v.sort();
    Some(v)
}

fn triples(parts: &[PartitionInfo]) -> Vec<(u32, u64, u64)> {
    parts
        .iter()
        .map(|p| (p.number, p.start, p.sectors))
        .collect()
}

fn ours(parts: &[PartitionInfo]) -> Vec<(u32, u64, u64, String)> {
    parts
        .iter()
        .map(|p| {
            let ty = match &p.kind {
                PartitionKind::Mbr { ptype, .. } => format!("{ptype:X}"),
                PartitionKind::Gpt { type_guid, .. } => type_guid.to_string(),
            };
            (p.number, p.start, p.sectors, ty)
        })
        .collect()
}

fn image(dir: &Path, mib: u64) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

const MBR_SCRIPT: &str = "label: dos
unit: sectors
start=2048, size=20480, type=83, bootable
start=22528, size=10240, type=82
start=32768, size=65536, type=5
start=34816, size=8192, type=83
start=45056, size=4096, type=8e
start=51200, size=2048, type=83
start=100352, size=20480, type=c
";

const GPT_SCRIPT: &str = "label: gpt
unit: sectors
start=2048, size=20480, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\"
start=22528, size=10240, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F
DISK5 : start=40960, size=8192, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"esp\"
DISK7 : start=65536, size=32768, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4
";

#[test]
fn mbr_matches_sfdisk() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 64);
    if !sfdisk(&img, &[], MBR_SCRIPT) {
        return;
    }
    let (label, want) = sfdisk_json(&img, &[]);
    assert_eq!(label, "dos");
    let dev = FileDevice::open(&img, true).unwrap();
    let got = read_partitions(&dev).unwrap();
    assert_eq!(ours(&got), want);
    let numbers: Vec<u32> = got.iter().map(|p| p.number).collect();
    assert_eq!(numbers, vec![1, 2, 3, 4, 5, 6, 7]);
    assert!(matches!(
        got[2].kind,
        PartitionKind::Mbr { extended: true, .. }
    ));
    assert_eq!(got[2].exposed_sectors(), 2);
    if let Some(px) = partx(&img) {
        assert_eq!(triples(&got), px, "ours vs partx");
    }
    assert!(matches!(
        got[0].kind,
        PartitionKind::Mbr { bootable: true, .. }
    ));
}

#[test]
fn gpt_matches_sfdisk() {
    let dir = tempfile::tempdir().unwrap();
    let script = GPT_SCRIPT.replace("DISK", &dir.path().join("disk.img").display().to_string());
    let img = image(dir.path(), 64);
    if !sfdisk(&img, &[], &script) {
        return;
    }
    let (label, want) = sfdisk_json(&img, &[]);
    assert_eq!(label, "gpt");
    let t = parse_image(&std::fs::read(&img).unwrap(), 512).unwrap();
    assert_eq!(t.kind, TableKind::Gpt);
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    assert_eq!(ours(&t.partitions), want);
    assert_eq!(
        t.partitions.iter().map(|p| p.number).collect::<Vec<_>>(),
        vec![1, 2, 5, 7]
    );
    match &t.partitions[0].kind {
        PartitionKind::Gpt { name, .. } => assert_eq!(name, "root"),
        k => panic!("{k:?}"),
    }
    if let Some(px) = partx(&img) {
        assert_eq!(triples(&t.partitions), px, "ours vs partx");
    }
}

#[test]
fn gpt_4k_sectors_matches_sfdisk() {
    // This sfdisk has no --sector-size: write the table through a 4K-sector loop device.
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 64);
    if !have_tool("sfdisk") {
        eprintln!("SKIPPED: sfdisk is not installed (Debian package fdisk)");
        return;
    }
    let Some(lo) = LoopDev::attach(&img, &["--sector-size", "4096"]) else {
        return;
    };
    let script = "label: gpt\nunit: sectors\nstart=256, size=2560\nstart=4096, size=1024\n";
    assert!(sfdisk(&lo.path, &[], script));
    let (_, want) = sfdisk_json(&lo.path, &[]);
    let bytes = std::fs::read(&img).unwrap();
    let t = parse_image(&bytes, 4096).unwrap();
    assert_eq!(t.kind, TableKind::Gpt);
    assert_eq!(ours(&t.partitions), want);
    assert_eq!(t.partitions[0].start, 256 * 8);
    // Through the device itself, the logical block size comes from BLKSSZGET.
    let dev = udm_io::backend::open::open_backend(&lo.path, &Default::default()).unwrap();
    assert_eq!(dev.limits().logical_block_size, 4096);
    assert_eq!(
        triples(&read_partitions(&*dev).unwrap()),
        triples(&t.partitions)
    );
    // Read with 512-byte LBAs, the 4K table is not found at LBA 1.
    assert!(parse_image(&bytes, 512).is_err());
}

#[test]
fn corrupt_gpt_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let script = GPT_SCRIPT.replace("DISK", &dir.path().join("disk.img").display().to_string());
    let img = image(dir.path(), 64);
    if !sfdisk(&img, &[], &script) {
        return;
    }
    let good = std::fs::read(&img).unwrap();
    let mut bad = good.clone();
    bad[512 + 40] ^= 1; // first usable LBA, header CRC now wrong
    let e = parse_image(&bad, 512).unwrap_err();
    assert!(e.to_string().contains("header CRC32"), "{e}");
    let mut bad = good.clone();
    bad[1024 + 33] ^= 1; // entry 1 start LBA, entries CRC now wrong
    let e = parse_image(&bad, 512).unwrap_err();
    assert!(e.to_string().contains("entries CRC32"), "{e}");
    // An entry beyond the disk, with both CRCs fixed: skipped with a warning.
    let mut bad = good.clone();
    bad[1024 + 128 + 40..1024 + 128 + 48].copy_from_slice(&(1u64 << 40).to_le_bytes());
    fix_gpt_crcs(&mut bad, 512);
    let t = parse_image(&bad, 512).unwrap();
    assert_eq!(
        t.partitions.iter().map(|p| p.number).collect::<Vec<_>>(),
        vec![1, 5, 7]
    );
    assert!(
        t.warnings.iter().any(|w| w.contains("entry 2")),
        "{:?}",
        t.warnings
    );
}

/// Recomputes the entries-array CRC and the header CRC of the primary GPT.
fn fix_gpt_crcs(img: &mut [u8], lbs: usize) {
    let h = lbs;
    let n = u32::from_le_bytes(img[h + 80..h + 84].try_into().unwrap()) as usize;
    let elba = u64::from_le_bytes(img[h + 72..h + 80].try_into().unwrap());
    let range = usize::try_from(elba)
        .ok()
        .and_then(|e| e.checked_mul(lbs))
        .and_then(|s| Some((s, s.checked_add(n.checked_mul(128)?)?)));
    if let Some((start, end)) = range.filter(|&(_, end)| end <= img.len()) {
        let c = crc32(&img[start..end]);
        img[h + 88..h + 92].copy_from_slice(&c.to_le_bytes());
    }
    let hs = (u32::from_le_bytes(img[h + 12..h + 16].try_into().unwrap()) as usize).clamp(92, lbs);
    img[h + 16..h + 20].fill(0);
    let c = crc32(&img[h..h + hs]);
    img[h + 16..h + 20].copy_from_slice(&c.to_le_bytes());
}

/// What the kernel registered for `/dev/loopN`: `(number, start, size)` from sysfs.
fn kernel_partitions(lo: &LoopDev) -> Vec<(u32, u64, u64)> {
    let name = lo.name();
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/sys/block/{name}")).unwrap() {
        let e = e.unwrap();
        let f = e.file_name().to_string_lossy().into_owned();
        let Some(n) = f.strip_prefix(&format!("{name}p")) else {
            continue;
        };
        let rd = |a: &str| -> u64 {
            std::fs::read_to_string(e.path().join(a))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        v.push((n.parse().unwrap(), rd("start"), rd("size")));
    }
    v.sort();
    v
}

#[test]
fn same_partitions_as_the_kernel() {
    for (label, script) in [("dos", MBR_SCRIPT), ("gpt", GPT_SCRIPT)] {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 64);
        let script = script.replace("DISK", &img.display().to_string());
        if !sfdisk(&img, &[], &script) {
            return;
        }
        let Some(lo) = LoopDev::attach(&img, &["-P"]) else {
            return;
        };
        // Partition scanning happens inside LOOP_CONFIGURE; allow a moment anyway.
        let mut kernel = Vec::new();
        for _ in 0..10 {
            kernel = kernel_partitions(&lo);
            if !kernel.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let dev = Arc::new(FileDevice::open(&img, false).unwrap());
        let parts = read_partitions(&*dev).unwrap();
        let mine: Vec<(u32, u64, u64)> = parts
            .iter()
            .map(|p| (p.number, p.start, p.exposed_sectors()))
            .collect();
        if kernel.is_empty() {
            eprintln!(
                "SKIPPED: the running kernel registered no partitions for the {label} table \
                 (built without CONFIG_MSDOS_PARTITION / CONFIG_EFI_PARTITION?)"
            );
            return;
        }
        assert_eq!(mine, kernel, "{label}: ours vs kernel");
        eprintln!("{label}: {} partitions match the kernel's", kernel.len());

        // A slice of partition 1 sees exactly what the kernel's partition device sees.
        let slice = SliceDevice::for_partition(dev.clone(), &lo.name(), &parts[0]).unwrap();
        assert_eq!(slice.name(), format!("{}p1", lo.name()));
        let data = vec![0x3cu8; 4096];
        slice.submit(Bio::write(8, &data)).unwrap();
        slice.submit(Bio::flush()).unwrap();
        let part_dev = format!("/dev/{}p1", lo.name());
        if Path::new(&part_dev).exists() {
            // The kernel's view goes through the loop device's page cache: drop it first.
            let _ = tool_cmd("blockdev")
                .arg("--flushbufs")
                .arg(&part_dev)
                .status();
            let raw = std::fs::read(&part_dev).unwrap();
            assert_eq!(&raw[8 * 512..8 * 512 + 4096], &data[..]);
        }
    }
}

/// Builds a GPT image of `sectors` sectors with the given `(first, last)` entries.
fn make_gpt(sectors: u64, entries: &[(u64, u64)]) -> Vec<u8> {
    let mut img = vec![0u8; (sectors * 512) as usize];
    // Protective MBR.
    img[0x1be + 4] = 0xee;
    img[0x1be + 8..0x1be + 12].copy_from_slice(&1u32.to_le_bytes());
    img[0x1be + 12..0x1be + 16]
        .copy_from_slice(&((sectors - 1).min(u32::MAX as u64) as u32).to_le_bytes());
    img[510] = 0x55;
    img[511] = 0xaa;
    let h = 512;
    img[h..h + 8].copy_from_slice(b"EFI PART");
    img[h + 8..h + 12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    img[h + 12..h + 16].copy_from_slice(&92u32.to_le_bytes());
    img[h + 24..h + 32].copy_from_slice(&1u64.to_le_bytes());
    img[h + 32..h + 40].copy_from_slice(&(sectors - 1).to_le_bytes());
    img[h + 40..h + 48].copy_from_slice(&34u64.to_le_bytes());
    img[h + 48..h + 56].copy_from_slice(&(sectors - 34).to_le_bytes());
    img[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
    img[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
    img[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
    for (i, &(first, last)) in entries.iter().enumerate().take(128) {
        let e = 1024 + i * 128;
        img[e] = 0xaf; // some non-zero type GUID
        img[e + 16] = i as u8 + 1;
        img[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
        img[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
    }
    fix_gpt_crcs(&mut img, 512);
    img
}

/// Invariants every successful parse must satisfy.
fn check_sane(img: &[u8], lbs: u32) {
    if let Ok(t) = parse_image(img, lbs) {
        let size = img.len() as u64 / 512;
        let mut last = 0;
        for p in &t.partitions {
            assert!(p.number > last && p.number < 256, "{:?}", t.partitions);
            last = p.number;
            assert!(p.sectors > 0 && p.start < size && p.sectors <= size - p.start);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_bytes_never_panic(
        mut img in proptest::collection::vec(any::<u8>(), 0..40 * 512),
        sign in any::<bool>(),
        lbs in prop_oneof![Just(512u32), Just(4096), Just(1000)],
    ) {
        if sign && img.len() >= 512 {
            img[510] = 0x55;
            img[511] = 0xaa;
            // Valid boot indicators, so the MBR path goes deeper.
            for i in 0..4 {
                img[0x1be + 16 * i] &= 0x80;
            }
        }
        check_sane(&img, lbs);
    }

    #[test]
    fn mutated_gpt_never_panics(
        entries in proptest::collection::vec((0u64..300, 0u64..300), 0..8),
        flips in proptest::collection::vec((0usize..34 * 512, any::<u8>()), 0..6),
        fix in any::<bool>(),
    ) {
        let mut img = make_gpt(256, &entries);
        for (at, x) in flips {
            img[at] ^= x;
        }
        if fix {
            fix_gpt_crcs(&mut img, 512);
        }
        check_sane(&img, 512);
    }

    #[test]
    fn mutated_mbr_chain_never_panics(
        prim in proptest::collection::vec((any::<u8>(), 0u32..600, 0u32..600), 4),
        ebrs in proptest::collection::vec((0usize..512, proptest::collection::vec((any::<u8>(), 0u32..600, 0u32..600), 4)), 0..6),
    ) {
        let mut img = vec![0u8; 512 * 512];
        let put = |img: &mut [u8], base: usize, i: usize, (t, s, n): (u8, u32, u32)| {
            let e = base + 0x1be + 16 * i;
            img[e + 4] = if t % 3 == 0 { 0x05 } else { t };
            img[e + 8..e + 12].copy_from_slice(&s.to_le_bytes());
            img[e + 12..e + 16].copy_from_slice(&n.to_le_bytes());
        };
        for (i, p) in prim.into_iter().enumerate() {
            put(&mut img, 0, i, p);
        }
        img[510] = 0x55;
        img[511] = 0xaa;
        for (sector, ents) in ebrs {
            let base = sector * 512;
            for (i, p) in ents.into_iter().enumerate() {
                put(&mut img, base, i, p);
            }
            img[base + 510] = 0x55;
            img[base + 511] = 0xaa;
        }
        check_sane(&img, 512);
    }
}

#[test]
fn built_gpt_parses() {
    let img = make_gpt(256, &[(34, 99), (0, 0), (100, 221), (200, 100)]);
    let t = parse_image(&img, 512).unwrap();
    assert_eq!(
        t.partitions
            .iter()
            .map(|p| (p.number, p.start, p.sectors))
            .collect::<Vec<_>>(),
        vec![(1, 34, 66), (2, 0, 1), (3, 100, 122)]
    );
    assert!(
        t.warnings.iter().any(|w| w.contains("entry 4")),
        "{:?}",
        t.warnings
    );
}
