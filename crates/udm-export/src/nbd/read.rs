//! READ replies that are not one buffer: reads larger than a chunk, sent one chunk at a time,
//! and sparse reads, whose holes are sent as `OFFSET_HOLE` chunks instead of zeroes.

use super::connection::{Conn, CHUNK};
use super::exec::RwBuf;
use super::proto::*;
use std::sync::atomic::Ordering;
use udm_io::{BioFlags, BlockDevice, ExtentKind};
use udm_types::SECTOR_SIZE;

/// Structured reads (without `DF`) of at least this many bytes first ask the device where its
/// holes are and send each as an `OFFSET_HOLE` chunk (20 bytes instead of its length in
/// zeroes), as qemu-nbd does. Smaller reads skip the query: on a file it costs two `lseek`
/// calls, noticeable next to a small read and nothing next to a large one.
pub(super) const SPARSE_MIN: usize = 256 << 10;

/// Holes shorter than this inside a read are read and sent as data: a chunk header each for
/// a few sectors would cost more than it saves.
const HOLE_MIN: u64 = 64 << 10;

impl Conn {
    /// Whether `req` (a READ) is answered by [`Conn::read_sparse`].
    pub(super) fn sparse_read(&self, req: &Request) -> bool {
        self.sess.structured && req.flags & CMD_FLAG_DF == 0 && req.length as usize >= SPARSE_MIN
    }

    /// A structured READ sent as the device's data and holes: `OFFSET_HOLE` chunks for ranges
    /// that read as zeroes (block status `Zero` or `HoleZero`; a hole whose contents are
    /// undefined is read), `OFFSET_DATA` chunks of at most `CHUNK` for the rest, the last chunk
    /// `DONE`. A read without holes, or whose block status fails, takes the ordinary path. A
    /// failure after the first chunk is an error chunk, as in [`Conn::read_streamed`].
    pub(super) fn read_sparse(
        &self,
        dev: &dyn BlockDevice,
        req: &Request,
        sector: u64,
        defer: bool,
    ) {
        let sectors = u64::from(req.length) / SECTOR_SIZE;
        let runs = match dev.block_status(sector, sectors) {
            Ok(ext) => runs(&ext, sectors),
            Err(e) => {
                tracing::debug!(error = %e, "block status for a sparse read failed; reading it all");
                vec![(sectors, false)]
            }
        };
        if !runs.iter().any(|&(_, hole)| hole) {
            return self.read_data(dev, req, sector, defer);
        }
        self.send_chunks(dev, req, sector, &runs, defer);
    }

    /// A structured READ as a run of chunks, one per hole (`OFFSET_HOLE`) and one per `CHUNK`
    /// of data (`OFFSET_DATA`), in order, the last one `DONE`; `runs` are `(sectors, hole)`
    /// covering the read. The writer is taken per chunk (other replies may interleave, as the
    /// protocol allows), so a client that asks for many 32 MiB reads and never takes the
    /// replies makes the server hold one chunk per request, not the whole payload. A read
    /// that fails is an error chunk, whether chunks went before it or not.
    fn send_chunks(
        &self,
        dev: &dyn BlockDevice,
        req: &Request,
        sector: u64,
        runs: &[(u64, bool)],
        defer: bool,
    ) {
        let longest = runs.iter().filter(|r| !r.1).map(|r| r.0).max().unwrap_or(0);
        let mut buf = self.take_buf(((longest * SECTOR_SIZE) as usize).min(CHUNK));
        let mut at = 0u64; // sectors from `sector`
        let mut ok = true;
        'runs: for (k, &(len, hole)) in runs.iter().enumerate() {
            let last_run = k + 1 == runs.len();
            if hole {
                let flags = if last_run { REPLY_FLAG_DONE } else { 0 };
                let hdr = structured_header(flags, REPLY_TYPE_OFFSET_HOLE, req.handle, 12);
                let off = (req.offset + at * SECTOR_SIZE).to_be_bytes();
                let size = ((len * SECTOR_SIZE) as u32).to_be_bytes();
                self.send(&[&hdr, &off, &size], defer && last_run);
                at += len;
            } else {
                let end = at + len;
                while at < end {
                    let n = ((end - at) * SECTOR_SIZE).min(CHUNK as u64) as usize;
                    if let Err(e) = self.rw(
                        dev,
                        sector + at,
                        RwBuf::Read(&mut buf[..n]),
                        BioFlags::empty(),
                    ) {
                        self.reply_io_err(req, &e, defer);
                        ok = false;
                        break 'runs;
                    }
                    let last = last_run && at + (n as u64) / SECTOR_SIZE == end;
                    let flags = if last { REPLY_FLAG_DONE } else { 0 };
                    let hdr =
                        structured_header(flags, REPLY_TYPE_OFFSET_DATA, req.handle, n as u32 + 8);
                    let off = (req.offset + at * SECTOR_SIZE).to_be_bytes();
                    self.send(&[&hdr, &off, &buf[..n]], defer && last);
                    at += (n as u64) / SECTOR_SIZE;
                    if self.broken.load(Ordering::Relaxed) {
                        ok = false;
                        break 'runs;
                    }
                }
            }
            if self.broken.load(Ordering::Relaxed) {
                ok = false;
                break;
            }
        }
        if ok {
            self.sess
                .export
                .counters
                .bytes_read
                .fetch_add(u64::from(req.length), Ordering::Relaxed);
        }
        self.put_buf(buf);
    }

    /// A READ answered with its data: one buffer, or [`Conn::read_streamed`] beyond `CHUNK`.
    pub(super) fn read_data(&self, dev: &dyn BlockDevice, req: &Request, sector: u64, defer: bool) {
        if req.length as usize > CHUNK {
            return self.read_streamed(dev, req, sector, defer);
        }
        let mut buf = self.take_buf(req.length as usize);
        match self.rw(dev, sector, RwBuf::Read(&mut buf), BioFlags::empty()) {
            Ok(()) => {
                self.sess
                    .export
                    .counters
                    .bytes_read
                    .fetch_add(u64::from(req.length), Ordering::Relaxed);
                self.reply_read(req, &buf, defer);
            }
            Err(e) => self.reply_io_err(req, &e, defer),
        }
        self.put_buf(buf);
    }

    /// A READ larger than `CHUNK`, read and sent one chunk at a time (see
    /// [`Conn::send_chunks`] for structured replies). A simple reply, or a structured one with
    /// `DF` (do not fragment: one `OFFSET_DATA` chunk), is one header and contiguous data, so
    /// the writer is held until the end, and a failure after the header can only be reported
    /// by disconnecting (as the protocol prescribes). A failure of the first chunk is an
    /// ordinary error reply.
    fn read_streamed(&self, dev: &dyn BlockDevice, req: &Request, sector: u64, defer: bool) {
        if self.sess.structured && req.flags & CMD_FLAG_DF == 0 {
            let sectors = u64::from(req.length) / SECTOR_SIZE;
            return self.send_chunks(dev, req, sector, &[(sectors, false)], defer);
        }
        let total = req.length as usize;
        let mut buf = self.take_buf(CHUNK);
        let mut done = 0usize;
        let read_chunk = |buf: &mut [u8], done: usize| {
            self.rw(
                dev,
                sector + (done as u64) / SECTOR_SIZE,
                RwBuf::Read(buf),
                BioFlags::empty(),
            )
        };
        let n = total.min(CHUNK);
        if let Err(e) = read_chunk(&mut buf[..n], 0) {
            self.reply_io_err(req, &e, defer);
            self.put_buf(buf);
            return;
        }
        let counters = &self.sess.export.counters;
        let mut w = self.writer.lock();
        if !self.broken.load(Ordering::Relaxed) {
            let pend = std::mem::take(&mut w.pending);
            let hdr = if self.sess.structured {
                let mut h = structured_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    req.handle,
                    req.length.saturating_add(8),
                )
                .to_vec();
                h.extend_from_slice(&req.offset.to_be_bytes());
                h
            } else {
                simple_reply(0, req.handle).to_vec()
            };
            self.write_out(&mut w, &[&pend, &hdr, &buf[..n]]);
            w.pending = pend;
            w.pending.clear();
            done = n;
            while done < total && !self.broken.load(Ordering::Relaxed) {
                let n = (total - done).min(CHUNK);
                if let Err(e) = read_chunk(&mut buf[..n], done) {
                    // The header promised the data: the only way to fail is to disconnect.
                    tracing::warn!(error = %e, "NBD read failed after its reply header was sent; disconnecting the client");
                    self.sess
                        .export
                        .counters
                        .errors
                        .fetch_add(1, Ordering::Relaxed);
                    self.broken.store(true, Ordering::SeqCst);
                    self.ctl.stream.close();
                    break;
                }
                self.write_out(&mut w, &[&buf[..n]]);
                done += n;
            }
        }
        drop(w);
        if done == total {
            counters
                .bytes_read
                .fetch_add(total as u64, Ordering::Relaxed);
        }
        self.put_buf(buf);
    }
}

/// The runs of a read of `sectors`: `(sectors, reads as zeroes)`, adjacent runs of one kind
/// merged, holes shorter than [`HOLE_MIN`] counted as data, and whatever the extents do not
/// cover (a short answer) as data.
fn runs(ext: &[udm_io::Extent], sectors: u64) -> Vec<(u64, bool)> {
    let min = HOLE_MIN / SECTOR_SIZE;
    let mut out: Vec<(u64, bool)> = Vec::new();
    let mut push = |len: u64, hole: bool| match out.last_mut() {
        Some(l) if l.1 == hole => l.0 += len,
        _ if len > 0 => out.push((len, hole)),
        _ => {}
    };
    let mut left = sectors;
    for e in ext {
        let len = e.sectors.min(left);
        let zero = matches!(e.kind, ExtentKind::Zero | ExtentKind::HoleZero);
        push(len, zero && len >= min);
        left -= len;
    }
    push(left, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use udm_io::Extent;

    fn ext(v: &[(u64, ExtentKind)]) -> Vec<Extent> {
        v.iter()
            .map(|&(sectors, kind)| Extent { sectors, kind })
            .collect()
    }

    #[test]
    fn runs_merge_short_holes_into_data_and_cover_the_whole_read() {
        use ExtentKind::*;
        let big = HOLE_MIN / SECTOR_SIZE;
        assert_eq!(
            runs(
                &ext(&[
                    (8, Data),
                    (big, HoleZero),
                    (big, Zero),
                    (8, Hole),
                    (4, HoleZero),
                    (8, Data)
                ]),
                8 + 2 * big + 20
            ),
            vec![(8, false), (2 * big, true), (20, false)]
        );
        // A short answer: the rest is data; a longer one is cut at the read's end.
        assert_eq!(
            runs(&ext(&[(big, HoleZero)]), big + 8),
            vec![(big, true), (8, false)]
        );
        assert_eq!(runs(&ext(&[(4 * big, HoleZero)]), big), vec![(big, true)]);
        assert_eq!(runs(&[], 16), vec![(16, false)]);
    }
}
