//! The ublk export on a real kernel (tests/vmlab/kernel-ublk.sh): Debian's Linux 6.12 under QEMU
//! with ublk_drv; udmd inside exports a device as /dev/ublkbN, which carries ext4 through
//! writes, TRIM, FLUSH, an interposer, a frozen live snapshot under a writer, removal with a
//! request parked in a suspended device, SIGTERM + restart and kill -9 + restart. Slow (about 3
//! minutes), so it runs only with UDM_VMLAB=1, and only when the binaries have the ublk feature.

#[test]
fn kernel_ublk_export() {
    udm_testkit::vmlab::run_script(
        "kernel ublk test",
        "kernel-ublk.sh",
        &[],
        "kernel-ublk: all passed",
    );
}
