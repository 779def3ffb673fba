//! Cross-check with the era tools of thin-provisioning-tools where they are installed (Debian
//! package; skipped otherwise): metadata written here passes era_check and era_dump prints the
//! same as for the tools' own era_restore of the same content; metadata written by era_restore
//! reads back here with the same content and checks clean, reference counts included.

use std::path::Path;
use std::process::Command;

use udm_pdata::array::Array;
use udm_pdata::bitset::Bitset;
use udm_pdata::btree;
use udm_pdata::check;
use udm_pdata::era::{self, Restore, Superblock, Writeset, WRITESET_TREE};
use udm_pdata::tm::Tm;
use udm_pdata::FileStore;

const NR: u32 = 16;

fn tool(name: &str) -> Option<String> {
    ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| Path::new(p).exists())
}

fn content() -> (Vec<(u32, Vec<bool>)>, Vec<u32>) {
    let ws = |bits: &[usize]| {
        (0..NR as usize)
            .map(|i| bits.contains(&i))
            .collect::<Vec<bool>>()
    };
    let writesets = vec![(4, ws(&[3])), (5, ws(&[1, 2, 9]))];
    let mut eras = vec![0u32; NR as usize];
    eras[1] = 2;
    eras[7] = 3;
    eras[15] = 1;
    (writesets, eras)
}

fn xml() -> String {
    let (writesets, eras) = content();
    let mut s =
        format!("<superblock uuid=\"\" block_size=\"128\" nr_blocks=\"{NR}\" current_era=\"5\">\n");
    for (era, bits) in &writesets {
        s += &format!("  <writeset era=\"{era}\" nr_bits=\"{NR}\">\n");
        for (i, b) in bits.iter().enumerate() {
            s += &format!("    <bit block=\"{i}\" value=\"{b}\"/>\n");
        }
        s += "  </writeset>\n";
    }
    s += "  <era_array>\n";
    for (i, e) in eras.iter().enumerate() {
        s += &format!("    <era block=\"{i}\" era=\"{e}\"/>\n");
    }
    s + "  </era_array>\n</superblock>\n"
}

fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(4 << 20))
        .expect("image");
    p
}

fn run(cmd: &str, args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().expect("run tool");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn era_tools_agree_both_ways() {
    let (Some(check_bin), Some(dump), Some(restore)) =
        (tool("era_check"), tool("era_dump"), tool("era_restore"))
    else {
        println!("SKIPPED era tools cross-check: era_check/era_dump/era_restore not installed (thin-provisioning-tools)");
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let (writesets, eras) = content();

    // Written here.
    let ours = image(dir.path(), "ours.img");
    let store = FileStore::open(&ours, true).expect("open");
    let r = Restore {
        block_size: 128,
        nr_blocks: NR,
        current_era: 5,
        writesets: &writesets,
        era_array: &eras,
        flags: 0,
    };
    era::restore(Box::new(store), &r).expect("restore");
    let (ok, out) = run(&check_bin, &[ours.as_os_str()]);
    assert!(ok, "era_check on our metadata: {out}");

    // Written by the tools from the same content.
    let theirs = image(dir.path(), "theirs.img");
    let xml_path = dir.path().join("in.xml");
    std::fs::write(&xml_path, xml()).expect("xml");
    let (ok, out) = run(
        &restore,
        &[
            "-i".as_ref(),
            xml_path.as_os_str(),
            "-o".as_ref(),
            theirs.as_os_str(),
        ],
    );
    assert!(ok, "era_restore: {out}");
    let (ok1, dump_ours) = run(&dump, &[ours.as_os_str()]);
    let (ok2, dump_theirs) = run(&dump, &[theirs.as_os_str()]);
    assert!(ok1 && ok2, "era_dump: {dump_ours}\n{dump_theirs}");
    assert_eq!(
        dump_ours, dump_theirs,
        "era_dump of our metadata and of era_restore's"
    );

    // The tools' metadata read here: same content, clean check with reference counts.
    let store = FileStore::open(&theirs, false).expect("open");
    let sb = Superblock::read(&store, 0).expect("superblock");
    assert_eq!(
        (sb.nr_blocks, sb.current_era, sb.data_block_size),
        (NR, 5, 128)
    );
    let roots = era::check_roots(&store, &sb).expect("roots");
    let report = check::check(&store, &sb.sm_root, &roots);
    assert!(report.is_clean(), "{:#?}", report.problems);
    let tm = Tm::open(Box::new(store), &sb.sm_root).expect("tm");
    let tree = btree::entries(&tm, sb.writeset_tree_root, &WRITESET_TREE).expect("writeset tree");
    let got: Vec<(u32, Vec<bool>)> = tree
        .iter()
        .map(|(era, v)| {
            let w = Writeset::parse(v);
            (
                *era as u32,
                Bitset::open(w.root, u64::from(w.nr_bits))
                    .bits(&tm)
                    .expect("bits"),
            )
        })
        .collect();
    assert_eq!(got, writesets);
    let a = Array {
        root: sb.era_array_root,
        value_size: 4,
    };
    let got: Vec<u32> = a
        .values(&tm, u64::from(NR))
        .expect("era array")
        .into_iter()
        .map(|e| e as u32)
        .collect();
    assert_eq!(got, eras);
}
