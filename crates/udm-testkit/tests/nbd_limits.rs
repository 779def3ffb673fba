//! udmd's NBD limits against hostile clients (issue "Trustworthy daemon", item 4), through the
//! daemon itself: `--nbd-max-connections` refuses the next client with a message it can show
//! while the others keep working, and pipelined 32 MiB READs that are never read back plus
//! WRITE headers claiming 32 MiB with 1 KiB sent keep udmd's resident memory far below the
//! 256 MiB the issue allows, while a normal client keeps its latency.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use udm_export::nbd::client::{greet, read_option_reply, Client, Reply};
use udm_export::nbd::proto::{
    info_request_data, option_request, CMD_READ, CMD_WRITE, OPT_GO, REP_ERR_SHUTDOWN, REQUEST_MAGIC,
};
use udm_testkit::Udmd;

fn request(cmd: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(28);
    r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&length.to_be_bytes());
    r
}

fn stream(d: &Udmd) -> UnixStream {
    let s = UnixStream::connect(d.nbd_socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn client(d: &Udmd, name: &str) -> Client<UnixStream> {
    Client::connect(stream(d), name, true).unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// A 512 MiB sparse disk with a linear device `vol` exported over NBD.
fn exported(d: &Udmd) {
    let f = d.path("d0.img");
    std::fs::File::create(&f)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    d.ok(&["disk", "add", "d0", "--file", f.to_str().unwrap()]);
    d.ok(&["create", "vol", "--table", "0 1048576 linear d0 0"]);
    d.ok(&["export", "add", "vol", "--nbd"]);
}

#[test]
fn connection_cap_refuses_with_a_message_and_keeps_the_others() {
    let d = Udmd::start_with(&["--nbd-max-connections", "2"]);
    exported(&d);
    let mut a = client(&d, "vol");
    let mut b = client(&d, "vol");
    let mut c = stream(&d);
    greet(&mut c).unwrap();
    c.write_all(&option_request(OPT_GO, &info_request_data("vol", &[])))
        .unwrap();
    let (_, typ, msg) = read_option_reply(&mut c).unwrap();
    let msg = String::from_utf8_lossy(&msg).into_owned();
    assert_eq!(typ, REP_ERR_SHUTDOWN, "third client: {msg}");
    assert!(msg.contains('2'), "the refusal names the limit: {msg}");
    assert!(d.log().contains("refus"), "udmd logs the refusal");
    assert_eq!(a.read(0, 4096).unwrap(), Reply::Ok(vec![0; 4096]));
    assert_eq!(b.write(0, &[7; 4096]).unwrap(), Reply::Ok(Vec::new()));
    // A freed slot serves the next client.
    drop(a);
    let start = Instant::now();
    let mut again = loop {
        match Client::connect(stream(&d), "vol", true) {
            Ok(c) => break c,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("no slot after a client left: {e}"),
        }
    };
    assert_eq!(again.read(0, 4096).unwrap(), Reply::Ok(vec![7; 4096]));
}

#[test]
fn memory_attacks_keep_udmd_small_and_other_clients_fast() {
    let d = Udmd::start();
    exported(&d);
    let pid = d.pid().unwrap();
    let mut normal = client(&d, "vol");
    for _ in 0..4 {
        assert!(matches!(normal.read(0, 1 << 20).unwrap(), Reply::Ok(_)));
    }
    let base = rss_kib(pid);
    // Four connections each pipeline 40 READs of 32 MiB and never read a reply.
    let mut flooders = Vec::new();
    for i in 0..4u64 {
        let mut s = stream(&d);
        let _ = Client::connect(s.try_clone().unwrap(), "vol", false).unwrap();
        let mut reqs = Vec::new();
        for h in 0..40u64 {
            reqs.extend(request(CMD_READ, h, ((i * 40 + h) % 16) << 25, 32 << 20));
        }
        flooders.push(std::thread::spawn(move || {
            let _ = s.write_all(&reqs);
            s
        }));
    }
    // Twenty connections send a WRITE header claiming 32 MiB and 1 KiB of payload.
    let mut writers = Vec::new();
    for h in 0..20u64 {
        let mut w = stream(&d);
        let _ = Client::connect(w.try_clone().unwrap(), "vol", false).unwrap();
        w.write_all(&request(CMD_WRITE, h, 0, 32 << 20)).unwrap();
        w.write_all(&[0xab; 1024]).unwrap();
        writers.push(w);
    }
    let mut peak = base;
    let mut worst = Duration::ZERO;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        peak = peak.max(rss_kib(pid));
        let t = Instant::now();
        assert_eq!(
            normal.read(1 << 20, 4096).unwrap(),
            Reply::Ok(vec![0; 4096])
        );
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "udmd RSS {} MiB -> peak {} MiB under attack; slowest normal 4k read {worst:?}",
        base / 1024,
        peak / 1024
    );
    assert!(peak < 256 * 1024, "udmd RSS reached {} MiB", peak / 1024);
    assert!(
        worst < Duration::from_millis(500),
        "a normal client's read took {worst:?}"
    );
    drop(writers);
    for f in flooders {
        drop(f.join().unwrap());
    }
}
