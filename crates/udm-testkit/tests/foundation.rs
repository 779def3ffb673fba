//! Foundation acceptance through the daemon: udmd driven by udmsetup, data checked byte by byte
//! against the backing files through an NBD client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::os::unix::net::UnixStream;
use udm_export::nbd::client::{Client, Reply};
use udm_testkit::{fill_pattern, read_at, Udmd};

const MIB: u64 = 1 << 20;

fn nbd(d: &Udmd, export: &str) -> Client<UnixStream> {
    let s = UnixStream::connect(d.nbd_socket()).expect("nbd socket");
    Client::connect(s, export, false).expect("nbd handshake")
}

fn read(c: &mut Client<UnixStream>, off: u64, len: u32) -> Vec<u8> {
    match c.read(off, len).expect("read") {
        Reply::Ok(v) => v,
        r => panic!("read {off}+{len}: {r:?}"),
    }
}

fn write(c: &mut Client<UnixStream>, off: u64, data: &[u8]) {
    assert_eq!(
        c.write(off, data).expect("write"),
        Reply::Ok(Vec::new()),
        "write at {off}"
    );
}

/// Expected bytes of a pattern disk at `sector` for `len` bytes.
fn pattern(seed: u8, sector: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, sector, seed);
    v
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn linear_spanning_two_disks_byte_by_byte() {
    let d = Udmd::start();
    let a = d.disk("a", 16 * MIB, 1);
    let b = d.disk("b", 16 * MIB, 2);
    // dmsetup(8)'s "join two disks" shape, with offsets so misplacement shows.
    d.ok(&[
        "create",
        "join",
        "--table",
        "0 8192 linear a 1024\n8192 16384 linear b 2048",
    ]);
    assert_eq!(
        d.ok(&["table", "join"]),
        "0 8192 linear 8:0 1024\n8192 16384 linear 8:16 2048\n"
    );
    d.ok(&["export", "add", "join", "--nbd"]);
    let mut c = nbd(&d, "join");
    assert_eq!(c.export.size, 24576 * 512);
    // Reads: the first part comes from a at +1024, the second from b at +2048.
    assert_eq!(read(&mut c, 0, 4096), pattern(1, 1024, 4096));
    assert_eq!(
        read(&mut c, 8192 * 512 - 512, 1024)[..512],
        pattern(1, 1024 + 8191, 512)[..]
    );
    assert_eq!(
        read(&mut c, 8192 * 512 - 512, 1024)[512..],
        pattern(2, 2048, 512)[..]
    );
    // A write across the boundary lands in both disks at the mapped places.
    let w = noise(8192, 7);
    write(&mut c, 8192 * 512 - 4096, &w);
    c.flush().expect("flush");
    assert_eq!(read_at(&a, (1024 + 8192 - 8) * 512, 4096), w[..4096]);
    assert_eq!(read_at(&b, 2048 * 512, 4096), w[4096..]);
    // Neighbours untouched.
    assert_eq!(
        read_at(&a, (1024 + 8192 - 9) * 512, 512),
        pattern(1, 1024 + 8192 - 9, 512)
    );
    assert_eq!(
        read_at(&b, (2048 + 8) * 512, 512),
        pattern(2, 2048 + 8, 512)
    );
}

fn check_striped(stripes: u64, chunk: u64) {
    let d = Udmd::start();
    let names = ["s0", "s1", "s2"];
    let offs = [0u64, 64, 128];
    let files: Vec<_> = (0..stripes as usize)
        .map(|i| d.disk(names[i], 8 * MIB, 10 + i as u8))
        .collect();
    let len = stripes * chunk * 64;
    let mut table = format!("0 {len} striped {stripes} {chunk}");
    for i in 0..stripes as usize {
        table.push_str(&format!(" {} {}", names[i], offs[i]));
    }
    d.ok(&["create", "st", "--table", &table]);
    let devs: Vec<String> = (0..stripes)
        .map(|i| format!(" 8:{} {}", i * 16, offs[i as usize]))
        .collect();
    assert_eq!(
        d.ok(&["table", "st"]),
        format!("0 {len} striped {stripes} {chunk}{}\n", devs.concat())
    );
    let status_devs: Vec<String> = (0..stripes).map(|i| format!("8:{} ", i * 16)).collect();
    assert_eq!(
        d.ok(&["status", "st"]),
        format!(
            "0 {len} striped {stripes} {}1 {}\n",
            status_devs.concat(),
            "A".repeat(stripes as usize)
        )
    );
    d.ok(&["export", "add", "st", "--nbd"]);
    let mut c = nbd(&d, "st");
    let data = noise((len * 512) as usize, stripes);
    for (i, piece) in data.chunks(256 * 1024).enumerate() {
        write(&mut c, i as u64 * 256 * 1024, piece);
    }
    c.flush().expect("flush");
    // Sector s of the device lives in stripe (s / chunk) % stripes at chunk row (s / chunk) / stripes.
    for s in (0..len).step_by(7) {
        let ch = s / chunk;
        let stripe = (ch % stripes) as usize;
        let dev_sector = offs[stripe] + (ch / stripes) * chunk + s % chunk;
        let got = read_at(&files[stripe], dev_sector * 512, 512);
        assert_eq!(
            got,
            data[(s * 512) as usize..(s * 512 + 512) as usize],
            "sector {s} (stripe {stripe})"
        );
    }
    assert_eq!(read(&mut c, 0, (len * 512) as u32), data);
}

#[test]
fn striped_over_two_and_three_devices_byte_by_byte() {
    check_striped(2, 16);
    check_striped(3, 8);
}

#[test]
fn delay_holds_requests_and_reports_them() {
    let d = Udmd::start();
    d.disk("a", 8 * MIB, 1);
    d.ok(&["create", "slow", "--table", "0 16384 delay a 0 200"]);
    assert_eq!(d.ok(&["table", "slow"]), "0 16384 delay 8:0 0 200\n");
    assert_eq!(d.ok(&["status", "slow"]), "0 16384 delay 0 0 0\n");
    d.ok(&["export", "add", "slow", "--nbd"]);
    let sock = d.nbd_socket();
    let reader = std::thread::spawn(move || {
        let mut c = Client::connect(UnixStream::connect(sock).unwrap(), "slow", false).unwrap();
        let t = std::time::Instant::now();
        let r = c.read(0, 4096).unwrap();
        (t.elapsed(), r)
    });
    std::thread::sleep(std::time::Duration::from_millis(80));
    assert_eq!(
        d.ok(&["status", "slow"]),
        "0 16384 delay 1 0 0\n",
        "one read held in the delay queue"
    );
    let (took, r) = reader.join().unwrap();
    assert!(
        took >= std::time::Duration::from_millis(190),
        "delay 200 ms, read took {took:?}"
    );
    assert_eq!(r, Reply::Ok(pattern(1, 0, 4096)));
    // Six and nine argument forms print their triples.
    d.ok(&["create", "slow6", "--table", "0 100 delay a 0 0 a 100 50"]);
    assert_eq!(
        d.ok(&["table", "slow6"]),
        "0 100 delay 8:0 0 0 8:0 100 50\n"
    );
    d.ok(&[
        "create",
        "slow9",
        "--table",
        "0 100 delay a 0 1 a 100 2 a 200 3",
    ]);
    assert_eq!(
        d.ok(&["table", "slow9"]),
        "0 100 delay 8:0 0 1 8:0 100 2 8:0 200 3\n"
    );
}

#[test]
fn flakey_with_features() {
    let d = Udmd::start();
    let a = d.disk("a", 8 * MIB, 1);
    // Down from the start (up 0 s, down 60 s) with drop_writes: writes "succeed" but are dropped.
    d.ok(&[
        "create",
        "drop",
        "--table",
        "0 4096 flakey a 0 0 60 1 drop_writes",
    ]);
    assert_eq!(
        d.ok(&["table", "drop"]),
        // Linux 6.1's table line: a space after each feature.
        "0 4096 flakey 8:0 0 0 60 1 drop_writes \n"
    );
    d.ok(&["export", "add", "drop", "--nbd"]);
    let mut c = nbd(&d, "drop");
    write(&mut c, 0, &[0xeeu8; 4096]);
    assert_eq!(
        read_at(&a, 0, 4096),
        pattern(1, 0, 4096),
        "drop_writes must not write"
    );
    assert_eq!(
        read(&mut c, 0, 4096),
        pattern(1, 0, 4096),
        "reads pass in drop_writes mode"
    );
    // error_writes: writes fail with EIO (NBD error 5), reads work.
    d.ok(&[
        "create",
        "ew",
        "--table",
        "0 4096 flakey a 4096 0 60 1 error_writes",
    ]);
    d.ok(&["export", "add", "ew", "--nbd"]);
    let mut c = nbd(&d, "ew");
    assert_eq!(c.write(0, &[1u8; 512]).unwrap(), Reply::Err(5));
    assert_eq!(read(&mut c, 0, 512), pattern(1, 4096, 512));
    // corrupt_bio_byte 32 r 1 0: byte 32 of every read is set to 1.
    d.ok(&[
        "create",
        "cor",
        "--table",
        "0 4096 flakey a 0 0 60 5 corrupt_bio_byte 32 r 1 0",
    ]);
    assert_eq!(
        d.ok(&["table", "cor"]),
        "0 4096 flakey 8:0 0 0 60 5 corrupt_bio_byte 32 r 1 0 \n"
    );
    d.ok(&["export", "add", "cor", "--nbd"]);
    let mut c = nbd(&d, "cor");
    let got = read(&mut c, 0, 4096);
    let mut want = pattern(1, 0, 4096);
    want[31] = 1;
    assert_eq!(got, want);
    // Up for an hour: nothing happens at all.
    d.ok(&[
        "create",
        "up",
        "--table",
        "0 4096 flakey a 0 3600 1 2 error_reads error_writes",
    ]);
    d.ok(&["export", "add", "up", "--nbd"]);
    let mut c = nbd(&d, "up");
    assert_eq!(read(&mut c, 0, 512), pattern(1, 0, 512));
}
