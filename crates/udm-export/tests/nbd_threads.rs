//! One connection's threads (transmission.rs): a large request gets a thread of its own while
//! another reads on, so the requests sent behind a slow one are answered while it runs, round
//! after round (threads parked on standby are counted and woken right); an idle connection's
//! threads burn no CPU; a client that disconnects with a request still in the device does not
//! end its connection before that request does (an export's removal waits for it). Written
//! against mutants cargo-mutants found missed in `Conn::standby`, `Conn::add_reader` and
//! `transmission`.

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

#[path = "nbd_hostile/support.rs"]
mod support;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::request;
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::proto::{CMD_DISC, CMD_READ, CMD_WRITE};
use udm_export::nbd::{NbdExportOptions, NbdServer};
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BioKind, BlockDevice, IoError};

const MIB: u64 = 1 << 20;

/// The tests here count the process's `nbd-conn` threads: one at a time.
static ONE_AT_A_TIME: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// 8 MiB of memory; from 4 MiB on, reads take 20 ms and writes 300 ms.
struct SlowTail(MemDevice);

impl BlockDevice for SlowTail {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        if bio.sector >= 4 * MIB / 512 {
            match bio.kind() {
                BioKind::Read => std::thread::sleep(Duration::from_millis(20)),
                BioKind::Write => std::thread::sleep(Duration::from_millis(300)),
                _ => {}
            }
        }
        self.0.submit(bio)
    }
}

fn serve() -> (Arc<NbdServer>, Arc<SlowTail>, tempfile::TempDir) {
    let dev = Arc::new(SlowTail(MemDevice::new(8 * MIB / 512)));
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::new();
    server
        .add_export("disk", dev.clone(), NbdExportOptions::default())
        .unwrap();
    server.listen_unix(&dir.path().join("nbd.sock")).unwrap();
    (server, dev, dir)
}

fn connect(dir: &tempfile::TempDir) -> Client<UnixStream> {
    let s = UnixStream::connect(dir.path().join("nbd.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    Client::connect(s, "disk", false).unwrap()
}

/// This process's `nbd-conn` threads: (thread id, CPU time in clock ticks, user + system).
fn conn_threads() -> Vec<(u64, u64)> {
    threads("nbd-conn")
}

/// This process's threads named `name`: (thread id, CPU time in clock ticks).
fn threads(name: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue; // the thread ended
        };
        // "tid (comm) state ...": utime and stime are fields 14 and 15.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let Some((tid, comm)) = head.split_once(" (") else {
            continue;
        };
        if comm != name {
            continue;
        }
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        out.push((tid.parse().unwrap(), ticks));
    }
    out
}

fn conn_threads_cpu() -> u64 {
    conn_threads().iter().map(|t| t.1).sum()
}

#[test]
fn requests_behind_a_slow_one_are_answered_while_it_runs() {
    let _one = ONE_AT_A_TIME.lock();
    let (server, _dev, dir) = serve();
    let mut c = connect(&dir);
    // One reaper for the server, however many clients.
    let more = [connect(&dir), connect(&dir)];
    assert_eq!(threads("nbd-reaper").len(), 1, "reaper threads");
    drop(more);
    let t = Instant::now();
    while conn_threads().len() > 1 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..60u64 {
        // One to four slow 64 KiB reads and a small one behind them, in one write: each slow
        // one needs a thread of its own (a parked one, or a new one when none is parked) for
        // the small one to be read.
        let n = 1 + (round * 7) % 4;
        let slow: Vec<u64> = (0..n).map(|i| 10 * round + i + 1).collect();
        let fast = 10 * round + 9;
        let mut all = Vec::new();
        for (i, &h) in slow.iter().enumerate() {
            all.extend_from_slice(&request(CMD_READ, h, 4 * MIB + i as u64 * MIB, 65536));
        }
        all.extend_from_slice(&request(CMD_READ, fast, 0, 4096));
        c.stream().write_all(&all).unwrap();
        let len = |h: u64| Some(if h == fast { 4096 } else { 65536 });
        let (h, r) = c.recv(len).unwrap();
        assert_eq!(
            h, fast,
            "round {round}: the small read waited for a slow one"
        );
        assert_eq!(r, Reply::Ok(vec![0; 4096]));
        let mut rest: Vec<u64> = slow.iter().map(|_| c.recv(len).unwrap().0).collect();
        rest.sort();
        assert_eq!(rest, slow);
        seen.extend(conn_threads().into_iter().map(|t| t.0));
        if round % 20 == 19 {
            // Let the spare threads park on standby.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The thread parked on standby is woken for the next slow request, not replaced by a new
    // one each time (nor does it exit when it could park).
    assert!(
        seen.len() <= 7,
        "{} threads served one connection's 60 rounds",
        seen.len()
    );
    // Idle now: parked threads wait, they do not spin.
    std::thread::sleep(Duration::from_millis(50));
    let before = conn_threads_cpu();
    std::thread::sleep(Duration::from_millis(500));
    let burnt = conn_threads_cpu() - before;
    assert!(
        burnt <= 5,
        "idle connection threads used {burnt} clock ticks of CPU in 500 ms"
    );
    server.shutdown();
}

#[test]
fn a_request_left_in_the_device_by_a_departing_client_ends_before_its_connection() {
    let _one = ONE_AT_A_TIME.lock();
    let (server, dev, dir) = serve();
    let mut c = connect(&dir);
    // A slow read first, so another thread takes over reading and the first parks on standby.
    match c.read(4 * MIB, 65536).unwrap() {
        Reply::Ok(d) => assert_eq!(d.len(), 65536),
        r => panic!("{r:?}"),
    }
    // A slow write and the disconnect right behind it, in one go: one thread is still in the
    // device with the write while another reads NBD_CMD_DISC.
    let mut msg = request(CMD_WRITE, 7, 4 * MIB, 131072).to_vec();
    msg.extend_from_slice(&[0xab; 131072]);
    msg.extend_from_slice(&request(CMD_DISC, 8, 0, 0));
    c.stream().write_all(&msg).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    server.remove_export("disk").unwrap();
    let took = t.elapsed();
    let mut got = vec![0u8; 131072];
    dev.0.submit(Bio::read(4 * MIB / 512, &mut got)).unwrap();
    assert!(
        got == vec![0xab; 131072],
        "the export was removed ({took:?}) before the departed client's write reached the device"
    );
    server.shutdown();
    // Nothing of the server's keeps running: connections, listener, watchdog, reaper.
    let t = Instant::now();
    let names = ["nbd-conn", "nbd-accept", "nbd-watchdog", "nbd-reaper"];
    let left = || -> Vec<&str> {
        names
            .into_iter()
            .filter(|n| !threads(n).is_empty())
            .collect()
    };
    while !left().is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        left().is_empty(),
        "threads left after shutdown: {:?}",
        left()
    );
}
