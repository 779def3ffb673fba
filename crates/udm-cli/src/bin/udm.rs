//! `udm`: high-level workflows (live snapshots, backup, migration) over udmd's control socket.

use anyhow::Context as _;
use clap::Parser;
use udm_cli::udm::snapshot::{self, SnapshotCommand};
use udm_cli::udm::track::{self, TrackCommand};
use udm_cli::udm::{status, Cli, Command};
use udm_cli::{default_socket, Session};

fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = cli.socket.clone().unwrap_or_else(default_socket);
    let mut session = Session::new(&socket);
    let r = match cli.command {
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
            Ok(())
        }
        Command::Snapshot(cmd) => snapshot_cmd(&mut session, cmd, cli.json),
        Command::Track(cmd) => track_cmd(&mut session, cmd, cli.json),
    };
    if cli.timings {
        for t in session.timings() {
            eprintln!(
                "timing: {:.3} ms {} {}",
                t.took.as_secs_f64() * 1e3,
                t.command,
                t.device
            );
        }
    }
    r
}

fn snapshot_cmd(s: &mut Session, cmd: SnapshotCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Take(a) => {
            let (name, location) = snapshot::take(s, &a)?;
            println!("snapshot {name} of {} taken", a.device);
            if let Some(l) = location {
                println!("exported read-only at {l}");
            }
        }
        SnapshotCommand::List => {
            let l = snapshot::list(s)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", snapshot::format_list(&l));
            }
        }
        SnapshotCommand::Status { name } => {
            let l = snapshot::list(s)?;
            let item = l
                .into_iter()
                .find(|x| x.name == name || x.origin_interposer.as_deref() == Some(name.as_str()))
                .ok_or_else(|| {
                    anyhow::anyhow!("{name} is neither a snapshot nor a merging origin")
                })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&item)?);
            } else {
                print!("{}", snapshot::format_list(std::slice::from_ref(&item)));
                println!("status: {}", item.status);
            }
        }
        SnapshotCommand::Drop { name } => {
            snapshot::drop_snapshot(s, &name)?;
            println!("snapshot {name} dropped");
        }
        SnapshotCommand::Merge { name, no_wait } => {
            let mut last = u64::MAX;
            let origin = snapshot::merge(s, &name, no_wait, &mut |done, total| {
                let pct = (done * 100).checked_div(total).unwrap_or(100);
                if pct != last {
                    eprintln!("merging {name}: {pct}% ({done}/{total} sectors)");
                    last = pct;
                }
            })?;
            if no_wait {
                println!(
                    "merging {name} through {origin}; follow with `udm snapshot status {origin}`"
                );
            } else {
                println!("snapshot {name} merged into its origin");
            }
        }
    }
    Ok(())
}

fn track_cmd(s: &mut Session, cmd: TrackCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        TrackCommand::Start(a) => {
            let (name, meta, bs) = track::start(s, &a)?;
            if json {
                let v = serde_json::json!({
                    "device": a.device, "era_device": name, "meta_file": meta,
                    "block_sectors": bs,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "tracking {} through {name} ({bs}-sector blocks, metadata {})",
                    a.device,
                    meta.display()
                );
            }
        }
        TrackCommand::Stop { device, delete } => {
            let meta = track::stop(s, &device, delete)?;
            match meta {
                Some(m) if !delete => println!(
                    "tracking of {device} stopped; metadata kept in {}",
                    m.display()
                ),
                _ => println!("tracking of {device} stopped"),
            }
        }
        TrackCommand::Status { device, since } => {
            let t = track::status(s, &device, since)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print!("{}", track::format_status(&t));
            }
        }
        TrackCommand::Checkpoint { device } => {
            let era = track::checkpoint(s, &device)?;
            if json {
                println!("{}", serde_json::json!({ "device": device, "era": era }));
            } else {
                println!("{device}: new era {era} (a backup point: `udm track status {device} --since {era}`)");
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
