//! Property: a chain of 1-4 points written from random plans (random sizes, including ones that
//! are not cluster multiples and differ between points; cluster_bits 12 or 16) reads through
//! `Chain` exactly as the model (later points override, Zero hides, unallocated falls through,
//! a smaller backing file reads as zeros past its end), and each image's `allocated()` is its
//! plan.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;

use proptest::prelude::*;
use udm_qcow2::{Chain, Cluster, Image, Plan, Planned, Run};

use common::{assert_bytes, model, point_name, write};

/// A point: its size and per guest cluster None (unallocated), Some(true) Data, Some(false) Zero.
type Point = (u64, Vec<Option<bool>>);

/// One point: its size and, per guest cluster, None (unallocated) or the planned state.
fn point(bits: u32) -> impl Strategy<Value = Point> {
    let cs = 1u64 << bits;
    (1u64..=40 * cs).prop_flat_map(move |size| {
        let n = size.div_ceil(cs) as usize;
        (
            Just(size),
            proptest::collection::vec(proptest::option::weighted(0.5, any::<bool>()), n),
        )
    })
}

/// Cluster bits, the points bottom first, and the data seed.
fn chain() -> impl Strategy<Value = (u32, Vec<Point>, u64)> {
    prop_oneof![Just(12u32), Just(16u32)].prop_flat_map(|bits| {
        (
            Just(bits),
            proptest::collection::vec(point(bits), 1..=4),
            any::<u64>(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn chain_reads_as_the_model((bits, points, seed) in chain()) {
        let dir = tempfile::tempdir().unwrap();
        let mut expect: Option<Vec<u8>> = None;
        let mut plans = Vec::new();
        for (i, (size, states)) in points.iter().enumerate() {
            let clusters: Vec<(u64, Planned)> = states
                .iter()
                .enumerate()
                .filter_map(|(c, s)| s.map(|d| (c as u64, if d { Planned::Data } else { Planned::Zero })))
                .collect();
            let plan = Plan {
                size: *size,
                cluster_bits: bits,
                backing: (i > 0).then(|| point_name(i - 1)),
                runs: Run::from_clusters(&clusters),
            };
            let s = seed.wrapping_add(i as u64);
            write(&dir.path().join(point_name(i)), &plan, s);
            expect = Some(model(&plan, s, expect.as_deref()));
            plans.push(plan);
        }
        let expect = expect.unwrap();
        let top = dir.path().join(point_name(points.len() - 1));
        let chain = Chain::open(&top).unwrap();
        prop_assert_eq!(chain.images().len(), points.len());
        prop_assert_eq!(chain.size(), expect.len() as u64);
        // Cluster by cluster, and once in a single read crossing every cluster boundary.
        let cs = 1usize << bits;
        let mut buf = vec![0u8; cs];
        for (c, want) in expect.chunks(cs).enumerate() {
            chain.read((c * cs) as u64, &mut buf[..want.len()]).unwrap();
            assert_bytes(&buf[..want.len()], want, &format!("cluster {c}"));
        }
        let mut all = vec![0u8; expect.len()];
        chain.read(0, &mut all).unwrap();
        assert_bytes(&all, &expect, "whole chain");
        if expect.len() > 3 {
            let mut mid = vec![0u8; expect.len() - 3];
            chain.read(1, &mut mid).unwrap();
            assert_bytes(&mid, &expect[1..expect.len() - 2], "offset read");
        }
        prop_assert_eq!(chain.read(1, &mut all).unwrap_err().errno(), libc::EINVAL);
        for (i, plan) in plans.iter().enumerate() {
            let img = Image::open(&dir.path().join(point_name(i))).unwrap();
            let got: Vec<(u64, Planned)> = img
                .allocated()
                .unwrap()
                .into_iter()
                .map(|(c, s)| (c, if matches!(s, Cluster::Data { .. }) { Planned::Data } else { Planned::Zero }))
                .collect();
            prop_assert_eq!(got, plan.clusters().collect::<Vec<_>>());
            prop_assert_eq!(img.backing(), plan.backing.as_deref());
            prop_assert_eq!(img.size(), plan.size);
            // resolve agrees with the top-down walk of the plans.
            for c in 0..img.nb_clusters() {
                let _ = img.cluster(c).unwrap();
            }
        }
        let top_plan = plans.last().unwrap();
        for c in 0..top_plan.size.div_ceil(1 << bits) {
            let want = plans.iter().enumerate().rev().find_map(|(i, p)| {
                if c >= p.size.div_ceil(1 << bits) {
                    return Some(None);
                }
                p.clusters().find(|(x, _)| *x == c).map(|(_, s)| Some((plans.len() - 1 - i, s)))
            }).flatten();
            let got = chain.resolve(c).unwrap().map(|(i, s)| {
                (i, if matches!(s, Cluster::Data { .. }) { Planned::Data } else { Planned::Zero })
            });
            prop_assert_eq!(got, want, "resolve({})", c);
        }
    }
}
