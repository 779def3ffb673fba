//! Live interposition under load (issue "Live interposition", acceptance 1): writers and readers
//! keep hammering the original device while linear, delay and flakey interposers are attached and
//! detached; nothing may fail, be lost or be misplaced, and the stall per switch is reported.
//! Requests span 4 KiB to 96 KiB, and a second test sends writes of any length at any sector
//! across the edges of an interposer, then compares the backing device itself with a model: an
//! interposer that acknowledged a write without passing it down must not go unnoticed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use udm_core::registry::{LoadFlags, ResumeOptions};
use udm_core::Registry;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BioFlags, BlockDevice};
use udm_target::table::TableSpec;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 1024;
const SECTORS: u64 = BLOCKS * 8;
/// Longest run of blocks one write (or read) covers: 96 KiB, well past one page.
const MAX_RUN: u64 = 24;

/// A block stamped with its number, writer sequence and a checksum.
fn make_block(block: u64, seq: u64, buf: &mut [u8]) {
    buf[..8].copy_from_slice(&block.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq;
    for chunk in buf[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let sum = crc(&buf[24..]);
    buf[16..24].copy_from_slice(&sum.to_le_bytes());
}

fn crc(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Returns (block, seq) if the block is intact, None for a never-written (zero) block.
fn check_block(buf: &[u8]) -> Result<Option<(u64, u64)>, String> {
    if buf.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let block = u64::from_le_bytes(buf[..8].try_into().map_err(|_| "short")?);
    let seq = u64::from_le_bytes(buf[8..16].try_into().map_err(|_| "short")?);
    let sum = u64::from_le_bytes(buf[16..24].try_into().map_err(|_| "short")?);
    if crc(&buf[24..]) != sum {
        return Err(format!(
            "block {block} seq {seq}: checksum mismatch (torn or corrupt)"
        ));
    }
    Ok(Some((block, seq)))
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn attach_detach_under_load() {
    let reg = Arc::new(Registry::new());
    let mem = Arc::new(MemDevice::new(SECTORS));
    reg.add_disk_device("orig", mem.clone()).unwrap();
    let node = reg.node("orig").unwrap();

    // Model: last acknowledged sequence per block; each writer owns blocks b % 4 == w.
    let model: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let ops = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for w in 0..4u64 {
        let (node, model, stop, failures, latencies, ops) = (
            node.clone(),
            model.clone(),
            stop.clone(),
            failures.clone(),
            latencies.clone(),
            ops.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            let mut buf = Vec::new();
            let mut seq = 0u64;
            let mut lat = Vec::new();
            let region = BLOCKS / 4;
            while !stop.load(Ordering::Relaxed) {
                // A run of 1..=MAX_RUN blocks inside this writer's quarter of the device.
                let first = rng.gen_range(0..region);
                let run = rng.gen_range(1..=MAX_RUN).min(region - first);
                let base = w * region + first;
                seq += 1;
                buf.resize(run as usize * BLOCK, 0);
                for (i, b) in buf.chunks_mut(BLOCK).enumerate() {
                    make_block(base + i as u64, seq, b);
                }
                let t = Instant::now();
                match node.submit(Bio::write(base * 8, &buf)) {
                    Ok(()) => {
                        for b in base..base + run {
                            model[b as usize].store(seq, Ordering::SeqCst);
                        }
                    }
                    Err(e) => failures
                        .lock()
                        .push(format!("write blocks {base}+{run}: {e}")),
                }
                if seq % 64 == 0 {
                    if let Err(e) = node.submit(Bio::flush()) {
                        failures.lock().push(format!("flush: {e}"));
                    }
                }
                lat.push(t.elapsed());
                ops.fetch_add(1, Ordering::Relaxed);
            }
            latencies.lock().extend(lat);
        }));
    }
    for r in 0..2u64 {
        let (node, model, stop, failures, ops) = (
            node.clone(),
            model.clone(),
            stop.clone(),
            failures.clone(),
            ops.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(100 + r);
            let mut buf = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let base = rng.gen_range(0..BLOCKS);
                let run = rng.gen_range(1..=MAX_RUN).min(BLOCKS - base);
                let floors: Vec<u64> = (base..base + run)
                    .map(|b| model[b as usize].load(Ordering::SeqCst))
                    .collect();
                buf.resize(run as usize * BLOCK, 0);
                if let Err(e) = node.submit(Bio::read(base * 8, &mut buf)) {
                    failures
                        .lock()
                        .push(format!("read blocks {base}+{run}: {e}"));
                    continue;
                }
                for ((block, floor), data) in (base..).zip(floors).zip(buf.chunks(BLOCK)) {
                    match check_block(data) {
                        Err(e) => failures.lock().push(e),
                        Ok(None) if floor > 0 => failures
                            .lock()
                            .push(format!("block {block}: lost (zero) after seq {floor}")),
                        Ok(Some((b, _))) if b != block => failures
                            .lock()
                            .push(format!("block {block} holds block {b}: misplaced")),
                        Ok(Some((_, s))) if s < floor => failures.lock().push(format!(
                            "block {block}: stale seq {s} < acknowledged {floor}"
                        )),
                        _ => {}
                    }
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let tables: [(&str, usize); 3] = [
        (&format!("0 {SECTORS} linear orig 0"), 200),
        (&format!("0 {SECTORS} delay orig 0 1"), 50),
        (&format!("0 {SECTORS} flakey orig 0 3600 1"), 50),
    ]
    .map(|(t, n)| (Box::leak(t.to_string().into_boxed_str()) as &str, n));
    let mut switches = Vec::new();
    let mut attached = 0u64;
    for (text, n) in tables {
        let mut stage_redirected = 0;
        let spec = TableSpec::parse(text).unwrap();
        for _ in 0..n {
            let t = Instant::now();
            reg.create(
                "ip",
                None,
                None,
                Some((
                    &spec,
                    LoadFlags {
                        read_only: false,
                        interpose: true,
                    },
                )),
                &ResumeOptions::default(),
            )
            .unwrap();
            switches.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(2));
            let info = reg.info("ip").unwrap();
            assert_eq!(info.interposers.len(), 1, "{text}: no interposer attached");
            stage_redirected += info.redirected;
            let t = Instant::now();
            reg.remove("ip", false, false).unwrap();
            switches.push(t.elapsed());
        }
        assert!(
            stage_redirected > 0,
            "{text}: the interposer never saw a request"
        );
        attached += stage_redirected;
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let failures = failures.lock();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Final content equals the model.
    let mut buf = vec![0u8; BLOCK];
    for b in 0..BLOCKS {
        mem.submit(Bio::read(b * 8, &mut buf)).unwrap();
        let want = model[b as usize].load(Ordering::SeqCst);
        match check_block(&buf).unwrap() {
            None => assert_eq!(want, 0, "block {b} lost"),
            Some((blk, seq)) => {
                assert_eq!(blk, b, "block {b} misplaced");
                assert_eq!(seq, want, "block {b}: final seq differs from the model");
            }
        }
    }
    assert!(attached > 0, "interposers never saw a request");
    let mut lat = latencies.lock().clone();
    let mut stalls = reg.switch_stalls();
    assert_eq!(
        stalls.len(),
        switches.len(),
        "every attach and detach is a quiesced switch"
    );
    let max_stall = stalls.iter().max().copied().unwrap_or_default();
    let p99_stall = percentile(&mut stalls, 0.99);
    let max_sw = switches.iter().max().copied().unwrap_or_default();
    let p99_sw = percentile(&mut switches, 0.99);
    let max_lat = lat.iter().max().copied().unwrap_or_default();
    let p99_lat = percentile(&mut lat, 0.99);
    eprintln!(
        "interposer switches: {} (attach+detach); I/O held per switch max {:?} p99 {:?}; whole command max {:?} p99 {:?}; write latency max {:?} p99 {:?}; {} ops; {} requests redirected",
        switches.len(),
        max_stall,
        p99_stall,
        max_sw,
        p99_sw,
        max_lat,
        p99_lat,
        ops.load(Ordering::Relaxed),
        attached
    );
}

/// Fills `buf` (whole sectors from `sector`) with what write number `op` puts there: each
/// sector names itself and the write, so a stale, lost or misplaced sector is recognisable.
fn stamp(buf: &mut [u8], sector: u64, op: u64) {
    for (i, s) in buf.chunks_mut(512).enumerate() {
        let n = sector + i as u64;
        s.fill((n as u8) ^ (op as u8).rotate_left(3));
        s[..8].copy_from_slice(&n.to_le_bytes());
        s[8..16].copy_from_slice(&op.to_le_bytes());
    }
}

/// The first sector where `got` and `want` differ, with the write number each one holds.
fn first_difference(got: &[u8], want: &[u8]) -> Option<String> {
    let op = |s: &[u8]| u64::from_le_bytes(s[8..16].try_into().unwrap_or_default());
    let (i, (g, w)) = got
        .chunks(512)
        .zip(want.chunks(512))
        .enumerate()
        .find(|(_, (g, w))| g != w)?;
    Some(format!(
        "sector {i} differs: holds write {} where write {} was acknowledged (0 = zeroes)",
        op(g),
        op(w)
    ))
}

/// Writes of 1 to 300 sectors at any sector, FUA writes and write-zeroes, many crossing the
/// edges of an interposer over the unaligned range [3, SECTORS - 5), with the interposer
/// attached for every other batch. Afterwards the backing device, read around every hook, must
/// equal the model, and so must a read through the interposer.
#[test]
fn large_and_unaligned_writes_reach_the_device_through_an_interposer() {
    let reg = Registry::new();
    let mem = Arc::new(MemDevice::new(SECTORS));
    reg.add_disk_device("orig", mem.clone()).unwrap();
    let node = reg.node("orig").unwrap();
    let (start, len) = (3, SECTORS - 8);
    let tables = [
        format!("0 {start} zero\n{start} {len} linear [interpose]orig {start}"),
        format!("0 {start} zero\n{start} {len} delay [interpose]orig {start} 0"),
    ];
    let mut model = vec![0u8; (SECTORS * 512) as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut redirected, mut large) = (0, 0);
    let mut op = 0u64;
    for batch in 0..24usize {
        let attached = batch % 2 == 0;
        if attached {
            udm_testkit::core::create(&reg, "ip", &tables[batch / 2 % 2], udm_testkit::core::IP)
                .unwrap();
        }
        for _ in 0..40 {
            op += 1;
            let sector = rng.gen_range(0..SECTORS);
            let n = rng.gen_range(1..=300u64).min(SECTORS - sector);
            let range = (sector * 512) as usize..((sector + n) * 512) as usize;
            if rng.gen_ratio(1, 8) {
                node.submit(Bio::write_zeroes(sector, n)).unwrap();
                model[range].fill(0);
            } else {
                let mut data = vec![0u8; range.len()];
                stamp(&mut data, sector, op);
                let mut bio = Bio::write(sector, &data);
                if rng.gen_ratio(1, 4) {
                    bio.flags |= BioFlags::FUA;
                }
                node.submit(bio).unwrap();
                model[range].copy_from_slice(&data);
            }
            if attached && n > 8 && sector + n > start && sector < start + len {
                large += 1;
            }
        }
        if attached {
            redirected += reg.info("ip").unwrap().redirected;
            reg.remove("ip", false, false).unwrap();
        }
    }
    assert!(
        redirected > 0 && large > 100,
        "{redirected} redirected, {large} large"
    );
    let mut got = vec![0u8; model.len()];
    mem.submit(Bio::read(0, &mut got)).unwrap();
    if let Some(d) = first_difference(&got, &model) {
        panic!("the backing device is not what was acknowledged: {d}");
    }
    udm_testkit::core::create(&reg, "ip", &tables[0], udm_testkit::core::IP).unwrap();
    got.fill(0xee);
    node.submit(Bio::read(0, &mut got)).unwrap();
    if let Some(d) = first_difference(&got, &model) {
        panic!("a read through the interposer: {d}");
    }
    reg.remove("ip", false, false).unwrap();
}
