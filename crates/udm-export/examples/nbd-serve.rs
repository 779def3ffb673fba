//! Serves one file over NBD until killed: the stand-in for `udmd` in tests and benchmarks.
//!
//! ```text
//! nbd-serve FILE --socket PATH [--tcp ADDR] [--name NAME] [--read-only] [--description TEXT]
//! ```
//! Prints `ready` on stdout once listening.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use udm_export::nbd::{NbdExportOptions, NbdServer, TcpSecurity};
use udm_io::backend::file::FileDevice;

fn usage() -> ! {
    eprintln!("usage: nbd-serve FILE --socket PATH [--tcp ADDR] [--name NAME] [--read-only] [--description TEXT]");
    std::process::exit(2);
}

fn main() {
    let mut file = None;
    let mut socket: Option<PathBuf> = None;
    let mut tcp: Option<SocketAddr> = None;
    let mut name = String::new();
    let mut read_only = false;
    let mut description = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = Some(args.next().unwrap_or_else(|| usage()).into()),
            "--tcp" => {
                tcp = Some(
                    args.next()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| usage()),
                )
            }
            "--name" => name = args.next().unwrap_or_else(|| usage()),
            "--description" => description = Some(args.next().unwrap_or_else(|| usage())),
            "--read-only" => read_only = true,
            s if !s.starts_with('-') && file.is_none() => file = Some(PathBuf::from(s)),
            _ => usage(),
        }
    }
    let Some(file) = file else { usage() };
    if socket.is_none() && tcp.is_none() {
        usage();
    }
    let dev = match FileDevice::open(&file, read_only) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("nbd-serve: cannot open {}: {e}", file.display());
            std::process::exit(1);
        }
    };
    let server = NbdServer::new();
    // A development tool: its TCP listener is plain (loudly logged), like `qemu-nbd` without
    // `--tls-creds`; udmd requires TLS.
    let opts = NbdExportOptions {
        read_only,
        description,
        insecure_tcp: tcp.is_some(),
        bitmaps: Vec::new(),
    };
    if let Err(e) = server.add_export(&name, dev, opts) {
        eprintln!("nbd-serve: {e}");
        std::process::exit(1);
    }
    if let Some(p) = &socket {
        if let Err(e) = server.listen_unix(p) {
            eprintln!("nbd-serve: {e}");
            std::process::exit(1);
        }
    }
    if let Some(a) = tcp {
        if let Err(e) = server.listen_tcp(
            a,
            TcpSecurity {
                tls: None,
                allow_insecure: true,
            },
        ) {
            eprintln!("nbd-serve: {e}");
            std::process::exit(1);
        }
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}
