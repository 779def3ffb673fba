//! `udm`: high-level workflows (live snapshots, backup, migration) over udmd's control socket.

use anyhow::Context as _;
use clap::Parser;
use udm_cli::udm::{status, Cli, Command};
use udm_cli::{default_socket, Session};

fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.socket.clone().unwrap_or_else(default_socket);
    let mut session = Session::new(&socket);
    match cli.command {
        Command::Status => {
            let r = status::gather(&mut session)?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).context("encoding the status as JSON")?
                );
            } else {
                print!("{}", status::format(&r));
            }
        }
    }
    Ok(())
}

fn main() {
    // SAFETY: restoring the default SIGPIPE disposition before any thread or I/O exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("udm: {e:#}");
        std::process::exit(1);
    }
}
