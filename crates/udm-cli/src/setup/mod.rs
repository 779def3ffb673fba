//! `udmsetup`: argument definitions ([`cli`]) and the commands, one module per family.

pub mod cli;
mod devices;
mod query;
mod udm_verbs;

use crate::error::CliError;
use crate::session::{unexpected, Session};
use cli::{Cli, Command};
use std::io::{Read, Write};
use udm_proto::{InfoRecord, Request, Response};

/// Everything a command needs besides its arguments; the binary fills it from the process
/// (stdout, stdin, environment), tests from buffers.
pub struct Ctx<'a> {
    /// Control session.
    pub session: Session,
    /// Standard output.
    pub out: &'a mut dyn Write,
    /// Table input when neither `--table` nor a file is given.
    pub stdin: &'a mut dyn Read,
    /// `--json`.
    pub json: bool,
    /// `-v` count.
    pub verbose: u8,
    /// `-u`.
    pub uuid: Option<String>,
    /// Whether the locale's codeset is UTF-8 (tree drawing).
    pub utf8: bool,
    /// Terminal columns when stdout is a terminal (tree truncation).
    pub term_columns: Option<usize>,
}

impl Ctx<'_> {
    fn call(&mut self, command: &str, device: &str, req: Request) -> Result<Response, CliError> {
        let label = self.ioctl_label(command, device);
        self.session.call(command, &label, req)
    }

    /// How libdm names the device in `device-mapper: <op> ioctl on <name> <uuid> failed`:
    /// the name and the uuid it sent, either possibly empty (`on lin  failed`, `on  UUID
    /// failed` with -u, `on dup UUID failed` for `create -u`). udm-only verbs keep the name.
    fn ioctl_label(&self, command: &str, device: &str) -> String {
        if device.is_empty() || command.starts_with("disk") || command.starts_with("export") {
            return device.to_string();
        }
        match (&self.uuid, command) {
            (Some(u), "create") => format!("{device} {u}"),
            (Some(u), _) => format!(" {u}"),
            (None, _) => format!("{device} "),
        }
    }

    fn write(&mut self, s: &str) -> Result<(), CliError> {
        self.out.write_all(s.as_bytes())?;
        Ok(())
    }

    /// Resolves `-u UUID` to a name (Request::NameByUuid).
    fn name_by_uuid(&mut self, command: &str) -> Result<Option<String>, CliError> {
        let Some(uuid) = self.uuid.clone() else {
            return Ok(None);
        };
        match self.call(command, &uuid, Request::NameByUuid { uuid: uuid.clone() })? {
            Response::Name(n) => Ok(Some(n)),
            other => Err(unexpected(command, &other)),
        }
    }

    /// The devices a repeatable command acts on: the names given, or the `-u` device.
    fn names_or_uuid(
        &mut self,
        command: &str,
        names: Vec<String>,
    ) -> Result<Vec<String>, CliError> {
        if !names.is_empty() {
            return Ok(names);
        }
        match self.name_by_uuid(command)? {
            Some(n) => Ok(vec![n]),
            None => Err(CliError::Usage("No device specified.".into())),
        }
    }

    fn info_of(&mut self, command: &str, name: &str) -> Result<InfoRecord, CliError> {
        match self.call(
            command,
            name,
            Request::Info {
                name: Some(name.to_string()),
            },
        )? {
            Response::Info(mut v) if !v.is_empty() => Ok(v.remove(0)),
            other => Err(unexpected(command, &other)),
        }
    }

    /// `-v` after a change: dmsetup's `_display_info`.
    fn verbose_info(&mut self, command: &str, name: &str) -> Result<(), CliError> {
        if self.verbose > 0 {
            let i = self.info_of(command, name)?;
            self.write(&crate::format::info::info_long(&i))?;
        }
        Ok(())
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    match cli.command {
        Command::Create(a) => devices::create(ctx, a),
        Command::Remove(a) => devices::remove(ctx, a),
        Command::Suspend(a) => devices::suspend(ctx, a),
        Command::Resume(a) => devices::resume(ctx, a),
        Command::Load(a) | Command::Reload(a) => devices::load(ctx, a),
        Command::Clear(a) => devices::clear(ctx, a),
        Command::Rename(a) => devices::rename(ctx, a),
        Command::Message(a) => devices::message(ctx, a),
        Command::Wait(a) => devices::wait(ctx, a),
        Command::Ls(a) => query::ls(ctx, a),
        Command::Info(a) => query::info(ctx, a),
        Command::Deps(a) => query::deps(ctx, a),
        Command::Status(a) => query::status(ctx, a),
        Command::Table(a) => query::table(ctx, a),
        Command::Targets => query::targets(ctx),
        Command::Version => query::version(ctx),
        Command::Disk(d) => udm_verbs::disk(ctx, d),
        Command::Export(e) => udm_verbs::export(ctx, e),
    }
}
