//! Device-mapper targets and tables.
//!
//! [`target`] holds the contract between the core and a target; [`table`] dispatches requests to
//! the targets of a constructed table (the table text is udm-table's, re-exported there); every
//! target is one module (`linear`, `striped`, `error_target`, ..., `snapshot/`), listed by name
//! in [`catalog`]; [`args`] holds the constructors' argument helpers (a leaf module, so targets
//! never import the table that dispatches to them).

pub mod args;
pub mod catalog;
pub mod delay;
pub mod era;
pub mod error_target;
pub mod flakey;
pub mod linear;
pub mod snapshot;
pub mod striped;
pub mod table;
pub mod target;
pub mod testing;
pub mod writeback;
pub mod zero;

pub use target::{
    CtorContext, DevRef, EventSink, Target, TargetCaps, TargetEnv, TargetError, TargetType,
};
