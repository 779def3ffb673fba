//! The metadata the era target writes, read by thin-provisioning-tools (Debian package; the
//! test says SKIPPED where they are not installed): after a write history through checkpoints,
//! a metadata snapshot and suspend/resume, `era_check` passes and `era_dump` and
//! `era_invalidate` print what the history says.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use udm_io::Bio;
use udm_target::era::shared_metadata;
use udm_target::table::Table;
use udm_target::testing::TestContext;
use udm_target::TargetEnv;

const BS: u64 = 128;
const NR: u64 = 20;

fn tool(name: &str) -> Option<String> {
    ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| Path::new(p).exists())
}

fn run(cmd: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().expect("run tool");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn write(t: &Table, block: u64) {
    t.submit(Bio::write(block * BS, &[7; 4096])).expect("write");
}

#[test]
fn era_tools_read_what_the_target_wrote() {
    let (Some(check), Some(dump)) = (tool("era_check"), tool("era_dump")) else {
        println!(
            "SKIPPED era tools check: era_check/era_dump not installed (thin-provisioning-tools)"
        );
        return;
    };
    let mut ctx = TestContext::new();
    let env = Arc::new(TargetEnv::default());
    ctx.set_env(env.clone());
    let meta = ctx.add_mem("meta", 8 * 1024);
    ctx.add_mem("origin", NR * BS);
    let t = ctx
        .build(&format!("0 {} era meta origin {BS}", NR * BS))
        .expect("table");
    t.preresume().expect("preresume");
    let history: [&[u64]; 4] = [&[0, 1, 19], &[1, 5], &[5, 6, 7], &[2, 19]];
    for (i, blocks) in history.iter().enumerate() {
        for &b in *blocks {
            write(&t, b);
        }
        if i == 1 {
            t.message(0, &["take_metadata_snap".into()]).expect("snap");
        } else if i + 1 < history.len() {
            t.message(0, &["checkpoint".into()]).expect("checkpoint");
        }
    }
    // The digest of the last archived era starts at the worker's next run (as the kernel's):
    // the commit of the last writes, which the flush waits for. Without it, a loaded machine
    // found no digest started yet and dumped the metadata before it.
    t.submit(Bio::flush()).expect("flush");
    let id = ctx.device("meta").expect("meta").id;
    let shared = shared_metadata(&env, id).expect("shared");
    assert!(shared.wait_digested(Duration::from_secs(10)));
    t.postsuspend();
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("meta.img");
    std::fs::write(&img, meta.contents()).expect("image");
    let (ok, out) = run(&check, &[img.as_os_str()]);
    assert!(ok, "era_check: {out}");
    // What the history says: eras 1..=3 digested into the array; era 4 archived at suspend.
    let mut digested = vec![0u32; NR as usize];
    for (era, blocks) in history[..3].iter().enumerate() {
        for &b in *blocks {
            digested[b as usize] = era as u32 + 1;
        }
    }
    let mut logical = digested.clone();
    for &b in history[3] {
        logical[b as usize] = 4;
    }
    let array = |eras: &[u32]| {
        let mut s = String::from("  <era_array>\n");
        for (b, e) in eras.iter().enumerate() {
            s += &format!("    <era block=\"{b}\" era=\"{e}\"/>\n");
        }
        s + "  </era_array>\n"
    };
    let head = format!(
        "<superblock uuid=\"\" block_size=\"{BS}\" nr_blocks=\"{NR}\" current_era=\"4\">\n"
    );
    let mut want = head.clone() + &format!("  <writeset era=\"4\" nr_bits=\"{NR}\">\n");
    for b in 0..NR {
        let v = history[3].contains(&b);
        want += &format!("    <bit block=\"{b}\" value=\"{v}\"/>\n");
    }
    want += "  </writeset>\n";
    want += &(array(&digested) + "</superblock>\n");
    let (ok, out) = run(&dump, &[img.as_os_str()]);
    assert!(ok, "era_dump: {out}");
    assert_eq!(out.trim_end(), want.trim_end(), "era_dump");
    let (ok, out) = run(&dump, &["--logical".as_ref(), img.as_os_str()]);
    assert!(ok, "era_dump --logical: {out}");
    assert_eq!(
        out.trim_end(),
        (head + &array(&logical) + "</superblock>").trim_end(),
        "era_dump --logical"
    );
    let Some(invalidate) = tool("era_invalidate") else {
        println!("SKIPPED era_invalidate: not installed");
        return;
    };
    for since in 1..=5u32 {
        let (ok, out) = run(
            &invalidate,
            &[
                "--written-since".as_ref(),
                since.to_string().as_ref(),
                img.as_os_str(),
            ],
        );
        assert!(ok, "era_invalidate: {out}");
        assert_eq!(
            out.trim_end(),
            invalidated(&logical, since).trim_end(),
            "--written-since {since}"
        );
    }
}

/// era_invalidate's output for the blocks last written in `since` or later: runs as ranges
/// (end exclusive), single blocks as blocks.
fn invalidated(eras: &[u32], since: u32) -> String {
    let mut s = String::from("<blocks>\n");
    let mut b = 0;
    while b < eras.len() {
        if eras[b] < since {
            b += 1;
            continue;
        }
        let start = b;
        while b < eras.len() && eras[b] >= since {
            b += 1;
        }
        if b - start == 1 {
            s += &format!("  <block block=\"{start}\"/>\n");
        } else {
            s += &format!("  <range begin=\"{start}\" end = \"{b}\"/>\n");
        }
    }
    s + "</blocks>\n"
}
