//! The core of udm: mapped devices with the kernel's live/inactive table model, suspend and
//! resume, claims, interposers and the registry of all devices.
//!
//! Where a request goes: an export calls [`node::DeviceNode::submit`] on the device it exports;
//! the node's gate counts it, its interposer hooks may redirect it into a
//! [`mapped::MappedDevice`], whose live [`udm_target::table::Table`] splits it across targets,
//! which send it down to other nodes, until a disk backend (`udm_io::backend`) performs it.
//!
//! Control operations go through [`registry::Registry`], split by concern into modules under
//! `registry/` (lookup, claims, interpose, build, lifecycle, switch, disks, report, query,
//! persist, unavailable).

pub mod config;
pub mod error;
pub mod freeze;
pub mod gate;
pub mod mapped;
pub mod node;
pub mod registry;

pub use error::{CoreError, Result};
pub use registry::Registry;
