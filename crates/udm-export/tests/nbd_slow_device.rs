//! A device whose small writes each wait for a commit (as an era target's first writes wait for
//! their writeset bits, and say so with `udm_io::thread::note_device_wait`): the server must
//! give a pipelining client's small requests to several threads, or the device only ever sees
//! one at a time and cannot batch (era's group commit), and the client gets one request per
//! wait.

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::proto::CMD_WRITE;
use udm_export::nbd::{NbdExportOptions, NbdServer};
use udm_io::{Bio, BlockDevice, IoError};

/// Each request notes a commit wait, sleeps `wait` (below the server's 2 ms stall watchdog)
/// and records how many ran at once.
struct Slow {
    wait: Duration,
    now: AtomicUsize,
    most: AtomicUsize,
}

impl BlockDevice for Slow {
    fn size(&self) -> u64 {
        2048
    }
    fn submit(&self, _bio: Bio<'_>) -> Result<(), IoError> {
        udm_io::thread::note_device_wait();
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(self.wait);
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn slow_small_writes_run_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let dev = Arc::new(Slow {
        wait: Duration::from_micros(400),
        now: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
    });
    let server = NbdServer::new();
    server
        .add_export("slow", dev.clone(), NbdExportOptions::default())
        .unwrap();
    server.listen_unix(&sock).unwrap();
    let mut c = Client::connect(UnixStream::connect(&sock).unwrap(), "slow", true).unwrap();
    let data = vec![0x5au8; 4096];
    let t = Instant::now();
    for round in 0..8u64 {
        let handles: Vec<u64> = (0..16u64)
            .map(|i| {
                c.send(CMD_WRITE, 0, (round * 16 + i) % 256 * 4096, 4096, &data)
                    .unwrap()
            })
            .collect();
        for _ in &handles {
            let (_, r) = c.recv(|_| None).unwrap();
            assert_eq!(r, Reply::Ok(Vec::new()));
        }
    }
    let took = t.elapsed();
    let most = dev.most.load(Ordering::SeqCst);
    server.shutdown();
    // 128 writes of 400 us one at a time would take 51 ms: faster than that, whatever the
    // machine's load (the mutation tests run this beside builds), they overlapped.
    assert!(most >= 4, "at most {most} small writes ran at once");
    assert!(
        took < Duration::from_micros(128 * 400),
        "128 slow writes took {took:?}"
    );
}
