//! The kernel's NBD driver as a udmd client (tests/vmlab/kernel-nbd.sh): Debian's nbd-client in a
//! real kernel under QEMU connects over TLS on 127.0.0.1 and over the Unix socket, and ext4,
//! TRIM and FLUSH run on the export. Slow (about 3 minutes), so it runs only with UDM_VMLAB=1.

#[test]
fn kernel_nbd_client() {
    udm_testkit::vmlab::run_script(
        "kernel NBD client test",
        "kernel-nbd.sh",
        &["tls"],
        "kernel-nbd: all passed (tls)",
    );
}
