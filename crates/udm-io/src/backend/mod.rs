//! Backends: where requests finally touch storage. One module per backend.

pub mod mem;
