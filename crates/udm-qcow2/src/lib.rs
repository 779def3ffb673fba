//! qcow2 images for `udm backup`: each backup point is a qcow2 version 3 image whose backing
//! file is the previous point. This crate is the format layer only:
//!
//! * [`Writer`] writes an image from a [`Plan`] (which guest clusters hold data, which read as
//!   zeros): 16-bit refcounts, no compression or encryption, a layout fixed by the plan so an
//!   interrupted write can be [resumed](Writer::resume) byte-identically, and the header
//!   written last so an unfinished file is never taken for an image.
//! * [`Image`] parses an image (a file or any [`ReadAt`]) defensively: hostile input gives an
//!   [`Error`], never a panic or an allocation sized by unchecked header values.
//! * [`Chain`] follows backing files and reads guest bytes through them.
//!
//! The format is QEMU's docs/interop/qcow2.rst; `qemu-img check` accepts what the writer makes.

pub mod chain;
pub mod error;
pub mod header;
mod layout;
pub mod reader;
pub mod writer;

pub use chain::Chain;
pub use error::{Error, Result};
pub use layout::{Plan, Planned, Run};
pub use reader::{Cluster, Image, ReadAt};
pub use writer::Writer;
