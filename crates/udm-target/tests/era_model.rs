//! Random histories through the era target against a model: writes (and discards), checkpoints,
//! metadata snapshots taken and dropped, suspend/resume, and a table reload that shares the
//! in-core metadata. After every step the era of every block (era array, then writesets, as
//! `era_dump --logical`) is what the model says, the status shows the model's era and snapshot,
//! and, once the digest is idle, the checker finds the metadata clean.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use udm_io::Bio;
use udm_pdata::era::{check_roots, Superblock};
use udm_pdata::{check, BlockStore};
use udm_target::era::{shared_metadata, DevStore};
use udm_target::table::Table;
use udm_target::testing::TestContext;
use udm_target::TargetEnv;

const BS: u64 = 16;
const NR: u64 = 70;

#[derive(Clone, Debug)]
enum Step {
    Write(u64),
    Discard(u64, u64),
    Checkpoint,
    TakeSnap,
    DropSnap,
    SuspendResume,
    Reload,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..NR).prop_map(Step::Write),
        1 => (0..NR * BS, 1..3 * BS).prop_map(|(s, n)| Step::Discard(s, n)),
        2 => Just(Step::Checkpoint),
        1 => Just(Step::TakeSnap),
        1 => Just(Step::DropSnap),
        1 => Just(Step::SuspendResume),
        1 => Just(Step::Reload),
    ]
}

struct Model {
    era: u32,
    eras: Vec<u32>,
    snap: bool,
}

fn build(ctx: &mut TestContext) -> Table {
    ctx.build(&format!("0 {} era meta origin {BS}", NR * BS))
        .expect("table")
}

fn run(steps: &[Step]) -> Result<(), TestCaseError> {
    let mut ctx = TestContext::new();
    let env = Arc::new(TargetEnv::default());
    ctx.set_env(env.clone());
    let meta = ctx.add_mem("meta", 8 * 512);
    ctx.add_mem("origin", NR * BS);
    let mut t = build(&mut ctx);
    t.preresume().expect("preresume");
    let id = ctx.device("meta").expect("meta").id;
    let shared = shared_metadata(&env, id).expect("shared");
    let mut m = Model {
        era: 1,
        eras: vec![0; NR as usize],
        snap: false,
    };
    for s in steps {
        let msg = |t: &Table, w: &str| t.message(0, &[w.to_string()]);
        match s {
            Step::Write(b) => {
                t.submit(Bio::write(b * BS, &[1; 512])).expect("write");
                m.eras[*b as usize] = m.era;
            }
            Step::Discard(sector, n) => {
                let n = (*n).min(NR * BS - sector);
                t.submit(Bio::discard(*sector, n)).expect("discard");
                // Earlier writes may still be held (acknowledged, bits not yet committed).
                t.submit(Bio::flush()).expect("flush");
                for b in sector / BS..=(sector + n - 1) / BS {
                    m.eras[b as usize] = m.era;
                }
            }
            Step::Checkpoint => {
                msg(&t, "checkpoint").expect("checkpoint");
                m.era += 1;
            }
            Step::TakeSnap => {
                let r = msg(&t, "take_metadata_snap");
                prop_assert_eq!(r.is_ok(), !m.snap, "take with snap={}", m.snap);
                if !m.snap {
                    m.era += 1;
                }
                m.snap = true;
            }
            Step::DropSnap => {
                prop_assert_eq!(msg(&t, "drop_metadata_snap").is_ok(), m.snap);
                m.snap = false;
            }
            Step::SuspendResume => {
                t.presuspend();
                t.postsuspend();
                t.preresume().expect("preresume");
                m.era += 1;
            }
            Step::Reload => {
                // The new table is built while the old one is live, as `dmsetup reload`.
                let t2 = build(&mut ctx);
                t.presuspend();
                t.postsuspend();
                t2.preresume().expect("preresume");
                t = t2;
                m.era += 1;
            }
        }
        let status = t.status_lines()[0].params.clone();
        let f: Vec<&str> = status.split(' ').collect();
        prop_assert_eq!(f[2].parse::<u32>().ok(), Some(m.era), "{}", status);
        prop_assert_eq!(f[3] != "-", m.snap, "{}", status);
        // After a write its bit may not be committed yet (it is held); messages, suspends and
        // flushes (after a discard) let every held write through first.
        if !matches!(s, Step::Write(_)) {
            let eras = shared.with_metadata(|md| md.logical_eras()).expect("eras");
            prop_assert_eq!(&eras, &m.eras, "after {:?}", s);
        }
        prop_assert!(shared.wait_digested(Duration::from_secs(10)), "digest");
        let problems = shared.with_metadata(|_| {
            let store = DevStore::new(meta.clone());
            let sb = Superblock::read(&store, 0).expect("superblock");
            let roots = check_roots(&store, &sb).expect("roots");
            check::check(&store as &dyn BlockStore, &sb.sm_root, &roots).problems
        });
        prop_assert!(problems.is_empty(), "after {:?}: {:?}", s, problems);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn era_target_matches_the_model(steps in proptest::collection::vec(step(), 1..40)) {
        run(&steps)?;
    }
}
