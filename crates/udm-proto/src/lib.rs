//! The control protocol of `udmd`.
//!
//! One JSON object per line on a Unix socket (owner-only permissions; the daemon and the CLI check
//! each other's credentials, [`peer`]). Every request carries the protocol version; the reply is either a typed
//! [`Response`] or an [`ErrorReply`] with the kernel-compatible errno. The CLI links only this
//! crate, never the data path.

pub mod client;
pub mod paths;
pub mod peer;
pub mod types;

pub use client::{ClientError, ControlClient};
pub use types::*;

/// Version of the protocol spoken by this build. A daemon refuses requests of another major
/// version with EPROTO and a message naming both versions.
pub const PROTOCOL_VERSION: u32 = 1;
