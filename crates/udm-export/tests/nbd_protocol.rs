//! NBD server protocol tests with the in-crate client and raw sockets: negotiation, every
//! command, every class of bad request, garbage handshakes, pipelining with out-of-order
//! replies, and clean removal of an export with clients connected.

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

#[path = "nbd_hostile/support.rs"]
mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use support::ParkDevice;
use udm_export::nbd::client::{self, Client, Reply};
use udm_export::nbd::proto::*;
use udm_export::nbd::{NbdExportOptions, NbdServer};
use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::BioKind;
use udm_types::errno::HasErrno;
use udm_types::Errno;

const SECTORS: u64 = 2048; // 1 MiB

struct Env {
    server: Arc<NbdServer>,
    dev: Arc<MemDevice>,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let server = NbdServer::new();
    let dev = Arc::new(MemDevice::new(SECTORS));
    server
        .add_export(
            "disk",
            dev.clone(),
            NbdExportOptions {
                read_only: false,
                description: Some("a memory disk".into()),
                insecure_tcp: false,
                bitmaps: Vec::new(),
            },
        )
        .unwrap();
    server
        .add_export(
            "ro",
            Arc::new(MemDevice::new(64)),
            NbdExportOptions {
                read_only: true,
                description: None,
                insecure_tcp: false,
                bitmaps: Vec::new(),
            },
        )
        .unwrap();
    server.listen_unix(&sock).unwrap();
    Env {
        server,
        dev,
        sock,
        _dir: dir,
    }
}

fn connect(e: &Env, name: &str, structured: bool) -> Client<UnixStream> {
    let s = UnixStream::connect(&e.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    Client::connect(s, name, structured).unwrap()
}

fn raw(e: &Env) -> UnixStream {
    let s = UnixStream::connect(&e.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn assert_works(c: &mut Client<UnixStream>) {
    let data = vec![0x5au8; 4096];
    assert_eq!(c.write(8192, &data).unwrap(), Reply::Ok(vec![]));
    assert_eq!(c.read(8192, 4096).unwrap(), Reply::Ok(data));
}

/// True when the server closed the stream (EOF or reset), false if it is still open.
fn is_closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn negotiation_list_info_go() {
    let e = env();
    let list = client::list(raw(&e)).unwrap();
    assert_eq!(
        list,
        vec![
            ("disk".to_string(), "a memory disk".to_string()),
            ("ro".to_string(), String::new())
        ]
    );
    for structured in [false, true] {
        let c = connect(&e, "disk", structured);
        assert_eq!(c.export.size, SECTORS * 512);
        assert_eq!(c.export.block_size, Some((512, 4096, 32 << 20)));
        assert_eq!(c.export.description.as_deref(), Some("a memory disk"));
        let f = c.export.flags;
        for flag in [
            FLAG_HAS_FLAGS,
            FLAG_SEND_FLUSH,
            FLAG_SEND_FUA,
            FLAG_SEND_TRIM,
            FLAG_SEND_WRITE_ZEROES,
            FLAG_SEND_FAST_ZERO,
            FLAG_CAN_MULTI_CONN,
            FLAG_SEND_CACHE,
        ] {
            assert_ne!(f & flag, 0, "flag {flag:#x}");
        }
        assert_eq!(f & FLAG_READ_ONLY, 0);
        assert_eq!(f & FLAG_SEND_DF != 0, structured);
        assert_eq!(c.negotiated(), (structured, structured.then_some(1)));
    }
    let ro = connect(&e, "ro", false);
    assert_ne!(ro.export.flags & FLAG_READ_ONLY, 0);
    assert_eq!(
        ro.export.flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES),
        0
    );

    // Raw negotiation: unknown option, STARTTLS, INFO for an unknown export, LIST with data,
    // LIST_META_CONTEXT before structured replies, then a valid GO on the same connection.
    let mut s = raw(&e);
    let hf = client::greet(&mut s).unwrap();
    assert_eq!(hf, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let cases: &[(u32, Vec<u8>, u32)] = &[
        (0x4242, vec![1, 2, 3], REP_ERR_UNSUP),
        (OPT_STARTTLS, vec![], REP_ERR_UNSUP),
        (OPT_INFO, info_request_data("nope", &[]), REP_ERR_UNKNOWN),
        (OPT_INFO, vec![0, 0, 0, 9, b'x'], REP_ERR_INVALID),
        (OPT_LIST, vec![1], REP_ERR_INVALID),
        (OPT_STRUCTURED_REPLY, vec![1], REP_ERR_INVALID),
        (
            OPT_LIST_META_CONTEXT,
            meta_request_data("disk", &[]),
            REP_ERR_INVALID,
        ),
    ];
    for (opt, data, want) in cases {
        s.write_all(&option_request(*opt, data)).unwrap();
        let (o, t, _) = client::read_option_reply(&mut s).unwrap();
        assert_eq!((o, t), (*opt, *want), "option {opt}");
    }
    s.write_all(&option_request(OPT_STRUCTURED_REPLY, &[]))
        .unwrap();
    assert_eq!(client::read_option_reply(&mut s).unwrap().1, REP_ACK);
    // LIST_META_CONTEXT with no query lists base:allocation; an unknown namespace matches nothing.
    s.write_all(&option_request(
        OPT_LIST_META_CONTEXT,
        &meta_request_data("disk", &[]),
    ))
    .unwrap();
    let (_, t, d) = client::read_option_reply(&mut s).unwrap();
    assert_eq!(t, REP_META_CONTEXT);
    assert_eq!(&d[4..], META_BASE_ALLOCATION.as_bytes());
    assert_eq!(client::read_option_reply(&mut s).unwrap().1, REP_ACK);
    s.write_all(&option_request(
        OPT_SET_META_CONTEXT,
        &meta_request_data("disk", &["x-foo:bar"]),
    ))
    .unwrap();
    assert_eq!(client::read_option_reply(&mut s).unwrap().1, REP_ACK);
    // INFO then GO.
    s.write_all(&option_request(
        OPT_INFO,
        &info_request_data("disk", &[INFO_NAME]),
    ))
    .unwrap();
    let mut types = vec![];
    loop {
        let (_, t, d) = client::read_option_reply(&mut s).unwrap();
        if t == REP_ACK {
            break;
        }
        assert_eq!(t, REP_INFO);
        types.push(be16(&d[0..2]));
    }
    assert!(types.contains(&INFO_EXPORT) && types.contains(&INFO_NAME));
    s.write_all(&option_request(OPT_GO, &info_request_data("disk", &[])))
        .unwrap();
    loop {
        if client::read_option_reply(&mut s).unwrap().1 == REP_ACK {
            break;
        }
    }
    // Block status without a selected context: EINVAL as a structured error.
    let req = Request {
        flags: 0,
        cmd: CMD_BLOCK_STATUS,
        handle: 7,
        offset: 0,
        length: 4096,
    };
    s.write_all(&req.encode()).unwrap();
    let h = read_array::<20>(&mut s).unwrap();
    assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
    assert_eq!(be16(&h[6..8]), REPLY_TYPE_ERROR);
    let mut p = vec![0u8; be32(&h[16..20]) as usize];
    s.read_exact(&mut p).unwrap();
    assert_eq!(be32(&p[0..4]), NBD_EINVAL);
    // The error chunk's message says why (errno, length, text).
    assert_eq!(
        String::from_utf8_lossy(&p[6..]),
        "no metadata context was negotiated"
    );
    assert_eq!(usize::from(be16(&p[4..6])), p.len() - 6);
}

#[test]
fn export_name_and_abort() {
    let e = env();
    // NBD_OPT_EXPORT_NAME with NO_ZEROES: 10 bytes of size+flags.
    let mut s = raw(&e);
    client::greet(&mut s).unwrap();
    s.write_all(&option_request(OPT_EXPORT_NAME, b"disk"))
        .unwrap();
    let b = read_array::<10>(&mut s).unwrap();
    assert_eq!(be64(&b[0..8]), SECTORS * 512);
    let req = Request {
        flags: 0,
        cmd: CMD_READ,
        handle: 1,
        offset: 0,
        length: 512,
    };
    s.write_all(&req.encode()).unwrap();
    let r = read_array::<16>(&mut s).unwrap();
    assert_eq!(be32(&r[4..8]), 0);
    // Without NO_ZEROES: 124 zero bytes follow.
    let mut s = raw(&e);
    let _ = read_array::<18>(&mut s).unwrap();
    s.write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    s.write_all(&option_request(OPT_EXPORT_NAME, b"disk"))
        .unwrap();
    let b = read_array::<134>(&mut s).unwrap();
    assert!(b[10..].iter().all(|&x| x == 0));
    // Unknown export with EXPORT_NAME: the server must hang up.
    let mut s = raw(&e);
    client::greet(&mut s).unwrap();
    s.write_all(&option_request(OPT_EXPORT_NAME, b"nope"))
        .unwrap();
    assert!(is_closed(&mut s));
    // ABORT is acknowledged, then the connection ends.
    let mut s = raw(&e);
    client::greet(&mut s).unwrap();
    s.write_all(&option_request(OPT_ABORT, &[])).unwrap();
    assert_eq!(client::read_option_reply(&mut s).unwrap().1, REP_ACK);
    assert!(is_closed(&mut s));
}

#[test]
fn commands_simple_and_structured() {
    let e = env();
    for structured in [false, true] {
        let mut c = connect(&e, "disk", structured);
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
        let fua = e.dev.flag_count(udm_io::BioFlags::FUA);
        assert_eq!(c.write(0, &data).unwrap(), Reply::Ok(vec![]));
        assert_eq!(c.read(0, 65536).unwrap(), Reply::Ok(data.clone()));
        assert_eq!(
            e.dev.flag_count(udm_io::BioFlags::FUA),
            fua,
            "a plain write reached the device with FUA"
        );
        assert_eq!(
            c.call(CMD_WRITE, CMD_FLAG_FUA, 65536, 512, &[9u8; 512])
                .unwrap(),
            Reply::Ok(vec![])
        );
        assert_eq!(
            e.dev.flag_count(udm_io::BioFlags::FUA),
            fua + 1,
            "NBD_CMD_FLAG_FUA not passed to the device"
        );
        assert_eq!(c.flush().unwrap(), Reply::Ok(vec![]));
        assert_eq!(
            c.call(CMD_TRIM, 0, 0, 4096, &[]).unwrap(),
            Reply::Ok(vec![])
        );
        assert_eq!(
            c.call(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 4096, 4096, &[])
                .unwrap(),
            Reply::Ok(vec![])
        );
        assert_eq!(c.read(4096, 4096).unwrap(), Reply::Ok(vec![0; 4096]));
        assert_eq!(
            c.call(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 8192, 4096, &[])
                .unwrap(),
            Reply::Ok(vec![])
        );
        assert_eq!(
            c.call(CMD_CACHE, 0, 0, 1 << 20, &[]).unwrap(),
            Reply::Ok(vec![])
        );
        // DF is valid on reads only with structured replies.
        let df = c.call(CMD_READ, CMD_FLAG_DF, 16384, 512, &[]).unwrap();
        if structured {
            assert_eq!(df, Reply::Ok(data[16384..16896].to_vec()));
        } else {
            assert_eq!(df, Reply::Err(NBD_EINVAL));
        }
        // Zero-length requests are answered, not dropped.
        assert_eq!(c.read(0, 0).unwrap(), Reply::Ok(vec![]));
        assert_eq!(c.write(0, &[]).unwrap(), Reply::Ok(vec![]));
        assert_works(&mut c);
        c.disconnect().unwrap();
    }
    let st = e.server.exports();
    let d = st.iter().find(|x| x.name == "disk").unwrap();
    assert_eq!(d.stats.trims, 2);
    assert_eq!(d.stats.write_zeroes, 4);
    assert_eq!(d.stats.caches, 2);
    assert!(d.stats.bytes_written >= 2 * 65536);
    assert!(d.stats.bytes_read >= 2 * 65536);
    assert_eq!(d.stats.errors, 1);
    assert_eq!(d.stats.connections, 2);
}

#[test]
fn block_status_base_allocation() {
    let e = env();
    let mut c = connect(&e, "disk", true);
    // Fresh memory device: all hole+zero. Write 8 KiB of data at 64 KiB.
    c.write(65536, &[1u8; 8192]).unwrap();
    let r = c.block_status(0, 1 << 20, 0).unwrap();
    assert_eq!(
        r,
        Reply::Extents(vec![
            (65536, STATE_HOLE | STATE_ZERO),
            (8192, 0),
            ((1 << 20) - 65536 - 8192, STATE_HOLE | STATE_ZERO)
        ])
    );
    let r = c.block_status(65536, 1 << 19, CMD_FLAG_REQ_ONE).unwrap();
    assert_eq!(r, Reply::Extents(vec![(8192, 0)]));
    assert_eq!(
        c.block_status(1 << 20, 512, 0).unwrap(),
        Reply::Err(NBD_EINVAL)
    );
    assert_eq!(c.block_status(1, 512, 0).unwrap(), Reply::Err(NBD_EINVAL));
    assert_eq!(e.server.exports()[0].stats.block_status, 4);
}

#[test]
fn bad_requests_get_errors_and_connection_survives() {
    let e = env();
    for structured in [false, true] {
        let mut c = connect(&e, "disk", structured);
        let size = SECTORS * 512;
        let cases: Vec<(u16, u16, u64, u32, Vec<u8>, u32)> = vec![
            (CMD_READ, 0, size, 512, vec![], NBD_EINVAL),
            (CMD_READ, 0, size - 512, 1024, vec![], NBD_EINVAL),
            (CMD_READ, 0, u64::MAX - 511, 512, vec![], NBD_EINVAL),
            (CMD_WRITE, 0, size, 512, vec![0; 512], NBD_ENOSPC),
            (CMD_WRITE_ZEROES, 0, size - 512, 1024, vec![], NBD_ENOSPC),
            (CMD_TRIM, 0, size, 512, vec![], NBD_EINVAL),
            (CMD_READ, 0, 100, 512, vec![], NBD_EINVAL),
            (CMD_READ, 0, 0, 100, vec![], NBD_EINVAL),
            (CMD_WRITE, 0, 0, 100, vec![0; 100], NBD_EINVAL),
            (CMD_READ, 0, 0, (32 << 20) + 512, vec![], NBD_EINVAL),
            (
                CMD_WRITE,
                0,
                0,
                (32 << 20) + 512,
                vec![0; (32 << 20) + 512],
                NBD_EINVAL,
            ),
            (CMD_WRITE_ZEROES, 0, 0, (32 << 20) + 512, vec![], NBD_EINVAL),
            // A fast zero has no size cap (only the export's end).
            (
                CMD_WRITE_ZEROES,
                CMD_FLAG_FAST_ZERO,
                0,
                (32 << 20) + 512,
                vec![],
                NBD_ENOSPC,
            ),
            (42, 0, 0, 512, vec![], NBD_EINVAL),
            (CMD_READ, 1 << 9, 0, 512, vec![], NBD_EINVAL),
            (
                CMD_WRITE,
                CMD_FLAG_NO_HOLE,
                0,
                512,
                vec![0; 512],
                NBD_EINVAL,
            ),
            (CMD_FLUSH, 0, 512, 0, vec![], NBD_EINVAL),
            (CMD_CACHE, CMD_FLAG_REQ_ONE, 0, 512, vec![], NBD_EINVAL),
        ];
        for (cmd, flags, off, len, data, want) in cases {
            let r = c.call(cmd, flags, off, len, &data).unwrap();
            assert_eq!(
                r,
                Reply::Err(want),
                "cmd {cmd} flags {flags:#x} off {off} len {len}"
            );
            assert_works(&mut c);
        }
        let mut ro = connect(&e, "ro", structured);
        for (cmd, data) in [
            (CMD_WRITE, vec![0u8; 512]),
            (CMD_TRIM, vec![]),
            (CMD_WRITE_ZEROES, vec![]),
        ] {
            assert_eq!(
                ro.call(cmd, 0, 0, 512, &data).unwrap(),
                Reply::Err(NBD_EPERM)
            );
        }
        assert_eq!(ro.read(0, 512).unwrap(), Reply::Ok(vec![0; 512]));
        assert_eq!(ro.flush().unwrap(), Reply::Ok(vec![]));
    }
    // Device errors map through the errno table.
    e.dev
        .inject(Fault::range(100, 101, Errno::EIO).ops(&[BioKind::Read]));
    e.dev
        .inject(Fault::range(200, 201, Errno::ENOSPC).ops(&[BioKind::Write]));
    let mut c = connect(&e, "disk", true);
    assert_eq!(c.read(100 * 512, 512).unwrap(), Reply::Err(NBD_EIO));
    assert_eq!(
        c.write(200 * 512, &[1; 512]).unwrap(),
        Reply::Err(NBD_ENOSPC)
    );
    let mut c = connect(&e, "disk", false);
    assert_eq!(c.read(100 * 512, 512).unwrap(), Reply::Err(NBD_EIO));
    assert_works(&mut c);
}

/// Writes over the 32 MiB maximum block size are read and skipped (EINVAL, the connection goes
/// on) up to 64 MiB; a longer one, or one whose payload stops coming, ends the connection and
/// is not counted.
#[test]
fn oversized_writes_are_skipped_up_to_64_mib_then_dropped() {
    let e = env();
    let max_skip = 64u32 << 20;
    let mut c = connect(&e, "disk", false);
    assert_eq!(
        c.call(CMD_WRITE, 0, 0, max_skip, &vec![7; max_skip as usize])
            .unwrap(),
        Reply::Err(NBD_EINVAL)
    );
    assert_works(&mut c);
    let stats = || {
        let st = e.server.exports();
        let d = st.iter().find(|x| x.name == "disk").unwrap().stats.clone();
        (d.writes, d.errors)
    };
    let before = stats();
    let mut c = connect(&e, "disk", false);
    c.send(CMD_WRITE, 0, 0, max_skip + 512, &[]).unwrap();
    assert!(
        is_closed(c.stream()),
        "a write over 64 MiB kept the connection"
    );
    let mut c = connect(&e, "disk", false);
    c.send(CMD_WRITE, 0, 0, 40 << 20, &vec![7; 1 << 20])
        .unwrap();
    c.stream().shutdown(std::net::Shutdown::Write).unwrap();
    assert!(
        is_closed(c.stream()),
        "a write whose payload stopped kept the connection"
    );
    assert_eq!(stats(), before, "writes that never arrived were counted");
    assert!(e.dev.contents()[..4096].iter().all(|&b| b != 7));
}

/// An export `gate` whose reads of sector 0 wait until released (a suspended device).
fn gate_env() -> (Env, Arc<ParkDevice>) {
    let e = env();
    let gate = ParkDevice::with(SECTORS, Duration::ZERO);
    e.server
        .add_export("gate", gate.clone(), NbdExportOptions::default())
        .unwrap();
    (e, gate)
}

/// A CACHE (read in 1 MiB steps) holds a buffer while it runs: charged to the connection's
/// in-flight budget like a read of that size, released with its reply.
#[test]
fn a_running_cache_request_is_charged_to_the_inflight_budget() {
    let (e, gate) = gate_env();
    let mut c = connect(&e, "gate", true);
    let h = c
        .send(CMD_CACHE, 0, 0, (SECTORS * 512) as u32, &[])
        .unwrap();
    gate.wait_parked(1);
    let held = e.server.memory().inflight_bytes;
    gate.release();
    assert_eq!(c.recv(|_| None).unwrap(), (h, Reply::Ok(vec![])));
    assert_eq!(held, 1 << 20, "in-flight bytes while the CACHE ran");
    let t = std::time::Instant::now();
    while e.server.memory().inflight_bytes != 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(e.server.memory().inflight_bytes, 0);
}

#[test]
fn pipelined_out_of_order_replies_while_device_blocks() {
    let (e, gate) = gate_env();
    let mut c = connect(&e, "gate", true);
    let mut other = connect(&e, "disk", false);
    let slow = c.send(CMD_READ, 0, 0, 512, &[]).unwrap();
    // While the first request blocks, the connection keeps reading and answering.
    let mut fast = vec![];
    for i in 1..20u64 {
        fast.push(
            c.send(CMD_WRITE, 0, i * 4096, 512, &[i as u8; 512])
                .unwrap(),
        );
    }
    for _ in 0..fast.len() {
        let (h, r) = c.recv(|h| (h == slow).then_some(512)).unwrap();
        assert!(fast.contains(&h) && h != slow, "handle {h}");
        assert_eq!(r, Reply::Ok(vec![]));
    }
    // Other connections and exports are unaffected.
    assert_works(&mut other);
    assert!(gate.parked.load(Ordering::SeqCst) >= 1);
    gate.release();
    let (h, r) = c.recv(|_| Some(512)).unwrap();
    assert_eq!((h, r), (slow, Reply::Ok(vec![0; 512])));
}

#[test]
fn shutdown_answers_in_flight_requests() {
    let (e, gate) = gate_env();
    let mut c = connect(&e, "gate", false);
    let slow = c.send(CMD_READ, 0, 0, 512, &[]).unwrap();
    gate.wait_parked(1);
    let server = e.server.clone();
    let stopper = std::thread::spawn(move || server.shutdown());
    // Released only once the shutdown is past closing clients still negotiating (the exports
    // are withdrawn just before), so a transmitting client closed with them would show.
    while !e.server.exports().is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    gate.release();
    stopper.join().unwrap();
    assert_eq!(
        c.recv(|_| Some(512)).unwrap(),
        (slow, Reply::Ok(vec![0; 512]))
    );
}

#[test]
fn remove_export_answers_in_flight_then_disconnects() {
    let (e, gate) = gate_env();
    let mut c = connect(&e, "gate", false);
    let slow = c.send(CMD_READ, 0, 0, 512, &[]).unwrap();
    gate.wait_parked(1);
    assert_eq!(
        e.server
            .exports()
            .iter()
            .find(|x| x.name == "gate")
            .unwrap()
            .clients,
        1
    );
    let server = e.server.clone();
    let remover = std::thread::spawn(move || server.remove_export("gate"));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !remover.is_finished(),
        "remove_export must wait for in-flight requests"
    );
    gate.release();
    remover.join().unwrap().unwrap();
    let (h, r) = c.recv(|_| Some(512)).unwrap();
    assert_eq!((h, r), (slow, Reply::Ok(vec![0; 512])));
    assert!(is_closed(c.stream()));
    assert!(e.server.exports().iter().all(|x| x.name != "gate"));
    assert_eq!(
        e.server.remove_export("gate").unwrap_err().errno(),
        Errno::ENOENT
    );
    assert_eq!(
        e.server
            .add_export(
                "disk",
                Arc::new(MemDevice::new(8)),
                NbdExportOptions::default()
            )
            .unwrap_err()
            .errno(),
        Errno::EEXIST
    );
    // New clients cannot reach the removed export; the others still work.
    let mut s = raw(&e);
    client::greet(&mut s).unwrap();
    s.write_all(&option_request(OPT_GO, &info_request_data("gate", &[])))
        .unwrap();
    assert_eq!(
        client::read_option_reply(&mut s).unwrap().1,
        REP_ERR_UNKNOWN
    );
    let mut d = connect(&e, "disk", true);
    assert_works(&mut d);
}

#[test]
fn garbage_drops_only_that_connection() {
    let e = env();
    let mut good = connect(&e, "disk", true);
    let garbage: Vec<Vec<u8>> = vec![
        // Unknown client flags.
        0xffff_ffffu32.to_be_bytes().to_vec(),
        // Bad option magic.
        [1u32.to_be_bytes().to_vec(), vec![0x55; 16]].concat(),
        // Huge option length.
        [
            1u32.to_be_bytes().to_vec(),
            IHAVEOPT.to_be_bytes().to_vec(),
            OPT_GO.to_be_bytes().to_vec(),
            0xffff_fff0u32.to_be_bytes().to_vec(),
        ]
        .concat(),
        // Truncated option.
        [
            1u32.to_be_bytes().to_vec(),
            IHAVEOPT.to_be_bytes().to_vec(),
            OPT_GO.to_be_bytes().to_vec(),
            100u32.to_be_bytes().to_vec(),
            vec![0; 10],
        ]
        .concat(),
        // Random bytes.
        (0..200u32).map(|i| (i * 37 % 251) as u8).collect(),
    ];
    for g in garbage {
        let mut s = raw(&e);
        let _ = read_array::<18>(&mut s).unwrap();
        s.write_all(&g).unwrap();
        if g.len() == 4 || g[4..12] != IHAVEOPT.to_be_bytes() || be32(&g[16..20]) > 1 << 20 {
            assert!(is_closed(&mut s));
        } else {
            // Truncated: the server waits for the rest; hanging up ends it.
            drop(s);
        }
        assert_works(&mut good);
    }
    // Transmission-phase garbage: bad request magic.
    let mut c = connect(&e, "disk", false);
    c.stream().write_all(&[0xde; 28]).unwrap();
    assert!(is_closed(c.stream()));
    // Oversized write payload beyond what we skip: hard disconnect.
    let mut c = connect(&e, "disk", false);
    c.send(CMD_WRITE, 0, 0, 0xffff_0000, &[]).unwrap();
    assert!(is_closed(c.stream()));
    // A client vanishing mid-write (header and half the payload).
    let mut c = connect(&e, "disk", true);
    c.send(CMD_WRITE, 0, 0, 8192, &[7u8; 4096]).unwrap();
    drop(c);
    // A client vanishing with replies pending.
    let mut c = connect(&e, "disk", true);
    for i in 0..64u64 {
        c.send(CMD_READ, 0, i * 4096, 4096, &[]).unwrap();
    }
    drop(c);
    assert_works(&mut good);
    // A second concurrent client doing I/O the whole time is unaffected.
    let sock = e.sock.clone();
    let t = std::thread::spawn(move || {
        let s = UnixStream::connect(sock).unwrap();
        let mut c = Client::connect(s, "disk", false).unwrap();
        for i in 0..200u32 {
            let d = vec![(i % 251) as u8; 4096];
            assert_eq!(
                c.write(u64::from(i % 64) * 4096 + 256 * 1024, &d).unwrap(),
                Reply::Ok(vec![])
            );
            assert_eq!(
                c.read(u64::from(i % 64) * 4096 + 256 * 1024, 4096).unwrap(),
                Reply::Ok(d)
            );
        }
    });
    for _ in 0..20 {
        let mut s = raw(&e);
        let _ = read_array::<18>(&mut s);
        let _ = s.write_all(&[0xff; 40]);
        drop(s);
        let mut c = connect(&e, "disk", true);
        let _ = c.stream().write_all(&[1; 13]);
    }
    t.join().unwrap();
    assert_works(&mut good);
}

#[test]
fn shutdown_disconnects_everyone() {
    let e = env();
    let mut c = connect(&e, "disk", true);
    let mut h = raw(&e);
    client::greet(&mut h).unwrap();
    assert_works(&mut c);
    e.server.shutdown();
    assert!(is_closed(c.stream()));
    assert!(is_closed(&mut h));
    assert!(UnixStream::connect(&e.sock).is_err());
}

#[test]
fn serve_stream_in_process() {
    let server = NbdServer::new();
    server
        .add_export(
            "",
            Arc::new(MemDevice::new(16)),
            NbdExportOptions::default(),
        )
        .unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let t = server.serve_stream(a).unwrap();
    let mut c = Client::connect(b, "", true).unwrap();
    assert_eq!(c.export.size, 16 * 512);
    assert_eq!(c.write(0, &[3; 512]).unwrap(), Reply::Ok(vec![]));
    c.disconnect().unwrap();
    t.join().unwrap();
    server.shutdown();
}
