//! Interoperability with QEMU's tools: qemu-img check accepts what the writer makes (no errors,
//! no leaks), qemu-img reads the same guest bytes as the model, and images QEMU makes read
//! through `Chain` the same as qemu-img convert renders them. Skips loudly without qemu-img.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_bytes, model, plan, point_name, write};
use udm_qcow2::{Chain, Cluster, Image, Planned};

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: {tool} not found");
        println!("SKIPPED: {tool} not found");
    }
    ok
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn check(path: &Path) {
    let out = run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path));
    assert!(out.contains("No errors were found"), "{path:?}: {out}");
    assert!(!out.contains("leaked"), "{path:?}: {out}");
}

fn convert(src: &Path, dst: &Path) -> Vec<u8> {
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(src)
        .arg(dst));
    std::fs::read(dst).expect("read raw")
}

fn chain_bytes(top: &Path) -> Vec<u8> {
    let chain = Chain::open(top).expect("chain");
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read(0, &mut buf).expect("read");
    buf
}

#[test]
fn full_image_checks_clean_and_converts_to_the_model() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // QEMU rounds a qcow2 virtual size down to 512-byte sectors: keep sizes sector multiples.
    let size = 5 * 65536 + 1536;
    let p = plan(
        size,
        16,
        None,
        &[
            (0, Planned::Data),
            (1, Planned::Zero),
            (3, Planned::Data),
            (5, Planned::Data),
        ],
    );
    let path = dir.path().join(point_name(0));
    write(&path, &p, 1);
    check(&path);
    let raw = convert(&path, &dir.path().join("out.raw"));
    assert_bytes(&raw, &model(&p, 1, None), "qemu-img convert");
}

#[test]
fn three_point_chain_checks_clean_and_reads_as_the_model() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 3 * 1024 * 1024 + 12800;
    // Point 0: most clusters; 1: some overridden, some zeroed; 2: more of both, across L2s.
    let bits = 12;
    let n = size.div_ceil(1 << bits);
    // The clusters of `0..n` that `keep` selects, as Zero where `zero` says so, else Data.
    let pick = |keep: &dyn Fn(u64) -> bool, zero: &dyn Fn(u64) -> bool| -> Vec<(u64, Planned)> {
        (0..n)
            .filter(|&i| keep(i))
            .map(|i| {
                (
                    i,
                    if zero(i) {
                        Planned::Zero
                    } else {
                        Planned::Data
                    },
                )
            })
            .collect()
    };
    let p0 = pick(&|i| i % 3 != 0, &|_| false);
    let p1 = pick(&|i| i % 5 == 0, &|i| i % 2 == 0);
    let p2 = pick(&|i| i % 7 == 1 || i == n - 1, &|i| i % 3 == 0);
    let plans = [
        plan(size, bits, None, &p0),
        plan(size, bits, Some(&point_name(0)), &p1),
        plan(size, bits, Some(&point_name(1)), &p2),
    ];
    let mut expect: Option<Vec<u8>> = None;
    for (i, p) in plans.iter().enumerate() {
        let path = dir.path().join(point_name(i));
        write(&path, p, i as u64 + 10);
        check(&path);
        expect = Some(model(p, i as u64 + 10, expect.as_deref()));
    }
    let expect = expect.unwrap();
    let top = dir.path().join(point_name(2));
    let info = run(Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output=json"])
        .arg(&top));
    for i in 0..3 {
        assert!(info.contains(&point_name(i)), "{info}");
    }
    assert_eq!(
        info.matches("\"backing-filename-format\": \"qcow2\"")
            .count(),
        2,
        "{info}"
    );
    assert_bytes(
        &convert(&top, &dir.path().join("out.raw")),
        &expect,
        "qemu-img convert",
    );
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &expect).unwrap();
    let cmp = run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&top)
        .arg(&raw));
    assert!(cmp.contains("Images are identical"), "{cmp}");
    assert_bytes(&chain_bytes(&top), &expect, "Chain::read");
}

#[test]
fn qemu_made_chain_reads_as_qemu_img_renders_it() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("4M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 2M 1M",
            "-c",
            "write -P 0x11 3M 4k",
        ])
        .arg(&base));
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ])
        .arg(&top)
        .arg("5M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -z 2M 64k",
            "-c",
            "write -P 0x5a 512k 128k",
            "-c",
            "write -P 0x77 4608k 64k",
        ])
        .arg(&top));
    let chain = Chain::open(&top).unwrap();
    assert_eq!(chain.images().len(), 2);
    assert_eq!(chain.images()[0].backing(), Some("base.qcow2"));
    assert_eq!(chain.images()[0].cluster(32).unwrap(), Cluster::Zero);
    assert_bytes(
        &chain_bytes(&top),
        &convert(&top, &dir.path().join("top.raw")),
        "top",
    );
    assert_bytes(
        &chain_bytes(&base),
        &convert(&base, &dir.path().join("base.raw")),
        "base",
    );
    let img = Image::open(&base).unwrap();
    assert!(img
        .allocated()
        .unwrap()
        .iter()
        .all(|(_, c)| matches!(c, Cluster::Data { .. })));
}

#[test]
fn qemu_made_version_2_image_reads_as_qemu_img_renders_it() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("v2.qcow2");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=4k",
        ])
        .arg(&base)
        .arg("1M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x42 4k 12k",
            "-c",
            "write -P 0x43 1020k 4k",
        ])
        .arg(&base));
    let img = Image::open(&base).unwrap();
    assert_eq!(img.header().version, 2);
    assert_eq!(img.allocated().unwrap().len(), 4);
    assert_bytes(
        &chain_bytes(&base),
        &convert(&base, &dir.path().join("v2.raw")),
        "v2",
    );
}

#[test]
fn edge_images_check_clean() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        ("empty.qcow2", plan(0, 16, None, &[])),
        ("nothing.qcow2", plan(100 << 20, 16, None, &[])),
        (
            "zeros.qcow2",
            plan(
                1 << 20,
                12,
                None,
                &[(0, Planned::Zero), (255, Planned::Zero)],
            ),
        ),
        (
            "big-clusters.qcow2",
            plan(9 << 20, 21, None, &[(1, Planned::Data), (4, Planned::Data)]),
        ),
        // Enough clusters for two refcount blocks at 4 KiB clusters (2048 entries each).
        (
            "two-blocks.qcow2",
            plan(
                3000 << 12,
                12,
                None,
                &(0..2100).map(|i| (i, Planned::Data)).collect::<Vec<_>>(),
            ),
        ),
    ];
    for (name, p) in &cases {
        let path = d.join(name);
        write(&path, p, 4);
        check(&path);
        assert_bytes(&chain_bytes(&path), &model(p, 4, None), name);
        assert_bytes(&convert(&path, &d.join("x.raw")), &model(p, 4, None), name);
    }
    // The longest backing name.
    let long = "b".repeat(1019) + ".raw";
    let p = plan(1 << 20, 16, Some(&long), &[(2, Planned::Data)]);
    write(&d.join("long.qcow2"), &p, 4);
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(d.join("long.qcow2")));
    assert!(info.contains(&long), "{info}");
}

#[test]
fn smaller_backing_file_reads_as_qemu_reads_it() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let create = |name: &str, size: &str, backing: Option<&str>| {
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k"]);
        if let Some(b) = backing {
            c.args(["-b", b, "-F", "qcow2"]);
        }
        run(c.arg(d.join(name)).arg(size));
    };
    create("t0.qcow2", "64k", None);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x61 0 64k"])
        .arg(d.join("t0.qcow2")));
    create("t1.qcow2", "20k", Some("t0.qcow2"));
    create("t2.qcow2", "64k", Some("t1.qcow2"));
    let top = d.join("t2.qcow2");
    let want = convert(&top, &d.join("t2.raw"));
    assert!(want[..20 << 10].iter().all(|&b| b == 0x61));
    assert!(want[20 << 10..].iter().all(|&b| b == 0));
    assert_bytes(&chain_bytes(&top), &want, "t2");
}
