//! Helper for the kernel cross-check (tests/vmlab/snapshot-crosscheck.sh) and a quick origin
//! write throughput measurement.
//!
//! ```text
//! snap-tool init  FILE SECTORS SEED        fill FILE with pseudo-random data
//! snap-tool write ORIGIN COW CHUNK N SEED  take a P snapshot, write N distinct origin chunks
//!                                          (plus a few snapshot writes); prints the status
//! snap-tool dump  ORIGIN COW OUT           load the COW (P 0), write the snapshot view to OUT,
//!                                          print the status
//! snap-tool merge ORIGIN COW              merge the snapshot back into ORIGIN (snapshot-merge),
//!                                          wait for completion, print the status
//! snap-tool perf                           origin write MB/s with 0, 1, 2 snapshots (memory)
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use udm_io::backend::file::FileDevice;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice};
use udm_target::snapshot::origin::OriginType;
use udm_target::snapshot::snap::SnapshotType;
use udm_target::{CtorContext, DevRef, EventSink, Target, TargetEnv, TargetError, TargetType};
use udm_types::DevId;

struct Ctx {
    devs: HashMap<String, DevRef>,
    env: Arc<TargetEnv>,
    len: u64,
}

impl Ctx {
    fn new() -> Self {
        Ctx {
            devs: HashMap::new(),
            env: Arc::new(TargetEnv::default()),
            len: 0,
        }
    }
    fn add(&mut self, name: &str, dev: Arc<dyn BlockDevice>) {
        let minor = self.devs.len() as u32 * 16;
        self.devs.insert(
            name.into(),
            DevRef {
                id: DevId::new(253, minor),
                name: name.into(),
                dev,
            },
        );
    }
    fn build(&mut self, ty: &dyn TargetType, len: u64, args: &str) -> Box<dyn Target> {
        self.len = len;
        let a: Vec<String> = args.split_whitespace().map(String::from).collect();
        match ty.construct(self, &a) {
            Ok(t) => t,
            Err(e) => die(&format!("{} {args}: {e} ({})", ty.name(), e.errno)),
        }
    }
}

impl CtorContext for Ctx {
    fn begin(&self) -> u64 {
        0
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn read_only(&self) -> bool {
        false
    }
    fn get_device(&mut self, path: &str) -> Result<DevRef, TargetError> {
        self.devs
            .get(path)
            .cloned()
            .ok_or_else(|| TargetError::invalid(format!("no device {path}")))
    }
    fn events(&self) -> EventSink {
        EventSink::none()
    }
    fn env(&self) -> Arc<TargetEnv> {
        self.env.clone()
    }
}

fn die(msg: &str) -> ! {
    eprintln!("snap-tool: {msg}");
    std::process::exit(1)
}

fn open(path: &str) -> Arc<dyn BlockDevice> {
    match FileDevice::open(Path::new(path), false) {
        Ok(d) => Arc::new(d),
        Err(e) => die(&format!("{path}: {e}")),
    }
}

fn num(s: &str) -> u64 {
    s.parse()
        .unwrap_or_else(|_| die(&format!("not a number: {s}")))
}

fn activate(t: &dyn Target) {
    if let Err(e) = t.preresume() {
        die(&format!("preresume: {e}"));
    }
    t.resume();
}

fn init(path: &str, sectors: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = std::fs::File::create(path).unwrap_or_else(|e| die(&format!("{path}: {e}")));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = sectors * 512;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n])
            .unwrap_or_else(|e| die(&format!("{path}: {e}")));
        left -= n as u64;
    }
}

fn write(origin: &str, cow: &str, chunk: u64, n: u64, seed: u64) {
    let mut c = Ctx::new();
    let o = open(origin);
    let size = o.size();
    c.add("origin", o);
    c.add("cow", open(cow));
    let org = c.build(&OriginType, size, "origin");
    let snap = c.build(
        &SnapshotType { merge: false },
        size,
        &format!("origin cow P {chunk}"),
    );
    activate(&*snap);
    let mut rng = StdRng::seed_from_u64(seed);
    let chunks = size / chunk;
    let mut order: Vec<u64> = (0..chunks).collect();
    order.shuffle(&mut rng);
    for &ch in order.iter().take(n as usize) {
        let off = rng.gen_range(0..chunk);
        let len = rng.gen_range(1..=chunk - off);
        let mut data = vec![0u8; (len * 512) as usize];
        rng.fill_bytes(&mut data);
        if let Err(e) = org.map(Bio::write(ch * chunk + off, &data)) {
            die(&format!("origin write: {e}"));
        }
    }
    for _ in 0..20 {
        let s = rng.gen_range(0..size - 4);
        let mut data = vec![0u8; 4 * 512];
        rng.fill_bytes(&mut data);
        if let Err(e) = snap.map(Bio::write(s, &data)) {
            die(&format!("snapshot write: {e}"));
        }
    }
    if let Err(e) = snap.map(Bio::flush()) {
        die(&format!("flush: {e}"));
    }
    println!("{}", snap.status());
}

fn dump(origin: &str, cow: &str, out: &str) {
    let mut c = Ctx::new();
    let o = open(origin);
    let size = o.size();
    c.add("origin", o);
    c.add("cow", open(cow));
    let snap = c.build(&SnapshotType { merge: false }, size, "origin cow P 0");
    activate(&*snap);
    let mut f = std::fs::File::create(out).unwrap_or_else(|e| die(&format!("{out}: {e}")));
    let mut buf = vec![0u8; 1 << 20];
    let mut s = 0;
    while s < size {
        let n = (size - s).min(2048);
        let b = &mut buf[..(n * 512) as usize];
        if let Err(e) = snap.map(Bio::read(s, b)) {
            die(&format!("snapshot read: {e}"));
        }
        f.write_all(b)
            .unwrap_or_else(|e| die(&format!("{out}: {e}")));
        s += n;
    }
    println!("{}", snap.status());
}

fn merge(origin: &str, cow: &str) {
    let mut c = Ctx::new();
    let o = open(origin);
    let size = o.size();
    c.add("origin", o);
    c.add("cow", open(cow));
    let m = c.build(&SnapshotType { merge: true }, size, "origin cow P 0");
    activate(&*m);
    let t = Instant::now();
    loop {
        let st = m.status();
        let mut it = st.split(['/', ' ']);
        let (a, _, meta) = (it.next(), it.next(), it.next());
        if a.is_some() && a == meta {
            println!("{st}");
            break;
        }
        if meta.is_none() || t.elapsed().as_secs() > 120 {
            die(&format!("merge did not complete: {st}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    m.presuspend();
    if let Err(e) = m.map(Bio::flush()) {
        die(&format!("flush: {e}"));
    }
}

fn perf() {
    const SECTORS: u64 = 256 * 2048; // 256 MiB
    for nsnap in 0..=2u32 {
        let mut c = Ctx::new();
        c.add("origin", Arc::new(MemDevice::new(SECTORS)));
        for i in 0..nsnap {
            c.add(&format!("cow{i}"), Arc::new(MemDevice::new(SECTORS + 4096)));
        }
        let org = c.build(&OriginType, SECTORS, "origin");
        let snaps: Vec<_> = (0..nsnap)
            .map(|i| {
                let s = c.build(
                    &SnapshotType { merge: false },
                    SECTORS,
                    &format!("origin cow{i} P 8"),
                );
                activate(&*s);
                s
            })
            .collect();
        let data = vec![0x5au8; 1 << 20];
        for pass in 0..2 {
            let t = Instant::now();
            let mut s = 0;
            while s < SECTORS {
                if let Err(e) = org.map(Bio::write(s, &data)) {
                    die(&format!("write: {e}"));
                }
                s += 2048;
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "snapshots={nsnap} pass={} ({}) origin write {:.0} MB/s",
                pass + 1,
                if pass == 0 && nsnap > 0 {
                    "first write: copies every chunk"
                } else {
                    "chunks already copied"
                },
                (SECTORS * 512) as f64 / secs / 1e6
            );
        }
        drop(snaps);
    }
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    match a.as_slice() {
        ["init", p, n, seed] => init(p, num(n), num(seed)),
        ["write", o, c, chunk, n, seed] => write(o, c, num(chunk), num(n), num(seed)),
        ["dump", o, c, out] => dump(o, c, out),
        ["merge", o, c] => merge(o, c),
        ["perf"] => perf(),
        _ => die("usage: snap-tool init|write|dump|perf ... (see the source header)"),
    }
}
