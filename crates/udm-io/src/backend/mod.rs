//! Backends: where requests finally touch storage. One module per backend.

pub mod file;
pub mod mem;
pub mod uring;
