//! Helpers shared by the hostile-client NBD tests: test devices (zeroes, parking / slow
//! reads), a server on a temporary socket, bounded waits, raw requests.

#![allow(dead_code)] // each test binary uses a subset
#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use udm_export::nbd::client::Client;
use udm_export::nbd::proto::*;
use udm_export::nbd::{NbdExportOptions, NbdLimits, NbdServer};
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BioOp, BlockDevice, IoError};

pub const MIB: u64 = 1 << 20;

/// Reads return zeroes (touching the buffer), writes are dropped; no memory of its own.
pub struct ZeroDevice {
    pub sectors: u64,
}

impl BlockDevice for ZeroDevice {
    fn size(&self) -> u64 {
        self.sectors
    }
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        if let BioOp::Read(b) = bio.op {
            b.fill(0);
        }
        Ok(())
    }
}

/// A device whose reads at sector 0 park until `release` (a suspended device), and whose
/// reads at `SLOW_SECTOR` take `slow` (a slow request).
pub struct ParkDevice {
    inner: MemDevice,
    slow: Duration,
    open: Mutex<bool>,
    cv: Condvar,
    pub parked: AtomicU64,
    pub finished: AtomicU64,
}

pub const SLOW_SECTOR: u64 = 8;

impl ParkDevice {
    pub fn new() -> Arc<Self> {
        Self::with(2048, Duration::from_millis(600))
    }
    pub fn with(sectors: u64, slow: Duration) -> Arc<Self> {
        Arc::new(ParkDevice {
            inner: MemDevice::new(sectors),
            slow,
            open: Mutex::new(false),
            cv: Condvar::new(),
            parked: AtomicU64::new(0),
            finished: AtomicU64::new(0),
        })
    }
    pub fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
    pub fn wait_parked(&self, n: u64) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.parked.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < end, "request never reached the device");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl BlockDevice for ParkDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        let read = matches!(bio.op, BioOp::Read(_));
        if read && bio.sector == 0 {
            self.parked.fetch_add(1, Ordering::SeqCst);
            let mut g = self.open.lock().unwrap();
            while !*g {
                g = self.cv.wait(g).unwrap();
            }
            drop(g);
            let r = self.inner.submit(bio);
            self.finished.fetch_add(1, Ordering::SeqCst);
            return r;
        }
        if read && bio.sector == SLOW_SECTOR {
            std::thread::sleep(self.slow);
        }
        self.inner.submit(bio)
    }
}

pub struct Env {
    pub server: Arc<NbdServer>,
    pub sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        // Bounded by the fix; never let a failing test hang the run on it.
        let s = self.server.clone();
        let t = std::thread::spawn(move || s.shutdown());
        let end = Instant::now() + Duration::from_secs(10);
        while !t.is_finished() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

pub fn env(limits: NbdLimits, exports: &[(&str, Arc<dyn BlockDevice>)]) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let server = NbdServer::with_limits(limits);
    for (name, dev) in exports {
        server
            .add_export(name, dev.clone(), NbdExportOptions::default())
            .unwrap();
    }
    server.listen_unix(&sock).unwrap();
    Env {
        server,
        sock,
        _dir: dir,
    }
}

pub fn stream(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

pub fn connect(sock: &Path, name: &str) -> Client<UnixStream> {
    Client::connect(stream(sock), name, false).unwrap()
}

/// Runs `f` on a thread and returns its result and duration, failing if it takes over `limit`.
pub fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> (T, Duration) {
    let start = Instant::now();
    let t = std::thread::spawn(f);
    while !t.is_finished() {
        assert!(
            start.elapsed() < limit,
            "{what} did not return within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (t.join().unwrap(), start.elapsed())
}

/// True when the server closed the stream (EOF or reset) within `within`.
pub fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    let end = Instant::now() + within;
    let mut b = vec![0u8; 1 << 20];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "{what} not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn request(cmd: u16, handle: u64, offset: u64, length: u32) -> [u8; REQUEST_LEN] {
    Request {
        flags: 0,
        cmd,
        handle,
        offset,
        length,
    }
    .encode()
}

/// A client of `export` on `sock` that sends `n` READs of `len` bytes at offset 0 and never
/// reads a reply: returns its socket, the client (to keep open) and the thread still writing
/// the requests.
pub fn flood_reads(
    sock: &Path,
    export: &str,
    n: u64,
    len: u32,
) -> (UnixStream, Client<UnixStream>, std::thread::JoinHandle<()>) {
    let s = stream(sock);
    let c = Client::connect(s.try_clone().unwrap(), export, false).unwrap();
    let mut reqs = Vec::new();
    for i in 0..n {
        reqs.extend_from_slice(&request(CMD_READ, i, 0, len));
    }
    let flooder = flood(s.try_clone().unwrap(), reqs);
    (s, c, flooder)
}

/// Waits at most 35 s for a flooding thread (its writes fail once the server closes).
pub fn join_flooder(flooder: std::thread::JoinHandle<()>) {
    bounded("flooder", Duration::from_secs(35), move || flooder.join())
        .0
        .unwrap();
}

/// Sends `reqs` on `s` from a thread (the server may stop reading: that is the point), never
/// reading a reply. The caller keeps another handle of the socket open.
pub fn flood(mut s: UnixStream, reqs: Vec<u8>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = s.write_all(&reqs);
    })
}
