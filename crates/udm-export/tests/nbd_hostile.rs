//! The NBD server against hostile and unlucky clients: requests parked in a suspended device,
//! clients that never read their replies, too many connections, and clients that never finish
//! the handshake. Removal and shutdown must stay bounded and other clients must keep their
//! latency. The memory attacks are in `nbd_memory.rs`.

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

#[path = "nbd_hostile/support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use support::*;
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::proto::*;
use udm_export::nbd::{NbdLimits, NbdStream, StreamControl};
use udm_io::backend::mem::MemDevice;
use udm_io::BlockDevice;

#[test]
fn removal_with_request_parked_in_suspended_device_is_bounded() {
    let park = ParkDevice::new();
    let e = env(
        NbdLimits::default(),
        &[
            ("park", park.clone() as Arc<dyn BlockDevice>),
            ("disk", Arc::new(MemDevice::new(2048))),
        ],
    );
    let mut c = connect(&e.sock, "park");
    c.send(CMD_READ, 0, 0, 4096, &[]).unwrap();
    c.send(CMD_READ, 0, 0, 512, &[]).unwrap();
    park.wait_parked(1);
    let server = e.server.clone();
    let (r, took) = bounded("remove_export", Duration::from_secs(5), move || {
        server.remove_export("park")
    });
    r.unwrap();
    eprintln!("remove_export with a parked request took {took:?}");
    assert!(closed_within(c.stream(), Duration::from_secs(2)));
    // The other export is unaffected.
    let mut d = connect(&e.sock, "disk");
    assert_eq!(d.write(0, &[7; 4096]).unwrap(), Reply::Ok(vec![]));
    // The device resumes: the parked requests finish, their replies are dropped, nothing
    // panics and the connection's resources go away.
    park.release();
    wait_until("parked requests finishing", Duration::from_secs(5), || {
        park.finished.load(Ordering::SeqCst) == park.parked.load(Ordering::SeqCst)
    });
    // Its connection and the payload it held go away (the count and the buffers are released
    // by different threads, so wait for both).
    wait_until(
        "the dead connection and its buffers going away",
        Duration::from_secs(5),
        || {
            let m = e.server.memory();
            (m.connections, m.inflight_bytes, m.buffered_bytes) == (1, 0, 0)
        },
    );
    assert_eq!(d.read(0, 4096).unwrap(), Reply::Ok(vec![7; 4096]));
    let server = e.server.clone();
    bounded("shutdown", Duration::from_secs(5), move || {
        server.shutdown()
    });
}

#[test]
fn shutdown_with_request_parked_in_suspended_device_is_bounded() {
    let park = ParkDevice::new();
    let e = env(
        NbdLimits::default(),
        &[("park", park.clone() as Arc<dyn BlockDevice>)],
    );
    let mut c = connect(&e.sock, "park");
    c.send(CMD_READ, 0, 0, 4096, &[]).unwrap();
    park.wait_parked(1);
    let mut idle = stream(&e.sock);
    let _ = read_array::<18>(&mut idle).unwrap();
    let server = e.server.clone();
    bounded("shutdown", Duration::from_secs(5), move || {
        server.shutdown()
    });
    assert!(closed_within(c.stream(), Duration::from_secs(2)));
    assert!(closed_within(&mut idle, Duration::from_secs(2)));
    park.release();
    wait_until("parked request finishing", Duration::from_secs(5), || {
        park.finished.load(Ordering::SeqCst) == 1
    });
    wait_until("connections gone", Duration::from_secs(5), || {
        e.server.memory().connections == 0
    });
}

#[test]
fn client_not_reading_replies_stalls_neither_removal_nor_others() {
    let park = ParkDevice::new();
    let e = env(
        NbdLimits::default(),
        &[
            (
                "big",
                ParkDevice::with(1 << 15, Duration::from_millis(50)) as _,
            ),
            ("other", park.clone() as _),
        ],
    );
    // The hostile client: rounds of small reads (their replies batched) each followed by a
    // slower one (so batched replies are left for the watchdog), never reading a byte of the
    // replies.
    let mut hostile = stream(&e.sock);
    let _h = Client::connect(hostile.try_clone().unwrap(), "big", false).unwrap();
    let mut reqs = Vec::new();
    for i in 0..400u64 {
        for j in 0..10u64 {
            reqs.extend_from_slice(&request(CMD_READ, i * 100 + j, (1 + j) * MIB, 4096));
        }
        reqs.extend_from_slice(&request(CMD_READ, i * 100 + 99, SLOW_SECTOR * 512, 512));
    }
    let flooder = flood(hostile.try_clone().unwrap(), reqs);
    // Let it fill every buffer on the way.
    std::thread::sleep(Duration::from_millis(1500));
    // Meanwhile another client keeps its latency, including the replies that need the
    // watchdog (a small write answered while a slow read runs behind it).
    let sock = e.sock.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let other = std::thread::spawn(move || {
        let mut c = connect(&sock, "other");
        let mut worst = Duration::ZERO;
        let mut rounds = 0u64;
        while !stop2.load(Ordering::SeqCst) || rounds < 3 {
            let lat = write_behind_slow_read(&mut c, rounds);
            for _ in 0..5 {
                let t = Instant::now();
                assert_eq!(c.write(128 * 512, &[2; 4096]).unwrap(), Reply::Ok(vec![]));
                worst = worst.max(t.elapsed());
            }
            worst = worst.max(lat);
            rounds += 1;
        }
        worst
    });
    std::thread::sleep(Duration::from_millis(1500));
    let server = e.server.clone();
    let (r, took) = bounded("remove_export", Duration::from_secs(5), move || {
        server.remove_export("big")
    });
    r.unwrap();
    eprintln!("remove_export of the stuck client's export took {took:?}");
    assert!(closed_within(&mut hostile, Duration::from_secs(3)));
    stop.store(true, Ordering::SeqCst);
    let (worst, _) = bounded("the other client", Duration::from_secs(20), move || {
        other.join().unwrap()
    });
    eprintln!("worst latency of the other client: {worst:?}");
    assert!(
        worst < Duration::from_millis(200),
        "the other client waited {worst:?}"
    );
    let server = e.server.clone();
    bounded("shutdown", Duration::from_secs(5), move || {
        server.shutdown()
    });
    join_flooder(flooder);
}

/// A stream whose writes block while `stuck` (a client that stopped reading, made
/// deterministic) until the server closes it.
#[derive(Default)]
struct Gate {
    /// (stuck, closed)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

struct GateStream {
    sock: UnixStream,
    gate: Arc<Gate>,
}

struct GateWriter {
    sock: UnixStream,
    gate: Arc<Gate>,
}

impl Write for GateWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut g = self.gate.state.lock().unwrap();
        while g.0 && !g.1 {
            g = self.gate.cv.wait(g).unwrap();
        }
        if g.1 {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        drop(g);
        self.sock.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct GateCtl {
    sock: UnixStream,
    gate: Arc<Gate>,
}

impl StreamControl for GateCtl {
    fn stop_reading(&self) {
        let _ = self.sock.shutdown(Shutdown::Read);
    }
    fn close(&self) {
        self.gate.state.lock().unwrap().1 = true;
        self.gate.cv.notify_all();
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

impl NbdStream for GateStream {
    #[allow(clippy::type_complexity)]
    fn split(
        self,
    ) -> std::io::Result<(
        Box<dyn Read + Send>,
        Box<dyn Write + Send>,
        Box<dyn StreamControl>,
    )> {
        let w = GateWriter {
            sock: self.sock.try_clone()?,
            gate: self.gate.clone(),
        };
        let c = GateCtl {
            sock: self.sock.try_clone()?,
            gate: self.gate.clone(),
        };
        Ok((Box::new(self.sock), Box::new(w), Box::new(c)))
    }
}

/// Sends a small write and a slow read together and returns how long the write's reply took
/// (it is batched, so it needs the watchdog to leave while the read runs).
fn write_behind_slow_read(c: &mut Client<UnixStream>, round: u64) -> Duration {
    let (w, r) = (1000 + round * 2, 1001 + round * 2);
    let mut both = request(CMD_WRITE, w, 64 * 512, 4096).to_vec();
    both.extend_from_slice(&[1; 4096]);
    both.extend_from_slice(&request(CMD_READ, r, SLOW_SECTOR * 512, 512));
    let t = Instant::now();
    c.stream().write_all(&both).unwrap();
    let (h1, rep) = c.recv(|h| (h == r).then_some(512)).unwrap();
    let lat = t.elapsed();
    assert_eq!((h1, rep), (w, Reply::Ok(vec![])), "write answered first");
    let (h2, _) = c.recv(|h| (h == r).then_some(512)).unwrap();
    assert_eq!(h2, r);
    lat
}

#[test]
fn stuck_reply_write_does_not_stall_other_connections() {
    let e = env(
        NbdLimits::default(),
        &[
            (
                "stuck",
                ParkDevice::with(2048, Duration::from_millis(50)) as _,
            ),
            ("other", ParkDevice::new() as _),
        ],
    );
    let gate = Arc::new(Gate::default());
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    e.server
        .serve_stream(GateStream {
            sock: a,
            gate: gate.clone(),
        })
        .unwrap();
    let mut stuck = Client::connect(b, "stuck", false).unwrap();
    // From now on the stuck client accepts no reply bytes. A batched reply is pending when
    // the slow read stalls: whoever sends it blocks for good.
    gate.state.lock().unwrap().0 = true;
    let mut both = request(CMD_READ, 1, 16 * 512, 4096).to_vec();
    both.extend_from_slice(&request(CMD_READ, 2, SLOW_SECTOR * 512, 512));
    stuck.stream().write_all(&both).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut c = connect(&e.sock, "other");
    for round in 0..3 {
        let lat = write_behind_slow_read(&mut c, round);
        eprintln!("other client, write behind a slow read: {lat:?}");
        assert!(lat < Duration::from_millis(200), "waited {lat:?}");
    }
    let server = e.server.clone();
    bounded("remove_export", Duration::from_secs(5), move || {
        server.remove_export("stuck")
    })
    .0
    .unwrap();
    assert!(closed_within(stuck.stream(), Duration::from_secs(2)));
    assert_eq!(c.write(0, &[3; 512]).unwrap(), Reply::Ok(vec![]));
}

#[test]
fn shutdown_with_client_not_reading_replies_is_bounded() {
    let e = env(
        NbdLimits::default(),
        &[("big", Arc::new(ZeroDevice { sectors: 1 << 17 }) as _)],
    );
    let (mut s, _c, flooder) = flood_reads(&e.sock, "big", 200, 8 << 20);
    std::thread::sleep(Duration::from_millis(1000));
    let server = e.server.clone();
    let (_, took) = bounded("shutdown", Duration::from_secs(5), move || {
        server.shutdown()
    });
    eprintln!("shutdown took {took:?}");
    assert!(closed_within(&mut s, Duration::from_secs(3)));
    join_flooder(flooder);
}

#[test]
fn client_not_reading_replies_is_dropped_after_send_timeout() {
    let e = env(
        NbdLimits {
            send_timeout: Some(Duration::from_secs(1)),
            ..NbdLimits::default()
        },
        &[("big", Arc::new(ZeroDevice { sectors: 1 << 17 }) as _)],
    );
    let (mut s, _c, flooder) = flood_reads(&e.sock, "big", 64, 8 << 20);
    let start = Instant::now();
    wait_until("stuck client dropped", Duration::from_secs(8), || {
        e.server.memory().connections == 0
    });
    eprintln!("stuck client dropped after {:?}", start.elapsed());
    assert!(closed_within(&mut s, Duration::from_secs(3)));
    join_flooder(flooder);
}

#[test]
fn connections_over_the_cap_are_refused_with_a_message() {
    let e = env(
        NbdLimits {
            max_connections: 2,
            ..NbdLimits::default()
        },
        &[("disk", Arc::new(MemDevice::new(2048)) as _)],
    );
    let mut a = connect(&e.sock, "disk");
    let mut b = connect(&e.sock, "disk");
    let err = match Client::connect(stream(&e.sock), "disk", false) {
        Ok(_) => panic!("third connection accepted over a cap of 2"),
        Err(e) => e.to_string(),
    };
    eprintln!("refused: {err}");
    assert!(err.contains("too many NBD connections"), "{err}");
    assert!(err.contains(&format!("{REP_ERR_SHUTDOWN:#x}")), "{err}");
    for c in [&mut a, &mut b] {
        assert_eq!(c.write(0, &[5; 4096]).unwrap(), Reply::Ok(vec![]));
        assert_eq!(c.read(0, 4096).unwrap(), Reply::Ok(vec![5; 4096]));
    }
    // Real clients show the reason (qemu prints the server's message; libnbd its errno).
    let uri = format!("nbd+unix:///disk?socket={}", e.sock.display());
    for (tool, args, expect) in [
        (
            "qemu-img",
            vec!["info", uri.as_str()],
            "too many NBD connections",
        ),
        ("nbdinfo", vec![uri.as_str()], "shutdown"),
    ] {
        let Ok(out) = Command::new("timeout")
            .arg("20")
            .arg(tool)
            .args(&args)
            .output()
        else {
            eprintln!("SKIPPED {tool} part: timeout(1) not available");
            continue;
        };
        if out.status.code() == Some(127) {
            eprintln!("SKIPPED {tool} part: {tool} not installed");
            continue;
        }
        let text = String::from_utf8_lossy(&out.stderr);
        eprintln!("{tool}: {text}");
        assert!(!out.status.success());
        assert!(text.contains(expect), "{text}");
    }
    // A freed slot can be taken again.
    a.disconnect().unwrap();
    wait_until("slot freed", Duration::from_secs(5), || {
        e.server.memory().connections == 1
    });
    let mut c = connect(&e.sock, "disk");
    assert_eq!(c.read(0, 4096).unwrap(), Reply::Ok(vec![5; 4096]));
}

/// A flood of connections over the cap: at most 16 refused clients are kept to be told why
/// (each for up to 2 s); the others are closed at once, so the flood holds no more.
#[test]
fn a_flood_over_the_cap_keeps_at_most_16_refused_clients() {
    let e = env(
        NbdLimits {
            max_connections: 1,
            ..NbdLimits::default()
        },
        &[("disk", Arc::new(MemDevice::new(2048)) as _)],
    );
    let mut a = connect(&e.sock, "disk");
    let flood: Vec<UnixStream> = (0..40).map(|_| stream(&e.sock)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let held = e.server.memory().connections;
    assert!(held <= 1 + 16, "{held} connections held");
    assert_eq!(a.read(0, 512).unwrap(), Reply::Ok(vec![0; 512]));
    // The flood gone and the slot freed, the server accepts again.
    drop(flood);
    a.disconnect().unwrap();
    wait_until(
        "the flood and the client to go",
        Duration::from_secs(5),
        || e.server.memory().connections == 0,
    );
    let mut c = connect(&e.sock, "disk");
    assert_eq!(c.read(0, 512).unwrap(), Reply::Ok(vec![0; 512]));
}

#[test]
fn silent_and_slow_handshakes_time_out() {
    let e = env(
        NbdLimits {
            handshake_timeout: Duration::from_secs(1),
            ..NbdLimits::default()
        },
        &[("disk", Arc::new(MemDevice::new(2048)) as _)],
    );
    let start = Instant::now();
    let mut silent = stream(&e.sock);
    let _ = read_array::<18>(&mut silent).unwrap();
    // A slow one: client flags, then an option one byte at a time.
    let mut slow = stream(&e.sock);
    let _ = read_array::<18>(&mut slow).unwrap();
    slow.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let opt = option_request(OPT_GO, &info_request_data("disk", &[]));
    let trickle = std::thread::spawn({
        let mut slow = slow.try_clone().unwrap();
        move || {
            for b in opt {
                if slow.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    });
    // A normal client is not affected by the timeout once in transmission.
    let mut good = connect(&e.sock, "disk");
    assert!(closed_within(&mut silent, Duration::from_secs(4)));
    assert!(closed_within(&mut slow, Duration::from_secs(4)));
    let took = start.elapsed();
    eprintln!("handshakes dropped after {took:?}");
    assert!(took >= Duration::from_millis(900), "{took:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(good.write(0, &[1; 512]).unwrap(), Reply::Ok(vec![]));
    trickle.join().unwrap();
    assert_eq!(e.server.memory().connections, 1);
}

#[test]
fn idle_clients_are_dropped_only_when_configured_and_idle() {
    let park = ParkDevice::new();
    let e = env(
        NbdLimits {
            idle_timeout: Some(Duration::from_secs(1)),
            ..NbdLimits::default()
        },
        &[
            ("disk", Arc::new(MemDevice::new(2048)) as _),
            ("park", park.clone() as _),
        ],
    );
    let mut idle = connect(&e.sock, "disk");
    assert_eq!(idle.write(0, &[1; 512]).unwrap(), Reply::Ok(vec![]));
    let mut active = connect(&e.sock, "disk");
    // A client waiting for a request parked in the device is not idle.
    let mut waiting = connect(&e.sock, "park");
    let parked = waiting.send(CMD_READ, 0, 0, 512, &[]).unwrap();
    park.wait_parked(1);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        assert_eq!(active.read(0, 512).unwrap(), Reply::Ok(vec![1; 512]));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(closed_within(idle.stream(), Duration::from_secs(2)));
    assert_eq!(active.read(0, 512).unwrap(), Reply::Ok(vec![1; 512]));
    park.release();
    assert_eq!(
        waiting.recv(|_| Some(512)).unwrap(),
        (parked, Reply::Ok(vec![0; 512]))
    );
    // Without an idle timeout (the default), an idle client stays.
    let e = env(
        NbdLimits::default(),
        &[("disk", Arc::new(MemDevice::new(2048)) as _)],
    );
    let mut c = connect(&e.sock, "disk");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.write(0, &[2; 512]).unwrap(), Reply::Ok(vec![]));
}

/// An option of up to 64 KiB is read and answered; a longer one (a length meant to make the
/// server allocate and wait for gigabytes) drops the client at once.
#[test]
fn options_longer_than_64_kib_drop_the_client() {
    let e = env(
        NbdLimits::default(),
        &[("disk", Arc::new(MemDevice::new(64)) as _)],
    );
    let start = |s: &mut UnixStream| {
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
    };
    let mut s = stream(&e.sock);
    start(&mut s);
    s.write_all(&option_request(99, &vec![0; 64 << 10]))
        .unwrap();
    let (opt, rep, _) = udm_export::nbd::client::read_option_reply(&mut s).unwrap();
    assert_eq!((opt, rep), (99, REP_ERR_UNSUP));
    let mut s = stream(&e.sock);
    start(&mut s);
    let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&99u32.to_be_bytes());
    hdr.extend_from_slice(&((64u32 << 10) + 1).to_be_bytes());
    s.write_all(&hdr).unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "a 64 KiB + 1 option kept the client"
    );
}
