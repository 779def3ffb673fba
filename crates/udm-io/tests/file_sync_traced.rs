//! FileDevice's FLUSH, PREFLUSH and FUA reach the kernel as real syncs: the test runs itself
//! again under `strace -f` and reads the fsync/fdatasync (and `pwritev2(..., RWF_DSYNC)`) calls
//! each request made. A flush that returns Ok without syncing passes every data check, so only
//! the syscalls can tell. The steps are delimited by `chdir` to marker paths that fail.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::ffi::CString;
use udm_io::backend::file::FileDevice;
use udm_io::{Bio, BioFlags, BlockDevice};
use udm_testkit::host::{have_tool, tool_cmd};

const CHILD: &str = "UDM_IO_TEST_SYNC_CHILD";
const MARK: &str = "/nonexistent/udm-sync-step-";

/// Marks the start of a step in the trace (a chdir that fails, seen by strace with its path).
fn mark(step: &str) {
    let p = CString::new(format!("{MARK}{step}")).unwrap();
    // SAFETY: p is a valid NUL-terminated path; chdir does not keep the pointer.
    let r = unsafe { libc::chdir(p.as_ptr()) };
    assert_eq!(r, -1, "the marker path exists");
}

/// The requests, one step each, on a buffered and an O_DIRECT FileDevice.
fn child() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = dir.path().join("f.img");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    for direct in [false, true] {
        let d = match FileDevice::open_with(&p, false, direct) {
            Ok(d) => d,
            Err(e) if direct => {
                eprintln!("NOTE: no O_DIRECT here ({e}); buffered only");
                mark("end");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let buf = vec![0x5au8; 4096];
        mark(&format!("{direct}-plain"));
        d.submit(Bio::write(8, &buf)).unwrap();
        mark(&format!("{direct}-flush"));
        d.submit(Bio::flush()).unwrap();
        mark(&format!("{direct}-fua"));
        d.submit(Bio::write(16, &buf).with_flags(BioFlags::FUA))
            .unwrap();
        mark(&format!("{direct}-preflush"));
        d.submit(Bio::write(24, &buf).with_flags(BioFlags::PREFLUSH))
            .unwrap();
        mark(&format!("{direct}-zeroes-fua"));
        d.submit(Bio::write_zeroes(32, 8).with_flags(BioFlags::FUA))
            .unwrap();
    }
    mark("end");
}

/// The trace lines of each step, in order.
fn steps(trace: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in trace.lines() {
        if let Some(i) = line.find(MARK) {
            let rest = &line[i + MARK.len()..];
            let step = rest.split('"').next().unwrap_or_default().to_string();
            out.push((step, Vec::new()));
        } else if let Some((_, lines)) = out.last_mut() {
            lines.push(line.to_string());
        }
    }
    out
}

fn syncs(lines: &[String]) -> bool {
    lines
        .iter()
        .any(|l| l.contains("fdatasync(") || l.contains("fsync("))
}

fn dsync_write(lines: &[String]) -> bool {
    lines
        .iter()
        .any(|l| l.contains("pwritev2(") && l.contains("RWF_DSYNC"))
}

#[test]
fn flush_and_fua_reach_fsync() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    if !have_tool("strace") {
        eprintln!(
            "SKIPPED flush_and_fua_reach_fsync: strace is not installed (apt-get install strace)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let out = tool_cmd("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,pwritev2,chdir",
            "-o",
        ])
        .arg(&trace)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "flush_and_fua_reach_fsync", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() && text.contains("ptrace") {
        eprintln!("SKIPPED flush_and_fua_reach_fsync: strace cannot trace here: {text}");
        return;
    }
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
    let trace = std::fs::read_to_string(&trace).unwrap();
    let steps = steps(&trace);
    assert_eq!(steps.last().map(|s| s.0.as_str()), Some("end"), "{trace}");
    let mut checked = 0;
    for (step, lines) in &steps {
        let ok = match step.rsplit_once('-').map_or("", |s| s.1) {
            "plain" => !syncs(lines) && !dsync_write(lines),
            "flush" | "preflush" => syncs(lines),
            "fua" => syncs(lines) || dsync_write(lines),
            _ => continue,
        };
        assert!(
            ok,
            "step {step}: the syscalls do not match (a plain write must not sync; flush, \
             PREFLUSH and FUA must reach fdatasync/fsync or RWF_DSYNC):\n{}",
            lines.join("\n")
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} steps traced:\n{trace}");
}
