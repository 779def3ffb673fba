//! One client connection: the fixed newstyle handshake, then the transmission phase
//! ([`super::transmission`]) with a reader that decodes and validates requests and an elastic
//! pool of workers that execute them on the device and write the replies, in any order.

use super::ctl::ConnCtl;
use super::export::Export;
use super::meta;
use super::proto::*;
use super::server::NbdServer;
use super::session::{export_size, min_block, session, Session, MAX_BLOCK};
use super::transmission::transmission;
use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use udm_io::BlockDevice;

/// Preferred block size advertised.
const PREFERRED_BLOCK: u32 = 4096;
/// Option data larger than this is treated as a denial of service (hard disconnect).
const MAX_OPTION_LEN: u32 = 64 << 10;

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
    write_greeting(w)?;
    let cflags = u32::from_be_bytes(read_array::<4>(r)?);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        tracing::debug!(cflags, "unknown NBD client flags; dropping");
        return Ok(Hs::End);
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // (export name the contexts were selected for, the contexts, that export)
    let mut meta: Option<(String, meta::MetaSel, Arc<Export>)> = None;
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
                let Some(export) = server.lookup(name).filter(|e| ctl.security.shown(&e.opts))
                else {
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
                        if !ctl.security.shown(&e.opts) {
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
                let Some(export) = server.lookup(name).filter(|e| ctl.security.shown(&e.opts))
                else {
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
                let Some(export) = server.lookup(name).filter(|e| ctl.security.shown(&e.opts))
                else {
                    h.err(opt, REP_ERR_UNKNOWN, &format!("no export named {name:?}"))?;
                    continue;
                };
                let chosen = meta::matching(&export.opts.bitmaps, &queries, set);
                for (id, ctx) in &chosen {
                    let mut d = (if set { *id } else { 0 }).to_be_bytes().to_vec();
                    d.extend_from_slice(ctx.as_bytes());
                    h.reply(opt, REP_META_CONTEXT, &d)?;
                }
                h.reply(opt, REP_ACK, &[])?;
                if set {
                    meta = Some((name.to_string(), meta::selection(&chosen), export.clone()));
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
