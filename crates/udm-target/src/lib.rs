//! Device-mapper targets and tables.
//!
//! [`target`] holds the contract between the core and a target; [`table`] dispatches requests to
//! the targets of a constructed table (the table text is udm-table's, re-exported there); every
//! target is one module (`linear`, `striped`, ...), registered by name in [`registry`].

pub mod delay;
pub mod error;
pub mod flakey;
pub mod linear;
pub mod registry;
pub mod snapshot;
pub mod striped;
pub mod table;
pub mod target;
pub mod testing;
pub mod zero;

pub use target::{
    CtorContext, DevRef, EventSink, Target, TargetCaps, TargetEnv, TargetError, TargetType,
};
