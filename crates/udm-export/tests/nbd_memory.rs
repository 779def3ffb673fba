//! NBD server memory under attack: pipelined huge reads and write headers without payload
//! hold at most the per-connection cap, idle connections free their buffer pools, the
//! server's RSS (in a child process) stays small, and write payloads a device keeps (lent)
//! leave the connection's count.

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

#[path = "nbd_hostile/support.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::proto::*;
use udm_export::nbd::{NbdExportOptions, NbdLimits, NbdServer};

#[test]
fn pipelined_huge_reads_hold_at_most_the_cap() {
    let e = env(
        NbdLimits::default(),
        &[("big", Arc::new(ZeroDevice { sectors: 1 << 17 }) as _)],
    );
    let cap = NbdLimits::default().max_inflight_bytes;
    let (s, _c, flooder) = flood_reads(&e.sock, "big", 40, 32 << 20);
    let (mut peak, mut admitted) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let m = e.server.memory();
        peak = peak.max(m.buffered_bytes + m.pooled_bytes);
        admitted = admitted.max(m.inflight_bytes);
        assert!(m.inflight_bytes <= cap, "{m:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "peak admitted {} MiB, peak buffered bytes: {} MiB",
        admitted / MIB,
        peak / MIB
    );
    assert!(admitted >= 32 * MIB, "the attack did not run: {admitted}");
    // Reads above 1 MiB are read and sent a chunk at a time: a client that takes no reply
    // makes the server hold one chunk per admitted request, not the whole payload.
    assert!(peak <= 8 * MIB, "held {} MiB", peak / MIB);
    drop(s);
    let server = e.server.clone();
    bounded("shutdown", Duration::from_secs(5), move || {
        server.shutdown()
    });
    join_flooder(flooder);
}

/// The buffer pool keeps at most 16 MiB, in buffers of at most 4 MiB: after a burst of
/// 24 pipelined 4 MiB writes running at once, and after one 8 MiB write (whose payload buffer
/// goes back to the allocator).
#[test]
fn the_buffer_pool_keeps_what_it_promises() {
    let dev = Arc::new(udm_io::backend::mem::MemDevice::new(1 << 17));
    let e = env(NbdLimits::default(), &[("disk", dev.clone() as _)]);
    let mut c = connect(&e.sock, "disk");
    assert_eq!(c.write(0, &vec![1; 8 << 20]).unwrap(), Reply::Ok(vec![]));
    let m = e.server.memory();
    assert_eq!(m.pooled_bytes, 0, "an 8 MiB buffer was kept: {m:?}");
    // Each write takes 20 ms: dozens run at once, each with its payload buffer.
    dev.set_latency(Duration::from_millis(20));
    let mut reqs = Vec::new();
    for i in 0..24u64 {
        reqs.extend_from_slice(&request(CMD_WRITE, i, (i % 16) * 4 * MIB, 4 << 20));
        reqs.extend_from_slice(&vec![2; 4 << 20]);
    }
    c.stream().write_all(&reqs).unwrap();
    for _ in 0..24 {
        assert_eq!(c.recv(|_| None).unwrap().1, Reply::Ok(vec![]));
    }
    let m = e.server.memory();
    eprintln!("pool after 24 pipelined 4 MiB writes: {m:?}");
    assert!(m.pooled_bytes <= 16 * MIB, "{m:?}");
    assert!(
        m.pooled_bytes >= 8 * MIB,
        "the pool kept few buffers: {m:?}"
    );
}

/// A client whose pipelined reads exceed the connection's in-flight budget (here 2 MiB) while
/// it takes no reply: the server stops reading until replies drain, then answers every one; it
/// does not end the connection.
#[test]
fn a_connection_over_its_inflight_budget_waits_instead_of_ending() {
    let limits = NbdLimits {
        max_inflight_bytes: 2 * MIB,
        ..NbdLimits::default()
    };
    let e = env(
        limits,
        &[("big", Arc::new(ZeroDevice { sectors: 1 << 15 }) as _)],
    );
    let mut c = connect(&e.sock, "big");
    let mut reqs = Vec::new();
    for i in 0..16u64 {
        reqs.extend_from_slice(&request(CMD_READ, i, 0, 1 << 20));
    }
    c.stream().write_all(&reqs).unwrap();
    // Replies fill the socket; the reader reaches the budget and waits.
    std::thread::sleep(Duration::from_millis(200));
    assert!(e.server.memory().inflight_bytes <= 2 * MIB);
    for _ in 0..16 {
        let (_, r) = c.recv(|_| Some(1 << 20)).unwrap();
        assert_eq!(r, Reply::Ok(vec![0; 1 << 20]));
    }
}

#[test]
fn write_headers_without_payload_commit_only_what_arrived() {
    let e = env(
        NbdLimits::default(),
        &[("big", Arc::new(ZeroDevice { sectors: 1 << 17 }) as _)],
    );
    let mut conns = Vec::new();
    for i in 0..20u64 {
        let mut s = stream(&e.sock);
        let _c = Client::connect(s.try_clone().unwrap(), "big", false).unwrap();
        s.write_all(&request(CMD_WRITE, i, 0, 32 << 20)).unwrap();
        s.write_all(&[0xab; 1024]).unwrap();
        conns.push(s);
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let m = e.server.memory();
        assert_eq!(m.connections, 20);
        assert!(m.buffered_bytes <= 20 * (MIB + (64 << 10)), "{m:?}");
        assert!(
            m.buffered_bytes >= 20 * 1024,
            "what arrived is not counted: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("20 half-sent 32 MiB writes: {:?}", e.server.memory());
    // Finishing one of them works normally.
    let mut s = conns.pop().unwrap();
    let mut c = Client::connect(stream(&e.sock), "big", false).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), Reply::Ok(vec![0; 4096]));
    s.write_all(&vec![0xab; (32 << 20) - 1024]).unwrap();
    let h = read_array::<SIMPLE_REPLY_LEN>(&mut s).unwrap();
    assert_eq!(be32(&h[4..8]), 0, "write succeeded");
}

#[test]
fn idle_connection_frees_its_buffer_pool() {
    let e = env(
        NbdLimits::default(),
        &[("big", Arc::new(ZeroDevice { sectors: 1 << 15 }) as _)],
    );
    let mut c = connect(&e.sock, "big");
    // The pool is trimmed after 1 s without requests: on a loaded machine that can happen
    // before we look, so read again until the pool is seen holding buffers.
    let mut m = e.server.memory();
    for _ in 0..5 {
        for _ in 0..4 {
            assert_eq!(c.read(0, 1 << 20).unwrap(), Reply::Ok(vec![0; 1 << 20]));
        }
        m = e.server.memory();
        if m.pooled_bytes >= MIB {
            break;
        }
    }
    assert!(m.pooled_bytes >= MIB, "{m:?}");
    // One request at a time: the pool holds a buffer or two, reused, not one per read.
    for _ in 0..12 {
        assert_eq!(c.read(0, 1 << 20).unwrap(), Reply::Ok(vec![0; 1 << 20]));
    }
    let m = e.server.memory();
    assert!(m.pooled_bytes <= 3 * MIB, "{m:?}");
    // Kept for reuse through a short pause (the trim waits for 1 s of idleness, 500 ticks).
    std::thread::sleep(Duration::from_millis(100));
    let m = e.server.memory();
    assert!(m.pooled_bytes >= MIB, "pool trimmed after 100 ms: {m:?}");
    wait_until("pool trimmed", Duration::from_secs(4), || {
        e.server.memory().pooled_bytes == 0
    });
    assert_eq!(c.read(0, 4096).unwrap(), Reply::Ok(vec![0; 4096]));
}

// ---------------------------------------------------------------------------------------------
// RSS: the server in a child process (this test binary, re-run as `rss_child_server`), so the
// other tests of this process do not blur the numbers.

const CHILD_ENV: &str = "UDM_NBD_HOSTILE_CHILD_SOCK";

/// The child side of `rss_stays_small_under_memory_attacks`; a no-op in a normal test run.
#[test]
fn rss_child_server() {
    let Ok(sock) = std::env::var(CHILD_ENV) else {
        return;
    };
    let server = NbdServer::new();
    server
        .add_export(
            "big",
            Arc::new(ZeroDevice { sectors: 1 << 17 }),
            NbdExportOptions::default(),
        )
        .unwrap();
    server.listen_unix(Path::new(&sock)).unwrap();
    // Serve until the parent closes our stdin.
    let mut b = [0u8; 1];
    let _ = std::io::stdin().read(&mut b);
    server.shutdown();
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn rss_stays_small_under_memory_attacks() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("child.sock");
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "rss_child_server",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let child = ChildGuard(child);
    let pid = child.0.id();
    wait_until("child server listening", Duration::from_secs(20), || {
        UnixStream::connect(&sock).is_ok()
    });
    // Warm up: a normal client.
    let mut c = connect(&sock, "big");
    for _ in 0..4 {
        assert_eq!(c.read(0, 1 << 20).unwrap(), Reply::Ok(vec![0; 1 << 20]));
    }
    let base = rss_kib(pid);
    // 40 pipelined 32 MiB reads on one connection, 20 connections with a 32 MiB write header
    // and 1 KiB of payload.
    let (s, _h, flooder) = flood_reads(&sock, "big", 40, 32 << 20);
    let mut writers = Vec::new();
    for i in 0..20u64 {
        let mut w = stream(&sock);
        let _c = Client::connect(w.try_clone().unwrap(), "big", false).unwrap();
        w.write_all(&request(CMD_WRITE, i, 0, 32 << 20)).unwrap();
        w.write_all(&[0xab; 1024]).unwrap();
        writers.push(w);
    }
    let mut peak = base;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) && peak - base < 1024 * 1024 {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    let grew_mib = (peak.saturating_sub(base)) / 1024;
    eprintln!("server RSS {} MiB -> peak {} MiB", base / 1024, peak / 1024);
    // Cap (64 MiB) + 20 x (1 MiB chunk + read buffer) + thread stacks and slack.
    assert!(grew_mib < 200, "server RSS grew by {grew_mib} MiB");
    // The normal client still works.
    assert_eq!(c.read(0, 4096).unwrap(), Reply::Ok(vec![0; 4096]));
    drop(s);
    drop(writers);
    drop(child);
    join_flooder(flooder);
}

/// Keeps every write's data as a device that holds writes would (`Bio::keep_data`), and
/// counts how many it got without a copy.
struct KeepingDevice {
    kept: std::sync::Mutex<Vec<(u64, udm_io::KeptBuf)>>,
}

impl udm_io::BlockDevice for KeepingDevice {
    fn size(&self) -> u64 {
        1 << 15
    }

    fn submit(&self, bio: udm_io::Bio<'_>) -> Result<(), udm_io::IoError> {
        if let Some(k) = bio.keep_data() {
            let lent = bio.lent.is_some_and(|b| {
                let p = b.as_ptr() as usize;
                (p..p + b.len()).contains(&(k.as_ptr() as usize))
            });
            assert!(lent, "the NBD export lends its write payloads");
            self.kept.lock().unwrap().push((bio.sector, k));
        }
        Ok(())
    }
}

/// A write payload kept by the device (lent, not copied) is no longer the connection's: its
/// bytes leave the connection's count and it does not go back to the buffer pool, and what
/// the device kept is exactly what the client wrote, however many writes follow.
#[test]
fn write_payloads_kept_by_the_device_leave_the_connection() {
    let dev = Arc::new(KeepingDevice {
        kept: std::sync::Mutex::new(Vec::new()),
    });
    let e = env(NbdLimits::default(), &[("keep", dev.clone() as _)]);
    let mut c = Client::connect(stream(&e.sock), "keep", true).unwrap();
    for i in 0..64u64 {
        let data = vec![i as u8 ^ 0x3c; 64 << 10];
        assert_eq!(
            c.write(i * (64 << 10), &data).unwrap(),
            Reply::Ok(Vec::new())
        );
    }
    let m = e.server.memory();
    assert_eq!(m.buffered_bytes, 0, "{m:?}");
    assert_eq!(m.pooled_bytes, 0, "kept payloads are not pooled: {m:?}");
    let kept = dev.kept.lock().unwrap();
    assert_eq!(kept.len(), 64);
    for (i, (sector, k)) in kept.iter().enumerate() {
        assert_eq!(*sector, i as u64 * 128);
        assert!(
            k.iter().all(|&b| b == i as u8 ^ 0x3c),
            "write {i} kept intact"
        );
    }
}

/// Writes wait at the device until `open` (a device suspended under writes).
struct WriteGate {
    inner: udm_io::backend::mem::MemDevice,
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl udm_io::BlockDevice for WriteGate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(&self, bio: udm_io::Bio<'_>) -> Result<(), udm_io::IoError> {
        if matches!(bio.op, udm_io::BioOp::Write(_)) {
            let mut g = self.open.lock().unwrap();
            while !*g {
                g = self.cv.wait(g).unwrap();
            }
        }
        self.inner.submit(bio)
    }
}

/// The pool keeps at most 16 buffers, and its byte count is the capacity of the buffers it
/// holds: 24 small writes held by the device at once give back 24 buffers, 16 are kept; one
/// write at a time reuses one buffer and the count stays that buffer's size.
#[test]
fn the_pool_counts_the_buffers_it_keeps_and_keeps_at_most_16() {
    const LEN: u64 = 64 << 10;
    let dev = Arc::new(WriteGate {
        inner: udm_io::backend::mem::MemDevice::new(1 << 12),
        open: std::sync::Mutex::new(false),
        cv: std::sync::Condvar::new(),
    });
    let e = env(NbdLimits::default(), &[("gate", dev.clone() as _)]);
    let mut c = connect(&e.sock, "gate");
    let mut reqs = Vec::new();
    for i in 0..24u64 {
        reqs.extend_from_slice(&request(CMD_WRITE, i, i * LEN, LEN as u32));
        reqs.extend_from_slice(&vec![3; LEN as usize]);
    }
    c.stream().write_all(&reqs).unwrap();
    wait_until("24 payloads received", Duration::from_secs(10), || {
        e.server.memory().buffered_bytes == 24 * LEN
    });
    *dev.open.lock().unwrap() = true;
    dev.cv.notify_all();
    for _ in 0..24 {
        assert_eq!(c.recv(|_| None).unwrap().1, Reply::Ok(vec![]));
    }
    // A buffer leaves the count before it joins the pool: wait for both.
    wait_until(
        "payload buffers back in the pool",
        Duration::from_secs(5),
        || {
            let m = e.server.memory();
            m.buffered_bytes == 0 && m.pooled_bytes >= 16 * LEN
        },
    );
    let m = e.server.memory();
    assert_eq!(m.pooled_bytes, 16 * LEN, "{m:?}");
    // One write at a time: one buffer, taken and given back, the count unchanged. (The pool is
    // trimmed after 1 s idle; on a loaded machine that may happen between two writes, leaving
    // one buffer, or after the last, leaving none: then go again.)
    let mut seen = 0;
    for round in 0..5u8 {
        for i in 0..3 {
            assert_eq!(
                c.write(i * LEN, &vec![round; LEN as usize]).unwrap(),
                Reply::Ok(vec![])
            );
        }
        seen = e.server.memory().pooled_bytes;
        if seen != 0 {
            break;
        }
    }
    assert!(
        seen == 16 * LEN || seen == LEN,
        "the pool's count drifted: {seen}"
    );
}

/// A request behind one that the device holds is read and answered: the reader waits for the
/// in-flight budget only when the connection holds more than its cap.
#[test]
fn a_request_behind_a_parked_one_is_admitted() {
    let park = ParkDevice::new();
    let e = env(NbdLimits::default(), &[("park", park.clone() as _)]);
    let mut c = connect(&e.sock, "park");
    let parked = c.send(CMD_READ, 0, 0, 4096, &[]).unwrap();
    park.wait_parked(1);
    let next = c.send(CMD_READ, 0, 16 * 512, 4096, &[]).unwrap();
    let (h, r) = c.recv(|_| Some(4096)).unwrap();
    assert_eq!((h, r), (next, Reply::Ok(vec![0; 4096])));
    park.release();
    let (h, r) = c.recv(|_| Some(4096)).unwrap();
    assert_eq!((h, r), (parked, Reply::Ok(vec![0; 4096])));
}
