//! `udmsetup`: dmsetup-compatible control of udm mapped devices over udmd's control socket.

use clap::Parser;
use std::io::{IsTerminal, Write};
use udm_cli::setup::{self, cli::Cli, Ctx};
use udm_cli::{default_socket, Session};

fn term_columns() -> Option<usize> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the valid, exclusively borrowed `ws`.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0).then_some(ws.ws_col as usize)
}

/// Parses the command line; usage errors exit 1 as dmsetup's do (help and version exit 0).
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    }
}

fn main() {
    // SAFETY: restoring the default SIGPIPE disposition before any thread or I/O exists, so
    // `udmsetup ls | head -1` ends quietly like dmsetup instead of reporting EPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = parse();
    let env = |k: &str| std::env::var(k).ok();
    let utf8 = udm_cli::format::ls::locale_is_utf8(
        env("LC_ALL").as_deref(),
        env("LC_CTYPE").as_deref(),
        env("LANG").as_deref(),
    );
    let socket = cli.socket.clone().unwrap_or_else(default_socket);
    let verbose = cli.verbose;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut ctx = Ctx {
        session: Session::new(&socket),
        out: &mut out,
        stdin: &mut input,
        json: cli.json,
        verbose,
        uuid: cli.uuid.clone(),
        utf8,
        term_columns: term_columns(),
    };
    let r = setup::run(cli, &mut ctx);
    let _ = out.flush();
    if let Err(e) = r {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(e.report(verbose > 0).as_bytes());
        if e.command_failed_line() {
            let _ = err.write_all(b"Command failed.\n");
        }
        std::process::exit(1);
    }
}
