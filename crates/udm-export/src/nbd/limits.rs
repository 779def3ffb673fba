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
