//! Replies to a client that waits for each one (queue depth 1) leave at once. The server
//! batches small replies only while more requests are already read; a reply held back when
//! none is waits until the watchdog notices it (at least 2 ms, `STALL_NS`, then its next
//! 2 ms tick) and gets a thread to send it, which a client at queue depth 1 pays on every
//! request. Written against mutants cargo-mutants found missed: the `defer` of the last chunk
//! of a sparse read; and the export's read counter, which must count each large read whole
//! however it was sent. Medians of many round trips, so a loaded machine does not fail it.

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use parking_lot::Mutex;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::{NbdExportOptions, NbdServer};
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BioKind, BlockDevice, IoError};

const MIB: u64 = 1 << 20;
/// Round trips per kind of request.
const ROUNDS: usize = 21;
/// A held reply waits at least this long; an unheld one microseconds.
const HELD: Duration = Duration::from_micros(1500);

/// 8 MiB of memory: data in the first 4 MiB but for a hole at [1 MiB, 1.5 MiB), the rest
/// holes. Reads longer than 4 KiB take 3 ms (so the server hands them to a thread of their
/// own and another thread reads the next request meanwhile), and the time the last one ended
/// is kept.
struct Disk {
    mem: MemDevice,
    read_done: Mutex<Option<Instant>>,
}

impl BlockDevice for Disk {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        let slow = bio.kind() == BioKind::Read && bio.sectors() > 8;
        if slow {
            std::thread::sleep(Duration::from_millis(3));
        }
        let r = self.mem.submit(bio);
        *self.read_done.lock() = Some(Instant::now());
        r
    }
    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<udm_io::Extent>, IoError> {
        self.mem.block_status(sector, sectors)
    }
}

fn serve() -> (Arc<NbdServer>, Arc<Disk>, tempfile::TempDir) {
    let mem = MemDevice::new(8 * MIB / 512);
    mem.submit(Bio::write(0, &vec![0x33; (4 * MIB) as usize]))
        .unwrap();
    mem.submit(Bio::discard(MIB / 512, MIB / 1024)).unwrap();
    let disk = Arc::new(Disk {
        mem,
        read_done: Mutex::new(None),
    });
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::new();
    server
        .add_export("disk", disk.clone(), NbdExportOptions::default())
        .unwrap();
    server.listen_unix(&dir.path().join("nbd.sock")).unwrap();
    (server, disk, dir)
}

fn connect(dir: &tempfile::TempDir, structured: bool) -> Client<UnixStream> {
    let s = UnixStream::connect(dir.path().join("nbd.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    Client::connect(s, "disk", structured).unwrap()
}

/// The median of `ROUNDS` runs of `f`, which checks its reply and says how long it took.
fn median(mut f: impl FnMut() -> Duration) -> Duration {
    let mut t: Vec<Duration> = (0..ROUNDS).map(|_| f()).collect();
    t.sort();
    t[ROUNDS / 2]
}

#[test]
fn small_requests_at_queue_depth_one_are_answered_at_once() {
    let (server, _disk, dir) = serve();
    for structured in [true, false] {
        let mut c = connect(&dir, structured);
        let mut timed = |f: &mut dyn FnMut(&mut Client<UnixStream>)| {
            median(|| {
                let s = Instant::now();
                f(&mut c);
                s.elapsed()
            })
        };
        let mut kinds: Vec<(&str, Duration)> = vec![
            (
                "4 KiB read",
                timed(&mut |c| match c.read(8192, 4096).unwrap() {
                    Reply::Ok(d) => assert_eq!(d, vec![0x33; 4096]),
                    r => panic!("{r:?}"),
                }),
            ),
            (
                "4 KiB write",
                timed(&mut |c| {
                    assert_eq!(c.write(4096, &[0x33; 4096]).unwrap(), Reply::Ok(vec![]))
                }),
            ),
            (
                "flush",
                timed(&mut |c| assert_eq!(c.flush().unwrap(), Reply::Ok(vec![]))),
            ),
            (
                "read past the end (an error)",
                timed(&mut |c| assert!(matches!(c.read(8 * MIB, 4096).unwrap(), Reply::Err(_)))),
            ),
        ];
        if structured {
            kinds.push((
                "block status",
                timed(&mut |c| {
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

/// Large reads run on a thread of their own while another reads the next request; once the
/// device has read the last piece, the reply's end leaves at once, not when the watchdog finds
/// it batched. Timed from the end of the device's last read to the end of the reply.
#[test]
fn the_end_of_a_large_read_is_not_held() {
    let (server, disk, dir) = serve();
    let mut c = connect(&dir, true);
    let kinds = [
        // Data then a hole: the last chunk is the hole's.
        ("768 KiB sparse read", MIB - 256 * 1024, 768 * 1024),
        // A hole then 32 KiB of data: the last chunk is small enough to be batched.
        ("288 KiB sparse read", MIB + 256 * 1024, 288 * 1024),
        // Beyond the 1 MiB chunk: sent a chunk at a time.
        ("1088 KiB read", 2 * MIB, 1088 * 1024),
    ];
    for (what, offset, len) in kinds {
        let m = median(|| {
            match c.read(offset, len).unwrap() {
                Reply::Ok(d) => assert_eq!(d.len(), len as usize),
                r => panic!("{r:?}"),
            }
            let end = Instant::now();
            let done = disk.read_done.lock().unwrap();
            end.saturating_duration_since(done)
        });
        eprintln!("{what}: median {m:?} from the device's last read");
        assert!(
            m < HELD,
            "{what}: its end took {m:?} (median) after the device's read"
        );
    }
    // Each of these reads is counted whole, however it was sent; so is one of simple replies
    // (one header, then the data a chunk at a time).
    let mut simple = connect(&dir, false);
    assert!(matches!(
        simple.read(2 * MIB, 1088 * 1024).unwrap(),
        Reply::Ok(_)
    ));
    // (Counted once the last byte is sent: maybe just after the client has it.)
    let total: u64 = kinds.iter().map(|k| u64::from(k.2)).sum::<u64>() * ROUNDS as u64;
    let counted = || server.exports()[0].stats.bytes_read;
    let t = Instant::now();
    while counted() != total + 1088 * 1024 && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(counted(), total + 1088 * 1024, "bytes read");
    server.shutdown();
}
