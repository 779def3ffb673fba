//! The command-line clients of udmd: `udmsetup` (dmsetup-compatible) and `udm` (workflows).
//!
//! Both speak only the control protocol (`udm-proto`); the data path is never linked. The
//! output formatting is pure and lives in [`format`] (one module per command family, tested
//! byte for byte against dmsetup's formats); table input parsing is in [`input`].

pub mod error;
pub mod format;
pub mod input;
pub mod session;
pub mod setup;
pub mod udm;

pub use error::CliError;
pub use session::{default_socket, Session, Timing};
