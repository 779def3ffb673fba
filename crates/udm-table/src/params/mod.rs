//! Typed arguments and status of every target udm implements, as devicemapper-rs has them:
//! each type parses its table text (`FromStr`, or [`FromArgs`] on arguments already split by
//! [`crate::split_args`]) with the kernel's checks and messages, and prints it back
//! (`Display`) in the kernel's table or status format, so the two round-trip. udm-target's
//! constructors parse with these types and build their table and status output from them;
//! the CLI reads status through them without linking the data path.
//!
//! Only the syntax is checked here: what needs the devices (their sizes, block sizes, whether
//! two paths name one device) stays with the constructors in udm-target, which parse a whole
//! line before they open its devices: with several faults in one line, a syntax fault is
//! reported before a device fault (striped's length checks still come before its
//! destinations, as in the kernel: [`StripedParams::header`]).

mod delay;
mod era;
mod flakey;
mod linear;
mod simple;
mod snapshot;
mod striped;

pub use delay::{DelayClass, DelayParams, DelayStatus};
pub use era::{EraParams, EraStatus, ERA_MIN_BLOCK_SECTORS};
pub use flakey::{CorruptByte, Direction, FlakeyFeatures, FlakeyParams, PROBABILITY_BASE};
pub use linear::LinearParams;
pub use simple::{ErrorParams, OriginParams, ZeroParams};
pub use snapshot::{SnapshotFeatures, SnapshotParams, SnapshotStatus, StoreKind};
pub use striped::{StripeDest, StripeHealth, StripedParams, StripedStatus};

use std::fmt;

use crate::args::ArgError;

/// Parsing from arguments split as the kernel's `dm_split_args` splits them.
pub trait FromArgs: Sized {
    /// The kernel's constructor checks on `argv`, with its messages.
    fn from_args(argv: &[String]) -> Result<Self, ArgError>;
}

/// `FromStr` for a [`FromArgs`] type: split the text, then parse the arguments.
macro_rules! from_str_via_args {
    ($($t:ty),* $(,)?) => {$(
        impl std::str::FromStr for $t {
            type Err = ArgError;
            fn from_str(s: &str) -> Result<Self, ArgError> {
                <$t as FromArgs>::from_args(&crate::split_args(s))
            }
        }
    )*};
}
pub(crate) use from_str_via_args;

/// An [`ArgError`] with `msg`.
pub(crate) fn invalid(msg: impl Into<String>) -> ArgError {
    ArgError { msg: msg.into() }
}

/// Writes a device argument as `dm_split_args` reads it back: C spaces and backslashes are
/// escaped with a backslash. Device numbers and udm names print unchanged.
pub(crate) struct Dev<'a>(pub &'a str);

impl fmt::Display for Dev<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.chars().any(|c| c == '\\' || crate::is_c_space(c)) {
            return f.write_str(self.0);
        }
        for c in self.0.chars() {
            if c == '\\' || crate::is_c_space(c) {
                f.write_str("\\")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod strategies {
    //! Generators of valid typed values for the round-trip property tests.
    use proptest::prelude::*;

    /// A device argument: non-empty, spaces and backslashes included (they are escaped).
    pub fn dev() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9]{1,3}:[0-9]{1,4}",
            "[a-z][a-z0-9_.-]{0,8}",
            "/[a-z \\\\\t]{1,12}",
        ]
    }

    /// `params` printed and parsed again is `params`.
    pub fn round_trips<T>(params: &T) -> Result<(), TestCaseError>
    where
        T: std::fmt::Display + std::str::FromStr + PartialEq + std::fmt::Debug,
        T::Err: std::fmt::Debug,
    {
        let text = params.to_string();
        match text.parse::<T>() {
            Ok(back) => prop_assert_eq!(&back, params, "{:?}", text),
            Err(e) => prop_assert!(false, "{text:?}: {e:?}"),
        }
        Ok(())
    }
}
