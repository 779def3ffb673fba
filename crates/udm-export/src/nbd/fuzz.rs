//! Fuzz entry points (`fuzz/fuzz_targets/nbd_*.rs`, the property tests of `nbd_fuzz.rs`): the
//! server driven by an in-memory stream, returning what it sent so a test can check that an
//! entry point really serves.

use std::io::{self, Read, Write};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{proto, NbdBitmap, NbdExportOptions, NbdServer, NbdStream, StreamControl};

/// Bytes of the server's output kept per stream (the rest is counted, not kept): fuzzing
/// should not pay for copying large reads.
const KEEP: usize = 1 << 20;

/// An in-memory stream: the client's bytes are `input`; the first [`KEEP`] bytes the server
/// sends go to `output`. Drives the server deterministically for fuzzing and property tests.
pub struct MemoryStream {
    /// Everything the "client" sends.
    pub input: Vec<u8>,
    /// What the server sent (its first [`KEEP`] bytes).
    pub output: Arc<Mutex<Vec<u8>>>,
}

impl MemoryStream {
    /// A stream that will send `input`.
    pub fn new(input: Vec<u8>) -> Self {
        MemoryStream {
            input,
            output: Arc::default(),
        }
    }
}

/// The server's side of the output.
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let mut out = self.0.lock();
        let room = KEEP.saturating_sub(out.len()).min(b.len());
        out.extend_from_slice(&b[..room]);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct NoCtl;

impl StreamControl for NoCtl {
    fn stop_reading(&self) {}
    fn close(&self) {}
}

impl NbdStream for MemoryStream {
    fn split(
        self,
    ) -> io::Result<(
        Box<dyn Read + Send>,
        Box<dyn Write + Send>,
        Box<dyn StreamControl>,
    )> {
        Ok((
            Box::new(io::Cursor::new(self.input)),
            Box::new(Captured(self.output)),
            Box::new(NoCtl),
        ))
    }
}

/// One server for every fuzz input (its exports' contents carry over, which only widens what
/// is explored): a fresh server per input spends most of the run starting and joining its
/// threads.
fn fuzz_server() -> std::sync::Arc<NbdServer> {
    static SERVER: std::sync::OnceLock<std::sync::Arc<NbdServer>> = std::sync::OnceLock::new();
    SERVER.get_or_init(new_fuzz_server).clone()
}

fn new_fuzz_server() -> std::sync::Arc<NbdServer> {
    let server = NbdServer::new();
    let dev = std::sync::Arc::new(udm_io::backend::mem::MemDevice::new(64));
    let _ = server.add_export(
        "fuzz",
        dev,
        NbdExportOptions {
            read_only: false,
            description: Some("fuzz target".into()),
            insecure_tcp: false,
            bitmaps: fuzz_bitmaps(),
        },
    );
    let ro = std::sync::Arc::new(udm_io::backend::mem::MemDevice::new(16));
    let _ = server.add_export(
        "ro",
        ro,
        NbdExportOptions {
            read_only: true,
            description: None,
            insecure_tcp: false,
            bitmaps: Vec::new(),
        },
    );
    server
}

/// A dirty bitmap on the fuzzed export, so `qemu:dirty-bitmap:` queries and replies are fuzzed.
fn fuzz_bitmaps() -> Vec<NbdBitmap> {
    let Ok(mut b) = udm_types::DirtyBitmap::new(64 * 512, 4096) else {
        return Vec::new();
    };
    b.set(1);
    b.set(5);
    vec![NbdBitmap {
        name: "backup-fuzz".into(),
        bitmap: std::sync::Arc::new(b),
    }]
}

/// Feeds arbitrary client bytes to a fresh server from the first byte of the handshake; the
/// server must neither panic nor hang (it stops at the end of the input). Returns what it sent.
pub fn fuzz_handshake(data: &[u8]) -> Vec<u8> {
    serve(data.to_vec())
}

fn serve(input: Vec<u8>) -> Vec<u8> {
    let stream = MemoryStream::new(input);
    let out = stream.output.clone();
    fuzz_server().serve_blocking(stream);
    let sent = std::mem::take(&mut *out.lock());
    sent
}

/// Feeds arbitrary bytes as transmission-phase requests, after a valid handshake that
/// negotiated structured replies and `base:allocation` (when `data[0]` is odd) or plain simple
/// replies (when even). Returns what the server sent, the handshake's replies included.
pub fn fuzz_requests(data: &[u8]) -> Vec<u8> {
    let structured = data.first().is_some_and(|b| b & 1 == 1);
    let mut input = Vec::new();
    input
        .extend_from_slice(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes());
    if structured {
        input.extend(proto::option_request(proto::OPT_STRUCTURED_REPLY, &[]));
        input.extend(proto::option_request(
            proto::OPT_SET_META_CONTEXT,
            &proto::meta_request_data("fuzz", &[proto::META_BASE_ALLOCATION]),
        ));
    }
    input.extend(proto::option_request(
        proto::OPT_GO,
        &proto::info_request_data("fuzz", &[proto::INFO_BLOCK_SIZE]),
    ));
    input.extend_from_slice(data.get(1..).unwrap_or(&[]));
    serve(input)
}
