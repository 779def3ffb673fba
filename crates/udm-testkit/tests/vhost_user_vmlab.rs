//! A VM on a udm device (tests/vmlab/vhost-user-blk.sh): udmd on the host serves a
//! vhost-user-blk export, QEMU boots a real kernel with it as a virtio-blk disk, the guest makes
//! and checks an ext4 filesystem, and while a writer runs the host attaches and detaches an
//! interposer and takes a snapshot of the guest-frozen filesystem, then checks the snapshot.
//! Slow (minutes under TCG), so it runs only with UDM_VMLAB=1.

#[test]
fn vm_on_a_vhost_user_blk_export() {
    udm_testkit::vmlab::run_script(
        "vhost-user-blk VM test",
        "vhost-user-blk.sh",
        &[],
        "vhost-user-blk: all passed",
    );
}
