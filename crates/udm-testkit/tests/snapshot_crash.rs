//! A persistent snapshot survives `kill -9` of udmd at any moment (issue "Snapshots",
//! deliverable 4): 50 kill points at random times while a client writes to the origin (groups
//! of 1 to 8 writes, each group followed by a flush, so writes acknowledged but still held by
//! the origin's write-back are in flight at the kills); after each restart the snapshot is
//! exactly the point-in-time image and every origin write that was acknowledged before an
//! acknowledged flush is present. Every round must make acknowledged progress (an error reply
//! fails the test: a killed daemon sends none, only its socket dies), and nearly every kill must
//! land on acknowledged writes that no flush covered yet. A merge killed half-way resumes
//! where it was: chunks merged before the kill and written before the restart stay written.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use rand::{Rng, SeedableRng};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use udm_export::nbd::client::{Client, Reply};
use udm_testkit::Udmd;

const SIZE: u64 = 16 << 20;
const BLOCK: usize = 4096;
/// Kill points.
const ROUNDS: u64 = 50;

/// What one round's writer has done, shared with the test thread.
#[derive(Default)]
struct Round {
    /// The blocks sent since the last acknowledged flush, with their data, in order.
    in_flight: Vec<(usize, Vec<u8>)>,
    /// How many of `in_flight` were acknowledged: data the daemon holds that no flush covers.
    acked: usize,
    /// Flushes acknowledged in this round.
    flushes: u64,
}

/// The round's writer: groups of 1 to 8 writes, each group followed by a flush, until the
/// connection dies. Returns `Ok` when the socket is dead (the kill) and `Err` on an error
/// reply: a killed daemon sends none, so an error reply is a failure of the product.
fn write_until_killed(
    mut c: Client<UnixStream>,
    seed: u64,
    model: &Mutex<Vec<u8>>,
    round: &Mutex<Round>,
) -> Result<(), String> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    loop {
        for _ in 0..r.gen_range(1..=8) {
            let blk = r.gen_range(0..SIZE as usize / BLOCK);
            let data: Vec<u8> = (0..BLOCK).map(|_| r.gen()).collect();
            round.lock().unwrap().in_flight.push((blk, data.clone()));
            match c.write((blk * BLOCK) as u64, &data) {
                Err(_) => return Ok(()),
                Ok(Reply::Ok(_)) => round.lock().unwrap().acked += 1,
                Ok(e) => return Err(format!("write of block {blk} got an error reply: {e:?}")),
            }
        }
        match c.flush() {
            Err(_) => return Ok(()),
            Ok(Reply::Ok(_)) => {}
            Ok(e) => return Err(format!("flush got an error reply: {e:?}")),
        }
        let mut model = model.lock().unwrap();
        let mut round = round.lock().unwrap();
        for (blk, data) in round.in_flight.drain(..) {
            model[blk * BLOCK..(blk + 1) * BLOCK].copy_from_slice(&data);
        }
        round.acked = 0;
        round.flushes += 1;
    }
}

/// Waits (at most 20 s) until `f` holds for the round, or the writer has stopped.
fn wait_round(
    round: &Mutex<Round>,
    writer: &std::thread::JoinHandle<Result<(), String>>,
    what: &str,
    f: impl Fn(&Round) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f(&round.lock().unwrap()) && !writer.is_finished() {
        assert!(Instant::now() < deadline, "{what} within 20 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn snapshot_survives_fifty_kill9_points() {
    let mut d = Udmd::start();
    let img = d.disk("vol", SIZE, 3);
    d.ok(&["export", "add", "vol", "--nbd"]);
    let o = d.take_snapshot(
        "vol",
        "vol.cow",
        &["--chunk", "8", "--export", "nbd", "--timings"],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    // --timings: every phase of the take, with its time.
    for phase in [
        "create vol-origin",
        "suspend vol-origin",
        "create vol-snap",
        "resume vol-origin",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("timing: ") && l.ends_with(&format!(" ms {phase}"))),
            "no timing of {phase}: {stderr}"
        );
    }
    let point_in_time = std::fs::read(&img).unwrap();
    // The model of the origin: the content every acknowledged (flushed) write left.
    let model = Arc::new(Mutex::new(point_in_time.clone()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    // Rounds whose kill hit acknowledged writes that no flush covered yet (held by the
    // origin's write-back, or just written to the origin without a flush).
    let mut held_at_kill = 0;
    for round_nr in 0..ROUNDS {
        let round: Arc<Mutex<Round>> = Arc::default();
        let c = d.nbd_client("vol");
        let (m, r) = (model.clone(), round.clone());
        let seed = rng.gen::<u64>();
        let writer = std::thread::spawn(move || write_until_killed(c, seed, &m, &r));
        // Every round makes acknowledged progress before its kill (a daemon that came back
        // unable to write fails here, not quietly), and the kill lands on acknowledged,
        // unflushed writes.
        let what = format!("round {round_nr}: no flush acknowledged");
        wait_round(&round, &writer, &what, |r| r.flushes > 0);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..60)));
        let what = format!("round {round_nr}: no write acknowledged after the last flush");
        wait_round(&round, &writer, &what, |r| r.acked > 0);
        d.crash_and_restart();
        if let Err(e) = writer.join().unwrap() {
            panic!("round {round_nr}: {e}");
        }
        let round = std::mem::take(&mut *round.lock().unwrap());
        assert!(round.flushes > 0, "round {round_nr}: no flush acknowledged");
        if round.acked > 0 {
            held_at_kill += 1;
        }
        // Writes not covered by an acknowledged flush may or may not have landed: a block
        // may hold any version written to it since.
        let on_disk = std::fs::read(&img).unwrap();
        let mut want = model.lock().unwrap();
        for (blk, data) in &round.in_flight {
            let r = blk * BLOCK..(blk + 1) * BLOCK;
            if on_disk[r.clone()] == data[..] {
                want[r].copy_from_slice(data);
            }
        }
        drop(want);
        let mut snap = d.nbd_client("vol-snap");
        assert!(
            udm_testkit::read_whole(&mut snap, SIZE) == point_in_time,
            "round {round_nr}: snapshot is not the point-in-time image"
        );
        let mut origin = d.nbd_client("vol");
        let got = udm_testkit::read_whole(&mut origin, SIZE);
        let want = model.lock().unwrap().clone();
        if got != want {
            let first = got
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!("round {round_nr}: origin lost an acknowledged write (first difference at byte {first})");
        }
    }
    // The wait before each kill makes this all but certain; a few kills may still land just
    // after a flush was acknowledged.
    assert!(
        held_at_kill >= ROUNDS * 4 / 5,
        "only {held_at_kill} of {ROUNDS} kills hit acknowledged, unflushed writes"
    );
    let list = String::from_utf8_lossy(&d.udm(&["snapshot", "list"]).stdout).to_string();
    assert!(list.contains("active"), "{list}");
}

/// The merge progress of a merging origin from its status line: (sectors used, metadata
/// sectors); the merge is over when they are equal.
fn merge_usage(d: &Udmd) -> (u64, u64) {
    let st = d.ok(&["status", "vol-origin"]);
    assert!(
        !st.contains("Merge failed") && !st.contains("Invalid"),
        "{st}"
    );
    let mut f = st.split_whitespace().skip(3);
    let used = f
        .next()
        .and_then(|u| u.split_once('/'))
        .and_then(|(a, _)| a.parse::<u64>().ok());
    let meta = f.next().and_then(|m| m.parse::<u64>().ok());
    match (used, meta) {
        (Some(u), Some(m)) => (u, m),
        _ => panic!("not a merging snapshot status: {st}"),
    }
}

/// Chunks (of [`BLOCK`] bytes) changed before the merge: every eighth one, written in
/// descending order, so that no two exceptions form a run and the merge takes one step (an
/// origin flush and a metadata write) per chunk, lowest chunk first.
const MERGE_CHUNKS: usize = SIZE as usize / BLOCK / 8;

fn merge_chunk(i: usize) -> std::ops::Range<usize> {
    let c = i * 8;
    c * BLOCK..(c + 1) * BLOCK
}

#[test]
fn merge_resumes_after_kill9() {
    let mut d = Udmd::start();
    let img = d.disk("vol", SIZE, 5);
    d.ok(&["export", "add", "vol", "--nbd"]);
    d.take_snapshot("vol", "vol.cow", &["--chunk", "8"]);
    let point_in_time = std::fs::read(&img).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x3e7);
    let mut c = d.nbd_client("vol");
    for i in (0..MERGE_CHUNKS).rev() {
        let data: Vec<u8> = (0..BLOCK).map(|_| rng.gen()).collect();
        let off = merge_chunk(i).start as u64;
        assert!(matches!(c.write(off, &data).unwrap(), Reply::Ok(_)));
    }
    assert!(matches!(c.flush().unwrap(), Reply::Ok(_)));
    drop(c);
    let o = d.udm(&["snapshot", "merge", "vol-snap", "--no-wait"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Kill once a few chunks are merged.
    let (start, _) = merge_usage(&d);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (used, meta) = merge_usage(&d);
        assert!(used > meta, "the merge ended before the kill");
        if used + 8 * 8 <= start {
            break;
        }
        assert!(Instant::now() < deadline, "the merge made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    d.kill9();
    // The merge was partial at the kill: the lowest chunks are back to the point-in-time
    // data, the others still hold what the client wrote.
    let at_kill = std::fs::read(&img).unwrap();
    let merged: Vec<bool> = (0..MERGE_CHUNKS)
        .map(|i| at_kill[merge_chunk(i)] == point_in_time[merge_chunk(i)])
        .collect();
    let n = merged.iter().take_while(|&&m| m).count();
    assert!(
        n > 1 && n < MERGE_CHUNKS,
        "not a partial merge at the kill: {n} of {MERGE_CHUNKS} chunks merged"
    );
    assert!(
        !merged[n..].contains(&true),
        "the merge skipped chunks: merged {:?}",
        (0..MERGE_CHUNKS).filter(|&i| merged[i]).collect::<Vec<_>>()
    );
    eprintln!("{n} of {MERGE_CHUNKS} chunks merged at the kill");
    // A client writes merged chunks before the merge resumes (the one merged last may be
    // copied but not committed yet: it is left alone). The resumed merge must not revert them.
    let mut after = point_in_time.clone();
    for i in 0..n - 1 {
        rng.fill(&mut after[merge_chunk(i)]);
    }
    std::fs::write(&img, {
        let mut v = at_kill;
        for i in 0..n - 1 {
            v[merge_chunk(i)].copy_from_slice(&after[merge_chunk(i)]);
        }
        v
    })
    .unwrap();
    d.crash_and_restart();
    // The merging origin is restored and the merge runs to its end.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (used, meta) = merge_usage(&d);
        if used == meta {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "merge did not finish after restart: {used} {meta}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = d.nbd_client("vol");
    let got = udm_testkit::read_whole(&mut c, SIZE);
    for i in 0..n - 1 {
        assert!(
            got[merge_chunk(i)] == after[merge_chunk(i)],
            "chunk {} was written after it was merged, and the resumed merge reverted it",
            i * 8
        );
    }
    assert!(
        got == after,
        "merged origin differs from the snapshot image"
    );
}
