//! Compares the pread and io_uring engines: 4 KiB random reads and writes from many threads
//! (each thread one request at a time, so queue depth = threads), buffered and O_DIRECT.
//!
//! ```text
//! cargo run --release -p udm-io --example engine_bench -- [FILE|-] [THREADS] [SECONDS] [MiB] [ROUNDS] [FILTER]
//! ```
//! FILE defaults to a scratch file in the current directory (created, filled, removed); it may
//! be a block device. FILTER keeps only the cases whose name (`direct-randread`...) contains it.
//! Each case runs ROUNDS times alternating engines; the median is printed.
#![allow(clippy::unwrap_used)] // a benchmark program, not library code

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use udm_io::backend::open::{open_backend, Engine, OpenOptions};
use udm_io::{Bio, BlockDevice};

fn run(dev: &Arc<dyn BlockDevice>, threads: usize, secs: f64, write: bool) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let blocks = dev.size() / 8;
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (dev, stop, ops) = (dev.clone(), stop.clone(), ops.clone());
            std::thread::spawn(move || {
                // 4 KiB buffer at a 4 KiB boundary inside a larger Vec.
                let mut raw = vec![0x5au8; 8192];
                let off = raw.as_ptr().align_offset(4096);
                let buf = &mut raw[off..off + 4096];
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let sector = (x % blocks) * 8;
                    if write {
                        dev.submit(Bio::write(sector, buf)).unwrap();
                    } else {
                        dev.submit(Bio::read(sector, buf)).unwrap();
                    }
                    n += 1;
                }
                ops.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    ops.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(16);
    let secs: f64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let mib: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(256);
    let rounds: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(3);
    let filter = args.get(6).cloned().unwrap_or_default();
    let (path, scratch) = match args.get(1).filter(|s| !s.is_empty() && *s != "-") {
        Some(p) => (PathBuf::from(p), false),
        None => {
            let p = PathBuf::from(format!("engine-bench-{}.img", std::process::id()));
            // Real data, so O_DIRECT reads reach the disk instead of reading holes.
            let chunk = vec![0xa5u8; 1 << 20];
            let mut f = std::fs::File::create(&p).unwrap();
            for _ in 0..mib {
                std::io::Write::write_all(&mut f, &chunk).unwrap();
            }
            f.sync_all().unwrap();
            (p, true)
        }
    };
    println!("file {} threads {threads} seconds {secs}", path.display());
    println!(
        "{:<18} {:>10} {:>10} {:>7}",
        "case", "pread", "io_uring", "ratio"
    );
    for direct in [false, true] {
        for write in [false, true] {
            let case = format!(
                "{}-{}",
                if direct { "direct" } else { "buffered" },
                if write { "randwrite" } else { "randread" }
            );
            if !case.contains(&filter) {
                continue;
            }
            let mut results = [Vec::new(), Vec::new()];
            for _ in 0..rounds {
                for (i, engine) in [Engine::Sync, Engine::Uring].into_iter().enumerate() {
                    let opts = OpenOptions {
                        read_only: false,
                        direct,
                        engine,
                    };
                    let dev = open_backend(&path, &opts).unwrap();
                    results[i].push(run(&dev, threads, secs, write));
                }
            }
            let med = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (p, u) = (med(&mut results[0]), med(&mut results[1]));
            println!("{case:<18} {p:>10.0} {u:>10.0} {:>7.2}", u / p);
        }
    }
    if scratch {
        let _ = std::fs::remove_file(&path);
    }
}
