//! Validated device names, following the kernel's rules for dm names.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a device name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// Empty names cannot be looked up.
    #[error("device name is empty")]
    Empty,
    /// The kernel limits names to 127 bytes.
    #[error("device name {0:?} is longer than 127 characters")]
    TooLong(String),
    /// `/`, control characters and whitespace would break paths and table syntax.
    #[error("device name {0:?} contains a forbidden character ('/', whitespace or control)")]
    BadChar(String),
    /// `control`, `.` and `..` are reserved, as under /dev/mapper.
    #[error("device name {0:?} is reserved")]
    Reserved(String),
}

/// A device name that is safe in paths, tables and export names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DevName(String);

impl DevName {
    /// Validates `s` as a device name.
    pub fn new(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > 127 {
            return Err(NameError::TooLong(s.to_string()));
        }
        if s.chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
        {
            return Err(NameError::BadChar(s.to_string()));
        }
        if matches!(s, "control" | "." | "..") {
            return Err(NameError::Reserved(s.to_string()));
        }
        Ok(Self(s.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DevName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(&s)
    }
}

impl From<DevName> for String {
    fn from(n: DevName) -> String {
        n.0
    }
}

impl fmt::Display for DevName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(DevName::new("vg-lv_1").is_ok());
        assert_eq!(DevName::new(""), Err(NameError::Empty));
        assert!(matches!(DevName::new("a/b"), Err(NameError::BadChar(_))));
        assert!(matches!(DevName::new("a b"), Err(NameError::BadChar(_))));
        assert!(matches!(
            DevName::new("control"),
            Err(NameError::Reserved(_))
        ));
        assert!(matches!(
            DevName::new(&"x".repeat(128)),
            Err(NameError::TooLong(_))
        ));
    }
}
