//! Replies to a client that waits for each one (queue depth 1) leave at once. The server
//! batches small replies only while more requests are already read; a reply held back when
//! none is waits until the watchdog notices it (2 ms, `STALL_NS`) and gets a thread to send
//! it, which a client at queue depth 1 pays on every request. Written against mutants
//! cargo-mutants found missed: the `defer` of the last chunk of a sparse or chunked read,
//! `more` (whether another request is buffered) inverted, the flush before reading dropped.
//! Medians of many round trips, so a loaded machine does not fail it: unheld, a small request's
//! round trip takes microseconds, held at least 2 ms.

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::proto::{Request, CMD_READ};
use udm_export::nbd::{NbdExportOptions, NbdServer};
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BioKind, BlockDevice, IoError};

const MIB: u64 = 1 << 20;
/// Round trips per kind of request.
const ROUNDS: usize = 41;
/// A held reply waits at least this long (`STALL_NS`) before the watchdog's next tick (every
/// 2 ms) gets it sent; unheld, the slowest kind below takes about 0.5 ms in a debug build.
const HELD: Duration = Duration::from_millis(2);

/// The median time of `ROUNDS` calls of `f`, each checked by it.
fn median(c: &mut Client<UnixStream>, mut f: impl FnMut(&mut Client<UnixStream>)) -> Duration {
    let mut t: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let s = Instant::now();
            f(c);
            s.elapsed()
        })
        .collect();
    t.sort();
    t[ROUNDS / 2]
}

#[test]
fn replies_to_a_client_at_queue_depth_one_are_not_held() {
    // 8 MiB: data in the first 4 MiB but for a hole at [1 MiB, 1.5 MiB); the rest holes.
    let dev = Arc::new(MemDevice::new(8 * MIB / 512));
    dev.submit(Bio::write(0, &vec![0x33; (4 * MIB) as usize]))
        .unwrap();
    dev.submit(Bio::discard(MIB / 512, MIB / 1024)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::new();
    server
        .add_export("disk", dev.clone(), NbdExportOptions::default())
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    server.listen_unix(&sock).unwrap();
    for structured in [true, false] {
        let s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client::connect(s, "disk", structured).unwrap();
        let mut kinds: Vec<(&str, Duration)> = vec![
            (
                "4 KiB read",
                median(&mut c, |c| match c.read(8192, 4096).unwrap() {
                    Reply::Ok(d) => assert_eq!(d, vec![0x33; 4096]),
                    r => panic!("{r:?}"),
                }),
            ),
            (
                "4 KiB write",
                median(&mut c, |c| {
                    assert_eq!(c.write(4096, &[0x33; 4096]).unwrap(), Reply::Ok(vec![]))
                }),
            ),
            (
                "flush",
                median(&mut c, |c| {
                    assert_eq!(c.flush().unwrap(), Reply::Ok(vec![]))
                }),
            ),
            (
                // Over the hole: a sparse read (structured), data chunks then a hole chunk.
                "768 KiB read",
                median(&mut c, |c| {
                    match c.read(MIB - 256 * 1024, 768 * 1024).unwrap() {
                        Reply::Ok(d) => assert_eq!(d.len(), 768 * 1024),
                        r => panic!("{r:?}"),
                    }
                }),
            ),
            (
                // A hole, then 32 KiB of data: the last chunk is small enough to be batched.
                "288 KiB read",
                median(&mut c, |c| {
                    match c.read(MIB + 256 * 1024, 288 * 1024).unwrap() {
                        Reply::Ok(d) => assert_eq!(&d[256 * 1024..], &[0x33; 32 * 1024][..]),
                        r => panic!("{r:?}"),
                    }
                }),
            ),
            (
                // Beyond the 1 MiB chunk: sent a chunk at a time.
                "1088 KiB read",
                median(&mut c, |c| match c.read(2 * MIB, 1088 << 10).unwrap() {
                    Reply::Ok(d) => assert!(d == vec![0x33; 1088 << 10]),
                    r => panic!("{r:?}"),
                }),
            ),
            (
                "read past the end (an error)",
                median(&mut c, |c| {
                    assert!(matches!(c.read(8 * MIB, 4096).unwrap(), Reply::Err(_)))
                }),
            ),
        ];
        if structured {
            kinds.push((
                "block status",
                median(&mut c, |c| {
                    assert!(matches!(
                        c.block_status(0, 4 << 20, 0).unwrap(),
                        Reply::Extents(_)
                    ))
                }),
            ));
        }
        for (what, m) in kinds {
            eprintln!("{what} (structured {structured}): median {m:?}");
            assert!(
                m < HELD,
                "{what} (structured {structured}): median round trip {m:?}, replies held"
            );
        }
    }
    server.shutdown();
}

/// Reads from 4 MiB on take 20 ms.
struct SlowTail(MemDevice);

impl BlockDevice for SlowTail {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        if bio.kind() == BioKind::Read && bio.sector >= 4 * MIB / 512 {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0.submit(bio)
    }
}

/// Two requests sent together, a small read and a slow large one: the small read's reply,
/// batched because the large one was already read, leaves when the large one is handed to
/// the device, not when it ends (nor at the watchdog's next look).
#[test]
fn a_batched_reply_is_not_held_by_a_slow_request_after_it() {
    let dev = Arc::new(SlowTail(MemDevice::new(8 * MIB / 512)));
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::new();
    server
        .add_export("disk", dev, NbdExportOptions::default())
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    server.listen_unix(&sock).unwrap();
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = Client::connect(s, "disk", false).unwrap();
    let mut first = Vec::new();
    for _ in 0..11 {
        // In one write, so the server finds the second buffered when it runs the first.
        let req = |handle, offset, length| Request {
            flags: 0,
            cmd: CMD_READ,
            handle,
            offset,
            length,
        };
        let (small, slow) = (1u64, 2u64);
        let mut both = req(small, 0, 4096).encode().to_vec();
        both.extend_from_slice(&req(slow, 4 * MIB, 256 * 1024).encode());
        let t = Instant::now();
        c.stream().write_all(&both).unwrap();
        let len = |h: u64| Some(if h == small { 4096 } else { 256 * 1024 });
        let (h, r) = c.recv(len).unwrap();
        first.push(t.elapsed());
        assert_eq!(h, small, "the slow read was answered first");
        assert!(matches!(r, Reply::Ok(_)));
        let (h, _) = c.recv(len).unwrap();
        assert_eq!(h, slow);
    }
    first.sort();
    let m = first[first.len() / 2];
    assert!(m < HELD, "the small read's reply took {m:?} (median)");
    server.shutdown();
}
