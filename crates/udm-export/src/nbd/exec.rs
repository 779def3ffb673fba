//! Executing requests on the device and writing their replies.

use super::connection::{Conn, Job, Wr, CHUNK, MAX_PENDING};
use super::meta;
use super::proto::*;
use std::io::{self, IoSlice, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use udm_io::{Bio, BioFlags, BioKind, BlockDevice, ExtentKind, IoError, LentBuf};
use udm_types::errno::HasErrno;
use udm_types::{Errno, SECTOR_SIZE};

/// Most bytes handed to one write call, so that a stalled client is seen as a write that
/// makes no progress (the send timeout) rather than one long call.
const WRITE_SLICE: usize = 4 << 20;

impl Conn {
    /// Runs a request and answers it, then gives back its in-flight budget (also when the
    /// connection is gone by then: the reply is dropped, the buffers freed).
    pub(super) fn execute(&self, job: Job, defer: bool) {
        let charge = job.charge;
        self.run_request(job, defer);
        self.release(charge);
        self.ctl.busy.fetch_sub(1, Ordering::SeqCst);
    }

    fn run_request(&self, job: Job, defer: bool) {
        let Job { req, payload, .. } = job;
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
            CMD_READ if self.sparse_read(&req) => self.read_sparse(dev, &req, sector, defer),
            CMD_READ => self.read_data(dev, &req, sector, defer),
            CMD_WRITE => {
                // Lent, so a device that holds the write (a snapshot origin's write-back)
                // keeps this buffer rather than a copy of it.
                let payload: LentBuf = Arc::new(payload);
                let r = self.rw(dev, sector, RwBuf::Write(&payload, Some(&payload)), fua);
                self.put_lent(payload);
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
        udm_io::write_zeroes_fallback(sector, sectors, |at, zeroes| {
            self.rw(dev, at, RwBuf::Write(zeroes, None), fua)
        })
    }

    pub(super) fn rw(
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
            RwBuf::Write(b, lent) => {
                let mut sec = sector;
                for ch in b.chunks(max) {
                    let n = ch.len() as u64 / SECTOR_SIZE;
                    let mut bio = Bio::write(sec, ch).with_flags(flags);
                    bio.lent = lent;
                    dev.submit(bio)?;
                    sec += n;
                }
            }
        }
        Ok(())
    }

    /// One block-status chunk per selected context (base:allocation first, then the dirty
    /// bitmaps in id order), sent as one write; the last chunk carries the DONE flag.
    fn block_status(&self, dev: &dyn BlockDevice, req: &Request, defer: bool) {
        let s = &self.sess;
        let min = u64::from(s.min_block);
        let len = (u64::from(req.length).div_ceil(min) * min).min(s.size - req.offset);
        let max_desc = u64::from(u32::MAX) / min * min;
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let mut chunks: Vec<(u32, Vec<(u32, u32)>)> = Vec::new();
        if s.meta.base {
            match self.allocation(dev, req, len, max_desc) {
                Ok(d) => chunks.push((meta::ID_BASE, d)),
                Err(e) => return self.reply_io_err(req, &e, defer),
            }
        }
        for &i in &s.meta.bitmaps {
            if let Some(b) = s.export.opts.bitmaps.get(i) {
                let d = meta::bitmap_descs(b, req.offset, len, max_desc, one);
                chunks.push((meta::bitmap_id(i), d));
            }
        }
        let mut out = Vec::new();
        let last = chunks.len().saturating_sub(1);
        for (n, (id, descs)) in chunks.iter().enumerate() {
            let plen = 4 + descs.len() * 8;
            let flags = if n == last { REPLY_FLAG_DONE } else { 0 };
            out.extend_from_slice(&structured_header(
                flags,
                REPLY_TYPE_BLOCK_STATUS,
                req.handle,
                plen as u32,
            ));
            out.extend_from_slice(&id.to_be_bytes());
            for (l, f) in descs {
                out.extend_from_slice(&l.to_be_bytes());
                out.extend_from_slice(&f.to_be_bytes());
            }
        }
        self.send(&[&out], defer);
    }

    /// `base:allocation` descriptors for `len` bytes at the request's offset.
    fn allocation(
        &self,
        dev: &dyn BlockDevice,
        req: &Request,
        len: u64,
        max_desc: u64,
    ) -> Result<Vec<(u32, u32)>, IoError> {
        let min = u64::from(self.sess.min_block);
        let exts = dev.block_status(req.offset / SECTOR_SIZE, len.div_ceil(SECTOR_SIZE))?;
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
            descs.push((bytes, flags));
        }
        let mut out = meta::round_descs(&descs, min, max_desc);
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
        Ok(out)
    }

    pub(super) fn reply_read(&self, req: &Request, data: &[u8], defer: bool) {
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

    pub(super) fn reply_io_err(&self, req: &Request, e: &IoError, defer: bool) {
        let mut code = e.errno().to_nbd();
        let fast_zero = req.cmd == CMD_WRITE_ZEROES && req.flags & CMD_FLAG_FAST_ZERO != 0;
        if (code == NBD_ENOTSUP && !fast_zero) || code == NBD_EOVERFLOW {
            code = NBD_EIO;
        }
        tracing::debug!(error = %e, cmd = cmd_name(req.cmd), "NBD request failed");
        self.reply_err(req, code, &e.to_string(), defer);
    }

    pub(super) fn reply_err(&self, req: &Request, code: u32, msg: &str, defer: bool) {
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
    pub(super) fn send(&self, parts: &[&[u8]], defer: bool) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let size: usize = parts.iter().map(|p| p.len()).sum();
        let mut w = self.writer.lock();
        let wr = &mut *w;
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
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
        let mut all: [&[u8]; 4] = [&pend, &[], &[], &[]];
        debug_assert!(parts.len() <= 3, "a reply has at most three parts");
        let n = parts.len().min(3);
        all[1..=n].copy_from_slice(&parts[..n]);
        self.write_out(wr, &all[..=n]);
        wr.pending = pend;
        wr.pending.clear();
    }

    /// Writes `parts` whole and flushes; while a write call is in progress `write_since` tells
    /// the reaper when it started (the send timeout). A failure marks the connection broken.
    pub(super) fn write_out(&self, wr: &mut Wr, parts: &[&[u8]]) {
        let since = &self.ctl.write_since;
        let res = write_all_vectored(&mut *wr.w, parts, &mut || {
            since.store(self.clock.now(), Ordering::Relaxed)
        })
        .and_then(|_| wr.w.flush());
        since.store(0, Ordering::Relaxed);
        if let Err(e) = res {
            tracing::debug!(error = %e, "NBD reply write failed; closing connection");
            self.broken.store(true, Ordering::SeqCst);
            self.ctl.stream.stop_reading();
        }
    }
}

pub(super) enum RwBuf<'a> {
    Read(&'a mut [u8]),
    /// The data, and the buffer it lies in if devices may keep it ([`Bio::lend`]).
    Write(&'a [u8], Option<&'a LentBuf>),
}

/// Writes all of `parts` with as few calls as possible, each at most `WRITE_SLICE` bytes;
/// `before` runs before every call.
fn write_all_vectored(
    w: &mut dyn Write,
    parts: &[&[u8]],
    before: &mut dyn FnMut(),
) -> io::Result<()> {
    let mut store = [IoSlice::new(&[]); 4];
    let mut n = 0;
    for p in parts.iter().filter(|p| !p.is_empty()) {
        if n == store.len() {
            return Err(io::Error::other("too many reply parts"));
        }
        store[n] = IoSlice::new(p);
        n += 1;
    }
    let mut bufs: &mut [IoSlice<'_>] = &mut store[..n];
    while !bufs.is_empty() {
        before();
        let r = {
            let mut call = [IoSlice::new(&[]); 4];
            let (mut total, mut k) = (0, 0);
            for b in bufs.iter() {
                if total == WRITE_SLICE {
                    break;
                }
                let take = b.len().min(WRITE_SLICE - total);
                call[k] = IoSlice::new(&b[..take]);
                total += take;
                k += 1;
            }
            w.write_vectored(&call[..k])
        };
        match r {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most `most` bytes a call, fails the first call with EINTR, records call sizes.
    struct Trickle {
        out: Vec<u8>,
        calls: Vec<usize>,
        most: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let offered: usize = bufs.iter().map(|b| b.len()).sum();
            self.calls.push(offered);
            if self.calls.len() == 1 {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            let mut left = self.most;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
            }
            Ok(self.most - left)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn replies_go_out_whole_in_order_and_in_bounded_calls() {
        let head = [1u8; 16];
        let body: Vec<u8> = (0..(9 << 20) as u32).map(|i| (i % 251) as u8).collect();
        let tail = [2u8; 5];
        let mut w = Trickle {
            out: Vec::new(),
            calls: Vec::new(),
            most: 3 << 20,
        };
        let mut befores = 0;
        write_all_vectored(&mut w, &[&head, &[], &body, &tail], &mut || befores += 1).unwrap();
        let mut want = head.to_vec();
        want.extend_from_slice(&body);
        want.extend_from_slice(&tail);
        assert!(w.out == want, "bytes lost, repeated or out of order");
        assert!(w.calls.iter().all(|&c| c <= WRITE_SLICE), "{:?}", w.calls);
        assert_eq!(
            w.calls[0], WRITE_SLICE,
            "the first call offers a whole slice"
        );
        assert_eq!(befores, w.calls.len(), "before() runs before every call");
    }
}
