//! Interoperability with real NBD clients against an in-process server exporting a file:
//! qemu-io, qemu-img, nbdinfo, nbdcopy and fio's nbd engine. Each test skips (loudly) when its
//! tool is missing (apt-get install qemu-utils libnbd-bin fio).

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use udm_export::nbd::{NbdExportOptions, NbdServer};
use udm_io::backend::file::FileDevice;

struct Env {
    server: Arc<NbdServer>,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

impl Env {
    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }
    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: {tool} is not installed");
    }
    ok
}

fn make_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

fn env(size: u64) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let disk = dir.path().join("disk.img");
    make_file(&disk, size);
    let server = NbdServer::new();
    server
        .add_export(
            "disk",
            Arc::new(FileDevice::open(&disk, false).unwrap()),
            NbdExportOptions {
                read_only: false,
                description: Some("interop disk".into()),
                insecure_tcp: false,
                bitmaps: Vec::new(),
            },
        )
        .unwrap();
    server.listen_unix(&sock).unwrap();
    Env { server, dir, sock }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn qemu_io_patterns() {
    if !have("qemu-io") {
        return;
    }
    let e = env(64 << 20);
    let uri = e.uri("disk");
    let cmds = [
        "write -P 0xa5 0 1M",
        "read -P 0xa5 0 1M",
        "write -P 0x3c 3M 64k",
        "write -P 0x11 1023k 2k",
        "read -P 0x11 1023k 2k",
        "read -P 0xa5 0 1023k",
        "discard 4M 1M",
        // Zeroes over data: a WRITE_ZEROES that does nothing must not pass as zeroes.
        "write -P 0xe1 8M 3M",
        "read -P 0xe1 8M 3M",
        "write -z 8M 2M",
        "read -P 0 8M 2M",
        "write -z -u 10M 1M",
        "read -P 0 10M 1M",
        "aio_write -P 0x77 20M 64k",
        "aio_write -P 0x78 21M 64k",
        "aio_flush",
        "read -P 0x77 20M 64k",
        "read -P 0x78 21M 64k",
        "write -f -P 0x99 30M 4k",
        "flush",
        "read -P 0x99 30M 4k",
        "read -P 0x3c 3M 64k",
    ];
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run(&mut c);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.contains("failed"), "{text}");
    // A fresh connection sees the same data (qemu 7.2 and 10 alike).
    let out = run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x99 30M 4k"]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
}

#[test]
fn qemu_img_convert_and_compare() {
    if !have("qemu-img") {
        return;
    }
    let e = env(32 << 20);
    let src = e.path("src.img");
    // A source with data and holes.
    let mut data = vec![0u8; 32 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        if (i >> 20) % 3 != 1 {
            *b = (i % 253) as u8;
        }
    }
    std::fs::write(&src, &data).unwrap();
    run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &e.uri("disk"),
    ]));
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &e.uri("disk"),
    ]));
    let back = e.path("back.img");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &e.uri("disk"),
        back.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&back).unwrap() == data);
    run(Command::new("qemu-img").args(["info", "-f", "raw", &e.uri("disk")]));
}

#[test]
fn nbdinfo_list_map_json() {
    if !have("nbdinfo") {
        return;
    }
    let e = env(8 << 20);
    let list = run(Command::new("nbdinfo").args([
        "--list",
        &format!("nbd+unix:///?socket={}", e.sock.display()),
    ]));
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("export=\"disk\""), "{text}");
    assert!(text.contains("interop disk"), "{text}");
    let json = run(Command::new("nbdinfo").args(["--json", &e.uri("disk")]));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let ex = &v["exports"][0];
    assert_eq!(ex["export-size"], 8 << 20);
    assert_eq!(ex["block_size_minimum"], 512);
    assert_eq!(ex["block_size_preferred"], 4096);
    assert_eq!(ex["block_size_maximum"], 32 << 20);
    assert_eq!(ex["can_multi_conn"], true);
    assert_eq!(ex["is_read_only"], false);
    assert_eq!(v["structured"], true);
    assert!(ex["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "base:allocation"));
    // Write 1 MiB of data at 1 MiB; the rest may be reported as holes (sparse file).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(e.path("disk.img"))
            .unwrap();
        f.write_all_at(&vec![0x42u8; 1 << 20], 1 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let map = run(Command::new("nbdinfo").args(["--map", &e.uri("disk")]));
    let text = String::from_utf8_lossy(&map.stdout);
    let mut next = 0u64;
    let mut saw_data = false;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        assert_eq!(off, next, "{text}");
        next = off + len;
        saw_data |= line.contains("data");
    }
    assert_eq!(next, 8 << 20, "{text}");
    assert!(saw_data, "{text}");
}

#[test]
fn nbdcopy_both_directions() {
    if !have("nbdcopy") {
        return;
    }
    let e = env(24 << 20);
    let src = e.path("src.img");
    let data: Vec<u8> = (0..(24u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy").args([src.to_str().unwrap(), &e.uri("disk")]));
    let back = e.path("back.img");
    run(Command::new("nbdcopy").args([&e.uri("disk"), back.to_str().unwrap()]));
    assert!(std::fs::read(&back).unwrap() == data);
    // Several connections at once (nbdcopy uses multi-conn when advertised).
    run(Command::new("nbdcopy").args([
        "--connections=4",
        "--requests=16",
        &e.uri("disk"),
        back.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&back).unwrap() == data);
}

#[test]
fn fio_verify_four_jobs() {
    if !have("fio") {
        return;
    }
    let e = env(64 << 20);
    let out = run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", e.uri("disk")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=4",
        "--size=16M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_state_save=0",
        "--group_reporting",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("err= 0"), "{text}");
    assert!(!text.contains("verify: bad"), "{text}");
}
