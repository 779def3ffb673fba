//! Resource limits of the NBD server, the memory gauge, and the refusal sent to clients over
//! the connection cap.
//!
//! Every limit exists so that no client, hostile or just stuck, can hold server memory or
//! threads without bound: connections are capped, handshakes and stalled reply writes time out,
//! each connection's payload memory is capped (its reader stops reading until replies drain),
//! and removing an export gives in-flight requests a short grace before sockets are closed.

use super::proto::*;
use std::io::{self, Read, Write};
use std::time::Duration;

/// Limits applied to every connection of an [`super::NbdServer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdLimits {
    /// Connections served at once (negotiating or transmitting). The next client gets
    /// `NBD_REP_ERR_SHUTDOWN` with a message for its first option, then is disconnected.
    pub max_connections: usize,
    /// Request and reply payload bytes one connection may hold (reads being produced or sent,
    /// writes being received or stored). Beyond it the server stops reading that client's
    /// requests until replies drain; a single request larger than this still runs alone.
    pub max_inflight_bytes: u64,
    /// Time from accepting a connection to the start of transmission; slower clients are
    /// disconnected.
    pub handshake_timeout: Duration,
    /// A reply write that makes no progress for this long (the client stopped reading)
    /// disconnects the client. `None` waits forever (removal and shutdown still cut it).
    pub send_timeout: Option<Duration>,
    /// When an export is removed or the server shut down, in-flight requests get this long to
    /// be answered before the sockets are closed in both directions.
    pub drain_timeout: Duration,
    /// A client in transmission that sends no request for this long, with nothing in flight,
    /// is disconnected. `None` (the default) keeps idle clients forever, as kernel and VM
    /// clients may legitimately idle for hours.
    pub idle_timeout: Option<Duration>,
}

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits {
            max_connections: 128,
            max_inflight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            send_timeout: Some(Duration::from_secs(60)),
            drain_timeout: Duration::from_secs(2),
            idle_timeout: None,
        }
    }
}

/// What the server's connections hold right now (a cheap sum of per-connection counters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NbdMemory {
    /// Live connections: negotiating, transmitting, or draining after removal.
    pub connections: usize,
    /// Payload bytes admitted by the per-connection cap (requests read but not yet answered).
    pub inflight_bytes: u64,
    /// Payload bytes actually held in request and reply buffers (write payloads count as
    /// they arrive).
    pub buffered_bytes: u64,
    /// Bytes kept in the connections' buffer pools for reuse (trimmed when idle).
    pub pooled_bytes: u64,
}

/// Options a refused client may send before we give up on it.
const REFUSE_MAX_OPTIONS: usize = 8;

/// Talks to a client over the connection cap: greets it, answers its options with
/// `NBD_REP_ERR_SHUTDOWN` and `msg` (so `qemu`, `nbdinfo`... show why), then returns to close.
/// `NBD_OPT_EXPORT_NAME` cannot carry an error and just gets the close.
pub(super) fn refuse(r: &mut impl Read, w: &mut impl Write, msg: &str) -> io::Result<()> {
    write_greeting(w)?;
    let _cflags = read_array::<4>(r)?;
    for _ in 0..REFUSE_MAX_OPTIONS {
        let hdr = read_array::<OPTION_HEADER_LEN>(r)?;
        if be64(&hdr[0..8]) != IHAVEOPT {
            return Ok(());
        }
        let opt = be32(&hdr[8..12]);
        let len = u64::from(be32(&hdr[12..16]));
        if len > 64 << 10 || io::copy(&mut r.take(len), &mut io::sink())? != len {
            return Ok(());
        }
        match opt {
            OPT_EXPORT_NAME => return Ok(()),
            OPT_ABORT => {
                w.write_all(&option_reply(opt, REP_ACK, &[]))?;
                return w.flush();
            }
            _ => {
                w.write_all(&option_reply(opt, REP_ERR_SHUTDOWN, msg.as_bytes()))?;
                w.flush()?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The refusal dialogue byte for byte (the mutation-testing pass found it only checked
    //! through a real client's error message).
    use super::*;
    use std::io::Cursor;

    const MSG: &str = "too many connections";

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// Runs `refuse` on the client flags then `options`; what the client received after the
    /// greeting.
    fn run(options: &[Vec<u8>]) -> Vec<u8> {
        let mut input = 0u32.to_be_bytes().to_vec();
        for o in options {
            input.extend_from_slice(o);
        }
        let mut out = Vec::new();
        // Running out of input is an error (the client went away); the replies are what count.
        let _ = refuse(&mut Cursor::new(input), &mut out, MSG);
        let mut greeting = Vec::new();
        write_greeting(&mut greeting).unwrap();
        assert!(out.starts_with(&greeting), "no greeting first");
        out.split_off(greeting.len())
    }

    fn shutdown(opt: u32) -> Vec<u8> {
        option_reply(opt, REP_ERR_SHUTDOWN, MSG.as_bytes())
    }

    #[test]
    fn options_get_the_shutdown_error_and_abort_an_ack() {
        let out = run(&[
            option(OPT_LIST, &[]),
            option(OPT_GO, b"\0\0\0\x04disk\0\0"),
            option(OPT_ABORT, &[]),
            option(OPT_LIST, &[]),
        ]);
        let mut want = shutdown(OPT_LIST);
        want.extend(shutdown(OPT_GO));
        want.extend(option_reply(OPT_ABORT, REP_ACK, &[]));
        assert_eq!(out, want);
    }

    #[test]
    fn export_name_or_a_bad_magic_ends_the_dialogue_without_a_reply() {
        assert!(run(&[option(OPT_EXPORT_NAME, b"disk"), option(OPT_LIST, &[])]).is_empty());
        let mut bad = option(OPT_LIST, &[]);
        bad[0] ^= 1;
        assert!(run(&[bad, option(OPT_LIST, &[])]).is_empty());
    }

    /// Option data up to 64 KiB is skipped and answered; longer or truncated data ends it.
    #[test]
    fn option_data_is_bounded() {
        let max = vec![0u8; 64 << 10];
        assert_eq!(run(&[option(OPT_INFO, &max)]), shutdown(OPT_INFO));
        let over = vec![0u8; (64 << 10) + 1];
        assert!(run(&[option(OPT_INFO, &over), option(OPT_LIST, &[])]).is_empty());
        let mut short = option(OPT_INFO, &[0u8; 10]);
        short.truncate(short.len() - 1);
        assert!(run(&[short]).is_empty());
    }
}
