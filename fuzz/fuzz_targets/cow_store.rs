//! The persistent COW store loader on a memory device holding arbitrary bytes: it must not
//! panic, and a store it accepts must be safe to use: no exception's data chunk is a metadata
//! chunk or beyond the device, none is used twice, new allocations avoid them all, and what is
//! committed afterwards loads back.
#![no_main]
use std::collections::HashSet;
use std::sync::Arc;

use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice};
use udm_target::snapshot::store::persistent::{encode_header, Persistent};
use udm_target::snapshot::store::{ExceptionStore, LoadState};

/// Largest device image tried (sectors).
const MAX_SECTORS: usize = 512;

fn load(cow: &Arc<MemDevice>, chunk: u64) -> Result<Option<(Persistent, Vec<(u64, u64)>)>, String> {
    let mut p = Persistent::new(cow.clone(), chunk, false);
    let mut got = Vec::new();
    match p.read_metadata(&mut |o, n| got.push((o, n))) {
        Ok(LoadState::Valid) => Ok(Some((p, got))),
        Ok(LoadState::Invalid) => Ok(None),
        Err(e) => Err(format!("{:?}: {}", e.errno, e.msg)),
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (&mode, rest) = match data.split_first() {
        Some(x) => x,
        None => return,
    };
    // Table chunk size: 0 (from the header) or 1..8 sectors.
    let table_chunk = match mode & 7 {
        0 | 5..=7 => 0,
        n => 1u64 << (n - 1),
    };
    let sectors = (rest.len().div_ceil(512)).clamp(1, MAX_SECTORS);
    let mut image = vec![0u8; sectors * 512];
    let n = rest.len().min(image.len());
    image[..n].copy_from_slice(&rest[..n]);
    if mode & 0x8 != 0 {
        // A valid header, so the fuzzer spends its time on the exception areas.
        let cs = 1u64 << ((mode >> 4) & 3);
        encode_header(&mut image, true, 1, cs);
    }
    let cow = Arc::new(MemDevice::new(sectors as u64));
    cow.submit(Bio::write(0, &image)).unwrap();
    let Ok(Some((mut p, loaded))) = load(&cow, table_chunk) else {
        return;
    };
    let cs = p.chunk_size();
    assert!(cs > 0);
    let chunks = cow.size() / cs;
    let stride = cs * 512 / 16 + 1;
    let mut olds = HashSet::new();
    let mut news = HashSet::new();
    for &(o, n) in &loaded {
        assert!(
            n < chunks,
            "exception {o}->{n} beyond the device ({chunks} chunks)"
        );
        assert!(
            n != 0 && n % stride != 1,
            "exception {o}->{n} in a metadata chunk"
        );
        assert!(olds.insert(o), "old chunk {o} twice");
        assert!(news.insert(n), "new chunk {n} twice");
    }
    // Use it: a few new exceptions, committed, then loaded back.
    let mut all = loaded.clone();
    for i in 0..(mode as u64 >> 6) * 3 {
        let Some(n) = p.prepare() else { break };
        assert!(n < chunks && n % stride != 1, "allocated {n}");
        assert!(news.insert(n), "allocated {n} which is in use");
        let old = u64::MAX - i;
        if olds.contains(&old) {
            break;
        }
        // A failed metadata write (the next area would lie past the device, as in the
        // kernel) invalidates the store: that exception is not durable, nothing more is.
        if p.commit(old, n, true) != Some(true) {
            break;
        }
        all.push((old, n));
    }
    drop(p);
    match load(&cow, table_chunk) {
        Ok(Some((_, again))) => assert_eq!(again, all, "committed exceptions do not load back"),
        Ok(None) => panic!("a store that loaded is invalid after commits"),
        Err(e) => panic!("a store that loaded no longer loads after commits: {e}"),
    }
});
