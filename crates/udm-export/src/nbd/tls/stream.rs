//! A TLS session over a TCP socket, split into a reader half and a writer half that work from
//! different threads at once (the transmission phase reads requests while workers write
//! replies).
//!
//! Both TLS libraries are used as state machines: ciphertext read from the socket is fed in and
//! plaintext comes out, plaintext written goes in and ciphertext to send comes out ([`Engine`]).
//! The engine sits in a mutex that is never held while blocked on the socket: the reader reads
//! raw bytes without the lock and takes it only to decrypt; a writer encrypts under the lock and
//! sends after releasing it, under a second `send` lock that keeps records in order.

use parking_lot::Mutex;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// A TLS library's server session driven through memory buffers.
pub(crate) trait Engine: Send {
    /// Takes received ciphertext; returns how much was consumed (may be less than given).
    fn feed(&mut self, data: &[u8]) -> io::Result<usize>;
    /// Decrypted bytes: `Ok(n > 0)`, `Ok(0)` once the peer closed the session, `WouldBlock`
    /// when more ciphertext is needed.
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Encrypts some of `buf`; returns how much was taken.
    fn write_plain(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Appends ciphertext waiting to be sent to `out`.
    fn drain(&mut self, out: &mut Vec<u8>) -> io::Result<()>;
    /// Still negotiating.
    fn handshaking(&self) -> bool;
    /// Who the peer proved to be (PSK username), for the log.
    fn peer(&self) -> Option<String>;
    /// Negotiated protocol version and cipher suite, for the log.
    fn suite(&self) -> String;
}

/// The TLS handshake must finish within this time (a client that stalls is dropped).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Ciphertext read from the socket at once.
const RAW_BUF: usize = 64 << 10;
/// Plaintext encrypted per lock hold, so the reader is not held up by a large reply.
const WRITE_CHUNK: usize = 256 << 10;

/// Runs the TLS handshake on `sock` (blocking). Returns ciphertext that arrived after the
/// handshake (the client's first records may share a segment with its Finished message).
pub(crate) fn handshake(engine: &mut dyn Engine, sock: &TcpStream) -> io::Result<Vec<u8>> {
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let r = drive(engine, sock);
    sock.set_read_timeout(None)?;
    r
}

fn drive(engine: &mut dyn Engine, mut sock: &TcpStream) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut raw = vec![0u8; RAW_BUF];
    loop {
        engine.drain(&mut out)?;
        if !out.is_empty() {
            sock.write_all(&out)?;
            out.clear();
        }
        if !engine.handshaking() {
            return Ok(Vec::new());
        }
        let n = sock.read(&mut raw)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed the connection during the TLS handshake",
            ));
        }
        let mut off = 0;
        while off < n {
            let used = match engine.feed(&raw[off..n]) {
                Ok(u) => u,
                Err(e) => {
                    // Send the alert saying why (bad certificate, unknown PSK identity).
                    let _ = engine.drain(&mut out);
                    let _ = sock.write_all(&out);
                    return Err(e);
                }
            };
            off += used;
            if !engine.handshaking() {
                engine.drain(&mut out)?;
                if !out.is_empty() {
                    sock.write_all(&out)?;
                }
                return Ok(raw[off..n].to_vec());
            }
            if used == 0 {
                return Err(io::Error::other("TLS engine took no handshake data"));
            }
        }
    }
}

struct Shared {
    engine: Mutex<Box<dyn Engine>>,
    /// Held by whoever sends ciphertext, from encryption to the end of the socket write.
    send: Mutex<()>,
    sock: TcpStream,
}

/// Splits an established session into halves usable from different threads.
pub(crate) fn split(
    engine: Box<dyn Engine>,
    sock: TcpStream,
    leftover: Vec<u8>,
) -> (Box<dyn Read + Send>, Box<dyn Write + Send>) {
    let shared = Arc::new(Shared {
        engine: Mutex::new(engine),
        send: Mutex::new(()),
        sock,
    });
    let len = leftover.len();
    let mut raw = leftover;
    raw.resize(RAW_BUF.max(len), 0);
    (
        Box::new(TlsReader {
            shared: shared.clone(),
            raw,
            pos: 0,
            len,
        }),
        Box::new(TlsWriter {
            shared,
            out: Vec::new(),
        }),
    )
}

struct TlsReader {
    shared: Arc<Shared>,
    raw: Vec<u8>,
    pos: usize,
    len: usize,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let mut queued = false;
            {
                let mut e = self.shared.engine.lock();
                loop {
                    match e.read_plain(buf) {
                        Ok(n) => return Ok(n),
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(err) => return Err(err),
                    }
                    if self.pos == self.len {
                        break;
                    }
                    let used = e.feed(&self.raw[self.pos..self.len])?;
                    if used == 0 {
                        return Err(io::Error::other("TLS engine took no data"));
                    }
                    self.pos += used;
                    let mut probe = Vec::new();
                    e.drain(&mut probe)?;
                    if !probe.is_empty() {
                        // Output while reading is rare (an alert refusing a TLS 1.2
                        // renegotiation; rustls answers a key update with the next record
                        // written): send it outside the engine lock.
                        drop(e);
                        let _s = self.shared.send.lock();
                        (&self.shared.sock).write_all(&probe)?;
                        queued = true;
                        break;
                    }
                }
            }
            if queued {
                continue;
            }
            // Nothing decrypted and no ciphertext left: wait on the socket without the lock.
            let n = (&self.shared.sock).read(&mut self.raw)?;
            if n == 0 {
                return Ok(0);
            }
            self.pos = 0;
            self.len = n;
        }
    }
}

struct TlsWriter {
    shared: Arc<Shared>,
    out: Vec<u8>,
}

impl TlsWriter {
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let _s = self.shared.send.lock();
        for part in parts {
            let mut rest = *part;
            while !rest.is_empty() {
                let take = rest.len().min(WRITE_CHUNK);
                {
                    let mut e = self.shared.engine.lock();
                    let mut chunk = &rest[..take];
                    while !chunk.is_empty() {
                        let n = e.write_plain(chunk)?;
                        if n == 0 {
                            return Err(io::Error::other("TLS engine took no data"));
                        }
                        chunk = &chunk[n..];
                        e.drain(&mut self.out)?;
                    }
                }
                rest = &rest[take..];
                (&self.shared.sock).write_all(&self.out)?;
                self.out.clear();
            }
        }
        Ok(())
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(&[buf])?;
        Ok(buf.len())
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let parts: Vec<&[u8]> = bufs.iter().map(|b| &**b).collect();
        self.send(&parts)?;
        Ok(parts.iter().map(|p| p.len()).sum())
    }

    /// Nothing to do: `send` wrote everything, and ciphertext the reader's input produced
    /// (alerts, key updates) is sent by the reader itself.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
