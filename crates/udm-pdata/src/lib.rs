//! The kernel's persistent-data formats (drivers/md/persistent-data) in user space: 4096-byte
//! checksummed, self-locating metadata blocks; a metadata space map; copy-on-write btrees,
//! arrays and bitsets through a transaction manager; and a checker that recomputes reference
//! counts. Era uses it now, clone and thin later; it knows nothing of targets or I/O paths.

pub mod array;
pub mod bitset;
pub mod block;
pub mod btree;
pub mod check;
pub mod era;
pub mod error;
pub mod node;
pub mod space_map;
pub mod tm;

pub use block::{BlockStore, FileStore, Kind, MemStore, BLOCK_SIZE};
pub use error::{Error, Result};
