//! dm-era cross-check with the kernel (tests/vmlab/era-crosscheck.sh): one write history with
//! checkpoints, a metadata snapshot and suspend/resume, by the kernel's era and by udm's; status
//! fields, era_check, era_dump --logical and era_invalidate equal, and each loads the other's
//! metadata. About 10 s of QEMU; runs only with UDM_VMLAB=1.

#[test]
fn era_kernel_crosscheck() {
    udm_testkit::vmlab::run_script(
        "era kernel cross-check",
        "era-crosscheck.sh",
        &[],
        "era-crosscheck: all match",
    );
}
