//! The state of one connection in transmission, shared by its threads, the watchdog and the
//! request executor: the reader and writer halves, the threads serving it, its buffer pool
//! and in-flight budget. The code that uses it is in `transmission.rs` (reading, threads),
//! `exec.rs` (requests and replies) and `buffers.rs` (payload memory).

use super::ctl::ConnCtl;
use super::proto::Request;
use super::session::Session;
use super::watchdog::Watchdog;
use parking_lot::{Condvar, Mutex};
use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

/// A write payload above the maximum is skipped (and answered with EINVAL) up to this size;
/// beyond it the connection is dropped, as the spec allows.
pub(super) const MAX_SKIP_PAYLOAD: u32 = 64 << 20;
/// Threads per connection (a second one starts only when the first stalls).
pub(super) const MAX_WORKERS: usize = 32;
/// Chunk used for emulated write-zeroes and cache reads, and for receiving write payloads.
pub(super) const CHUNK: usize = 1 << 20;

pub(super) struct Job {
    pub(super) req: Request,
    pub(super) payload: Vec<u8>,
    /// Bytes of the connection's in-flight budget this request holds until it is answered.
    pub(super) charge: u64,
}

pub(super) struct Wr {
    pub(super) w: Box<dyn Write + Send>,
    /// Replies held back while more requests were already buffered (sent with the next write).
    pub(super) pending: Vec<u8>,
    pub(super) pending_since: u64,
}

pub(crate) struct Conn {
    pub(super) sess: Session,
    pub(super) reader: Mutex<BufReader<Box<dyn Read + Send>>>,
    pub(super) writer: Mutex<Wr>,
    pub(super) broken: AtomicBool,
    pub(super) closing: AtomicBool,
    pub(super) ctl: Arc<ConnCtl>,
    pub(super) threads: Mutex<Threads>,
    pub(super) threads_cv: Condvar,
    pub(super) standby_cv: Condvar,
    /// When the reader was released to execute a request (watchdog clock), 0 while reading.
    pub(super) released_at: AtomicU64,
    /// Light requests still to hand off since one waited for the device (see
    /// [`DEVICE_WAIT_SPAN`]).
    pub(super) device_waits: AtomicU64,
    /// Set by the watchdog when deferred replies waited too long: the next thread of this
    /// connection to get there sends them (the watchdog never writes to a socket).
    pub(super) flush_asked: AtomicBool,
    /// Watchdog-only state: `ctl.requests` at the last tick and ticks since it changed (the
    /// pool of a connection where it stands still is freed).
    pub(super) idle_seen: AtomicU64,
    pub(super) idle_ticks: AtomicU32,
    pub(super) pool: Mutex<Pool>,
    /// The reader waits here for the in-flight budget (see `buffers.rs`).
    pub(super) budget_mx: Mutex<()>,
    pub(super) budget_cv: Condvar,
    pub(super) budget_waiting: AtomicBool,
    pub(super) clock: Arc<Watchdog>,
}

/// Largest batch of deferred replies.
pub(super) const MAX_PENDING: usize = 64 << 10;
/// A connection whose only reader has been executing this long gets another thread.
pub(super) const STALL_NS: u64 = 2_000_000;
/// The buffer pool of a connection that read no request for this many ticks (1 s) is freed.
pub(super) const IDLE_TRIM_TICKS: u32 = 500;

#[derive(Default)]
pub(super) struct Threads {
    /// Threads serving the connection (reading, executing or on standby).
    pub(super) live: usize,
    /// Threads parked on standby, ready to take over reading.
    pub(super) standby: usize,
    /// Standby wake-ups not yet taken.
    pub(super) wakeups: usize,
}

/// Requests at least this large are executed while another thread reads on: copying them
/// costs far more than the hand-off.
pub(super) const HEAVY_BYTES: u32 = 64 << 10;
/// After a light request waited for the device (a metadata commit, a read that missed the page
/// cache: `udm_io::thread::note_device_wait`), this many light requests are handed off like
/// heavy ones (each further wait starts the count again). A device that makes each first write
/// wait for a commit (era) then sees the client's queue depth and batches its commits, and a
/// file whose data is not cached gets the client's reads in parallel instead of one at a time
/// (4k random reads of an uncached file ran at a third of nbdkit's); light requests that only
/// compete for CPU or a lock (a page-cache hit) stay on the reading thread, where handing them
/// off measured 30% slower.
pub(super) const DEVICE_WAIT_SPAN: u64 = 64;
/// A standby thread with nothing to do for this long exits.
pub(super) const STANDBY_IDLE: Duration = Duration::from_secs(5);

pub(super) enum Next {
    Job(Job),
    Handled,
    End,
}

/// Free buffers of one connection.
#[derive(Default)]
pub(super) struct Pool {
    pub(super) bufs: Vec<Vec<u8>>,
    /// Sum of the capacities in `bufs`.
    pub(super) bytes: usize,
}

impl Conn {
    /// The state of a connection entering transmission, with one thread (the caller).
    pub(super) fn new(
        sess: Session,
        r: BufReader<Box<dyn Read + Send>>,
        w: Box<dyn Write + Send>,
        ctl: &Arc<ConnCtl>,
        clock: &Arc<Watchdog>,
    ) -> Arc<Conn> {
        Arc::new(Conn {
            sess,
            reader: Mutex::new(r),
            writer: Mutex::new(Wr {
                w,
                pending: Vec::new(),
                pending_since: 0,
            }),
            broken: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            ctl: ctl.clone(),
            threads: Mutex::new(Threads {
                live: 1,
                ..Threads::default()
            }),
            threads_cv: Condvar::new(),
            standby_cv: Condvar::new(),
            released_at: AtomicU64::new(0),
            device_waits: AtomicU64::new(0),
            flush_asked: AtomicBool::new(false),
            idle_seen: AtomicU64::new(0),
            idle_ticks: AtomicU32::new(0),
            pool: Mutex::new(Pool::default()),
            budget_mx: Mutex::new(()),
            budget_cv: Condvar::new(),
            budget_waiting: AtomicBool::new(false),
            clock: clock.clone(),
        })
    }
}
