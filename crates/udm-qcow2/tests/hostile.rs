//! Hostile images: each malformed header, table or entry gives the expected error (variant and
//! errno, naming the problem), and random corruption never panics. Chains that loop, go too
//! deep, name another format or mix cluster sizes are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;

use std::path::Path;

use common::{plan, write};
use udm_qcow2::{Chain, Cluster, Error, Image, Planned};

const CS: u64 = 4096;

/// A finished image (cluster_bits 12, backing "point-0.qcow2") as bytes: clusters 0 and 5
/// Data, 1 Zero, 600 (second L2 table) Data.
fn good() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let p = plan(
        700 * CS,
        12,
        Some("point-0.qcow2"),
        &[
            (0, Planned::Data),
            (1, Planned::Zero),
            (5, Planned::Data),
            (600, Planned::Data),
        ],
    );
    write(&path, &p, 3);
    std::fs::read(&path).unwrap()
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn open(b: Vec<u8>) -> Result<Image<Vec<u8>>, Error> {
    Image::from_reader(b, "hostile.qcow2")
}

/// Opening `b` fails with errno `errno` and a message containing `what` (and the file name).
fn refused(b: Vec<u8>, errno: i32, what: &str) -> Error {
    let e = open(b).expect_err(what);
    let msg = e.to_string();
    assert_eq!(e.errno(), errno, "{msg}");
    assert!(msg.contains(what), "{msg:?} should contain {what:?}");
    assert!(msg.contains("hostile.qcow2"), "{msg}");
    e
}

fn l1_offset(b: &[u8]) -> usize {
    be64(b, 40) as usize
}

/// The offset of the L2 entry of guest cluster `c` (within the first 512 clusters).
fn l2_entry_at(b: &[u8], c: usize) -> usize {
    let l2 = be64(b, l1_offset(b)) & 0x00ff_ffff_ffff_fe00;
    l2 as usize + c * 8
}

#[test]
fn the_good_image_opens() {
    let img = open(good()).unwrap();
    assert_eq!(img.backing(), Some("point-0.qcow2"));
    assert_eq!(img.backing_format(), Some("qcow2"));
    assert_eq!(img.cluster(1).unwrap(), Cluster::Zero);
    assert_eq!(img.cluster(2).unwrap(), Cluster::Unallocated);
    assert!(matches!(img.cluster(600).unwrap(), Cluster::Data { .. }));
    assert_eq!(img.cluster(700).unwrap_err().errno(), libc::EINVAL);
    let mut buf = vec![0u8; CS as usize];
    img.read_cluster(5, &mut buf).unwrap();
    assert_eq!(
        img.read_cluster(1, &mut buf).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        img.read_cluster(5, &mut buf[1..]).unwrap_err().errno(),
        libc::EINVAL
    );
}

#[test]
fn header_refusals() {
    let mut b = good();
    b[0] = b'X';
    assert!(matches!(
        refused(b, libc::EINVAL, "magic"),
        Error::NotQcow2 { .. }
    ));
    refused(Vec::new(), libc::EINVAL, "not a qcow2 image");
    refused(good()[..50].to_vec(), libc::EIO, "past the end");
    for v in [0, 1, 4, u32::MAX] {
        let mut b = good();
        put32(&mut b, 4, v);
        let e = refused(b, libc::EINVAL, &format!("version {v}"));
        assert!(matches!(e, Error::Unsupported { .. }));
    }
    for len in [0, 72, 100, 108] {
        let mut b = good();
        put32(&mut b, 100, len);
        refused(b, libc::EILSEQ, "header_length");
    }
    let mut b = good();
    put32(&mut b, 100, 8192);
    refused(b, libc::EILSEQ, "header_length");
    let mut b = good();
    put32(&mut b, 32, 1);
    refused(b, libc::EINVAL, "encryption");
    let names = [
        "dirty bit",
        "corrupt bit",
        "external data file",
        "compression type",
        "extended L2",
    ];
    for (bit, name) in names.iter().enumerate() {
        let mut b = good();
        put64(&mut b, 72, 1 << bit);
        let e = refused(b, libc::EINVAL, name);
        assert!(matches!(e, Error::Unsupported { .. }));
    }
    let mut b = good();
    put64(&mut b, 72, 1 << 40);
    refused(b, libc::EINVAL, "bit 40");
    for bits in [0, 8, 22, 64, u32::MAX] {
        let mut b = good();
        put32(&mut b, 20, bits);
        refused(b, libc::EILSEQ, "cluster_bits");
    }
    let mut b = good();
    put32(&mut b, 96, 7);
    refused(b, libc::EILSEQ, "refcount_order");
}

#[test]
fn size_and_table_refusals() {
    // A size the L1 table does not cover; the largest size.
    for size in [700 * CS * 1000, u64::MAX] {
        let mut b = good();
        put64(&mut b, 24, size);
        refused(b, libc::EILSEQ, "does not cover");
    }
    // A huge l1_size: refused against the file length, nothing allocated from it.
    let mut b = good();
    put32(&mut b, 36, u32::MAX);
    let e = refused(b, libc::EIO, "L1 table");
    assert!(matches!(e, Error::Truncated { .. }));
    // L1 table: unaligned, past the end, overflowing.
    let mut b = good();
    let v = be64(&b, 40) + 8;
    put64(&mut b, 40, v);
    refused(b, libc::EILSEQ, "L1 table");
    let mut b = good();
    let len = b.len() as u64;
    put64(&mut b, 40, len);
    refused(b, libc::EIO, "L1 table");
    let mut b = good();
    put64(&mut b, 40, u64::MAX - CS + 1);
    refused(b, libc::EIO, "L1 table");
    // Refcount table: unaligned, past the end, overflowing, absent.
    let mut b = good();
    let v = be64(&b, 48) + 512;
    put64(&mut b, 48, v);
    refused(b, libc::EILSEQ, "refcount table");
    let mut b = good();
    put32(&mut b, 56, 1 << 20);
    refused(b, libc::EIO, "refcount table");
    let mut b = good();
    put32(&mut b, 56, u32::MAX);
    refused(b, libc::EIO, "refcount table");
    let mut b = good();
    put64(&mut b, 48, u64::MAX - CS + 1);
    refused(b, libc::EIO, "refcount table");
    let mut b = good();
    put32(&mut b, 56, 0);
    refused(b, libc::EILSEQ, "refcount table");
}

#[test]
fn l1_and_l2_entry_refusals() {
    // An L1 entry pointing at an unaligned or missing L2 table.
    let mut b = good();
    let at = l1_offset(&b);
    let e = be64(&b, at);
    put64(&mut b, at, e + 512);
    refused(b, libc::EILSEQ, "L1 entry");
    let mut b = good();
    let len = b.len() as u64;
    put64(&mut b, at, (1 << 63) | len);
    refused(b, libc::EIO, "L2 table");
    let mut b = good();
    put64(&mut b, at, (1 << 63) | 0x00ff_ffff_ffff_f000);
    refused(b, libc::EIO, "L2 table");
    // One L2 table in two L1 entries (a small file could otherwise describe billions of
    // allocated clusters).
    let mut b = good();
    put64(&mut b, at + 8, e);
    refused(b, libc::EILSEQ, "also L1 entry 0");
    // L2 entries: unaligned and past-the-end data offsets fail on access, naming the entry.
    let mut b = good();
    let at0 = l2_entry_at(&b, 0);
    let d = be64(&b, at0);
    put64(&mut b, at0, d + 512);
    let img = open(b).unwrap();
    let e = img.cluster(0).unwrap_err();
    assert_eq!(e.errno(), libc::EILSEQ, "{e}");
    assert!(e.to_string().contains("guest cluster 0"), "{e}");
    assert_eq!(img.allocated().unwrap_err().errno(), libc::EILSEQ);
    assert!(matches!(img.cluster(5).unwrap(), Cluster::Data { .. }));
    let mut b = good();
    let len = b.len() as u64;
    put64(&mut b, at0, (1 << 63) | len);
    let img = open(b).unwrap();
    assert!(matches!(
        img.cluster(0).unwrap_err(),
        Error::Truncated { .. }
    ));
    // A compressed entry: refused on access, naming the cluster; the others still read.
    let mut b = good();
    let at5 = l2_entry_at(&b, 5);
    put64(&mut b, at5, (1 << 62) | 0x1234_5600);
    let img = open(b).unwrap();
    let e = img.cluster(5).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    assert!(
        e.to_string().contains("guest cluster 5 is compressed"),
        "{e}"
    );
    assert!(img.allocated().is_err());
    assert!(matches!(img.cluster(0).unwrap(), Cluster::Data { .. }));
    let mut buf = vec![0u8; CS as usize];
    assert!(img.read_cluster(5, &mut buf).is_err());
    // A zero flag wins over an offset (QEMU's "allocated zero" cluster).
    let mut b = good();
    let d = be64(&b, at0);
    put64(&mut b, at0, d | 1);
    assert_eq!(open(b).unwrap().cluster(0).unwrap(), Cluster::Zero);
}

#[test]
fn backing_name_refusals() {
    let mut b = good();
    put32(&mut b, 16, 1024);
    refused(b, libc::EILSEQ, "1024 bytes");
    let mut b = good();
    put64(&mut b, 8, CS - 4);
    refused(b, libc::EILSEQ, "past the first cluster");
    let mut b = good();
    put64(&mut b, 8, u64::MAX - 2);
    refused(b, libc::EILSEQ, "backing");
    let mut b = good();
    put32(&mut b, 16, 0);
    refused(b, libc::EILSEQ, "backing file name");
    // Extensions running into the backing name / a huge extension length.
    let mut b = good();
    put32(&mut b, 116, 1000);
    refused(b, libc::EILSEQ, "header extension");
    let mut b = good();
    put32(&mut b, 116, u32::MAX);
    refused(b, libc::EILSEQ, "header extension");
}

/// Deterministic random corruption of the metadata clusters: errors, never a panic.
#[test]
fn random_corruption_never_panics() {
    let good = good();
    let meta = (be64(&good, 40) as usize + 3 * CS as usize).min(good.len());
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut opened = 0;
    for round in 0..3000 {
        let mut b = good.clone();
        for _ in 0..(1 + round % 8) {
            let at = if next() % 2 == 0 {
                next() as usize % 128
            } else {
                next() as usize % meta
            };
            b[at] = next() as u8;
        }
        if round % 7 == 0 {
            b.truncate(next() as usize % good.len());
        }
        let Ok(img) = open(b) else { continue };
        opened += 1;
        let _ = img.allocated();
        let mut buf = vec![0u8; img.cluster_size() as usize];
        for c in [0, 1, 5, 600, 699, 700, u64::MAX] {
            if img.cluster(c).is_ok() {
                let _ = img.read_cluster(c, &mut buf);
            }
        }
    }
    assert!(
        opened > 100,
        "only {opened} corrupted images opened: the test hardly reads"
    );
}

fn chain_refused(top: &Path, what: &str) {
    let e = Chain::open(top).expect_err(what);
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(e.to_string().contains(what), "{e} should contain {what}");
}

#[test]
fn chain_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A loop: a -> b -> a.
    write(
        &d.join("a.qcow2"),
        &plan(CS * 4, 12, Some("b.qcow2"), &[]),
        0,
    );
    write(
        &d.join("b.qcow2"),
        &plan(CS * 4, 12, Some("a.qcow2"), &[]),
        0,
    );
    chain_refused(&d.join("a.qcow2"), "loop");
    // Self-loop through another spelling of the path.
    std::fs::create_dir(d.join("sub")).unwrap();
    write(
        &d.join("sub/s.qcow2"),
        &plan(CS * 4, 12, Some("../sub/./s.qcow2"), &[]),
        0,
    );
    chain_refused(&d.join("sub/s.qcow2"), "loop");
    // Depth: 258 images (257 backing files) refused, 257 accepted.
    write(
        &d.join("c0.qcow2"),
        &plan(CS, 12, None, &[(0, Planned::Data)]),
        0,
    );
    for i in 1..=257 {
        let back = format!("c{}.qcow2", i - 1);
        write(
            &d.join(format!("c{i}.qcow2")),
            &plan(CS, 12, Some(&back), &[]),
            0,
        );
    }
    assert_eq!(
        Chain::open(&d.join("c256.qcow2")).unwrap().images().len(),
        257
    );
    chain_refused(&d.join("c257.qcow2"), "more than 256");
    // Cluster size differs.
    write(&d.join("big.qcow2"), &plan(CS * 16, 16, None, &[]), 0);
    write(
        &d.join("small.qcow2"),
        &plan(CS * 16, 12, Some("big.qcow2"), &[]),
        0,
    );
    chain_refused(&d.join("small.qcow2"), "cluster size");
    // Another backing format.
    let p = d.join("rawfmt.qcow2");
    write(&p, &plan(CS * 4, 12, Some("c0.qcow2"), &[]), 0);
    let mut b = std::fs::read(&p).unwrap();
    b[120..125].copy_from_slice(b"raw\0\0");
    std::fs::write(&p, &b).unwrap();
    chain_refused(&p, "not qcow2");
    // A missing backing file: the OS error, naming the file.
    write(
        &d.join("orphan.qcow2"),
        &plan(CS * 4, 12, Some("gone.qcow2"), &[]),
        0,
    );
    let e = Chain::open(&d.join("orphan.qcow2")).unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    assert!(e.to_string().contains("gone.qcow2"), "{e}");
    // A smaller backing file reads as zeros past its end, and hides what lies below it.
    write(
        &d.join("t0.qcow2"),
        &plan(CS * 8, 12, None, &[(6, Planned::Data)]),
        5,
    );
    write(
        &d.join("t1.qcow2"),
        &plan(CS * 2 + 10, 12, Some("t0.qcow2"), &[]),
        0,
    );
    write(
        &d.join("t2.qcow2"),
        &plan(CS * 8, 12, Some("t1.qcow2"), &[]),
        0,
    );
    let chain = Chain::open(&d.join("t2.qcow2")).unwrap();
    assert_eq!(chain.resolve(6).unwrap(), None);
    let mut buf = vec![1u8; (CS * 8) as usize];
    chain.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    assert_eq!(chain.resolve(8).unwrap_err().errno(), libc::EINVAL);
}
