//! Exports: the ways real clients reach udm devices. One module per export kind: [`nbd`] (the NBD
//! protocol over Unix and TCP sockets), [`fuse`] (a file per device, for `losetup`), `ublk`
//! (a kernel block device, behind the `ublk` feature), and [`vhost_user`] (a virtio-blk disk for
//! VMs, over a vhost-user socket). Each kind's handle implements the one [`Export`] trait
//! ([`export`]): start with the kind's constructor, then stop, list and count without knowing
//! the kind; the `ublk` feature stays in this crate (`start`: [`start_ublk`] fails with
//! EOPNOTSUPP without it).

pub mod export;
pub mod fuse;
pub mod nbd;
mod start;
#[cfg(feature = "ublk")]
pub mod ublk;
pub mod vhost_user;

pub use export::{Detached, Export, ExportError, ExportStats, UblkOptions};
pub use start::start_ublk;
