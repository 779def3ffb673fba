//! `udm`: high-level workflows (live snapshots, backup, migration) over udmd's control socket.

use anyhow::Context as _;
use clap::Parser;
use udm_cli::udm::backup::{self, BackupCommand, Kind, Progress};
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
        Command::Backup(cmd) => backup_cmd(&mut session, cmd, cli.json),
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

/// Shows progress: a bar on a terminal, JSON lines with `--json`, plain notes otherwise.
struct Reporter {
    json: bool,
    bar: Option<indicatif::ProgressBar>,
    /// When the last JSON progress line was printed (at most one a second, and the last).
    last: Option<std::time::Instant>,
}

impl Reporter {
    fn new(json: bool) -> Reporter {
        use std::io::IsTerminal;
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            ) {
                b.set_style(style);
            }
            b
        });
        Reporter {
            json,
            bar,
            last: None,
        }
    }

    fn report(&mut self, p: Progress) {
        match p {
            Progress::Note(n) if self.json => {
                println!("{}", serde_json::json!({ "event": "note", "message": n }))
            }
            Progress::Note(n) => match &self.bar {
                Some(b) => b.println(n),
                None => eprintln!("{n}"),
            },
            Progress::Copied { done, total } => {
                let due = self.last.is_none_or(|t| t.elapsed().as_secs() >= 1) || done >= total;
                if self.json && due {
                    self.last = Some(std::time::Instant::now());
                    println!(
                        "{}",
                        serde_json::json!({ "event": "progress", "done": done, "total": total })
                    );
                } else if let Some(b) = &self.bar {
                    b.set_length(total);
                    b.set_position(done);
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn backup_cmd(s: &mut Session, cmd: BackupCommand, json: bool) -> anyhow::Result<()> {
    let mut r = Reporter::new(json);
    let mut progress = |p: Progress| r.report(p);
    let result =
        |v: serde_json::Value| println!("{}", serde_json::json!({ "event": "done", "result": v }));
    match cmd {
        BackupCommand::Full(a) => {
            let p = backup::run::run(s, Kind::Full, &a, &mut progress)?;
            print_point(&a, &p, json, &result)?;
        }
        BackupCommand::Incremental(a) => {
            let p = backup::run::run(s, Kind::Incremental, &a, &mut progress)?;
            print_point(&a, &p, json, &result)?;
        }
        BackupCommand::List { dir } => {
            let m = backup::Manifest::load(&dir)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "{} is not a udm backup directory (no backup.json)",
                    dir.display()
                )
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print!("{}", backup::format_list(&m));
            }
        }
        BackupCommand::Restore(a) => {
            let rep = backup::restore::restore(s, &a, &mut progress)?;
            if json {
                result(serde_json::to_value(&rep)?);
            } else {
                println!(
                    "point {} restored to {} ({} bytes, {} clusters checked, digest {})",
                    rep.point, a.to, rep.size, rep.clusters, rep.digest
                );
            }
        }
        BackupCommand::Verify(a) => {
            let rep = backup::restore::verify(&a.dir, a.point, &mut progress)?;
            if json {
                result(serde_json::to_value(&rep)?);
            } else {
                println!(
                    "point {} verified: {} clusters match their checksums ({} bytes of data, digest {})",
                    rep.point, rep.clusters, rep.data_bytes, rep.digest
                );
            }
        }
    }
    r.finish();
    Ok(())
}

fn print_point(
    a: &backup::RunArgs,
    p: &backup::Point,
    json: bool,
    result: &dyn Fn(serde_json::Value),
) -> anyhow::Result<()> {
    if json {
        result(serde_json::to_value(p)?);
    } else {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "point {} ({:?}) of {} in {}: {:.1} MiB changed, {:.1} MiB copied, {:.1} MiB as zeros, image {:.1} MiB, {:.1} s",
            p.n,
            p.kind,
            a.device,
            a.to.join(&p.file).display(),
            mib(p.changed_bytes),
            mib(p.data_bytes),
            mib(p.zero_bytes),
            mib(p.image_bytes),
            p.seconds
        );
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
