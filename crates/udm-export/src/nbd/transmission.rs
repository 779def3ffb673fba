//! The transmission phase of one connection.
//!
//! The thread that reads a request executes it itself (no hand-off, no context switch), and only
//! one thread reads at a time (`reader`, taken with `try_lock`). When the executing thread has
//! been busy for a while with nobody reading, the watchdog starts another thread that takes over
//! reading, up to `MAX_WORKERS` per connection, so a slow or suspended device stalls only the
//! requests sent to it. A thread that finishes and finds someone else reading exits.

use super::connection::{
    Conn, Job, Next, Wr, CHUNK, DEVICE_WAIT_SPAN, HEAVY_BYTES, IDLE_TRIM_TICKS, MAX_SKIP_PAYLOAD,
    MAX_WORKERS, STALL_NS, STANDBY_IDLE,
};
use super::ctl::ConnCtl;
use super::proto::*;
use super::session::{Session, MAX_BLOCK};
use super::validate::{validate, Refusal};
use super::watchdog::{Tick, Watchdog};
use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Serves the transmission phase of a connection that finished its handshake, until it ends.
pub(super) fn transmission(
    sess: Session,
    r: BufReader<Box<dyn Read + Send>>,
    w: Box<dyn Write + Send>,
    ctl: &Arc<ConnCtl>,
    clock: &Arc<Watchdog>,
) {
    if !ctl.enter_transmission() {
        return;
    }
    let c = Conn::new(sess, r, w, ctl, clock);
    let ticked: Weak<Conn> = Arc::downgrade(&c);
    clock.register(ticked);
    c.serve();
    let mut t = c.threads.lock();
    while t.live > 0 {
        c.standby_cv.notify_all();
        c.threads_cv.wait_for(&mut t, Duration::from_millis(100));
    }
    drop(t);
    c.flush_pending();
    let _ = c.writer.lock().w.flush();
    c.trim_pool();
}

impl Conn {
    /// Reads and executes requests until the connection closes; while another thread reads,
    /// waits on standby.
    fn serve(self: &Arc<Self>) {
        loop {
            if self.flush_asked.load(Ordering::Relaxed)
                && self.flush_asked.swap(false, Ordering::SeqCst)
            {
                self.flush_pending();
            }
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
            let light = job.req.length < HEAVY_BYTES && job.req.cmd != CMD_FLUSH;
            // Light requests run on this thread, unless the device recently made one wait (a
            // commit, a page-cache miss: udm_io::thread::note_device_wait): then they are handed
            // off too, so the device gets the client's queue depth.
            let inline = light && self.device_waits.load(Ordering::Relaxed) == 0;
            if !inline {
                self.add_reader();
            }
            self.execute(job, more && inline);
            // Taken after every request, so a heavy one's wait does not linger for a later one.
            let waited = udm_io::thread::took_device_wait();
            if light {
                if waited {
                    self.device_waits.store(DEVICE_WAIT_SPAN, Ordering::Relaxed);
                } else {
                    let _ =
                        self.device_waits
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            });
                }
            }
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

    /// Called by the watchdog (must not block): adds a reader when the connection looks
    /// stalled, gets deferred replies that have waited too long sent by a thread of this
    /// connection, and frees the buffer pool of an idle connection.
    fn on_tick(self: &Arc<Self>, now: u64) {
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
        let aged = self.writer.try_lock().is_some_and(|w| {
            !w.pending.is_empty() && now.saturating_sub(w.pending_since) >= STALL_NS
        });
        if aged && !self.flush_asked.swap(true, Ordering::SeqCst) {
            self.add_reader();
        }
        let n = self.ctl.requests.load(Ordering::Relaxed);
        if self.idle_seen.swap(n, Ordering::Relaxed) != n {
            self.idle_ticks.store(0, Ordering::Relaxed);
        } else if self.idle_ticks.fetch_add(1, Ordering::Relaxed) == IDLE_TRIM_TICKS {
            self.trim_pool();
        }
    }

    pub(super) fn flush_pending(&self) {
        let mut w = self.writer.lock();
        if !w.pending.is_empty() {
            self.write_pending(&mut w);
        }
    }

    /// Sends the batched replies (keeping the buffer for reuse); a failed write marks the
    /// connection broken and stops reading.
    fn write_pending(&self, wr: &mut Wr) {
        let pend = std::mem::take(&mut wr.pending);
        self.write_out(wr, &[&pend]);
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
        self.ctl.requests.fetch_add(1, Ordering::Relaxed);
        let mut payload = Vec::new();
        let mut charge = 0;
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
            charge = u64::from(req.length);
            if !self.acquire(charge) {
                return Next::End;
            }
            match self.read_payload(r, req.length as usize) {
                Ok(p) => payload = p,
                Err(_) => {
                    self.release(charge);
                    return Next::End;
                }
            }
        }
        self.count(&req);
        let more = r.buffer().len() >= REQUEST_LEN;
        let refuse = if self.ctl.stopping.load(Ordering::SeqCst) {
            Err(Refusal::Stopping)
        } else {
            validate(&self.sess.rules(), &req)
        };
        if let Err(why) = refuse {
            self.put_buf(payload);
            self.release(charge);
            self.reply_err(&req, why.code(), why.message(), more);
            return Next::Handled;
        }
        // Reads (and chunked cache / emulated zeroing) hold buffers while they run.
        let cost = match req.cmd {
            CMD_READ => u64::from(req.length),
            CMD_CACHE | CMD_WRITE_ZEROES => u64::from(req.length).min(CHUNK as u64),
            _ => 0,
        };
        if cost > 0 {
            charge = cost;
            if !self.acquire(charge) {
                return Next::End;
            }
        }
        self.ctl.busy.fetch_add(1, Ordering::SeqCst);
        Next::Job(Job {
            req,
            payload,
            charge,
        })
    }

    /// True once the connection is ending (client gone, write failed, export removed).
    pub(super) fn ending(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
            || self.closing.load(Ordering::SeqCst)
            || self.ctl.stopping.load(Ordering::SeqCst)
    }
    fn count(&self, req: &Request) {
        let c = &self.sess.export.counters;
        match c.by_cmd.get(req.cmd as usize) {
            Some(a) => a.fetch_add(1, Ordering::Relaxed),
            None => c.unknown.fetch_add(1, Ordering::Relaxed),
        };
    }
}

impl Tick for Conn {
    fn tick(self: Arc<Self>, now: u64) {
        self.on_tick(now);
    }
}
