//! Exports: the ways real clients reach udm devices. One module per export kind: [`nbd`] (the NBD
//! protocol over Unix and TCP sockets), [`fuse`] (a file per device, for `losetup`), `ublk`
//! (a kernel block device, behind the `ublk` feature), and [`vhost_user`] (a virtio-blk disk for
//! VMs, over a vhost-user socket).

pub mod fuse;
pub mod nbd;
#[cfg(feature = "ublk")]
pub mod ublk;
pub mod vhost_user;
