//! Backends: where requests finally touch storage. One module per backend.

pub mod blockdev;
pub mod file;
pub mod mem;
pub mod open;
pub mod uring;
