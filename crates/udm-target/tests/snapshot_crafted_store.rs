//! Crafted persistent stores whose exceptions point at metadata, past the COW device, or
//! reuse a chunk: the loader refuses them (ENXIO past the device, EINVAL otherwise) with a
//! message naming the area, the exception and the chunk, and writes nothing to them. Stores
//! written the ordinary way (exceptions, a full area, a partial merge) still load.
#![allow(clippy::unwrap_used)]

mod snapshot_common;

use std::sync::Arc;

use snapshot_common::*;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice};
use udm_target::snapshot::store::persistent::{encode_header, Persistent};
use udm_target::snapshot::store::{ExceptionStore, LoadState};
use udm_types::Errno;

/// Chunk size of the crafted stores: 8 sectors, 256 exceptions per area, area `i` at chunk
/// `1 + 257 * i`.
const CS: u64 = 8;
const EPA: u64 = 256;
const O: u64 = 1024;

/// A store image of `chunks` chunks with `entries` in area 0 (and `more` in area 1).
fn image(chunks: u64, area0: &[(u64, u64)], area1: &[(u64, u64)]) -> Vec<u8> {
    let cb = (CS * 512) as usize;
    let mut img = vec![0u8; chunks as usize * cb];
    encode_header(&mut img, true, 1, CS);
    for (area, entries) in [(0u64, area0), (1, area1)] {
        let base = (1 + area * (EPA + 1)) as usize * cb;
        for (i, (o, n)) in entries.iter().enumerate() {
            let at = base + i * 16;
            img[at..at + 8].copy_from_slice(&o.to_le_bytes());
            img[at + 8..at + 16].copy_from_slice(&n.to_le_bytes());
        }
    }
    img
}

fn mem_with(img: &[u8]) -> Arc<MemDevice> {
    let d = Arc::new(MemDevice::new(img.len() as u64 / 512));
    d.submit(Bio::write(0, img)).unwrap();
    d
}

/// Loads the store directly; the error when refused.
fn load(img: &[u8]) -> Result<Vec<(u64, u64)>, (Errno, String)> {
    let d = mem_with(img);
    let mut p = Persistent::new(d.clone(), 0, false);
    let mut got = Vec::new();
    let r = p.read_metadata(&mut |o, n| got.push((o, n)));
    match r {
        Ok(LoadState::Valid) => Ok(got),
        Ok(LoadState::Invalid) => panic!("crafted store loaded as invalid"),
        Err(e) => {
            assert!(
                got.is_empty(),
                "a refused store reported exceptions {got:?}"
            );
            assert_eq!(d.contents(), img, "a refused store was written");
            Err((e.errno, e.msg))
        }
    }
}

/// Builds a snapshot target on the crafted COW: must fail with `errno`, COW untouched.
fn refused_by_target(img: &[u8], errno: Errno, needles: &[&str]) {
    let mut c = Ctx::new();
    let o = c.mem("o", O);
    dev_write(&*o, 0, &pattern(1, 0, O));
    let cow = c.mem("c", img.len() as u64 / 512);
    dev_write(&*cow, 0, img);
    let e = c
        .snapshot(O, "o c P 8")
        .err()
        .expect("crafted store accepted");
    assert_eq!(e.errno, errno, "{}", e.msg);
    for n in needles {
        assert!(e.msg.contains(n), "{n:?} not in {:?}", e.msg);
    }
    assert_eq!(cow.contents(), img, "the refused COW was written");
}

fn refused(img: &[u8], errno: Errno, needles: &[&str]) {
    let (e, msg) = load(img).expect_err("crafted store accepted");
    assert_eq!(e, errno, "{msg}");
    for n in needles {
        assert!(msg.contains(n), "{n:?} not in {msg:?}");
    }
    refused_by_target(img, errno, needles);
}

#[test]
fn new_chunk_in_an_exception_area_is_einval() {
    // Exception 2 of area 0 maps old chunk 7 onto chunk 258: metadata area 1.
    let img = image(600, &[(0, 2), (1, 3), (7, 258)], &[]);
    refused(
        &img,
        Errno::EINVAL,
        &[
            "exception 2 of metadata area 0",
            "new chunk 258",
            "metadata area 1",
        ],
    );
    // Onto area 0 itself.
    let img = image(600, &[(5, 1)], &[]);
    refused(
        &img,
        Errno::EINVAL,
        &[
            "exception 0 of metadata area 0",
            "new chunk 1",
            "chunk of metadata area 0",
        ],
    );
}

#[test]
fn new_chunk_beyond_the_cow_device_is_enxio() {
    let img = image(600, &[(0, 2), (9, 600)], &[]);
    refused(
        &img,
        Errno::ENXIO,
        &[
            "exception 1 of metadata area 0",
            "new chunk 600",
            "beyond the end of the COW device",
        ],
    );
    let img = image(600, &[(9, u64::MAX)], &[]);
    refused(&img, Errno::ENXIO, &["beyond the end"]);
}

#[test]
fn duplicate_old_or_new_chunks_are_einval() {
    let img = image(600, &[(4, 2), (5, 3), (4, 4)], &[]);
    refused(
        &img,
        Errno::EINVAL,
        &[
            "exception 2 of metadata area 0",
            "old chunk 4 already has exception 0",
        ],
    );
    let img = image(600, &[(4, 2), (5, 3), (6, 2)], &[]);
    refused(
        &img,
        Errno::EINVAL,
        &[
            "exception 2 of metadata area 0",
            "new chunk 2 is already used by exception 0",
        ],
    );
}

/// Area 0 full, the next area would be past the device: the kernel never writes this (it
/// zeroes the next area before writing a full one).
#[test]
fn full_area_with_the_next_one_beyond_the_device_is_enxio() {
    let full: Vec<(u64, u64)> = (0..EPA).map(|i| (i, i + 2)).collect();
    let img = image(EPA + 2, &full, &[]);
    refused(
        &img,
        Errno::ENXIO,
        &["metadata area 0 is full", "metadata area 1 (chunk 258)"],
    );
}

/// Entries of area 1 are checked too (and against area 0's).
#[test]
fn second_area_is_checked() {
    let full: Vec<(u64, u64)> = (0..EPA).map(|i| (i, i + 2)).collect();
    let img = image(600, &full, &[(1000, 259), (1001, 5)]);
    refused(
        &img,
        Errno::EINVAL,
        &[
            "exception 1 of metadata area 1",
            "new chunk 5 is already used by exception 3 of metadata area 0",
        ],
    );
    let img = image(600, &full, &[(1000, 259), (1001, 260)]);
    assert_eq!(load(&img).unwrap().len(), EPA as usize + 2);
}

/// Bytes after the end marker are not exceptions, and stay so after the next commit.
#[test]
fn bytes_after_the_end_marker_never_become_exceptions() {
    let mut img = image(600, &[(10, 2), (11, 3)], &[]);
    // Entry 2 is the end marker; entry 3 is junk pointing at area 1.
    let at = (CS * 512 + 3 * 16) as usize;
    img[at..at + 8].copy_from_slice(&77u64.to_le_bytes());
    img[at + 8..at + 16].copy_from_slice(&258u64.to_le_bytes());
    let d = mem_with(&img);
    let mut p = Persistent::new(d.clone(), 0, false);
    let mut got = Vec::new();
    p.read_metadata(&mut |o, n| got.push((o, n))).unwrap();
    assert_eq!(got, vec![(10, 2), (11, 3)]);
    let n = p.prepare().unwrap();
    assert_eq!(n, 4);
    assert_eq!(p.commit(12, n, true), Some(true));
    drop(p);
    let mut q = Persistent::new(d, 0, false);
    let mut again = Vec::new();
    q.read_metadata(&mut |o, n| again.push((o, n)))
        .expect("reload after a commit");
    assert_eq!(again, vec![(10, 2), (11, 3), (12, 4)]);
}

/// What the store itself writes (a full area and more, then a partial merge) still loads,
/// through the snapshot target too.
#[test]
fn ordinary_stores_still_load() {
    let d = Arc::new(MemDevice::new(CS * 700));
    let mut p = Persistent::new(d.clone(), CS, false);
    p.read_metadata(&mut |_, _| {}).unwrap();
    let mut all = Vec::new();
    for old in 0..300u64 {
        let n = p.prepare().unwrap();
        all.push((old * 3, n));
        assert_eq!(p.commit(old * 3, n, true), Some(true));
    }
    assert_eq!(load(&d.contents()).unwrap(), all);
    // Merge away the last few (non-consecutive olds: one per step).
    for _ in 0..50 {
        let (_, _, n) = p.prepare_merge().unwrap().unwrap();
        p.commit_merge(n).unwrap();
        all.truncate(all.len() - n as usize);
    }
    assert_eq!(load(&d.contents()).unwrap(), all);
    let mut c = Ctx::new();
    c.mem("o", O);
    let cow = c.mem("c", CS * 700);
    dev_write(&*cow, 0, &d.contents());
    let s = c.snapshot(O, "o c P 8").unwrap();
    assert_eq!(
        s.status(),
        format!("{}/{} 16", (all.last().unwrap().1 + 1) * CS, CS * 700),
        "area 0 again"
    );
}

/// A new store on a COW device used before: the stale exceptions left in area 0 are zeroed
/// when the store is created (`zero_disk_area(0)`), so reopening it finds none of them.
#[test]
fn a_new_store_forgets_what_an_old_one_left_in_area_0() {
    let mut img = image(64, &[(3, 2), (5, 3)], &[]);
    img[..512].fill(0); // no header: a new snapshot
    let d = mem_with(&img);
    let mut p = Persistent::new(d.clone(), CS, false);
    assert!(matches!(
        p.read_metadata(&mut |_, _| panic!("a new store has no exceptions")),
        Ok(LoadState::Valid)
    ));
    drop(p);
    let mut p = Persistent::new(d, 0, false);
    let mut got = Vec::new();
    assert!(matches!(
        p.read_metadata(&mut |o, n| got.push((o, n))),
        Ok(LoadState::Valid)
    ));
    assert_eq!(got, vec![], "stale exceptions came back");
}
