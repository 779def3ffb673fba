//! Pre-shared keys (TLS-PSK, RFC 4279 / RFC 8446), as `nbdkit --tls-psk` and qemu's
//! `tls-creds-psk` offer, with the `openssl` crate.
//!
//! Why openssl and not rustls: rustls has no external-PSK support (rustls issue #174; the
//! pull request adding it, #2424, is not merged as of rustls 0.23.46), so the PSK handshake is
//! done by OpenSSL (TLS 1.3 PSK, e.g. `TLS_CHACHA20_POLY1305_SHA256` with gnutls clients, and
//! TLS 1.2 PSK suites). It runs behind
//! the same [`Engine`] abstraction as rustls: an `SslStream` over an in-memory transport.

use super::stream::Engine;
use super::TlsError;
use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVersion,
};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// Longest key accepted (bytes); gnutls' psktool makes 32.
const MAX_KEY: usize = 256;

/// Parses a key file in the psktool/nbdkit format: one `username:hexkey` per line.
pub(crate) fn parse_keys(path: &Path, text: &str) -> Result<HashMap<String, Vec<u8>>, TlsError> {
    let mut keys = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |why: &str| TlsError::PskFile {
            path: path.to_path_buf(),
            line: i + 1,
            why: why.to_string(),
        };
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hex) = line
            .rsplit_once(':')
            .ok_or_else(|| bad("expected username:hexkey"))?;
        if user.is_empty() {
            return Err(bad("empty username"));
        }
        let hex = hex.trim();
        if hex.is_empty() || hex.len() % 2 != 0 || hex.len() / 2 > MAX_KEY {
            return Err(bad(
                "the key must be an even number of hex digits (at most 512)",
            ));
        }
        let mut key = Vec::with_capacity(hex.len() / 2);
        for pair in hex.as_bytes().chunks(2) {
            let s = std::str::from_utf8(pair).map_err(|_| bad("key is not hex"))?;
            key.push(u8::from_str_radix(s, 16).map_err(|_| bad("key is not hex"))?);
        }
        keys.insert(user.to_string(), key);
    }
    if keys.is_empty() {
        return Err(TlsError::PskFile {
            path: path.to_path_buf(),
            line: 0,
            why: "no keys in the file".into(),
        });
    }
    Ok(keys)
}

/// Builds the OpenSSL context answering PSK identities from `keys`.
pub(crate) fn context(keys: HashMap<String, Vec<u8>>) -> Result<SslContext, TlsError> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server()).map_err(TlsError::OpenSsl)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(TlsError::OpenSsl)?;
    // TLS 1.2: PSK with ephemeral (EC)DH first, then plain PSK (gnutls' default order accepts
    // all of them). TLS 1.3 PSK uses the SHA-256 suites with OpenSSL's legacy callback.
    b.set_cipher_list(
        "ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256:\
         DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:\
         PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:ECDHE-PSK-CHACHA20-POLY1305:\
         DHE-PSK-CHACHA20-POLY1305:PSK-CHACHA20-POLY1305",
    )
    .map_err(TlsError::OpenSsl)?;
    b.set_ciphersuites("TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256")
        .map_err(TlsError::OpenSsl)?;
    b.set_options(SslOptions::NO_TICKET);
    let idx = user_index()?;
    b.set_psk_server_callback(move |ssl, identity, buf| {
        let user = identity.and_then(|i| std::str::from_utf8(i).ok());
        let Some((user, key)) = user.and_then(|u| keys.get_key_value(u)) else {
            tracing::warn!(
                identity = ?identity.map(String::from_utf8_lossy),
                "NBD TLS-PSK: unknown username"
            );
            return Ok(0);
        };
        if key.len() > buf.len() {
            return Ok(0);
        }
        buf[..key.len()].copy_from_slice(key);
        ssl.set_ex_data(idx, user.clone());
        Ok(key.len())
    });
    Ok(b.build())
}

/// Where the session keeps the username it authenticated (for the log).
static USER_IDX: std::sync::OnceLock<Index<Ssl, String>> = std::sync::OnceLock::new();

fn user_index() -> Result<Index<Ssl, String>, TlsError> {
    if let Some(i) = USER_IDX.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index().map_err(TlsError::OpenSsl)?;
    Ok(*USER_IDX.get_or_init(|| i))
}

/// Ciphertext buffers between the socket and OpenSSL.
#[derive(Default)]
struct MemIo {
    inb: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.inb.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.inb.len() - self.pos);
        buf[..n].copy_from_slice(&self.inb[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.inb.len() {
            self.inb.clear();
            self.pos = 0;
        }
        Ok(n)
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An OpenSSL server session as an [`Engine`].
pub(crate) struct OpensslEngine {
    s: SslStream<MemIo>,
    handshaking: bool,
}

fn ssl_err(e: openssl::ssl::Error) -> io::Error {
    match e.into_io_error() {
        Ok(io) => io,
        Err(e) => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    }
}

impl OpensslEngine {
    pub(crate) fn new(ctx: &Arc<SslContext>) -> io::Result<OpensslEngine> {
        let ssl = Ssl::new(ctx).map_err(io::Error::other)?;
        let s = SslStream::new(ssl, MemIo::default()).map_err(io::Error::other)?;
        let mut e = OpensslEngine {
            s,
            handshaking: true,
        };
        e.advance()?;
        Ok(e)
    }

    fn advance(&mut self) -> io::Result<()> {
        if !self.handshaking {
            return Ok(());
        }
        match self.s.accept() {
            Ok(()) => {
                self.handshaking = false;
                Ok(())
            }
            Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
                Ok(())
            }
            Err(e) => Err(ssl_err(e)),
        }
    }
}

impl Engine for OpensslEngine {
    fn feed(&mut self, data: &[u8]) -> io::Result<usize> {
        self.s.get_mut().inb.extend_from_slice(data);
        self.advance()?;
        Ok(data.len())
    }

    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.handshaking {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.s.ssl_read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(0),
            Err(e) if e.code() == ErrorCode::WANT_READ => Err(io::ErrorKind::WouldBlock.into()),
            Err(e) => Err(ssl_err(e)),
        }
    }

    fn write_plain(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.s.ssl_write(buf).map_err(ssl_err)
    }

    fn drain(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        out.append(&mut self.s.get_mut().out);
        Ok(())
    }

    fn handshaking(&self) -> bool {
        self.handshaking
    }

    fn suite(&self) -> String {
        let ssl = self.s.ssl();
        format!(
            "{} {}",
            ssl.version_str(),
            ssl.current_cipher().map_or("?", |c| c.name())
        )
    }

    fn peer(&self) -> Option<String> {
        USER_IDX
            .get()
            .and_then(|i| self.s.ssl().ex_data(*i).cloned())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn key_file_format() {
        let p = Path::new("keys.psk");
        let k = parse_keys(p, "# comment\nalice:00ff10\n\nbob:ABcd\r\n").unwrap();
        assert_eq!(k["alice"], [0, 0xff, 0x10]);
        assert_eq!(k["bob"], [0xab, 0xcd]);
        for bad in ["alice", "alice:", ":00", "alice:0", "alice:zz", ""] {
            assert!(parse_keys(p, bad).is_err(), "{bad:?} accepted");
        }
        let e = parse_keys(p, "a:00\nb:xyz1\n").unwrap_err().to_string();
        assert!(e.contains("keys.psk:2"), "{e}");
        // Keys of up to 256 bytes (512 hex digits), as psktool writes at most.
        let k = parse_keys(p, &format!("c:{}", "ab".repeat(256))).unwrap();
        assert_eq!(k["c"].len(), 256);
        assert!(parse_keys(p, &format!("c:{}", "ab".repeat(257))).is_err());
    }
}
