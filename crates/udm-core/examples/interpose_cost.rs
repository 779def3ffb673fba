//! Per-request cost of the interposition path, in process: 4 KiB reads on a memory device sent
//! to its node plain, then with a linear interposer attached. Prints ns per request for each
//! and their difference (what interposition adds to every request).

use std::sync::Arc;
use std::time::Instant;
use udm_core::registry::{LoadFlags, ResumeOptions};
use udm_core::Registry;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice};
use udm_target::table::TableSpec;

fn measure(node: &dyn BlockDevice, n: u64) -> f64 {
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    for i in 0..n {
        let _ = node.submit(Bio::read((i * 8) % 65536, &mut buf));
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reg = Registry::new();
    reg.add_disk_device("d", Arc::new(MemDevice::new(65536)))?;
    let node = reg.node("d")?;
    let n = 2_000_000;
    measure(node.as_ref(), n / 10);
    let plain = measure(node.as_ref(), n);
    let spec = TableSpec::parse("0 65536 linear d 0")?;
    reg.create(
        "ip",
        None,
        None,
        Some((
            &spec,
            LoadFlags {
                read_only: false,
                interpose: true,
            },
        )),
        &ResumeOptions::default(),
    )?;
    measure(node.as_ref(), n / 10);
    let ip = measure(node.as_ref(), n);
    println!("4k read on a memory device: plain {plain:.0} ns, interposed {ip:.0} ns, interposition adds {:.0} ns per request", ip - plain);
    Ok(())
}
