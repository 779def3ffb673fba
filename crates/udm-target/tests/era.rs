//! The era target in process, on memory devices: a write history through eras, checkpoints and
//! suspend/resume against a model (block -> last era written), the metadata snapshot, a
//! "crash" (the table dropped without suspend), write-after-commit ordering, bad input; the
//! udm-pdata checker clean after every step.

use std::sync::Arc;
use std::time::Duration;

use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::{Bio, BioKind, BlockDevice};
use udm_pdata::era::{check_roots, Superblock, Writeset, WRITESET_TREE};
use udm_pdata::{check, BlockStore};
use udm_target::era::{shared_metadata, DevStore, Metadata};
use udm_target::table::Table;
use udm_target::testing::TestContext;
use udm_target::TargetEnv;
use udm_types::Errno;

const BS: u64 = 128;
const NR: u64 = 16;

struct Rig {
    ctx: TestContext,
    env: Arc<TargetEnv>,
    meta: Arc<MemDevice>,
    origin: Arc<MemDevice>,
}

fn rig() -> Rig {
    let mut ctx = TestContext::new();
    let env = Arc::new(TargetEnv::default());
    ctx.set_env(env.clone());
    let meta = ctx.add_mem("meta", 8 * 256);
    let origin = ctx.add_mem("origin", NR * BS);
    Rig {
        ctx,
        env,
        meta,
        origin,
    }
}

impl Rig {
    fn table(&mut self) -> Table {
        let t = self
            .ctx
            .build(&format!("0 {} era meta origin {BS}", NR * BS))
            .expect("era table");
        t.preresume().expect("preresume");
        t.resume();
        t
    }

    fn shared(&self) -> Arc<udm_target::era::Shared> {
        let id = self.ctx.device("meta").expect("meta").id;
        shared_metadata(&self.env, id).expect("in-core metadata")
    }
}

/// A write and a flush: the write is acknowledged at once (held until its bit is committed),
/// the flush returns once it is on the origin and so marked.
fn write(t: &Table, block: u64) {
    t.submit(Bio::write(block * BS + 1, &[0xa5; 1024]))
        .expect("write");
    t.submit(Bio::flush()).expect("flush");
}

fn status(t: &Table) -> String {
    t.status_lines()[0].params.clone()
}

fn msg(t: &Table, m: &str) -> Result<Option<String>, udm_target::TargetError> {
    t.message(0, &[m.to_string()])
}

/// The committed metadata, read through a fresh open (only while no table works on it).
fn on_disk(meta: &Arc<MemDevice>) -> Metadata {
    Metadata::open(Box::new(DevStore::new(meta.clone())), BS as u32).expect("open metadata")
}

/// The checker (reference counts included) finds nothing on the committed metadata.
fn assert_clean(meta: &Arc<MemDevice>) {
    let store = DevStore::new(meta.clone());
    let sb = Superblock::read(&store, 0).expect("superblock");
    let roots = check_roots(&store, &sb).expect("roots");
    let report = check::check(&store as &dyn BlockStore, &sb.sm_root, &roots);
    assert!(report.is_clean(), "checker: {:?}", report.problems);
}

/// The model: block -> last era it was written in (0 = never).
fn model(history: &[(u32, &[u64])]) -> Vec<u32> {
    let mut eras = vec![0u32; NR as usize];
    for (era, blocks) in history {
        for &b in *blocks {
            eras[b as usize] = *era;
        }
    }
    eras
}

fn bits(blocks: &[u64]) -> Vec<bool> {
    (0..NR).map(|b| blocks.contains(&b)).collect()
}

#[test]
fn fresh_device_is_formatted_and_resume_starts_era_1() {
    let mut r = rig();
    let t = r.table();
    assert!(status(&t).starts_with("8 "), "{}", status(&t));
    assert!(status(&t).ends_with(" 1 -"), "{}", status(&t));
    let total = status(&t).split(['/', ' ']).nth(2).map(str::to_string);
    assert_eq!(total.as_deref(), Some("256"), "total = metadata blocks");
    assert_eq!(t.table_lines()[0].params, "8:0 8:16 128");
    t.postsuspend();
    drop(t);
    let md = on_disk(&r.meta);
    assert_eq!((md.current_era(), md.nr_blocks()), (1, NR as u32));
    assert_clean(&r.meta);
}

#[test]
fn write_history_reaches_the_era_array_as_the_model_says() {
    let mut r = rig();
    let t = r.table();
    let history: [(u32, &[u64]); 3] = [(1, &[0, 3]), (2, &[3, 5, 15]), (3, &[7, 0])];
    for (i, (_, blocks)) in history.iter().enumerate() {
        for &b in *blocks {
            write(&t, b);
        }
        if i + 1 < history.len() {
            assert_eq!(msg(&t, "checkpoint").expect("checkpoint"), None);
        }
    }
    assert!(r.shared().wait_digested(Duration::from_secs(10)), "digest");
    assert!(status(&t).ends_with(" 3 -"), "{}", status(&t));
    let (array, current) = r.shared().with_metadata(|md| {
        (
            md.era_array().expect("array"),
            md.current_writeset().expect("ws"),
        )
    });
    assert_eq!(array, model(&history[..2]), "eras 1 and 2 digested");
    assert_eq!(
        current,
        Some(bits(&[0, 7])),
        "era 3 is the current writeset"
    );
    // Suspend archives era 3 without a new era; resume rolls over to 4 and digests it.
    t.postsuspend();
    let md = on_disk(&r.meta);
    assert_eq!(md.current_era(), 3);
    assert_eq!(md.writesets().expect("ws"), vec![(3, bits(&[0, 7]))]);
    assert_eq!(md.current_writeset().expect("ws"), None);
    assert_clean(&r.meta);
    t.preresume().expect("preresume");
    assert!(r.shared().wait_digested(Duration::from_secs(10)), "digest");
    assert!(status(&t).ends_with(" 4 -"), "{}", status(&t));
    t.postsuspend();
    drop(t);
    let md = on_disk(&r.meta);
    assert_eq!(md.era_array().expect("array"), model(&history));
    assert_clean(&r.meta);
}

#[test]
fn metadata_snapshot_is_held_and_dropped() {
    let mut r = rig();
    let t = r.table();
    write(&t, 2);
    msg(&t, "take_metadata_snap").expect("take");
    let st = status(&t);
    let held: u64 = st
        .rsplit(' ')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("held root");
    assert!(st.contains(" 2 "), "the snapshot ends era 1: {st}");
    let e = msg(&t, "take_metadata_snap").unwrap_err();
    assert_eq!(
        (e.errno, e.msg.as_str()),
        (Errno::EINVAL, "metadata snapshot already exists")
    );
    // The snapshot's superblock holds era 1's writeset even after the digest removed it.
    assert!(r.shared().wait_digested(Duration::from_secs(10)), "digest");
    t.postsuspend();
    assert_clean(&r.meta);
    let store = DevStore::new(r.meta.clone());
    let snap = Superblock::read(&store, held).expect("snapshot superblock");
    assert_eq!((snap.current_era, snap.metadata_snap), (2, 0));
    assert_ne!(
        snap.writeset_tree_root,
        on_disk(&r.meta).superblock().writeset_tree_root
    );
    t.preresume().expect("preresume");
    msg(&t, "DROP_METADATA_SNAP").expect("drop, any case");
    assert!(status(&t).ends_with(" -"), "{}", status(&t));
    let e = msg(&t, "drop_metadata_snap").unwrap_err();
    assert_eq!(
        (e.errno, e.msg.as_str()),
        (Errno::EINVAL, "no snap to drop")
    );
    t.postsuspend();
    assert_clean(&r.meta);
}

#[test]
fn unknown_or_malformed_message_is_einval() {
    let mut r = rig();
    let t = r.table();
    assert_eq!(msg(&t, "frobnicate").unwrap_err().errno, Errno::EINVAL);
    let e = t
        .message(0, &["checkpoint".to_string(), "now".to_string()])
        .unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
    assert!(
        status(&t).ends_with(" 1 -"),
        "nothing changed: {}",
        status(&t)
    );
}

#[test]
fn crash_loses_no_acknowledged_write() {
    let mut r = rig();
    let t = r.table();
    msg(&t, "checkpoint").expect("checkpoint");
    for b in [1, 4, 9] {
        write(&t, b);
    }
    drop(t); // no postsuspend: nothing after the last write's commit
    assert_clean(&r.meta);
    let md = on_disk(&r.meta);
    assert_eq!(md.current_era(), 2);
    assert_eq!(md.current_writeset().expect("ws"), Some(bits(&[1, 4, 9])));
    let t = r.table();
    assert!(r.shared().wait_digested(Duration::from_secs(10)), "digest");
    assert!(status(&t).ends_with(" 3 -"), "{}", status(&t));
    t.postsuspend();
    drop(t);
    assert_eq!(
        on_disk(&r.meta).era_array().expect("array"),
        model(&[(2, &[1, 4, 9])])
    );
    assert_clean(&r.meta);
}

#[test]
fn a_write_reaches_the_origin_only_after_its_metadata_commit() {
    let mut r = rig();
    let t = r.table();
    write(&t, 3);
    r.meta
        .inject(Fault::range(0, u64::MAX, Errno::EIO).ops(&[BioKind::Write, BioKind::Flush]));
    let before = r.origin.count(BioKind::Write);
    // Acknowledged and held; its commit fails, so it never reaches the origin (a block must
    // not change unrecorded) and the next flush reports it, as a failed write-back.
    t.submit(Bio::write(5 * BS, &[1; 512]))
        .expect("held write acknowledged");
    let e = t.submit(Bio::flush()).unwrap_err();
    assert_eq!(udm_types::errno::HasErrno::errno(&e), Errno::EIO, "{e}");
    assert_eq!(
        r.origin.count(BioKind::Write),
        before,
        "not issued to the origin"
    );
    let mut back = [0u8; 512];
    t.submit(Bio::read(5 * BS, &mut back)).expect("read");
    assert_eq!(back, [0; 512], "the dropped write is not shown either");
    write(&t, 3); // already marked: no metadata I/O needed
                  // The failed commit may have left the in-core state ahead of the disk: nothing more is
                  // written through this metadata, even once the device works again.
    r.meta.clear_faults();
    let meta_writes = r.meta.count(BioKind::Write);
    let e = t.submit(Bio::write(6 * BS, &[1; 512])).unwrap_err();
    assert_eq!(udm_types::errno::HasErrno::errno(&e), Errno::EIO);
    assert_eq!(status(&t), "Error");
    assert_eq!(msg(&t, "checkpoint").unwrap_err().errno, Errno::EIO);
    t.postsuspend();
    assert_eq!(
        r.meta.count(BioKind::Write),
        meta_writes,
        "failed metadata is not written"
    );
    drop(t);
    // A new table reads the device again: what was committed is there, and it works.
    assert_clean(&r.meta);
    let t = r.table();
    assert!(status(&t).ends_with(" 2 -"), "{}", status(&t));
    write(&t, 6);
    t.postsuspend();
    drop(t);
    let eras = on_disk(&r.meta).logical_eras().expect("eras");
    assert_eq!((eras[3], eras[6]), (1, 2));
    assert_clean(&r.meta);
}

#[test]
fn discard_marks_every_block_it_touches() {
    let mut r = rig();
    let t = r.table();
    t.submit(Bio::discard(BS - 8, 2 * BS + 16))
        .expect("discard");
    let current = r
        .shared()
        .with_metadata(|md| md.current_writeset().expect("ws"));
    assert_eq!(current, Some(bits(&[0, 1, 2, 3])));
}

#[test]
fn constructor_errors() {
    let mut r = rig();
    let e =
        |ctx: &mut TestContext, args: &str| match ctx.build(&format!("0 {} era {args}", NR * BS)) {
            Ok(_) => panic!("{args}: built"),
            Err(e) => e.to_string(),
        };
    assert!(e(&mut r.ctx, "meta origin").contains("Invalid argument count"));
    assert!(e(&mut r.ctx, "meta origin 12").contains("Invalid block size"));
    assert!(e(&mut r.ctx, "meta origin x").contains("Error parsing block size"));
    assert!(e(&mut r.ctx, "nope origin 128").contains("Error opening metadata device"));
    assert!(e(&mut r.ctx, "meta nope 128").contains("Error opening data device"));
    // Format with 128, then a table with 256 on the same metadata.
    drop(r.table());
    let msg = e(&mut r.ctx, "meta origin 256");
    assert!(
        msg.contains("changing the data block size (from 128 to 256) is not supported"),
        "{msg}"
    );
    // A corrupt superblock: a clear error with the kernel's errno, nothing written.
    let mut sb = [0u8; 4096];
    r.meta.submit(Bio::read(0, &mut sb)).expect("read");
    sb[200] ^= 0xff;
    r.meta.submit(Bio::write(0, &sb)).expect("write");
    let before = r.meta.contents();
    let err = match r.ctx.build(&format!("0 {} era meta origin {BS}", NR * BS)) {
        Ok(_) => panic!("corrupt metadata accepted"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("Error reading metadata"), "{err}");
    assert!(err.to_string().contains("EILSEQ"), "{err}");
    assert_eq!(udm_types::errno::HasErrno::errno(&err), Errno(libc::EILSEQ));
    assert!(r.meta.contents() == before, "nothing written");
}

#[test]
fn metadata_device_too_small_is_a_clear_error() {
    for (sectors, errno) in [(8, Errno::ENOSPC), (4, Errno::ERANGE)] {
        let mut ctx = TestContext::new();
        let meta = ctx.add_mem("meta", sectors);
        ctx.add_mem("origin", NR * BS);
        let err = match ctx.build(&format!("0 {} era meta origin {BS}", NR * BS)) {
            Ok(_) => panic!("{sectors}-sector metadata device accepted"),
            Err(e) => e,
        };
        assert_eq!(udm_types::errno::HasErrno::errno(&err), errno, "{err}");
        assert!(err.to_string().contains("Error reading metadata"), "{err}");
        println!("{sectors} sectors: {err}");
        assert!(meta.contents().iter().all(|&b| b == 0), "nothing written");
    }
}

#[test]
fn origin_resize_keeps_the_eras_of_the_blocks_that_remain() {
    let mut r = rig();
    let t = r.table();
    write(&t, 2);
    write(&t, 15);
    t.postsuspend();
    drop(t);
    // Grow to 24 blocks (the origin device is replaced by a bigger one under the same name).
    r.origin = r.ctx.add_mem("origin", 24 * BS);
    let t = r
        .ctx
        .build(&format!("0 {} era meta origin {BS}", 24 * BS))
        .expect("grown");
    t.preresume().expect("preresume");
    write(&t, 20);
    assert!(status(&t).ends_with(" 2 -"), "{}", status(&t));
    let eras = r
        .shared()
        .with_metadata(|md| md.logical_eras().expect("eras"));
    let mut want = vec![0u32; 24];
    (want[2], want[15], want[20]) = (1, 1, 2);
    assert_eq!(eras, want);
    t.postsuspend();
    drop(t);
    assert_clean(&r.meta);
    // Shrink to 10 blocks: the eras of blocks 0..10 stay.
    let t = r
        .ctx
        .build(&format!("0 {} era meta origin {BS}", 10 * BS))
        .expect("shrunk");
    t.preresume().expect("preresume");
    assert!(r.shared().wait_digested(Duration::from_secs(10)), "digest");
    let eras = r
        .shared()
        .with_metadata(|md| md.logical_eras().expect("eras"));
    assert_eq!(eras, want[..10].to_vec());
    t.postsuspend();
    drop(t);
    assert_clean(&r.meta);
}

#[test]
fn corrupt_metadata_in_each_structure_is_refused_before_anything_is_written() {
    let mut r = rig();
    let t = r.table();
    write(&t, 1);
    msg(&t, "checkpoint").expect("checkpoint");
    write(&t, 2);
    msg(&t, "take_metadata_snap").expect("snap");
    write(&t, 3);
    t.postsuspend();
    drop(t);
    let store = DevStore::new(r.meta.clone());
    let sb = Superblock::read(&store, 0).expect("superblock");
    let tm =
        udm_pdata::tm::Tm::open(Box::new(DevStore::new(r.meta.clone())), &sb.sm_root).expect("tm");
    let tree = udm_pdata::btree::entries(&tm, sb.writeset_tree_root, &WRITESET_TREE).expect("tree");
    let bitset = Writeset::parse(&tree.last().expect("an archived writeset").1).root;
    let structures = [
        ("space map index", sb.sm_root.bitmap_root),
        ("writeset tree", sb.writeset_tree_root),
        ("archived writeset", bitset),
        ("era array", sb.era_array_root),
        ("metadata snapshot", sb.metadata_snap),
    ];
    for (what, block) in structures {
        let mut b = [0u8; 4096];
        r.meta.submit(Bio::read(block * 8, &mut b)).expect("read");
        let good = b;
        b[100] ^= 0x40;
        r.meta.submit(Bio::write(block * 8, &b)).expect("write");
        let before = r.meta.contents();
        let err = match r.ctx.build(&format!("0 {} era meta origin {BS}", NR * BS)) {
            Ok(_) => panic!("{what} corrupt: accepted"),
            Err(e) => e,
        };
        assert_eq!(
            udm_types::errno::HasErrno::errno(&err),
            Errno(libc::EILSEQ),
            "{what}: {err}"
        );
        assert!(
            err.to_string().contains("Error reading metadata"),
            "{what}: {err}"
        );
        assert!(
            err.to_string().contains(&format!("block {block}")),
            "{what}: {err}"
        );
        assert!(r.meta.contents() == before, "{what}: nothing written");
        r.meta
            .submit(Bio::write(block * 8, &good))
            .expect("restore");
    }
    drop(r.table());
    assert_clean(&r.meta);
}

/// The status line of a fresh device after its first resume is the kernel's, byte for byte
/// (Linux 6.1 in vmlab: `8 9/1024 1 -` for 32 blocks of 128 sectors, `8 25/1024 1 -` for
/// 16384 blocks of 8: the era array grows by one new block per full block, as the kernel's).
#[test]
fn fresh_status_is_the_kernels() {
    for (blocks, bs, want) in [(32u64, 128u64, "8 9/1024 1 -"), (16384, 8, "8 25/1024 1 -")] {
        let mut ctx = TestContext::new();
        ctx.add_mem("meta", 8 * 1024);
        ctx.add_sparse("origin", blocks * bs);
        let t = ctx
            .build(&format!("0 {} era meta origin {bs}", blocks * bs))
            .expect("table");
        t.preresume().expect("preresume");
        assert_eq!(status(&t), want, "{blocks} blocks of {bs}");
    }
}

/// Writers on several threads while checkpoints and status reads run: no deadlock, every
/// block recorded in an era no earlier than the one its write was issued in, metadata clean.
#[test]
fn concurrent_writers_and_checkpoints() {
    let mut r = rig();
    let t = r.table();
    let era_now = |t: &Table| -> u32 {
        status(t)
            .split(' ')
            .nth(2)
            .and_then(|e| e.parse().ok())
            .expect("era")
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    let issued: Vec<Vec<(u64, u32)>> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let (t, era_now) = (&t, &era_now);
                let done = &done;
                s.spawn(move || {
                    let mut out = Vec::new();
                    let mut i = 0u64;
                    while !done.load(std::sync::atomic::Ordering::SeqCst) {
                        let b = (i * 7 + w * 3) % NR;
                        let era = era_now(t);
                        write(t, b);
                        out.push((b, era));
                        i += 1;
                    }
                    out
                })
            })
            .collect();
        // 20 checkpoints while the writers run, then they stop.
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(1));
            msg(&t, "checkpoint").expect("checkpoint");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        writers
            .into_iter()
            .map(|h| h.join().expect("writer"))
            .collect()
    });
    assert_eq!(era_now(&t), 21, "checkpoints ran");
    assert!(issued.iter().any(|w| !w.is_empty()), "the writers wrote");
    t.postsuspend();
    drop(t);
    assert_clean(&r.meta);
    let eras = on_disk(&r.meta).logical_eras().expect("eras");
    for (b, era) in issued.into_iter().flatten() {
        assert!(
            eras[b as usize] >= era,
            "block {b} issued in era {era}, recorded {}",
            eras[b as usize]
        );
    }
}

#[test]
fn two_to_the_31_origin_blocks_is_einval_at_resume() {
    let mut ctx = TestContext::new();
    ctx.add_mem("meta", 8 * 64);
    let len = (1u64 << 31) * 8;
    ctx.add_sparse("origin", len);
    let t = ctx
        .build(&format!("0 {len} era meta origin 8"))
        .expect("the constructor does not look at the size (the kernel checks in preresume)");
    let e = t.preresume().unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
    assert_eq!(e.msg, "Invalid number of origin blocks 2147483648");
    let t = ctx
        .build(&format!("0 {} era meta origin 8", len - 8))
        .expect("one block less");
    assert!(
        t.preresume().is_err(),
        "2^31 - 1 blocks need more metadata than 64 blocks"
    );
}

/// Sector `s` of the table, read through it.
fn read_sector(t: &Table, s: u64) -> u8 {
    let mut b = [0u8; 512];
    t.submit(Bio::read(s, &mut b)).expect("read");
    assert!(b.iter().all(|&x| x == b[0]), "sector {s} mixed");
    b[0]
}

#[test]
fn a_write_over_a_held_write_is_held_behind_it_without_waiting_for_its_commit() {
    let mut r = rig();
    let t = r.table();
    let quick = Duration::from_millis(60);
    // Block 4 is unmarked and its commit slow: A is held while its bit commits; B, over part
    // of A, is held behind it instead of waiting for that commit.
    r.meta.set_latency(Duration::from_millis(150));
    t.submit(Bio::write(4 * BS, &[1; 1024])).expect("A");
    let t0 = std::time::Instant::now();
    t.submit(Bio::write(4 * BS + 1, &[2; 1024])).expect("B");
    assert!(t0.elapsed() < quick, "B waited {:?}", t0.elapsed());
    assert_eq!(
        (
            read_sector(&t, 4 * BS),
            read_sector(&t, 4 * BS + 1),
            read_sector(&t, 4 * BS + 2)
        ),
        (1, 2, 2),
        "reads lay held writes over the origin in order"
    );
    t.submit(Bio::flush()).expect("flush");
    r.meta.set_latency(Duration::ZERO);
    let on_origin = |s: u64| r.origin.contents()[(s * 512) as usize];
    assert_eq!(
        (
            on_origin(4 * BS),
            on_origin(4 * BS + 1),
            on_origin(4 * BS + 2)
        ),
        (1, 2, 2)
    );
    // Block 6: C is held, its bit committed, but the origin is slow to take it; D, over C in
    // a block now marked, is held behind C rather than waiting for C to be applied.
    r.origin.set_latency(Duration::from_millis(150));
    t.submit(Bio::write(6 * BS, &[3; 512])).expect("C");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !r
        .shared()
        .with_metadata(|md| md.current_writeset().expect("ws"))
        .is_some_and(|ws| ws.get(6).copied().unwrap_or(false))
    {
        assert!(std::time::Instant::now() < deadline, "block 6 never marked");
        std::thread::sleep(Duration::from_millis(2));
    }
    let t0 = std::time::Instant::now();
    t.submit(Bio::write(6 * BS, &[4; 512])).expect("D");
    assert!(t0.elapsed() < quick, "D waited {:?}", t0.elapsed());
    t.submit(Bio::flush()).expect("flush");
    r.origin.set_latency(Duration::ZERO);
    assert_eq!(on_origin(6 * BS), 4, "applied in order");
}
