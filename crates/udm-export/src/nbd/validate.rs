//! Checking a request against what the session negotiated, before it runs. Pure (no
//! connection, no device), so each rule is unit-tested on its own, as ublk/translate.rs is.

use super::proto::*;
use super::session::{Session, MAX_BLOCK};

/// What a request must respect: the parts of the negotiated session the rules read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rules {
    /// Structured replies were negotiated (allows `DF` on reads).
    pub structured: bool,
    /// A metadata context was negotiated (allows BLOCK_STATUS).
    pub meta: bool,
    /// The export is read-only.
    pub read_only: bool,
    /// Minimum block size: offsets and lengths are multiples of it.
    pub min_block: u32,
    /// Export size in bytes.
    pub size: u64,
}

impl Session {
    /// What requests must respect.
    pub(super) fn rules(&self) -> Rules {
        Rules {
            structured: self.structured,
            meta: self.meta.any(),
            read_only: self.read_only,
            min_block: self.min_block,
            size: self.size,
        }
    }
}

/// Why a request is refused. [`Refusal::code`] is the NBD error sent back, and
/// [`Refusal::message`] the text of the structured error reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    UnknownCommand,
    BadFlags,
    ReadOnly,
    FlushRange,
    NoMetaContext,
    Unaligned,
    TooLarge,
    /// Beyond the end: a write gets ENOSPC, anything else EINVAL (the NBD spec).
    BeyondEnd {
        write: bool,
    },
    EmptyStatus,
    /// The export is being removed.
    Stopping,
}

impl Refusal {
    /// The NBD error code on the wire.
    pub(super) fn code(self) -> u32 {
        match self {
            Refusal::ReadOnly => NBD_EPERM,
            Refusal::BeyondEnd { write: true } => NBD_ENOSPC,
            Refusal::Stopping => NBD_ESHUTDOWN,
            _ => NBD_EINVAL,
        }
    }

    /// What the client is told.
    pub(super) fn message(self) -> &'static str {
        match self {
            Refusal::UnknownCommand => "unknown command",
            Refusal::BadFlags => "command flag not valid for this command",
            Refusal::ReadOnly => "export is read-only",
            Refusal::FlushRange => "flush offset and length must be zero",
            Refusal::NoMetaContext => "no metadata context was negotiated",
            Refusal::Unaligned => "request not aligned to the minimum block size",
            Refusal::TooLarge => "request larger than the maximum block size",
            Refusal::BeyondEnd { .. } => "request beyond the end of the export",
            Refusal::EmptyStatus => "block status of zero length",
            Refusal::Stopping => "export is being removed",
        }
    }
}

/// Checks `req` against `r`.
pub(super) fn validate(r: &Rules, req: &Request) -> Result<(), Refusal> {
    let allowed = CMD_FLAG_FUA
        | match req.cmd {
            CMD_READ if r.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
            _ => return Err(Refusal::UnknownCommand),
        };
    if req.flags & !allowed != 0 {
        return Err(Refusal::BadFlags);
    }
    let write_like = matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if write_like && r.read_only {
        return Err(Refusal::ReadOnly);
    }
    if req.cmd == CMD_FLUSH {
        if req.offset != 0 || req.length != 0 {
            return Err(Refusal::FlushRange);
        }
        return Ok(());
    }
    if req.cmd == CMD_BLOCK_STATUS && !r.meta {
        return Err(Refusal::NoMetaContext);
    }
    let min = u64::from(r.min_block.max(1));
    if req.offset % min != 0 || (req.cmd != CMD_BLOCK_STATUS && u64::from(req.length) % min != 0) {
        return Err(Refusal::Unaligned);
    }
    let capped = matches!(req.cmd, CMD_READ | CMD_WRITE | CMD_CACHE)
        || (req.cmd == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_FAST_ZERO == 0);
    if capped && req.length > MAX_BLOCK {
        return Err(Refusal::TooLarge);
    }
    let end = req.offset.checked_add(u64::from(req.length));
    if end.is_none_or(|e| e > r.size) {
        return Err(Refusal::BeyondEnd {
            write: matches!(req.cmd, CMD_WRITE | CMD_WRITE_ZEROES),
        });
    }
    if req.cmd == CMD_BLOCK_STATUS && req.length == 0 {
        return Err(Refusal::EmptyStatus);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        structured: true,
        meta: true,
        read_only: false,
        min_block: 512,
        size: 1 << 20,
    };

    fn req(cmd: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            cmd,
            handle: 7,
            offset,
            length,
        }
    }

    fn check(r: &Rules, cmd: u16, flags: u16, offset: u64, length: u32) -> Result<(), Refusal> {
        validate(r, &req(cmd, flags, offset, length))
    }

    #[test]
    fn valid_requests_pass() {
        for cmd in [
            CMD_READ,
            CMD_WRITE,
            CMD_TRIM,
            CMD_WRITE_ZEROES,
            CMD_CACHE,
            CMD_BLOCK_STATUS,
        ] {
            assert_eq!(check(&RULES, cmd, 0, 4096, 4096), Ok(()), "cmd {cmd}");
        }
        assert_eq!(check(&RULES, CMD_FLUSH, 0, 0, 0), Ok(()));
        assert_eq!(check(&RULES, CMD_WRITE, CMD_FLAG_FUA, 0, 512), Ok(()));
        assert_eq!(check(&RULES, CMD_READ, CMD_FLAG_DF, 0, 512), Ok(()));
        // The last byte, exactly.
        assert_eq!(check(&RULES, CMD_READ, 0, (1 << 20) - 512, 512), Ok(()));
    }

    #[test]
    fn each_rule_refuses_with_its_wire_code() {
        let ro = Rules {
            read_only: true,
            ..RULES
        };
        let plain = Rules {
            structured: false,
            meta: false,
            ..RULES
        };
        let cases = [
            (
                check(&RULES, 99, 0, 0, 512),
                Refusal::UnknownCommand,
                NBD_EINVAL,
            ),
            (
                check(&RULES, CMD_WRITE, CMD_FLAG_DF, 0, 512),
                Refusal::BadFlags,
                NBD_EINVAL,
            ),
            (
                check(&plain, CMD_READ, CMD_FLAG_DF, 0, 512),
                Refusal::BadFlags,
                NBD_EINVAL,
            ),
            (
                check(&ro, CMD_WRITE, 0, 0, 512),
                Refusal::ReadOnly,
                NBD_EPERM,
            ),
            (
                check(&ro, CMD_TRIM, 0, 0, 512),
                Refusal::ReadOnly,
                NBD_EPERM,
            ),
            (
                check(&ro, CMD_WRITE_ZEROES, 0, 0, 512),
                Refusal::ReadOnly,
                NBD_EPERM,
            ),
            (
                check(&RULES, CMD_FLUSH, 0, 512, 0),
                Refusal::FlushRange,
                NBD_EINVAL,
            ),
            (
                check(&plain, CMD_BLOCK_STATUS, 0, 0, 512),
                Refusal::NoMetaContext,
                NBD_EINVAL,
            ),
            (
                check(&RULES, CMD_READ, 0, 100, 512),
                Refusal::Unaligned,
                NBD_EINVAL,
            ),
            (
                check(&RULES, CMD_WRITE, 0, 0, 100),
                Refusal::Unaligned,
                NBD_EINVAL,
            ),
            (
                check(&RULES, CMD_READ, 0, 0, MAX_BLOCK + 512),
                Refusal::TooLarge,
                NBD_EINVAL,
            ),
            (
                check(&RULES, CMD_WRITE, 0, 1 << 20, 512),
                Refusal::BeyondEnd { write: true },
                NBD_ENOSPC,
            ),
            (
                check(&RULES, CMD_READ, 0, 1 << 20, 512),
                Refusal::BeyondEnd { write: false },
                NBD_EINVAL,
            ),
            (
                check(&RULES, CMD_READ, 0, u64::MAX - 511, 512),
                Refusal::BeyondEnd { write: false },
                NBD_EINVAL,
            ),
            (
                check(&RULES, CMD_BLOCK_STATUS, 0, 0, 0),
                Refusal::EmptyStatus,
                NBD_EINVAL,
            ),
        ];
        for (i, (got, want, code)) in cases.into_iter().enumerate() {
            assert_eq!(got, Err(want), "case {i}");
            assert_eq!(want.code(), code, "case {i}");
            assert!(!want.message().is_empty());
        }
        assert_eq!(Refusal::Stopping.code(), NBD_ESHUTDOWN);
    }

    #[test]
    fn fast_zero_and_block_status_lengths_are_not_capped() {
        let big = Rules {
            size: 1 << 40,
            ..RULES
        };
        let len = MAX_BLOCK + 512;
        assert_eq!(
            check(&big, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, len),
            Ok(())
        );
        assert_eq!(
            check(&big, CMD_WRITE_ZEROES, 0, 0, len),
            Err(Refusal::TooLarge)
        );
        assert_eq!(check(&big, CMD_TRIM, 0, 0, len), Ok(()));
        // Block status lengths need not be aligned (only the offset).
        assert_eq!(check(&big, CMD_BLOCK_STATUS, 0, 0, 100), Ok(()));
    }
}
