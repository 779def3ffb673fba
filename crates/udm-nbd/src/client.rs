//! A small blocking NBD client over the same codec, for `udm backup` and tests: fixed newstyle
//! with `NBD_OPT_GO`, optional structured replies and metadata contexts (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`), and one request at a time (or several sent before reading
//! replies, for pipelining tests).

use crate::proto::*;
use std::collections::HashMap;
use std::io::{self, Read, Write};

/// Server reply to one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Success with the data of a read (empty otherwise).
    Ok(Vec<u8>),
    /// Block status descriptors `(length, flags)` (one metadata context).
    Extents(Vec<(u32, u32)>),
    /// Block status of several metadata contexts: `(context id, descriptors)` in reply order.
    Contexts(Vec<(u32, Vec<(u32, u32)>)>),
    /// An NBD error code.
    Err(u32),
}

/// What the server advertised for the export.
#[derive(Clone, Debug, Default)]
pub struct ExportDesc {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// `(min, preferred, max)` block sizes, if sent.
    pub block_size: Option<(u32, u32, u32)>,
    /// Description, if sent.
    pub description: Option<String>,
}

/// A connected client in the transmission phase.
pub struct Client<S: Read + Write> {
    s: S,
    /// What the server said about the export.
    pub export: ExportDesc,
    structured: bool,
    meta_id: Option<u32>,
    contexts: Vec<(u32, String)>,
    next_handle: u64,
    /// Structured replies received in part, by handle.
    partial: HashMap<u64, Partial>,
}

/// The chunks of one structured reply received so far.
#[derive(Default)]
struct Partial {
    /// Read chunks by offset: data, or `None` for a hole of that length (zeroes).
    pieces: Vec<(u64, u32, Option<Vec<u8>>)>,
    extents: Vec<(u32, Vec<(u32, u32)>)>,
    error: Option<u32>,
}

/// A read's data from its chunks, which may arrive in any order: laid out by offset from the
/// first, holes as zeroes; a gap or an overlap is a protocol error.
fn assemble(mut pieces: Vec<(u64, u32, Option<Vec<u8>>)>) -> io::Result<Vec<u8>> {
    pieces.sort_by_key(|p| p.0);
    let mut out = Vec::new();
    let mut next = pieces.first().map_or(0, |p| p.0);
    for (off, len, data) in pieces {
        if off != next {
            return Err(proto_err(format!(
                "read chunks not contiguous: chunk at {off}, expected {next}"
            )));
        }
        match data {
            Some(d) => out.extend_from_slice(&d),
            // Not `resize`: zero-filled allocation and a copy stay fast in debug builds, where
            // the tests time reads of holes.
            None => out.extend_from_slice(&vec![0u8; len as usize]),
        }
        next = off + u64::from(len);
    }
    Ok(out)
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one option reply: (option, type, data).
pub fn read_option_reply(s: &mut impl Read) -> io::Result<(u32, u32, Vec<u8>)> {
    let h = read_array::<20>(s)?;
    if be64(&h[0..8]) != REPLY_OPT_MAGIC {
        return Err(proto_err("bad option reply magic"));
    }
    let len = be32(&h[16..20]);
    if len > 1 << 20 {
        return Err(proto_err("option reply too long"));
    }
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d)?;
    Ok((be32(&h[8..12]), be32(&h[12..16]), d))
}

/// Reads the greeting and sends client flags; returns the handshake flags.
pub fn greet(s: &mut (impl Read + Write)) -> io::Result<u16> {
    let g = read_array::<18>(s)?;
    if be64(&g[0..8]) != NBD_MAGIC || be64(&g[8..16]) != IHAVEOPT {
        return Err(proto_err("not a newstyle NBD server"));
    }
    let f = be16(&g[16..18]);
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
    Ok(f)
}

/// Lists the exports (names and descriptions) with `NBD_OPT_LIST`, then aborts.
pub fn list(mut s: impl Read + Write) -> io::Result<Vec<(String, String)>> {
    greet(&mut s)?;
    s.write_all(&option_request(OPT_LIST, &[]))?;
    let mut out = Vec::new();
    loop {
        let (_, typ, d) = read_option_reply(&mut s)?;
        match typ {
            REP_SERVER => {
                let mut c = Cursor::new(&d);
                let name = c.string32().ok_or_else(|| proto_err("bad REP_SERVER"))?;
                let rest = c.bytes(c.remaining()).unwrap_or_default();
                out.push((name.to_string(), String::from_utf8_lossy(rest).into_owned()));
            }
            REP_ACK => break,
            t => return Err(proto_err(format!("NBD_OPT_LIST failed: {t:#x}"))),
        }
    }
    s.write_all(&option_request(OPT_ABORT, &[]))?;
    let _ = read_option_reply(&mut s);
    Ok(out)
}

impl<S: Read + Write> Client<S> {
    /// Negotiates `name`: structured replies and `base:allocation` when `structured`.
    pub fn connect(s: S, name: &str, structured: bool) -> io::Result<Self> {
        let contexts: &[&str] = if structured {
            &[META_BASE_ALLOCATION]
        } else {
            &[]
        };
        Self::connect_with(s, name, structured, contexts)
    }

    /// Negotiates `name` with structured replies and the metadata `contexts` (those the server
    /// has: see [`Client::contexts`]).
    pub fn connect_contexts(s: S, name: &str, contexts: &[&str]) -> io::Result<Self> {
        Self::connect_with(s, name, true, contexts)
    }

    fn connect_with(mut s: S, name: &str, structured: bool, wanted: &[&str]) -> io::Result<Self> {
        greet(&mut s)?;
        let mut meta_id = None;
        let mut contexts = Vec::new();
        if structured {
            s.write_all(&option_request(OPT_STRUCTURED_REPLY, &[]))?;
            let (_, t, _) = read_option_reply(&mut s)?;
            if t != REP_ACK {
                return Err(proto_err("structured replies refused"));
            }
            s.write_all(&option_request(
                OPT_SET_META_CONTEXT,
                &meta_request_data(name, wanted),
            ))?;
            loop {
                let (_, t, d) = read_option_reply(&mut s)?;
                match t {
                    REP_META_CONTEXT if d.len() >= 4 => {
                        let id = be32(&d[0..4]);
                        meta_id.get_or_insert(id);
                        contexts.push((id, String::from_utf8_lossy(&d[4..]).into_owned()));
                    }
                    REP_ACK => break,
                    t => return Err(proto_err(format!("SET_META_CONTEXT failed: {t:#x}"))),
                }
            }
        }
        s.write_all(&option_request(
            OPT_GO,
            &info_request_data(name, &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]),
        ))?;
        let mut export = ExportDesc::default();
        loop {
            let (_, t, d) = read_option_reply(&mut s)?;
            match t {
                REP_INFO if d.len() >= 2 => match be16(&d[0..2]) {
                    INFO_EXPORT if d.len() == 12 => {
                        export.size = be64(&d[2..10]);
                        export.flags = be16(&d[10..12]);
                    }
                    INFO_BLOCK_SIZE if d.len() == 14 => {
                        export.block_size =
                            Some((be32(&d[2..6]), be32(&d[6..10]), be32(&d[10..14])))
                    }
                    INFO_DESCRIPTION => {
                        export.description = Some(String::from_utf8_lossy(&d[2..]).into_owned())
                    }
                    _ => {}
                },
                REP_ACK => break,
                t => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("NBD_OPT_GO failed: {t:#x} {}", String::from_utf8_lossy(&d)),
                    ))
                }
            }
        }
        Ok(Client {
            s,
            export,
            structured,
            meta_id,
            contexts,
            next_handle: 1,
            partial: HashMap::new(),
        })
    }

    /// Sends a request without waiting; returns its handle.
    pub fn send(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let req = Request {
            flags,
            cmd,
            handle,
            offset,
            length,
        };
        let mut v = req.encode().to_vec();
        v.extend_from_slice(data);
        self.s.write_all(&v)?;
        Ok(handle)
    }

    /// Receives one reply; `read_len` gives the payload length of a simple read reply, looked
    /// up by handle. Structured replies may come in several chunks, interleaved with other
    /// handles' chunks (the server sends large reads a chunk at a time): chunks are gathered per
    /// handle until one ends with `NBD_REPLY_FLAG_DONE`.
    pub fn recv(&mut self, read_len: impl Fn(u64) -> Option<u32>) -> io::Result<(u64, Reply)> {
        loop {
            let m = read_array::<4>(&mut self.s)?;
            match be32(&m) {
                SIMPLE_REPLY_MAGIC => {
                    let r = read_array::<12>(&mut self.s)?;
                    let err = be32(&r[0..4]);
                    let handle = be64(&r[4..12]);
                    if err != 0 {
                        return Ok((handle, Reply::Err(err)));
                    }
                    let n = read_len(handle).unwrap_or(0);
                    let mut d = vec![0u8; n as usize];
                    self.s.read_exact(&mut d)?;
                    return Ok((handle, Reply::Ok(d)));
                }
                STRUCTURED_REPLY_MAGIC => {
                    let h = read_array::<16>(&mut self.s)?;
                    let flags = be16(&h[0..2]);
                    let typ = be16(&h[2..4]);
                    let handle = be64(&h[4..12]);
                    let len = be32(&h[12..16]);
                    let mut p = vec![0u8; len as usize];
                    self.s.read_exact(&mut p)?;
                    let part = self.partial.entry(handle).or_default();
                    match typ {
                        REPLY_TYPE_OFFSET_DATA if p.len() >= 8 => part.pieces.push((
                            be64(&p[0..8]),
                            (p.len() - 8) as u32,
                            Some(p[8..].to_vec()),
                        )),
                        REPLY_TYPE_OFFSET_HOLE if p.len() == 12 => {
                            part.pieces.push((be64(&p[0..8]), be32(&p[8..12]), None))
                        }
                        REPLY_TYPE_BLOCK_STATUS if p.len() >= 12 => part.extents.push((
                            be32(&p[0..4]),
                            p[4..]
                                .chunks_exact(8)
                                .map(|c| (be32(&c[0..4]), be32(&c[4..8])))
                                .collect(),
                        )),
                        REPLY_TYPE_NONE => {}
                        t if t & 0x8000 != 0 && p.len() >= 6 => part.error = Some(be32(&p[0..4])),
                        t => return Err(proto_err(format!("unexpected chunk type {t}"))),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        let part = self.partial.remove(&handle).unwrap_or_default();
                        let mut x = part.extents;
                        let r = match (part.error, x.len()) {
                            (Some(e), _) => Reply::Err(e),
                            (None, 0) => Reply::Ok(assemble(part.pieces)?),
                            (None, 1) => Reply::Extents(x.remove(0).1),
                            (None, _) => Reply::Contexts(x),
                        };
                        return Ok((handle, r));
                    }
                }
                m => return Err(proto_err(format!("bad reply magic {m:#x}"))),
            }
        }
    }

    /// One request, waiting for its reply.
    pub fn call(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> io::Result<Reply> {
        let h = self.send(cmd, flags, offset, length, data)?;
        let (rh, r) = self.recv(|_| if cmd == CMD_READ { Some(length) } else { None })?;
        if rh != h {
            return Err(proto_err("reply for another handle"));
        }
        Ok(r)
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Reply> {
        self.call(CMD_READ, 0, offset, len, &[])
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<Reply> {
        self.call(CMD_WRITE, 0, offset, data.len() as u32, data)
    }

    /// Flushes.
    pub fn flush(&mut self) -> io::Result<Reply> {
        self.call(CMD_FLUSH, 0, 0, 0, &[])
    }

    /// Block status of a range (`base:allocation`).
    pub fn block_status(&mut self, offset: u64, len: u32, flags: u16) -> io::Result<Reply> {
        self.call(CMD_BLOCK_STATUS, flags, offset, len, &[])
    }

    /// The metadata contexts the server selected: `(id, name)`.
    pub fn contexts(&self) -> &[(u32, String)] {
        &self.contexts
    }

    /// Whether structured replies and a metadata context were negotiated.
    pub fn negotiated(&self) -> (bool, Option<u32>) {
        (self.structured, self.meta_id)
    }

    /// Sends `NBD_CMD_DISC` and returns the stream.
    pub fn disconnect(mut self) -> io::Result<S> {
        self.send(CMD_DISC, 0, 0, 0, &[])?;
        Ok(self.s)
    }

    /// The underlying stream, for raw (malformed) traffic.
    pub fn stream(&mut self) -> &mut S {
        &mut self.s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_chunks_are_laid_out_by_offset() {
        let got = assemble(vec![
            (1024, 4, Some(vec![3; 4])),
            (1000, 16, None),
            (1016, 8, Some(vec![2; 8])),
        ])
        .expect("contiguous");
        let mut want = vec![0u8; 16];
        want.extend_from_slice(&[2; 8]);
        want.extend_from_slice(&[3; 4]);
        assert_eq!(got, want);
        assert!(
            assemble(vec![(0, 8, None), (16, 8, None)]).is_err(),
            "a gap"
        );
        assert!(
            assemble(vec![(0, 8, None), (4, 8, None)]).is_err(),
            "an overlap"
        );
        assert_eq!(assemble(Vec::new()).expect("nothing"), Vec::<u8>::new());
    }
}
