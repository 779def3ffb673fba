//! An image interrupted after k synced data clusters and resumed with done = k is
//! byte-identical to one written without interruption, for every k; an unfinished file is not
//! an image; resume refuses finished images and impossible `done` values.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;

use common::{payload, plan, write};
use udm_qcow2::{Error, Image, Planned, Writer};

fn the_plan() -> udm_qcow2::Plan {
    let cs = 1u64 << 12;
    plan(
        700 * cs + 100,
        12,
        Some("point-0.qcow2"),
        &[
            (0, Planned::Data),
            (1, Planned::Zero),
            (2, Planned::Data),
            (511, Planned::Data),
            (512, Planned::Data),
            (600, Planned::Zero),
            (650, Planned::Data),
            (700, Planned::Data),
        ],
    )
}

#[test]
fn resumed_image_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let p = the_plan();
    let whole = dir.path().join("whole.qcow2");
    let size = write(&whole, &p, 7);
    let want = std::fs::read(&whole).unwrap();
    assert_eq!(want.len() as u64, size);
    let data: Vec<u64> = p
        .clusters()
        .filter(|(_, s)| *s == Planned::Data)
        .map(|(c, _)| c)
        .collect();
    for k in 0..=data.len() {
        let path = dir.path().join(format!("resumed-{k}.qcow2"));
        {
            let mut w = Writer::create(&path, &p).unwrap();
            for &c in &data[..k] {
                w.write_next(&payload(&p, 7, c)).unwrap();
            }
            w.sync().unwrap();
            assert_eq!(w.done(), k as u64);
            // A write after the recorded point that the crash tore: resume must cut it off.
            if k < data.len() {
                let len = payload(&p, 7, data[k]).len();
                w.write_next(&vec![0xee; len + 1]).unwrap_err();
                w.write_next(&payload(&p, 99, data[k])).unwrap();
            }
        }
        // Interrupted: no qcow2 magic yet.
        let err = Image::open(&path).unwrap_err();
        assert!(matches!(err, Error::NotQcow2 { .. }), "{err}");
        let mut w = Writer::resume(&path, &p, k as u64).unwrap();
        assert_eq!(w.done(), k as u64);
        for &c in &data[k..] {
            w.write_next(&payload(&p, 7, c)).unwrap();
        }
        assert_eq!(w.finish().unwrap(), size);
        assert!(
            std::fs::read(&path).unwrap() == want,
            "resume after {k} differs"
        );
    }
}

#[test]
fn writer_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let p = the_plan();
    let path = dir.path().join("a.qcow2");
    write(&path, &p, 1);
    // Exists.
    let e = Writer::create(&path, &p).unwrap_err();
    assert!(matches!(e, Error::Exists { .. }));
    assert_eq!(e.errno(), libc::EEXIST);
    // Finished images cannot be resumed.
    let e = Writer::resume(&path, &p, 1).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    let b = dir.path().join("b.qcow2");
    let mut w = Writer::create(&b, &p).unwrap();
    // Wrong lengths: short for a full cluster, the last cluster's exact tail accepted.
    assert_eq!(w.write_next(&[0; 100]).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(w.write_next(&[0; 8192]).unwrap_err().errno(), libc::EINVAL);
    w.write_next(&[1; 4096]).unwrap();
    w.sync().unwrap();
    // Finish before all data is written.
    assert_eq!(w.finish().unwrap_err().errno(), libc::EINVAL);
    // done beyond the plan; a file too short for `done`.
    assert_eq!(Writer::resume(&b, &p, 7).unwrap_err().errno(), libc::EINVAL);
    let e = Writer::resume(&b, &p, 5).unwrap_err();
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    let mut w = Writer::resume(&b, &p, 1).unwrap();
    for _ in 0..3 {
        w.write_next(&[2; 4096]).unwrap();
    }
    // Cluster 650: only whole. Cluster 700 (the last, 100 bytes in the image): 100 or whole.
    assert_eq!(w.write_next(&[2; 100]).unwrap_err().errno(), libc::EINVAL);
    w.write_next(&[2; 4096]).unwrap();
    assert_eq!(w.write_next(&[3; 101]).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(w.write_next(&[3; 4097]).unwrap_err().errno(), libc::EINVAL);
    w.write_next(&[3; 100]).unwrap();
    assert_eq!(w.write_next(&[3; 100]).unwrap_err().errno(), libc::EINVAL);
    w.finish().unwrap();
    // A whole last cluster is accepted, and its bytes past the virtual size are not stored.
    let c = dir.path().join("c.qcow2");
    let mut w = Writer::create(&c, &p).unwrap();
    w.write_next(&[1; 4096]).unwrap();
    for _ in 0..4 {
        w.write_next(&[2; 4096]).unwrap();
    }
    w.write_next(&[3; 4096]).unwrap();
    w.finish().unwrap();
    assert!(std::fs::read(&b).unwrap() == std::fs::read(&c).unwrap());
}

#[test]
fn plan_validation() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        ("cluster_bits", plan(1 << 20, 11, None, &[])),
        ("cluster_bits", plan(1 << 20, 22, None, &[])),
        (
            "not after",
            plan(1 << 20, 16, None, &[(3, Planned::Data), (3, Planned::Zero)]),
        ),
        (
            "not after",
            plan(1 << 20, 16, None, &[(3, Planned::Data), (2, Planned::Zero)]),
        ),
        (
            "past the virtual size",
            plan(1 << 20, 16, None, &[(16, Planned::Data)]),
        ),
        ("backing name", plan(1 << 20, 16, Some(""), &[])),
        (
            "backing name",
            plan(1 << 20, 16, Some(&"x".repeat(1024)), &[]),
        ),
        ("L1 table", plan(u64::MAX, 12, None, &[])),
    ];
    for (i, (what, p)) in bad.iter().enumerate() {
        let path = dir.path().join(format!("{i}.qcow2"));
        let e = Writer::create(&path, p).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
        assert!(e.to_string().contains(what), "{e} should name {what}");
        assert!(!path.exists(), "an invalid plan must not create the file");
    }
    // The limits themselves are fine: 1023-byte backing name, 2 MiB clusters, size 0.
    write(
        &dir.path().join("long.qcow2"),
        &plan(1 << 20, 16, Some(&"y".repeat(1023)), &[]),
        0,
    );
    write(
        &dir.path().join("big.qcow2"),
        &plan(5 << 21, 21, None, &[(4, Planned::Data)]),
        0,
    );
    let img = Image::open(&dir.path().join("long.qcow2")).unwrap();
    assert_eq!(img.backing().map(str::len), Some(1023));
    write(&dir.path().join("empty.qcow2"), &plan(0, 16, None, &[]), 0);
    let img = Image::open(&dir.path().join("empty.qcow2")).unwrap();
    assert_eq!(img.size(), 0);
    assert!(img.allocated().unwrap().is_empty());
}
