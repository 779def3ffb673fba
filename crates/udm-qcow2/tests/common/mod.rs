//! Shared by the integration tests: writing a plan with generated data, and the byte model of
//! a chain of points (later points override, Zero hides, unallocated falls through, bytes past
//! a smaller backing file's size read as zeros).
#![allow(dead_code)]

use std::path::Path;

use udm_qcow2::{Plan, Planned, Run, Writer};

/// Deterministic bytes for guest cluster `index` of a point written with `seed`.
pub fn cluster_data(seed: u64, index: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(index.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The bytes `write_next` gets for guest cluster `index`: a whole cluster, or up to the size.
pub fn payload(plan: &Plan, seed: u64, index: u64) -> Vec<u8> {
    let cs = 1u64 << plan.cluster_bits;
    let len = (plan.size - index * cs).min(cs) as usize;
    cluster_data(seed, index, len)
}

/// Writes `plan` to `path` in one go; returns the file size.
pub fn write(path: &Path, plan: &Plan, seed: u64) -> u64 {
    let mut w = Writer::create(path, plan).expect("create");
    for (index, p) in plan.clusters() {
        if p == Planned::Data {
            w.write_next(&payload(plan, seed, index))
                .expect("write_next");
        }
    }
    w.finish().expect("finish")
}

/// The guest bytes of the point `plan` (written with `seed`) over `below`, the guest bytes of
/// its backing file (None: no backing file).
pub fn model(plan: &Plan, seed: u64, below: Option<&[u8]>) -> Vec<u8> {
    let cs = 1u64 << plan.cluster_bits;
    let mut out = vec![0u8; plan.size as usize];
    if let Some(b) = below {
        let n = b.len().min(out.len());
        out[..n].copy_from_slice(&b[..n]);
    }
    for (index, p) in plan.clusters() {
        let start = (index * cs) as usize;
        let end = ((index + 1) * cs).min(plan.size) as usize;
        match p {
            Planned::Data => out[start..end].copy_from_slice(&payload(plan, seed, index)),
            Planned::Zero => out[start..end].fill(0),
        }
    }
    out
}

/// A plan with the given clusters.
pub fn plan(
    size: u64,
    cluster_bits: u32,
    backing: Option<&str>,
    clusters: &[(u64, Planned)],
) -> Plan {
    Plan {
        size,
        cluster_bits,
        backing: backing.map(str::to_string),
        runs: Run::from_clusters(clusters),
    }
}

/// The name of point `n` of a chain.
pub fn point_name(n: usize) -> String {
    format!("point-{n}.qcow2")
}

/// Asserts `got == want`, reporting the first differing offset instead of both buffers.
pub fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}
