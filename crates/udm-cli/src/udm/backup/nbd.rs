//! Reading and writing udm devices from the CLI over udmd's NBD Unix socket: `udm backup`
//! exports the snapshot (with its dirty bitmap) and reads it as any NBD client would, and
//! `restore` writes a udm device the same way.

use super::chain::err;
use crate::error::CliError;
use crate::session::Session;
use crate::udm::snapshot::done;
use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use udm_nbd::client::{Client, Reply};
use udm_nbd::proto::{CMD_FLUSH, CMD_READ, CMD_WRITE_ZEROES, META_BASE_ALLOCATION, STATE_ZERO};
use udm_proto::{BitmapSpec, ExportKind, Request, Response};
use udm_types::Errno;

/// Largest read or write sent at once.
pub const IO_MAX: u64 = 4 << 20;

/// An NBD export this module added, and a connection to it.
pub struct NbdDev {
    client: Client<UnixStream>,
    /// The export's id (to remove it).
    pub export_id: String,
    /// Its size in bytes.
    pub size: u64,
    bitmap_id: Option<u32>,
    base_id: Option<u32>,
}

/// Reads sent ahead of their use: up to `depth` on the connection at once, so the server
/// reads them in parallel (it may answer out of order); they are taken back in the order
/// they were sent.
pub struct ReadAhead {
    depth: usize,
    /// Sent and not taken back: (handle, offset, length), oldest first.
    inflight: VecDeque<(u64, u64, u32)>,
    /// Replies that arrived before older ones were taken back.
    early: HashMap<u64, Reply>,
}

impl ReadAhead {
    pub fn new(depth: usize) -> ReadAhead {
        ReadAhead {
            depth: depth.max(1),
            inflight: VecDeque::new(),
            early: HashMap::new(),
        }
    }

    /// Whether another read may be sent.
    pub fn has_room(&self) -> bool {
        self.inflight.len() < self.depth
    }
}

/// The data of a read reply into `buf`, or the error naming the read.
fn fill(r: Reply, offset: u64, buf: &mut [u8]) -> Result<(), CliError> {
    match r {
        Reply::Ok(d) if d.len() == buf.len() => {
            buf.copy_from_slice(&d);
            Ok(())
        }
        Reply::Err(code) => Err(err(
            Errno::EIO,
            format!(
                "reading {} bytes at {offset} failed: NBD error {code}",
                buf.len()
            ),
        )),
        _ => Err(err(Errno::EPROTO, format!("short read at {offset}"))),
    }
}

fn nbd_err(what: &str, dev: &str, e: impl std::fmt::Display) -> CliError {
    err(Errno::EIO, format!("{what} {dev} over NBD: {e}"))
}

/// The socket path in an `nbd+unix:///NAME?socket=PATH` location.
fn socket_of(location: &str) -> Option<PathBuf> {
    location
        .split_once("?socket=")
        .map(|(_, p)| PathBuf::from(p))
}

impl NbdDev {
    /// Exports `device` over NBD as `name` (with `bitmap` as `qemu:dirty-bitmap:BITMAP_NAME`)
    /// unless an export of that name exists (a resumed backup), and connects, selecting
    /// `base:allocation` and the bitmap.
    pub fn open(
        s: &mut Session,
        device: &str,
        name: &str,
        read_only: bool,
        bitmap: Option<BitmapSpec>,
    ) -> Result<NbdDev, CliError> {
        let id = format!("nbd:{name}");
        let list = match s.call("export list", "", Request::ExportList)? {
            Response::Exports(v) => v,
            _ => Vec::new(),
        };
        let mut rec = list.into_iter().find(|e| e.id == id);
        if rec.is_none() {
            let req = Request::ExportAdd {
                device: device.into(),
                export: ExportKind::Nbd {
                    name: Some(name.into()),
                    insecure_tcp: false,
                    bitmaps: bitmap.iter().cloned().collect(),
                },
                read_only,
            };
            if let Response::Exports(v) = s.call("export add", device, req)? {
                rec = v.into_iter().find(|e| e.id == id);
            }
        }
        let rec = rec.ok_or_else(|| {
            err(
                Errno::EPROTO,
                format!("export {id} of {device} was not listed after adding it"),
            )
        })?;
        let sock = socket_of(&rec.location).ok_or_else(|| {
            err(
                Errno::EPROTO,
                format!("export {id} is not on a Unix socket: {}", rec.location),
            )
        })?;
        let stream =
            UnixStream::connect(&sock).map_err(|e| nbd_err("cannot connect to", device, e))?;
        let bm_ctx = bitmap
            .as_ref()
            .map(|b| format!("qemu:dirty-bitmap:{}", b.name));
        let mut wanted = vec![META_BASE_ALLOCATION];
        if let Some(c) = &bm_ctx {
            wanted.push(c);
        }
        let client = Client::connect_contexts(stream, name, &wanted)
            .map_err(|e| nbd_err("cannot open", device, e))?;
        let find = |n: &str| client.contexts().iter().find(|c| c.1 == n).map(|c| c.0);
        let base_id = find(META_BASE_ALLOCATION);
        let bitmap_id =
            match &bm_ctx {
                Some(c) => Some(find(c).ok_or_else(|| {
                    err(Errno::EPROTO, format!("export {name} does not offer {c}"))
                })?),
                None => None,
            };
        Ok(NbdDev {
            size: client.export.size,
            client,
            export_id: id,
            bitmap_id,
            base_id,
        })
    }

    /// Sends a read of `len` bytes at `offset` without waiting for it (see [`ReadAhead`]).
    pub fn read_ahead(
        &mut self,
        ra: &mut ReadAhead,
        offset: u64,
        len: u32,
    ) -> Result<(), CliError> {
        let h = self
            .client
            .send(CMD_READ, 0, offset, len, &[])
            .map_err(|e| nbd_err("reading", &self.export_id, e))?;
        ra.inflight.push_back((h, offset, len));
        Ok(())
    }

    /// The data of the oldest read sent with [`NbdDev::read_ahead`], into `buf` (its length);
    /// replies to later reads that arrive first are kept for their turn.
    pub fn read_next(&mut self, ra: &mut ReadAhead, buf: &mut [u8]) -> Result<(), CliError> {
        let Some((h, offset, len)) = ra.inflight.pop_front() else {
            return Err(err(Errno::EPROTO, "no read in flight".into()));
        };
        let reply = loop {
            if let Some(r) = ra.early.remove(&h) {
                break r;
            }
            let inflight = &ra.inflight;
            let len_of = |x: u64| {
                if x == h {
                    return Some(len);
                }
                inflight.iter().find(|r| r.0 == x).map(|r| r.2)
            };
            let (rh, r) = self
                .client
                .recv(len_of)
                .map_err(|e| nbd_err("reading", &self.export_id, e))?;
            if rh == h {
                break r;
            }
            if !ra.inflight.iter().any(|r| r.0 == rh) {
                return Err(err(
                    Errno::EPROTO,
                    format!("a reply for handle {rh}, which was not asked"),
                ));
            }
            ra.early.insert(rh, r);
        };
        fill(reply, offset, buf)
    }

    /// Writes `data` at `offset` (zeros by WRITE_ZEROES when `data` is all zero).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), CliError> {
        let r = if data.iter().all(|&b| b == 0) {
            self.client
                .call(CMD_WRITE_ZEROES, 0, offset, data.len() as u32, &[])
        } else {
            self.client.write(offset, data)
        };
        match r {
            Ok(Reply::Ok(_)) => Ok(()),
            Ok(Reply::Err(code)) => Err(err(
                Errno::EIO,
                format!(
                    "writing {} bytes at {offset} failed: NBD error {code}",
                    data.len()
                ),
            )),
            Ok(_) => Err(err(
                Errno::EPROTO,
                format!("odd reply to a write at {offset}"),
            )),
            Err(e) => Err(nbd_err("writing", &self.export_id, e)),
        }
    }

    /// Flushes the device.
    pub fn flush(&mut self) -> Result<(), CliError> {
        match self.client.call(CMD_FLUSH, 0, 0, 0, &[]) {
            Ok(Reply::Ok(_)) => Ok(()),
            Ok(r) => Err(err(Errno::EIO, format!("flush failed: {r:?}"))),
            Err(e) => Err(nbd_err("flushing", &self.export_id, e)),
        }
    }

    /// For `len` bytes at `offset`: `(bytes, dirty, zero)` runs from the dirty bitmap (every
    /// byte dirty without one) and `base:allocation` (zero: reads as zeros).
    pub fn status(&mut self, offset: u64, len: u32) -> Result<Vec<(u64, bool, bool)>, CliError> {
        let r = self
            .client
            .block_status(offset, len, 0)
            .map_err(|e| nbd_err("block status of", &self.export_id, e))?;
        let chunks = match r {
            Reply::Contexts(c) => c,
            Reply::Extents(x) => vec![(self.base_id.or(self.bitmap_id).unwrap_or(0), x)],
            Reply::Err(code) => {
                return Err(err(
                    Errno::EIO,
                    format!("block status at {offset}: NBD error {code}"),
                ))
            }
            Reply::Ok(_) => return Err(err(Errno::EPROTO, "block status without extents".into())),
        };
        let mut base = None;
        let mut dirty = None;
        for (id, x) in chunks {
            if Some(id) == self.base_id {
                base = Some(x);
            } else if Some(id) == self.bitmap_id {
                dirty = Some(x);
            }
        }
        // Merge the two descriptor lists over the covered range.
        let flatten = |x: Option<Vec<(u32, u32)>>, default: u32| -> Vec<(u64, u32)> {
            match x {
                Some(v) => v.into_iter().map(|(l, f)| (u64::from(l), f)).collect(),
                None => vec![(u64::from(len), default)],
            }
        };
        let a = flatten(base, 0);
        let b = flatten(dirty, 1);
        let covered = a
            .iter()
            .map(|x| x.0)
            .sum::<u64>()
            .min(b.iter().map(|x| x.0).sum());
        let mut out: Vec<(u64, bool, bool)> = Vec::new();
        let (mut i, mut j, mut ai, mut bj, mut pos) = (0usize, 0usize, 0u64, 0u64, 0u64);
        while pos < covered && i < a.len() && j < b.len() {
            let n = (a[i].0 - ai).min(b[j].0 - bj).min(covered - pos);
            let run = (n, b[j].1 & 1 != 0, a[i].1 & STATE_ZERO != 0);
            match out.last_mut() {
                Some(l) if l.1 == run.1 && l.2 == run.2 => l.0 += n,
                _ => out.push(run),
            }
            pos += n;
            ai += n;
            bj += n;
            if ai == a[i].0 {
                i += 1;
                ai = 0;
            }
            if bj == b[j].0 {
                j += 1;
                bj = 0;
            }
        }
        if out.is_empty() {
            return Err(err(
                Errno::EPROTO,
                format!("empty block status at {offset}"),
            ));
        }
        Ok(out)
    }

    /// Disconnects and removes the export.
    pub fn close(self, s: &mut Session) -> Result<(), CliError> {
        let _ = self.client.disconnect();
        remove_export(s, &self.export_id)
    }
}

/// Removes export `id` if it exists.
fn remove_export(s: &mut Session, id: &str) -> Result<(), CliError> {
    if let Response::Exports(v) = s.call("export list", "", Request::ExportList)? {
        if v.iter().any(|e| e.id == id) {
            done(
                s,
                "export remove",
                id,
                Request::ExportRemove { id: id.into() },
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};
    use udm_nbd::proto::{
        be32, option_reply, read_array, simple_reply, write_greeting, Request as NbdRequest,
        INFO_EXPORT, OPT_GO, REP_ACK, REP_INFO, REQUEST_LEN,
    };

    /// A fake server for one connection: the newstyle handshake for `NBD_OPT_GO`, then `n`
    /// reads answered newest first (simple replies), each filled with the low byte of its
    /// offset / 4096.
    fn reversing_server(mut s: UnixStream, n: usize) {
        write_greeting(&mut s).unwrap();
        read_array::<4>(&mut s).unwrap(); // client flags
        let hdr = read_array::<16>(&mut s).unwrap();
        assert_eq!(be32(&hdr[8..12]), OPT_GO);
        let mut data = vec![0u8; be32(&hdr[12..16]) as usize];
        s.read_exact(&mut data).unwrap();
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 20).to_be_bytes());
        info.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&option_reply(OPT_GO, REP_INFO, &info)).unwrap();
        s.write_all(&option_reply(OPT_GO, REP_ACK, &[])).unwrap();
        let mut reqs = Vec::new();
        for _ in 0..n {
            let b = read_array::<REQUEST_LEN>(&mut s).unwrap();
            reqs.push(NbdRequest::decode(&b).unwrap());
        }
        for r in reqs.iter().rev() {
            s.write_all(&simple_reply(0, r.handle)).unwrap();
            s.write_all(&vec![(r.offset / 4096) as u8; r.length as usize])
                .unwrap();
        }
    }

    #[test]
    fn read_ahead_hands_back_replies_in_send_order_when_they_arrive_reversed() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || reversing_server(b, 4));
        let mut dev = NbdDev {
            client: Client::connect(a, "x", false).unwrap(),
            export_id: "nbd:x".into(),
            size: 1 << 20,
            bitmap_id: None,
            base_id: None,
        };
        let mut ra = ReadAhead::new(4);
        for i in 0..4u64 {
            assert!(ra.has_room());
            dev.read_ahead(&mut ra, i * 4096, 512 * (i as u32 + 1))
                .unwrap();
        }
        assert!(!ra.has_room());
        for i in 0..4u64 {
            let mut buf = vec![0xffu8; 512 * (i as usize + 1)];
            dev.read_next(&mut ra, &mut buf).unwrap();
            assert!(
                buf.iter().all(|&x| u64::from(x) == i),
                "read {i} got another's data"
            );
        }
        assert!(ra.early.is_empty() && ra.inflight.is_empty());
        assert!(
            dev.read_next(&mut ra, &mut [0u8; 1]).is_err(),
            "no read in flight"
        );
        server.join().unwrap();
    }
}
