//! Helpers shared by the NBD TLS tests: an in-process server on 127.0.0.1 with exports `vol`
//! (TLS only) and `open`, alice's pre-shared key, and an OpenSSL PSK client after STARTTLS.

#![allow(dead_code)] // each test binary uses a subset
#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use udm_export::nbd::client::{greet, read_option_reply, Client};
use udm_export::nbd::proto::*;
use udm_export::nbd::{NbdExportOptions, NbdServer, TcpSecurity, TlsCreds};
use udm_io::backend::mem::MemDevice;

pub const SIZE_SECTORS: u64 = 32 << 11; // 32 MiB
pub const KEY: &str = "9f3b6c1de2a4785f0c1b2a3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f50617";

pub struct Srv {
    pub server: Arc<NbdServer>,
    pub port: u16,
}

impl Drop for Srv {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

/// A server with exports `vol` (TLS only) and `open` (also plain TCP where allowed).
pub fn serve(security: TcpSecurity) -> Srv {
    let server = NbdServer::new();
    for (name, insecure_tcp) in [("vol", false), ("open", true)] {
        server
            .add_export(
                name,
                Arc::new(MemDevice::new(SIZE_SECTORS)),
                NbdExportOptions {
                    read_only: false,
                    description: Some(format!("tls test {name}")),
                    insecure_tcp,
                    bitmaps: Vec::new(),
                },
            )
            .unwrap();
    }
    server
        .listen_tcp(SocketAddr::from(([127, 0, 0, 1], 0)), security)
        .unwrap();
    let port = udm_testkit::nbd_tcp_port(&server);
    Srv { server, port }
}

pub fn psk_dir(dir: &Path, user: &str, key: &str) -> PathBuf {
    let d = dir.join(format!("psk-{user}-{}", &key[..4]));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("keys.psk"), format!("{user}:{key}\n")).unwrap();
    d
}

/// A server with alice's PSK; `allow_insecure` serves exports marked insecure in plain text.
pub fn psk_server(dir: &Path, allow_insecure: bool) -> Srv {
    let keys = psk_dir(dir, "alice", KEY);
    serve(TcpSecurity {
        tls: Some(Arc::new(
            TlsCreds::psk_file(&keys.join("keys.psk")).unwrap(),
        )),
        allow_insecure,
    })
}

pub fn tcp(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

pub fn key_bytes() -> Vec<u8> {
    (0..KEY.len() / 2)
        .map(|i| u8::from_str_radix(&KEY[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// TLS-PSK as user alice on a connection that already sent `NBD_OPT_STARTTLS` and got the ACK.
pub fn psk_client(s: TcpStream) -> openssl::ssl::SslStream<TcpStream> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_psk_client_callback(|_, _hint, id, key| {
        id[..6].copy_from_slice(b"alice\0");
        let k = key_bytes();
        key[..k.len()].copy_from_slice(&k);
        Ok(k.len())
    });
    let ssl = b
        .build()
        .configure()
        .unwrap()
        .verify_hostname(false)
        .use_server_name_indication(false)
        .into_ssl("localhost")
        .unwrap();
    let mut t = openssl::ssl::SslStream::new(ssl, s).unwrap();
    t.connect().unwrap();
    t
}

pub fn starttls(mut s: TcpStream) -> openssl::ssl::SslStream<TcpStream> {
    ask_starttls(&mut s);
    psk_client(s)
}

/// Sends `NBD_OPT_STARTTLS` on a greeted connection and checks the server agreed.
pub fn ask_starttls(s: &mut TcpStream) {
    s.write_all(&option_request(OPT_STARTTLS, &[])).unwrap();
    let (o, typ, _) = read_option_reply(s).unwrap();
    assert_eq!((o, typ), (OPT_STARTTLS, REP_ACK));
}

/// A connection to `port`, greeted, that has just been told yes to `NBD_OPT_STARTTLS`.
pub fn starttls_agreed(port: u16) -> TcpStream {
    let mut c = tcp(port);
    greet(&mut c).unwrap();
    ask_starttls(&mut c);
    c
}

/// After `NBD_OPT_STARTTLS` the option haggling continues without a new greeting; this makes
/// the test client (which starts with a greeting) fit: it reads a fake greeting and swallows
/// its client flags.
pub struct AfterStartTls<S> {
    pub inner: S,
    greeting: Vec<u8>,
    swallow: usize,
}

impl<S: std::io::Read> std::io::Read for AfterStartTls<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.greeting.is_empty() {
            let n = buf.len().min(self.greeting.len());
            buf[..n].copy_from_slice(&self.greeting[..n]);
            self.greeting.drain(..n);
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

impl<S: Write> Write for AfterStartTls<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.swallow > 0 {
            let n = buf.len().min(self.swallow);
            self.swallow -= n;
            return Ok(n);
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The in-house NBD client on a stream that has just finished its TLS handshake after
/// `NBD_OPT_STARTTLS`, opening `name` with structured replies.
pub fn client_after_starttls<S: Read + Write>(t: S, name: &str) -> Client<AfterStartTls<S>> {
    let mut greeting = NBD_MAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    Client::connect(
        AfterStartTls {
            inner: t,
            greeting,
            swallow: 4,
        },
        name,
        true,
    )
    .unwrap()
}
