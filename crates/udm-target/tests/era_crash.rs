//! Power cut at every point of the metadata device's write stream: after the cut, nothing more
//! reaches the device (writes and flushes fail, as a dead disk). The metadata left behind must
//! open and check clean, every write the target acknowledged and flushed must be recorded in an
//! era at least as late as the one it was issued in, and every block that changed on the origin
//! must be recorded (over-reporting is allowed, under-reporting never). Writes are acknowledged
//! before their bits are committed (held in memory), so unflushed ones may be lost at the cut,
//! as with any volatile write cache; a flush follows every other write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BioKind, BlockDevice, IoError};
use udm_pdata::era::{check_roots, Superblock};
use udm_pdata::{check, BlockStore};
use udm_target::era::{DevStore, Metadata};
use udm_target::testing::TestContext;
use udm_types::Errno;

const BS: u64 = 8;
const NR: u64 = 40;

/// A device that dies after `budget` writes and flushes.
struct Cut {
    inner: Arc<MemDevice>,
    budget: AtomicU64,
}

impl BlockDevice for Cut {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        if bio.kind() != BioKind::Read {
            let left = self.budget.load(Ordering::SeqCst);
            if left == 0 {
                return Err(IoError::errno(
                    bio.kind(),
                    bio.sector,
                    Errno::EIO,
                    "power cut",
                ));
            }
            self.budget.store(left - 1, Ordering::SeqCst);
        }
        self.inner.submit(bio)
    }
}

/// Steps: `Some(b)` writes block b, `None` checkpoints. Returns the acknowledged and flushed
/// writes with the era each was issued in, and whether the cut happened.
fn run(budget: u64, meta: &Arc<MemDevice>, origin: &Arc<MemDevice>) -> (Vec<(u64, u32)>, bool) {
    let mut ctx = TestContext::new();
    ctx.add_device(
        "meta",
        Arc::new(Cut {
            inner: meta.clone(),
            budget: AtomicU64::new(budget),
        }),
    );
    ctx.add_device("origin", origin.clone());
    let table = match ctx.build(&format!("0 {} era meta origin {BS}", NR * BS)) {
        Ok(t) => t,
        Err(_) => return (Vec::new(), true),
    };
    if table.preresume().is_err() {
        return (Vec::new(), true);
    }
    let mut era = 1u32;
    let mut acked = Vec::new();
    let mut unflushed = Vec::new();
    let steps = (0..60u64).map(|i| {
        if i % 7 == 6 {
            None
        } else {
            Some((i * 13) % NR)
        }
    });
    for s in steps {
        match s {
            Some(b) => {
                if table.submit(Bio::write(b * BS, &[1; 512])).is_err() {
                    return (acked, true);
                }
                unflushed.push((b, era));
                if b % 2 == 0 {
                    if table.submit(Bio::flush()).is_err() {
                        return (acked, true);
                    }
                    acked.append(&mut unflushed);
                }
            }
            None => match table.message(0, &["checkpoint".to_string()]) {
                Ok(_) => era += 1,
                Err(_) => return (acked, true),
            },
        }
    }
    table.postsuspend();
    (acked, false)
}

#[test]
fn no_acknowledged_write_is_lost_at_any_power_cut() {
    for budget in 0.. {
        let meta = Arc::new(MemDevice::new(8 * 256));
        let origin = Arc::new(MemDevice::new(NR * BS));
        let (acked, cut) = run(budget, &meta, &origin);
        let data = origin.contents();
        let changed: Vec<u64> = (0..NR)
            .filter(|b| data[(b * BS * 512) as usize] != 0)
            .collect();
        if !cut {
            assert!(
                budget > 20,
                "the history must cross many cut points ({budget})"
            );
            break;
        }
        if meta.contents().iter().all(|&b| b == 0) {
            assert!(
                acked.is_empty() && changed.is_empty(),
                "budget {budget}: acknowledged or changed with nothing on disk"
            );
            continue;
        }
        let store = DevStore::new(meta.clone());
        let Ok(sb) = Superblock::read(&store, 0) else {
            // The cut came before the format's superblock: nothing can have been acknowledged.
            assert!(
                acked.is_empty() && changed.is_empty(),
                "budget {budget}: no superblock but acknowledged writes"
            );
            continue;
        };
        let roots = check_roots(&store, &sb).expect("roots");
        let report = check::check(&store as &dyn BlockStore, &sb.sm_root, &roots);
        assert!(report.is_clean(), "budget {budget}: {:?}", report.problems);
        let md = Metadata::open(Box::new(DevStore::new(meta.clone())), BS as u32)
            .unwrap_or_else(|e| panic!("budget {budget}: reopen: {e}"));
        let eras = md.logical_eras().expect("eras");
        for (b, era) in &acked {
            let got = eras.get(*b as usize).copied().unwrap_or(0);
            assert!(
                got >= *era,
                "budget {budget}: block {b} written in era {era}, recorded {got}"
            );
        }
        for b in &changed {
            assert!(
                eras.get(*b as usize).is_some_and(|&e| e > 0),
                "budget {budget}: block {b} changed on the origin, not recorded"
            );
        }
    }
}
