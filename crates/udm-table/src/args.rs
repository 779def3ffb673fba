//! Argument helpers with the kernel's parsing rules (`dm_split_args`, `sscanf`, `kstrtouint`,
//! `struct dm_arg_set`), shared by every target constructor. Helpers that open devices stay with
//! the targets in udm-target: they need the data path.

use udm_types::errno::HasErrno;
use udm_types::Errno;

/// A constructor argument the kernel would refuse: the target's message (`ti->error`), EINVAL.
/// udm-target turns it into a `TargetError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct ArgError {
    /// The target's message for the bad argument.
    pub msg: String,
}

impl HasErrno for ArgError {
    fn errno(&self) -> Errno {
        Errno::EINVAL
    }
}

/// The kernel's `dm_split_args`: splits on C whitespace; a backslash makes the next character
/// literal (a trailing lone backslash stays as it is).
pub fn split_args(params: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = params.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| crate::is_c_space(*c)) {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut tok = String::new();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some(n) => tok.push(n),
                    None => tok.push('\\'),
                }
                continue;
            }
            if crate::is_c_space(c) {
                break;
            }
            tok.push(c);
        }
        out.push(tok);
    }
}

/// `sscanf(s, "%llu%c")` == 1: decimal digits only. Overflow is refused (the kernel wraps).
pub fn scan_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `sscanf(s, "%u%c")` == 1: decimal digits only, within `u32`.
pub fn scan_u32(s: &str) -> Option<u32> {
    scan_u64(s).and_then(|v| u32::try_from(v).ok())
}

/// `kstrtouint(s, 10)`: an optional `+`, decimal digits, an optional trailing newline.
pub fn kstrtouint(s: &str) -> Option<u32> {
    let s = s.strip_suffix('\n').unwrap_or(s);
    scan_u32(s.strip_prefix('+').unwrap_or(s))
}

/// A start sector argument (`Invalid device sector` otherwise), as linear, delay, flakey and
/// error read it.
pub fn sector(s: &str) -> Result<u64, ArgError> {
    scan_u64(s).ok_or_else(|| ArgError {
        msg: "Invalid device sector".into(),
    })
}

/// The kernel's `struct dm_arg_set`: arguments consumed front to back.
#[derive(Debug, Clone)]
pub struct ArgSet<'a> {
    args: &'a [String],
}

impl<'a> ArgSet<'a> {
    /// All of `args`.
    pub fn new(args: &'a [String]) -> Self {
        ArgSet { args }
    }

    /// Arguments left.
    pub fn remaining(&self) -> usize {
        self.args.len()
    }

    /// `dm_shift_arg`: the next argument, if any.
    pub fn shift(&mut self) -> Option<&'a str> {
        let (first, rest) = self.args.split_first()?;
        self.args = rest;
        Some(first.as_str())
    }

    /// `dm_read_arg`: the next argument as a `u32` in `[min, max]`, else `error`.
    pub fn read_arg(&mut self, min: u32, max: u32, error: &str) -> Result<u32, ArgError> {
        self.read(min, max, error, false)
    }

    /// `dm_read_arg_group`: like [`ArgSet::read_arg`], and the value must not exceed the
    /// number of arguments left after it.
    pub fn read_arg_group(&mut self, min: u32, max: u32, error: &str) -> Result<u32, ArgError> {
        self.read(min, max, error, true)
    }

    fn read(&mut self, min: u32, max: u32, error: &str, grouped: bool) -> Result<u32, ArgError> {
        let v = self
            .shift()
            .and_then(scan_u32)
            .filter(|v| *v >= min && *v <= max)
            .filter(|v| !grouped || *v as usize <= self.remaining());
        v.ok_or_else(|| ArgError { msg: error.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arg_helpers_follow_the_kernel() {
        assert_eq!(scan_u64("0012"), Some(12));
        assert_eq!(scan_u64("+1"), None);
        assert_eq!(scan_u64("1 "), None);
        assert_eq!(scan_u64("18446744073709551616"), None);
        assert_eq!(scan_u32("4294967296"), None);
        assert_eq!(kstrtouint("+7\n"), Some(7));
        assert_eq!(kstrtouint("-7"), None);
        let v: Vec<String> = ["2", "a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut a = ArgSet::new(&v);
        assert_eq!(a.read_arg_group(0, 5, "e").unwrap(), 2);
        assert_eq!(a.shift(), Some("a"));
        let mut a = ArgSet::new(&v[..2]);
        assert_eq!(
            a.read_arg_group(0, 5, "too many").unwrap_err().msg,
            "too many"
        );
        let mut a = ArgSet::new(&v);
        assert_eq!(a.read_arg(3, 5, "low").unwrap_err().msg, "low");
        assert_eq!(a.remaining(), 3);
    }

    #[test]
    fn split_args_like_the_kernel() {
        assert_eq!(
            split_args("  a  b\\ c\td\\\\ e\\"),
            ["a", "b c", "d\\", "e\\"]
        );
        assert!(split_args(" \t ").is_empty());
        assert_eq!(split_args("a\u{a0}b"), ["a\u{a0}b"]);
    }
}
