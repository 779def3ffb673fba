//! One client connection: the fixed newstyle handshake, then the transmission phase with a
//! reader (this thread) that decodes and validates requests and an elastic pool of workers
//! that execute them on the device and write the replies, in any order.

use super::proto::*;
use super::server::{ConnCtl, Export, NbdServer};
use parking_lot::{Condvar, Mutex};
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use udm_io::{Bio, BioFlags, BioKind, BlockDevice, ExtentKind, IoError};
use udm_types::errno::HasErrno;
use udm_types::{Errno, SECTOR_SIZE};

/// Largest request payload we accept (read and write): 32 MiB, the spec's portable maximum.
pub(crate) const MAX_BLOCK: u32 = 32 << 20;
/// Preferred block size advertised.
const PREFERRED_BLOCK: u32 = 4096;
/// Option data larger than this is treated as a denial of service (hard disconnect).
const MAX_OPTION_LEN: u32 = 64 << 10;
/// A write payload above the maximum is skipped (and answered with EINVAL) up to this size;
/// beyond it the connection is dropped, as the spec allows.
const MAX_SKIP_PAYLOAD: u32 = 64 << 20;
/// Threads per connection (a second one starts only when the first stalls).
const MAX_WORKERS: usize = 32;
/// Chunk used for emulated write-zeroes and cache reads.
const CHUNK: usize = 1 << 20;
/// Buffers kept for reuse per connection.
const POOL_MAX: usize = 16;
/// Larger buffers are returned to the allocator rather than kept.
const POOL_BUF_MAX: usize = 4 << 20;

/// Smallest unit clients may address: the device's logical block size (at least a sector).
fn min_block(dev: &dyn BlockDevice) -> u32 {
    let l = dev.limits().logical_block_size;
    if l.is_power_of_two() && (512..=65536).contains(&l) {
        l
    } else {
        512
    }
}

/// Advertised size: the device size rounded down to the minimum block size.
pub(crate) fn export_size(e: &Export) -> u64 {
    let min = u64::from(min_block(e.dev.as_ref()));
    e.dev.size().saturating_mul(SECTOR_SIZE) / min * min
}

fn transmission_flags(e: &Export, structured: bool) -> u16 {
    let mut f =
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
    if e.read_only() {
        f |= FLAG_READ_ONLY;
    } else {
        if e.dev.limits().discard {
            f |= FLAG_SEND_TRIM;
        }
        f |= FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    f
}

/// What the handshake agreed on.
struct Session {
    export: Arc<Export>,
    structured: bool,
    meta: bool,
    size: u64,
    min_block: u32,
    read_only: bool,
    max_io_bytes: usize,
    discard: bool,
    native_zeroes: bool,
}

enum Hs {
    /// Enter transmission.
    Go(Session),
    /// Connection over (abort, bad input, end of stream).
    End,
}

/// Runs a connection to its end.
pub(crate) fn run(
    server: &Arc<NbdServer>,
    r: Box<dyn Read + Send>,
    w: Box<dyn Write + Send>,
    ctl: &Arc<ConnCtl>,
) {
    let mut r = BufReader::with_capacity(128 << 10, r);
    let mut w = w;
    match handshake(server, &mut r, &mut w, ctl) {
        Ok(Hs::Go(sess)) => {
            let export = sess.export.clone();
            transmission(sess, r, w, ctl, server.watchdog());
            export.detach(ctl.id);
        }
        Ok(Hs::End) => {}
        Err(e) => tracing::debug!(error = %e, "NBD handshake ended"),
    }
}

struct Hand<'a> {
    w: &'a mut Box<dyn Write + Send>,
}

impl Hand<'_> {
    fn reply(&mut self, opt: u32, typ: u32, data: &[u8]) -> io::Result<()> {
        self.w.write_all(&option_reply(opt, typ, data))
    }
    fn err(&mut self, opt: u32, typ: u32, msg: &str) -> io::Result<()> {
        self.reply(opt, typ, truncate_utf8(msg, 4096).as_bytes())
    }
}

fn handshake(
    server: &Arc<NbdServer>,
    r: &mut BufReader<Box<dyn Read + Send>>,
    w: &mut Box<dyn Write + Send>,
    ctl: &Arc<ConnCtl>,
) -> io::Result<Hs> {
    let mut g = Vec::with_capacity(18);
    g.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&g)?;
    w.flush()?;
    let cflags = u32::from_be_bytes(read_array::<4>(r)?);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        tracing::debug!(cflags, "unknown NBD client flags; dropping");
        return Ok(Hs::End);
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // (export name the contexts were selected for, base:allocation selected)
    let mut meta: Option<(String, bool)> = None;
    let mut h = Hand { w };
    loop {
        let hdr = read_array::<OPTION_HEADER_LEN>(r)?;
        if be64(&hdr[0..8]) != IHAVEOPT {
            tracing::debug!("bad NBD option magic; dropping");
            return Ok(Hs::End);
        }
        let opt = be32(&hdr[8..12]);
        let len = be32(&hdr[12..16]);
        if len > MAX_OPTION_LEN {
            tracing::debug!(opt, len, "oversized NBD option; dropping");
            return Ok(Hs::End);
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        if (server.is_shut() || ctl.stopping.load(Ordering::SeqCst)) && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(Hs::End);
            }
            h.err(opt, REP_ERR_SHUTDOWN, "server is shutting down")?;
            continue;
        }
        if ctl.security.tls_required() && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(Hs::End);
            }
            h.err(
                opt,
                REP_ERR_TLS_REQD,
                "TLS required: send NBD_OPT_STARTTLS first",
            )?;
            continue;
        }
        match opt {
            OPT_EXPORT_NAME => {
                let Ok(name) = std::str::from_utf8(&data) else {
                    return Ok(Hs::End);
                };
                let Some(export) = server.lookup(name).filter(|e| ctl.security.shown(e)) else {
                    tracing::debug!(name, "NBD_OPT_EXPORT_NAME for unknown export; dropping");
                    return Ok(Hs::End);
                };
                if !export.attach(ctl) {
                    return Ok(Hs::End);
                }
                let sess = session(export, structured, &meta, name);
                let mut v = Vec::with_capacity(134);
                v.extend_from_slice(&sess.size.to_be_bytes());
                v.extend_from_slice(&transmission_flags(&sess.export, structured).to_be_bytes());
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                if let Err(e) = h.w.write_all(&v).and_then(|_| h.w.flush()) {
                    sess.export.detach(ctl.id);
                    return Err(e);
                }
                return Ok(Hs::Go(sess));
            }
            OPT_ABORT => {
                let _ = h.reply(opt, REP_ACK, &[]);
                let _ = h.w.flush();
                return Ok(Hs::End);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    h.err(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                } else {
                    for e in server.export_list() {
                        if !ctl.security.shown(&e) {
                            continue;
                        }
                        let mut d = Vec::new();
                        d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                        d.extend_from_slice(e.name.as_bytes());
                        if let Some(desc) = &e.opts.description {
                            d.extend_from_slice(truncate_utf8(desc, 4096).as_bytes());
                        }
                        h.reply(opt, REP_SERVER, &d)?;
                    }
                    h.reply(opt, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => {
                let mut c = Cursor::new(&data);
                let parsed = (|| {
                    let name = c.string32()?;
                    let n = c.u16()?;
                    let mut infos = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        infos.push(c.u16()?);
                    }
                    (c.remaining() == 0).then_some((name, infos))
                })();
                let Some((name, infos)) = parsed else {
                    h.err(opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request")?;
                    continue;
                };
                let Some(export) = server.lookup(name).filter(|e| ctl.security.shown(e)) else {
                    let (typ, msg) = ctl.security.not_shown(name);
                    h.err(opt, typ, &msg)?;
                    continue;
                };
                let size = export_size(&export);
                let flags = transmission_flags(&export, structured);
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&size.to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
                let mut replies = vec![d];
                let min = min_block(export.dev.as_ref());
                let pref = PREFERRED_BLOCK
                    .max(min)
                    .max(export.dev.limits().physical_block_size.min(65536))
                    .next_power_of_two();
                let mut d = Vec::with_capacity(14);
                d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                d.extend_from_slice(&min.to_be_bytes());
                d.extend_from_slice(&pref.to_be_bytes());
                d.extend_from_slice(&(MAX_BLOCK / min * min).to_be_bytes());
                replies.push(d);
                if infos.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    replies.push(d);
                }
                if infos.contains(&INFO_DESCRIPTION) {
                    if let Some(desc) = &export.opts.description {
                        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        d.extend_from_slice(truncate_utf8(desc, 4096).as_bytes());
                        replies.push(d);
                    }
                }
                for d in &replies {
                    h.reply(opt, REP_INFO, d)?;
                }
                if opt == OPT_INFO {
                    h.reply(opt, REP_ACK, &[])?;
                    continue;
                }
                if !export.attach(ctl) {
                    h.err(
                        opt,
                        REP_ERR_UNKNOWN,
                        &format!("export {name:?} was removed"),
                    )?;
                    continue;
                }
                let sess = session(export, structured, &meta, name);
                if let Err(e) = h.reply(opt, REP_ACK, &[]).and_then(|_| h.w.flush()) {
                    sess.export.detach(ctl.id);
                    return Err(e);
                }
                return Ok(Hs::Go(sess));
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    h.err(
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else {
                    structured = true;
                    h.reply(opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    meta = None;
                }
                if !structured {
                    h.err(opt, REP_ERR_INVALID, "negotiate structured replies first")?;
                    continue;
                }
                let mut c = Cursor::new(&data);
                let parsed = (|| {
                    let name = c.string32()?;
                    let n = c.u32()?;
                    let mut qs = Vec::new();
                    for _ in 0..n {
                        qs.push(c.string32()?);
                    }
                    (c.remaining() == 0).then_some((name, qs))
                })();
                let Some((name, queries)) = parsed else {
                    h.err(opt, REP_ERR_INVALID, "malformed meta context request")?;
                    continue;
                };
                if !server.lookup(name).is_some_and(|e| ctl.security.shown(&e)) {
                    h.err(opt, REP_ERR_UNKNOWN, &format!("no export named {name:?}"))?;
                    continue;
                }
                let matched = if set {
                    queries.contains(&META_BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| *q == "base:" || *q == META_BASE_ALLOCATION)
                };
                if matched {
                    let mut d = (if set { 1u32 } else { 0 }).to_be_bytes().to_vec();
                    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    h.reply(opt, REP_META_CONTEXT, &d)?;
                }
                h.reply(opt, REP_ACK, &[])?;
                if set {
                    meta = Some((name.to_string(), matched));
                }
            }
            OPT_STARTTLS => {
                if let Some((typ, msg)) = ctl.security.starttls_refusal(!data.is_empty()) {
                    h.err(opt, typ, msg)?;
                } else if !r.buffer().is_empty() {
                    // The client must wait for our reply before its TLS ClientHello.
                    tracing::debug!("NBD client sent data after NBD_OPT_STARTTLS; dropping");
                    return Ok(Hs::End);
                } else {
                    h.reply(opt, REP_ACK, &[])?;
                    h.w.flush()?;
                    let (nr, nw) = ctl.security.upgrade()?;
                    *r = BufReader::with_capacity(128 << 10, nr);
                    *h.w = nw;
                    // Everything negotiated in plain text is forgotten (NBD spec, TLS section).
                    structured = false;
                    meta = None;
                    continue;
                }
            }
            _ => {
                h.err(opt, REP_ERR_UNSUP, "option not supported")?;
            }
        }
        h.w.flush()?;
    }
}

fn session(
    export: Arc<Export>,
    structured: bool,
    meta: &Option<(String, bool)>,
    name: &str,
) -> Session {
    let min = min_block(export.dev.as_ref());
    let limits = export.dev.limits();
    let max_io = if limits.max_io_sectors == 0 {
        usize::MAX
    } else {
        (limits.max_io_sectors.saturating_mul(SECTOR_SIZE)).min(usize::MAX as u64) as usize
    };
    Session {
        size: export_size(&export),
        structured,
        meta: structured && matches!(meta, Some((n, true)) if n == name),
        min_block: min,
        read_only: export.read_only(),
        max_io_bytes: max_io.max(min as usize),
        discard: limits.discard,
        native_zeroes: limits.write_zeroes,
        export,
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission
//
// The thread that reads a request executes it itself (no hand-off, no context switch), and only
// one thread reads at a time (`reader`, taken with `try_lock`). When the executing thread has
// been busy for a while with nobody reading, the watchdog starts another thread that takes over
// reading, up to `MAX_WORKERS` per connection, so a slow or suspended device stalls only the
// requests sent to it. A thread that finishes and finds someone else reading exits.

struct Job {
    req: Request,
    payload: Vec<u8>,
}

struct Wr {
    w: Box<dyn Write + Send>,
    /// Replies held back while more requests were already buffered (sent with the next write).
    pending: Vec<u8>,
    pending_since: u64,
}

pub(crate) struct Conn {
    sess: Session,
    reader: Mutex<BufReader<Box<dyn Read + Send>>>,
    writer: Mutex<Wr>,
    broken: AtomicBool,
    closing: AtomicBool,
    ctl: Arc<ConnCtl>,
    threads: Mutex<Threads>,
    threads_cv: Condvar,
    standby_cv: Condvar,
    /// When the reader was released to execute a request (watchdog clock), 0 while reading.
    released_at: AtomicU64,
    pool: Mutex<Vec<Vec<u8>>>,
    clock: Arc<Watchdog>,
}

/// Largest batch of deferred replies.
const MAX_PENDING: usize = 64 << 10;
/// A connection whose only reader has been executing this long gets another thread.
const STALL_NS: u64 = 2_000_000;
/// Watchdog period.
const TICK: Duration = Duration::from_millis(2);

/// One thread per server: starts readers for stalled connections and flushes deferred replies
/// that waited too long.
pub(crate) struct Watchdog {
    epoch: Instant,
    conns: Mutex<Vec<Weak<Conn>>>,
    cv: Condvar,
    running: AtomicBool,
    stop: AtomicBool,
}

impl Watchdog {
    pub(crate) fn new() -> Arc<Watchdog> {
        Arc::new(Watchdog {
            epoch: Instant::now(),
            conns: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            running: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    fn register(self: &Arc<Self>, c: &Arc<Conn>) {
        self.conns.lock().push(Arc::downgrade(c));
        self.cv.notify_all();
        if !self.running.swap(true, Ordering::SeqCst) {
            let me = self.clone();
            if std::thread::Builder::new()
                .name("nbd-watchdog".into())
                .spawn(move || me.run())
                .is_err()
            {
                self.running.store(false, Ordering::SeqCst);
            }
        }
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }

    fn run(self: Arc<Self>) {
        loop {
            let live: Vec<Arc<Conn>> = {
                let mut g = self.conns.lock();
                g.retain(|w| w.strong_count() > 0);
                while g.is_empty() && !self.stop.load(Ordering::SeqCst) {
                    self.cv.wait(&mut g);
                    g.retain(|w| w.strong_count() > 0);
                }
                if self.stop.load(Ordering::SeqCst) {
                    self.running.store(false, Ordering::SeqCst);
                    return;
                }
                g.iter().filter_map(|w| w.upgrade()).collect()
            };
            let now = self.now();
            for c in &live {
                c.tick(now);
            }
            drop(live);
            std::thread::sleep(TICK);
        }
    }
}

#[derive(Default)]
struct Threads {
    /// Threads serving the connection (reading, executing or on standby).
    live: usize,
    /// Threads parked on standby, ready to take over reading.
    standby: usize,
    /// Standby wake-ups not yet taken.
    wakeups: usize,
}

/// Requests at least this large are executed while another thread reads on: copying them
/// costs far more than the hand-off.
const HEAVY_BYTES: u32 = 64 << 10;
/// A standby thread with nothing to do for this long exits.
const STANDBY_IDLE: Duration = Duration::from_secs(5);

enum Next {
    Job(Job),
    Handled,
    End,
}

fn transmission(
    sess: Session,
    r: BufReader<Box<dyn Read + Send>>,
    w: Box<dyn Write + Send>,
    ctl: &Arc<ConnCtl>,
    clock: &Arc<Watchdog>,
) {
    let c = Arc::new(Conn {
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
        pool: Mutex::new(Vec::new()),
        clock: clock.clone(),
    });
    clock.register(&c);
    c.serve();
    let mut t = c.threads.lock();
    while t.live > 0 {
        c.standby_cv.notify_all();
        c.threads_cv.wait_for(&mut t, Duration::from_millis(100));
    }
    drop(t);
    c.flush_pending();
    let _ = c.writer.lock().w.flush();
}

impl Conn {
    /// Reads and executes requests until the connection closes; while another thread reads,
    /// waits on standby.
    fn serve(self: &Arc<Self>) {
        loop {
            let Some(mut rg) = self.reader.try_lock() else {
                if self.closing.load(Ordering::SeqCst) || !self.standby() {
                    break;
                }
                continue;
            };
            self.released_at.store(0, Ordering::SeqCst);
            if self.closing.load(Ordering::SeqCst) {
                break;
            }
            let job = loop {
                let more = rg.buffer().len() >= REQUEST_LEN;
                if !more {
                    self.flush_pending();
                }
                match self.read_one(&mut rg, more) {
                    Next::Job(j) => break Some(j),
                    Next::Handled => continue,
                    Next::End => break None,
                }
            };
            let Some(job) = job else {
                self.closing.store(true, Ordering::SeqCst);
                drop(rg);
                self.standby_cv.notify_all();
                break;
            };
            let more = rg.buffer().len() >= REQUEST_LEN;
            self.released_at.store(self.clock.now(), Ordering::SeqCst);
            drop(rg);
            let heavy = job.req.length >= HEAVY_BYTES || job.req.cmd == CMD_FLUSH;
            if heavy {
                self.add_reader();
            }
            self.execute(job, more && !heavy);
        }
        let mut t = self.threads.lock();
        t.live -= 1;
        self.threads_cv.notify_all();
    }

    /// Parks until asked to read (true) or idle for too long (false).
    fn standby(&self) -> bool {
        let mut t = self.threads.lock();
        t.standby += 1;
        let mut woken = false;
        while !self.closing.load(Ordering::SeqCst) {
            if t.wakeups > 0 {
                t.wakeups -= 1;
                woken = true;
                break;
            }
            if self.standby_cv.wait_for(&mut t, STANDBY_IDLE).timed_out() {
                break;
            }
        }
        t.standby -= 1;
        woken && !self.closing.load(Ordering::SeqCst)
    }

    /// Gets another thread reading: a standby one, else a new one (up to the limit).
    fn add_reader(self: &Arc<Self>) {
        let mut t = self.threads.lock();
        if t.standby > t.wakeups {
            t.wakeups += 1;
            self.standby_cv.notify_one();
            return;
        }
        if t.live < MAX_WORKERS {
            let me = self.clone();
            if std::thread::Builder::new()
                .name("nbd-conn".into())
                .spawn(move || me.serve())
                .is_ok()
            {
                t.live += 1;
            }
        }
    }

    /// Called by the watchdog: adds a reader when the connection looks stalled, and sends
    /// deferred replies that have waited too long.
    fn tick(self: &Arc<Self>, now: u64) {
        let rel = self.released_at.load(Ordering::SeqCst);
        if rel != 0
            && now.saturating_sub(rel) >= STALL_NS
            && !self.closing.load(Ordering::SeqCst)
            && !self.reader.is_locked()
            && self
                .released_at
                .compare_exchange(rel, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            self.add_reader();
        }
        if let Some(mut w) = self.writer.try_lock() {
            if !w.pending.is_empty() && now.saturating_sub(w.pending_since) >= STALL_NS {
                self.write_pending(&mut w);
            }
        }
    }

    fn flush_pending(&self) {
        let mut w = self.writer.lock();
        if !w.pending.is_empty() {
            self.write_pending(&mut w);
        }
    }

    /// Sends the batched replies (keeping the buffer for reuse); a failed write marks the
    /// connection broken and stops reading.
    fn write_pending(&self, wr: &mut Wr) {
        let pend = std::mem::take(&mut wr.pending);
        if write_all_vectored(&mut *wr.w, &[&pend])
            .and_then(|_| wr.w.flush())
            .is_err()
        {
            self.broken.store(true, Ordering::SeqCst);
            self.ctl.stream.stop_reading();
        }
        wr.pending = pend;
        wr.pending.clear();
    }

    /// Reads one request; answers invalid ones directly.
    fn read_one(&self, r: &mut BufReader<Box<dyn Read + Send>>, more: bool) -> Next {
        if self.broken.load(Ordering::Relaxed) {
            return Next::End;
        }
        let Ok(hdr) = read_array::<REQUEST_LEN>(r) else {
            return Next::End;
        };
        let req = match Request::decode(&hdr) {
            Ok(req) => req,
            Err(e) => {
                tracing::debug!(?e, "bad NBD request magic; dropping connection");
                return Next::End;
            }
        };
        if req.cmd == CMD_DISC {
            return Next::End;
        }
        let mut payload = Vec::new();
        if req.cmd == CMD_WRITE {
            if req.length > MAX_BLOCK {
                if req.length > MAX_SKIP_PAYLOAD {
                    tracing::debug!(len = req.length, "oversized NBD write; dropping connection");
                    return Next::End;
                }
                match io::copy(&mut r.take(u64::from(req.length)), &mut io::sink()) {
                    Ok(n) if n == u64::from(req.length) => {}
                    _ => return Next::End,
                }
                self.count(&req);
                self.reply_err(
                    &req,
                    NBD_EINVAL,
                    "write larger than the maximum block size",
                    more,
                );
                return Next::Handled;
            }
            payload = self.take_buf(req.length as usize);
            if r.read_exact(&mut payload).is_err() {
                return Next::End;
            }
        }
        self.count(&req);
        let more = r.buffer().len() >= REQUEST_LEN;
        if self.ctl.stopping.load(Ordering::SeqCst) {
            self.put_buf(payload);
            self.reply_err(&req, NBD_ESHUTDOWN, "export is being removed", more);
            return Next::Handled;
        }
        if let Err((err, msg)) = self.validate(&req) {
            self.put_buf(payload);
            self.reply_err(&req, err, msg, more);
            return Next::Handled;
        }
        Next::Job(Job { req, payload })
    }
    fn count(&self, req: &Request) {
        let c = &self.sess.export.counters;
        match c.by_cmd.get(req.cmd as usize) {
            Some(a) => a.fetch_add(1, Ordering::Relaxed),
            None => c.unknown.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn take_buf(&self, len: usize) -> Vec<u8> {
        let mut b = {
            let mut p = self.pool.lock();
            match p.iter().position(|b| b.capacity() >= len) {
                Some(i) => p.swap_remove(i),
                None => p.pop().unwrap_or_default(),
            }
        };
        if b.len() > len {
            b.truncate(len);
        } else {
            b.resize(len, 0);
        }
        b
    }

    fn put_buf(&self, b: Vec<u8>) {
        if b.capacity() == 0 || b.capacity() > POOL_BUF_MAX {
            return;
        }
        let mut p = self.pool.lock();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    }

    /// Checks a request against the negotiated session; the error is an NBD code.
    fn validate(&self, req: &Request) -> Result<(), (u32, &'static str)> {
        let s = &self.sess;
        let allowed = CMD_FLAG_FUA
            | match req.cmd {
                CMD_READ if s.structured => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
                _ => return Err((NBD_EINVAL, "unknown command")),
            };
        if req.flags & !allowed != 0 {
            return Err((NBD_EINVAL, "command flag not valid for this command"));
        }
        let write_like = matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if write_like && s.read_only {
            return Err((NBD_EPERM, "export is read-only"));
        }
        if req.cmd == CMD_FLUSH {
            if req.offset != 0 || req.length != 0 {
                return Err((NBD_EINVAL, "flush offset and length must be zero"));
            }
            return Ok(());
        }
        if req.cmd == CMD_BLOCK_STATUS && !s.meta {
            return Err((NBD_EINVAL, "no metadata context was negotiated"));
        }
        let min = u64::from(s.min_block);
        if req.offset % min != 0
            || (req.cmd != CMD_BLOCK_STATUS && u64::from(req.length) % min != 0)
        {
            return Err((NBD_EINVAL, "request not aligned to the minimum block size"));
        }
        let capped = matches!(req.cmd, CMD_READ | CMD_WRITE | CMD_CACHE)
            || (req.cmd == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_FAST_ZERO == 0);
        if capped && req.length > MAX_BLOCK {
            return Err((NBD_EINVAL, "request larger than the maximum block size"));
        }
        let end = req.offset.checked_add(u64::from(req.length));
        if end.is_none_or(|e| e > s.size) {
            return Err(if matches!(req.cmd, CMD_WRITE | CMD_WRITE_ZEROES) {
                (NBD_ENOSPC, "request beyond the end of the export")
            } else {
                (NBD_EINVAL, "request beyond the end of the export")
            });
        }
        if req.cmd == CMD_BLOCK_STATUS && req.length == 0 {
            return Err((NBD_EINVAL, "block status of zero length"));
        }
        Ok(())
    }

    fn execute(&self, job: Job, defer: bool) {
        let Job { req, payload } = job;
        let s = &self.sess;
        let dev = s.export.dev.as_ref();
        let sector = req.offset / SECTOR_SIZE;
        let fua = if req.flags & CMD_FLAG_FUA != 0 {
            BioFlags::FUA
        } else {
            BioFlags::empty()
        };
        let c = &s.export.counters;
        match req.cmd {
            CMD_READ => {
                let mut buf = self.take_buf(req.length as usize);
                match self.rw(dev, sector, RwBuf::Read(&mut buf), BioFlags::empty()) {
                    Ok(()) => {
                        c.bytes_read
                            .fetch_add(u64::from(req.length), Ordering::Relaxed);
                        self.reply_read(&req, &buf, defer);
                    }
                    Err(e) => self.reply_io_err(&req, &e, defer),
                }
                self.put_buf(buf);
            }
            CMD_WRITE => {
                let r = self.rw(dev, sector, RwBuf::Write(&payload), fua);
                self.put_buf(payload);
                match r {
                    Ok(()) => {
                        c.bytes_written
                            .fetch_add(u64::from(req.length), Ordering::Relaxed);
                        self.reply_ok(&req, defer);
                    }
                    Err(e) => self.reply_io_err(&req, &e, defer),
                }
            }
            CMD_FLUSH => match dev.submit(Bio::flush()) {
                Ok(()) => self.reply_ok(&req, defer),
                Err(e) => self.reply_io_err(&req, &e, defer),
            },
            CMD_TRIM => {
                let sectors = u64::from(req.length) / SECTOR_SIZE;
                let r = if !s.discard || sectors == 0 {
                    Ok(())
                } else {
                    match dev.submit(Bio::discard(sector, sectors).with_flags(fua)) {
                        Err(e) if e.errno() == Errno::EOPNOTSUPP => Ok(()),
                        r => r,
                    }
                };
                match r {
                    Ok(()) => self.reply_ok(&req, defer),
                    Err(e) => self.reply_io_err(&req, &e, defer),
                }
            }
            CMD_WRITE_ZEROES => match self.write_zeroes(dev, &req, sector, fua) {
                Ok(()) => self.reply_ok(&req, defer),
                Err(e) => self.reply_io_err(&req, &e, defer),
            },
            CMD_CACHE => {
                let mut buf = self.take_buf((req.length as usize).min(CHUNK));
                let mut off = 0u64;
                let mut res = Ok(());
                while off < u64::from(req.length) && res.is_ok() {
                    let n = (u64::from(req.length) - off).min(CHUNK as u64) as usize;
                    res = self.rw(
                        dev,
                        sector + off / SECTOR_SIZE,
                        RwBuf::Read(&mut buf[..n]),
                        BioFlags::empty(),
                    );
                    off += n as u64;
                }
                self.put_buf(buf);
                match res {
                    Ok(()) => self.reply_ok(&req, defer),
                    Err(e) => self.reply_io_err(&req, &e, defer),
                }
            }
            CMD_BLOCK_STATUS => self.block_status(dev, &req, defer),
            _ => self.reply_err(&req, NBD_EINVAL, "unknown command", defer),
        }
    }

    fn write_zeroes(
        &self,
        dev: &dyn BlockDevice,
        req: &Request,
        sector: u64,
        fua: BioFlags,
    ) -> Result<(), IoError> {
        let sectors = u64::from(req.length) / SECTOR_SIZE;
        if sectors == 0 {
            return Ok(());
        }
        let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
        let mut flags = fua;
        if req.flags & CMD_FLAG_NO_HOLE != 0 {
            flags |= BioFlags::NO_UNMAP;
        }
        if fast {
            flags |= BioFlags::FAST_ZERO;
        }
        if self.sess.native_zeroes {
            match dev.submit(Bio::write_zeroes(sector, sectors).with_flags(flags)) {
                Err(e) if e.errno() == Errno::EOPNOTSUPP && !fast => {}
                r => return r,
            }
        } else if fast {
            return Err(IoError::Unsupported {
                op: BioKind::WriteZeroes,
                device: dev.describe(),
            });
        }
        // Emulate with zero buffers.
        let zeroes = vec![0u8; CHUNK.min(req.length as usize)];
        let mut done = 0u64;
        while done < sectors {
            let n = (sectors - done).min(zeroes.len() as u64 / SECTOR_SIZE);
            let buf = &zeroes[..(n * SECTOR_SIZE) as usize];
            self.rw(dev, sector + done, RwBuf::Write(buf), fua)?;
            done += n;
        }
        Ok(())
    }

    fn rw(
        &self,
        dev: &dyn BlockDevice,
        sector: u64,
        buf: RwBuf<'_>,
        flags: BioFlags,
    ) -> Result<(), IoError> {
        let max = self.sess.max_io_bytes;
        match buf {
            RwBuf::Read(b) => {
                let mut sec = sector;
                for ch in b.chunks_mut(max) {
                    let n = ch.len() as u64 / SECTOR_SIZE;
                    dev.submit(Bio::read(sec, ch).with_flags(flags))?;
                    sec += n;
                }
            }
            RwBuf::Write(b) => {
                let mut sec = sector;
                for ch in b.chunks(max) {
                    let n = ch.len() as u64 / SECTOR_SIZE;
                    dev.submit(Bio::write(sec, ch).with_flags(flags))?;
                    sec += n;
                }
            }
        }
        Ok(())
    }

    fn block_status(&self, dev: &dyn BlockDevice, req: &Request, defer: bool) {
        let s = &self.sess;
        let min = u64::from(s.min_block);
        let len = (u64::from(req.length).div_ceil(min) * min).min(s.size - req.offset);
        let sector = req.offset / SECTOR_SIZE;
        let exts = match dev.block_status(sector, len.div_ceil(SECTOR_SIZE)) {
            Ok(x) => x,
            Err(e) => return self.reply_io_err(req, &e, defer),
        };
        let max_desc = u64::from(u32::MAX) / min * min;
        let mut descs: Vec<(u64, u32)> = Vec::new();
        let mut total = 0u64;
        for e in exts {
            if e.sectors == 0 || total >= len {
                continue;
            }
            let flags = match e.kind {
                ExtentKind::Data => 0,
                ExtentKind::Hole => STATE_HOLE,
                ExtentKind::Zero => STATE_ZERO,
                ExtentKind::HoleZero => STATE_HOLE | STATE_ZERO,
            };
            let bytes = (e.sectors.saturating_mul(SECTOR_SIZE)).min(len - total);
            total += bytes;
            match descs.last_mut() {
                Some(last) if last.1 == flags => last.0 += bytes,
                _ => descs.push((bytes, flags)),
            }
        }
        // Round to the minimum block size (a sub-block extent takes the status of its block).
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut carry = 0u64;
        for (bytes, flags) in descs {
            let mut b = bytes + carry;
            carry = b % min;
            b -= carry;
            while b > 0 {
                let n = b.min(max_desc);
                out.push((n as u32, flags));
                b -= n;
            }
        }
        if carry > 0 {
            match out.last_mut() {
                Some(l) if u64::from(l.0) + min <= max_desc => l.0 += min as u32,
                _ => out.push((min as u32, 0)),
            }
        }
        if out.is_empty() {
            out.push((min.min(len.max(min)) as u32, 0));
        }
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            out.truncate(1);
            let cap = (u64::from(req.length) / min * min).max(min);
            if u64::from(out[0].0) > cap {
                out[0].0 = cap as u32;
            }
        }
        let mut payload = Vec::with_capacity(4 + out.len() * 8);
        payload.extend_from_slice(&1u32.to_be_bytes());
        for (l, f) in &out {
            payload.extend_from_slice(&l.to_be_bytes());
            payload.extend_from_slice(&f.to_be_bytes());
        }
        let hdr = structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.handle,
            payload.len() as u32,
        );
        self.send(&[&hdr, &payload], defer);
    }

    fn reply_read(&self, req: &Request, data: &[u8], defer: bool) {
        if self.sess.structured {
            if data.is_empty() {
                let hdr = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.handle, 0);
                self.send(&[&hdr], defer);
                return;
            }
            let hdr = structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.handle,
                (data.len() + 8) as u32,
            );
            let off = req.offset.to_be_bytes();
            self.send(&[&hdr, &off, data], defer);
        } else {
            self.send(&[&simple_reply(0, req.handle), data], defer);
        }
    }

    fn reply_ok(&self, req: &Request, defer: bool) {
        self.send(&[&simple_reply(0, req.handle)], defer);
    }

    fn reply_io_err(&self, req: &Request, e: &IoError, defer: bool) {
        let mut code = e.errno().to_nbd();
        let fast_zero = req.cmd == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_FAST_ZERO != 0;
        if (code == NBD_ENOTSUP && !fast_zero) || code == NBD_EOVERFLOW {
            code = NBD_EIO;
        }
        tracing::debug!(error = %e, cmd = cmd_name(req.cmd), "NBD request failed");
        self.reply_err(req, code, &e.to_string(), defer);
    }

    fn reply_err(&self, req: &Request, code: u32, msg: &str, defer: bool) {
        self.sess
            .export
            .counters
            .errors
            .fetch_add(1, Ordering::Relaxed);
        if self.sess.structured {
            self.send(&[&structured_error(req.handle, code, msg)], defer);
        } else {
            self.send(&[&simple_reply(code, req.handle)], defer);
        }
    }

    /// Writes one whole reply (header and payload with one writev where possible); with `defer`
    /// small replies are batched until the reader runs out of buffered requests.
    fn send(&self, parts: &[&[u8]], defer: bool) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let size: usize = parts.iter().map(|p| p.len()).sum();
        let mut w = self.writer.lock();
        let wr = &mut *w;
        if defer && wr.pending.len() + size <= MAX_PENDING {
            if wr.pending.is_empty() {
                wr.pending_since = self.clock.now();
            }
            for p in parts {
                wr.pending.extend_from_slice(p);
            }
            return;
        }
        let pend = std::mem::take(&mut wr.pending);
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        all.push(&pend);
        all.extend_from_slice(parts);
        if let Err(e) = write_all_vectored(&mut *wr.w, &all).and_then(|_| wr.w.flush()) {
            tracing::debug!(error = %e, "NBD reply write failed; closing connection");
            self.broken.store(true, Ordering::Relaxed);
            self.ctl.stream.stop_reading();
        }
        wr.pending = pend;
        wr.pending.clear();
    }
}

enum RwBuf<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

fn write_all_vectored(w: &mut dyn Write, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut bufs: &mut [IoSlice<'_>] = &mut slices;
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "connection closed",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
