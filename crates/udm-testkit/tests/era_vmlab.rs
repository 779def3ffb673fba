//! dm-era cross-check with the kernel (tests/vmlab/era-crosscheck.sh): one write history with
//! checkpoints, a metadata snapshot and suspend/resume, by the kernel's era and by udm's: status
//! lines (used count and held root included), era_check, the eras of all blocks and
//! era_invalidate equal, and each loads the other's metadata. About 10 s of QEMU each; run only
//! with UDM_VMLAB=1.

#[test]
fn era_kernel_crosscheck() {
    udm_testkit::vmlab::run_script(
        "era kernel cross-check",
        "era-crosscheck.sh",
        &[],
        "era-crosscheck: all match",
    );
}

/// 330 steps on Linux 6.12 over two era-array blocks: the metadata's allocation cursor wraps.
#[test]
fn era_kernel_crosscheck_long_history() {
    udm_testkit::vmlab::run_script(
        "era kernel cross-check, long history",
        "era-crosscheck.sh",
        &["long"],
        "era-crosscheck: all match",
    );
}
