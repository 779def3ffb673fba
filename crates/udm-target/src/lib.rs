//! Device-mapper targets and tables.
//!
//! [`target`] holds the contract between the core and a target; [`table`] parses and prints the
//! dmsetup table text; every target is one module (`linear`, `striped`, ...), registered by name in
//! [`registry`].

pub mod target;

pub use target::{
    CtorContext, DevRef, EventSink, Target, TargetCaps, TargetEnv, TargetError, TargetType,
};
