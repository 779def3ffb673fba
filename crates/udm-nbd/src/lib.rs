//! The NBD protocol as udm speaks it on both ends: `proto` is the wire format (constants,
//! encoders, decoders) used by udmd's server (`udm_export::nbd`), and `client` a small blocking
//! client used by `udm backup` (reading a snapshot and its dirty bitmap) and by tests.

pub mod client;
pub mod proto;
