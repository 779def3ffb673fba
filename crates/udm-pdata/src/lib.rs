//! The kernel's persistent-data formats (drivers/md/persistent-data) in user space: 4096-byte
//! checksummed, self-locating metadata blocks; a metadata space map; copy-on-write btrees,
//! arrays and bitsets through a transaction manager; and a checker that recomputes reference
//! counts. Era uses it now, clone and thin later; it knows nothing of targets or I/O paths.
//!
//! Use: `Tm::format` (or `Tm::open` from a superblock's space-map root), build and change
//! structures through `btree`, `array` and `bitset`, then `Tm::pre_commit` (data blocks and
//! space map, flushed) and `Tm::commit` (the superblock, flushed). Not here yet: multi-level
//! btrees and the data space map (thin), growing the metadata space map (`dm_sm_extend`).

pub mod array;
pub mod bitset;
pub mod block;
pub mod btree;
pub mod check;
pub mod era;
pub mod error;
pub mod kind;
pub mod node;
pub mod space_map;
pub mod tm;

pub use block::{BlockStore, FileStore, Kind, MemStore, BLOCK_SIZE};
pub use error::{Error, Result};
