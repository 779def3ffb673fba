//! Dirty bitmaps over NBD (`qemu:dirty-bitmap:NAME`), as backup tools read them: udm's own
//! client (the one `udm backup` uses), nbdinfo --map and qemu-img map with qemu's
//! `x-dirty-bitmap` (what virtnbdbackup and libvirt-based tools do). Tools that are missing
//! are reported as SKIPPED.

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::proto::{CMD_FLAG_REQ_ONE, META_BASE_ALLOCATION};
use udm_export::nbd::{NbdBitmap, NbdExportOptions, NbdServer};
use udm_io::backend::mem::MemDevice;
use udm_types::DirtyBitmap;

const SIZE: u64 = 16 << 20;
const G: u64 = 64 << 10;

struct Env {
    server: Arc<NbdServer>,
    _dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

/// Dirty blocks of the "backup-vol" bitmap (64 KiB granularity): 1, 2, 3, 100, 255 (the last).
const DIRTY: [u64; 5] = [1, 2, 3, 100, 255];

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let mut a = DirtyBitmap::new(SIZE, G).unwrap();
    for b in DIRTY {
        a.set(b);
    }
    let mut other = DirtyBitmap::new(SIZE, 1 << 20).unwrap();
    other.set(0);
    let server = NbdServer::new();
    server
        .add_export(
            "snap",
            Arc::new(MemDevice::new(SIZE / 512)),
            NbdExportOptions {
                read_only: true,
                description: None,
                insecure_tcp: false,
                bitmaps: vec![
                    NbdBitmap {
                        name: "backup-vol".into(),
                        bitmap: Arc::new(a),
                    },
                    NbdBitmap {
                        name: "other".into(),
                        bitmap: Arc::new(other),
                    },
                ],
            },
        )
        .unwrap();
    server.listen_unix(&sock).unwrap();
    Env {
        server,
        _dir: dir,
        sock,
    }
}

/// The expected `(offset, length, dirty)` runs of "backup-vol".
fn expected() -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for b in 0..SIZE / G {
        let d = DIRTY.contains(&b);
        match out.last_mut() {
            Some(l) if l.2 == d => l.1 += G,
            _ => out.push((b * G, G, d)),
        }
    }
    out
}

fn have(tool: &str) -> bool {
    let ok = Command::new(tool).arg("--version").output().is_ok();
    if !ok {
        eprintln!("SKIPPED: {tool} is not installed");
    }
    ok
}

#[test]
fn own_client_selects_contexts_and_gets_one_chunk_each() {
    let e = env();
    let s = UnixStream::connect(&e.sock).unwrap();
    let wanted = [
        META_BASE_ALLOCATION,
        "qemu:dirty-bitmap:backup-vol",
        "qemu:dirty-bitmap:missing",
    ];
    let mut c = Client::connect_contexts(s, "snap", &wanted).unwrap();
    assert_eq!(
        c.contexts(),
        [
            (1, "base:allocation".to_string()),
            (2, "qemu:dirty-bitmap:backup-vol".to_string())
        ]
    );
    let Reply::Contexts(x) = c.block_status(0, 8 * G as u32, 0).unwrap() else {
        panic!("expected two chunks");
    };
    assert_eq!(x.len(), 2);
    assert_eq!(x[0].0, 1);
    let g = G as u32;
    assert_eq!(x[1], (2, vec![(g, 0), (3 * g, 1), (4 * g, 0)]));
    // REQ_ONE: one descriptor per context.
    let Reply::Contexts(x) = c.block_status(G, 8 * G as u32, CMD_FLAG_REQ_ONE).unwrap() else {
        panic!("expected two chunks");
    };
    assert_eq!(x[1], (2, vec![(3 * g, 1)]));
    // The last block, and a range ending at the export's end.
    let Reply::Contexts(x) = c.block_status(SIZE - 2 * G, 2 * G as u32, 0).unwrap() else {
        panic!("expected two chunks");
    };
    assert_eq!(x[1], (2, vec![(g, 0), (g, 1)]));

    // Only the bitmap: one chunk with its id.
    let s = UnixStream::connect(&e.sock).unwrap();
    let mut c = Client::connect_contexts(s, "snap", &["qemu:dirty-bitmap:other"]).unwrap();
    assert_eq!(c.contexts(), [(3, "qemu:dirty-bitmap:other".to_string())]);
    assert_eq!(
        c.block_status(0, 2 << 20, 0).unwrap(),
        Reply::Extents(vec![(1 << 20, 1), (1 << 20, 0)])
    );
}

/// `nbdinfo ARGS`, asserting success; its JSON output.
fn nbdinfo_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("nbdinfo").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn nbdinfo_maps_the_bitmap() {
    if !have("nbdinfo") {
        return;
    }
    let e = env();
    let uri = format!("nbd+unix:///snap?socket={}", e.sock.display());
    let v = nbdinfo_json(&["--json", &uri]);
    let ctx = v["exports"][0]["contexts"].as_array().unwrap().clone();
    for c in [
        "base:allocation",
        "qemu:dirty-bitmap:backup-vol",
        "qemu:dirty-bitmap:other",
    ] {
        assert!(ctx.iter().any(|x| x == c), "{c} not in {ctx:?}");
    }
    let v = nbdinfo_json(&["--json", "--map=qemu:dirty-bitmap:backup-vol", &uri]);
    let got: Vec<(u64, u64, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["offset"].as_u64().unwrap(),
                x["length"].as_u64().unwrap(),
                x["type"].as_u64().unwrap() & 1 == 1,
            )
        })
        .collect();
    assert_eq!(got, expected());
}

#[test]
fn qemu_img_map_with_x_dirty_bitmap() {
    if !have("qemu-img") {
        return;
    }
    let e = env();
    // qemu's x-dirty-bitmap reads the bitmap in place of base:allocation: dirty ranges show
    // as "data": false (the convention libvirt-era backup tools rely on).
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=snap,x-dirty-bitmap=qemu:dirty-bitmap:backup-vol",
        e.sock.display()
    );
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts", &opts])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut got: Vec<(u64, u64, bool)> = Vec::new();
    for x in v.as_array().unwrap() {
        let (s, l) = (x["start"].as_u64().unwrap(), x["length"].as_u64().unwrap());
        let dirty = x["data"] == false;
        match got.last_mut() {
            Some(g) if g.2 == dirty && g.0 + g.1 == s => g.1 += l,
            _ => got.push((s, l, dirty)),
        }
    }
    assert_eq!(got, expected());
}
