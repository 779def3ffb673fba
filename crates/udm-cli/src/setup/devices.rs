//! Commands that change devices: create, load/reload, suspend, resume, remove, clear, rename,
//! message, wait.

use super::cli::{
    CreateArgs, LoadArgs, MessageArgs, NamesArgs, RemoveArgs, RenameArgs, ResumeArgs, SuspendArgs,
    WaitArgs,
};
use super::Ctx;
use crate::error::CliError;
use crate::input::{parse_concise, read_table};
use crate::session::unexpected;
use std::path::Path;
use udm_proto::{Request, Response};

/// udmd's major for mapped devices (the kernel's usual device-mapper major).
const DM_MAJOR: u32 = 253;

/// libdm retries a busy remove 25 times, 200 ms apart (`libdm-iface.c` `_do_dm_ioctl`
/// with `retry_remove`).
const REMOVE_RETRIES: u32 = 25;
const REMOVE_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(200);

/// A change succeeded: udmd may answer `Done` or with the changed records (e.g. the new
/// device's info after create); either way dmsetup prints nothing.
fn expect_done(_command: &str, _r: Response) -> Result<(), CliError> {
    Ok(())
}

fn create_concise(ctx: &mut Ctx<'_>, spec: Option<String>) -> Result<(), CliError> {
    if ctx.uuid.is_some() {
        return Err(CliError::Usage(
            "--concise is incompatible with --[no]table, --minor, --uuid and --inactive.".into(),
        ));
    }
    let spec = match spec {
        Some(s) => s,
        None => {
            let mut s = String::new();
            ctx.stdin
                .read_to_string(&mut s)
                .map_err(crate::input::InputError::Stdin)?;
            s
        }
    };
    let devices = parse_concise(spec.trim_end_matches('\n'))?;
    for d in devices {
        let req = Request::Create {
            name: d.name.clone(),
            uuid: d.uuid,
            table: (!d.table.lines.is_empty()).then(|| d.table.to_string()),
            read_only: d.read_only,
            interpose: d.interpose,
            freeze: None,
        };
        let r = ctx.call("create", &d.name, req)?;
        expect_done("create", r)?;
        ctx.verbose_info("info", &d.name)?;
    }
    Ok(())
}

pub(super) fn create(ctx: &mut Ctx<'_>, a: CreateArgs) -> Result<(), CliError> {
    if a.concise {
        return create_concise(ctx, a.name);
    }
    let Some(name) = a.name else {
        return Err(CliError::Usage(
            "Please provide a name for the new device.".into(),
        ));
    };
    let table = if a.notable {
        None
    } else {
        let spec = read_table(a.table.as_deref(), a.file.as_deref(), ctx.stdin)?;
        // dmsetup: no target lines = a device without a table (`_added_target == 0`).
        (!spec.lines.is_empty()).then(|| spec.to_string())
    };
    let has_table = table.is_some();
    let req = Request::Create {
        name: name.clone(),
        uuid: ctx.uuid.clone(),
        table,
        read_only: a.readonly,
        interpose: a.interpose,
        freeze: a.freeze.as_deref().map(super::udm_verbs::absolute),
    };
    match ctx.call("create", &name, req) {
        Err(CliError::Refused { reply, .. }) if has_table && !create_refused(ctx, &name)? => {
            Err(load_refused(ctx, &name, reply)?)
        }
        r => {
            expect_done("create", r?)?;
            ctx.verbose_info("info", &name)
        }
    }
}

/// Whether a failed `create NAME --table` failed where the kernel's DEV_CREATE fails (a name
/// that is invalid or taken, a uuid that is taken) rather than in the table load after it.
fn create_refused(ctx: &mut Ctx<'_>, name: &str) -> Result<bool, CliError> {
    if udm_types::DevName::new(name).is_err() {
        return Ok(true);
    }
    if super::query::mapped(ctx)?.iter().any(|d| d.name == name) {
        return Ok(true);
    }
    let Some(uuid) = ctx.uuid.clone() else {
        return Ok(false);
    };
    Ok(matches!(
        ctx.call("create", name, Request::NameByUuid { uuid }),
        Ok(Response::Name(_))
    ))
}

/// libdm creates the device, then loads the table by name and device number and removes the
/// device when the load fails, so dmsetup reports `reload ioctl on NAME (MAJ:MIN) failed` with
/// the number the device had: the lowest free minor, which udm would have given it too.
fn load_refused(
    ctx: &mut Ctx<'_>,
    name: &str,
    reply: udm_proto::ErrorReply,
) -> Result<CliError, CliError> {
    let devs = super::query::mapped(ctx)?;
    let major = devs.first().map_or(DM_MAJOR, |d| d.major);
    let minor = (0..)
        .find(|m| !devs.iter().any(|d| d.minor == *m))
        .unwrap_or_default();
    Ok(CliError::Refused {
        command: "reload".into(),
        device: format!("{name} ({major}:{minor})"),
        reply,
    })
}

pub(super) fn load(ctx: &mut Ctx<'_>, a: LoadArgs) -> Result<(), CliError> {
    let mut args = a.args.into_iter();
    let name = match ctx.name_by_uuid("reload")? {
        Some(n) => n,
        None => args
            .next()
            .ok_or_else(|| CliError::Usage("Please specify device.".into()))?,
    };
    let file = args.next();
    if args.next().is_some() {
        return Err(CliError::Usage("Too many command line arguments.".into()));
    }
    let spec = read_table(
        a.table.as_deref(),
        file.as_deref().map(Path::new),
        ctx.stdin,
    )?;
    let req = Request::Load {
        name: name.clone(),
        table: spec.to_string(),
        read_only: a.readonly,
        interpose: a.interpose,
    };
    let r = ctx.call("reload", &name, req)?;
    expect_done("reload", r)?;
    ctx.verbose_info("info", &name)
}

pub(super) fn suspend(ctx: &mut Ctx<'_>, a: SuspendArgs) -> Result<(), CliError> {
    for name in ctx.names_or_uuid("suspend", a.names)? {
        let req = Request::Suspend {
            name: name.clone(),
            noflush: a.noflush,
            nolockfs: a.nolockfs,
        };
        let r = ctx.call("suspend", &name, req)?;
        expect_done("suspend", r)?;
        ctx.verbose_info("info", &name)?;
    }
    Ok(())
}

pub(super) fn resume(ctx: &mut Ctx<'_>, a: ResumeArgs) -> Result<(), CliError> {
    for name in ctx.names_or_uuid("resume", a.names)? {
        let req = Request::Resume {
            name: name.clone(),
            freeze: a.freeze.as_deref().map(super::udm_verbs::absolute),
        };
        let r = ctx.call("resume", &name, req)?;
        expect_done("resume", r)?;
        ctx.verbose_info("info", &name)?;
    }
    Ok(())
}

pub(super) fn clear(ctx: &mut Ctx<'_>, a: NamesArgs) -> Result<(), CliError> {
    for name in ctx.names_or_uuid("clear", a.names)? {
        let r = ctx.call("clear", &name, Request::Clear { name: name.clone() })?;
        expect_done("clear", r)?;
        ctx.verbose_info("info", &name)?;
    }
    Ok(())
}

pub(super) fn remove(ctx: &mut Ctx<'_>, a: RemoveArgs) -> Result<(), CliError> {
    for name in ctx.names_or_uuid("remove", a.names)? {
        let mut tries = 0;
        loop {
            let req = Request::Remove {
                name: name.clone(),
                force: a.force,
                deferred: a.deferred,
            };
            match ctx.call("remove", &name, req) {
                Err(CliError::Refused { ref reply, .. })
                    if a.retry && reply.errno == libc::EBUSY && tries < REMOVE_RETRIES =>
                {
                    tries += 1;
                    std::thread::sleep(REMOVE_RETRY_DELAY);
                }
                r => {
                    expect_done("remove", r?)?;
                    break;
                }
            }
        }
    }
    Ok(())
}

pub(super) fn rename(ctx: &mut Ctx<'_>, a: RenameArgs) -> Result<(), CliError> {
    let (name, new) = match (ctx.name_by_uuid("rename")?, a.args.as_slice()) {
        (Some(n), [new]) => (n, new.clone()),
        (None, [old, new]) => (old.clone(), new.clone()),
        (Some(_), _) => {
            return Err(CliError::Usage(
                "With -u, rename takes only the new name (or uuid).".into(),
            ))
        }
        (None, _) => {
            return Err(CliError::Usage(
                "rename needs <device> <new_name> (or <device> --setuuid <uuid>).".into(),
            ))
        }
    };
    let req = if a.setuuid {
        Request::Rename {
            name: name.clone(),
            new_name: None,
            set_uuid: Some(new),
        }
    } else {
        Request::Rename {
            name: name.clone(),
            new_name: Some(new),
            set_uuid: None,
        }
    };
    let r = ctx.call("rename", &name, req)?;
    expect_done("rename", r)
}

/// dmsetup prints a message reply as is when it is empty or ends in a newline, else with one.
pub fn message_output(reply: &str) -> String {
    if reply.is_empty() || reply.ends_with('\n') {
        reply.to_string()
    } else {
        format!("{reply}\n")
    }
}

pub(super) fn message(ctx: &mut Ctx<'_>, a: MessageArgs) -> Result<(), CliError> {
    let mut args = a.args.into_iter();
    let name = match ctx.name_by_uuid("message")? {
        Some(n) => n,
        None => args
            .next()
            .ok_or_else(|| CliError::Usage("No device specified.".into()))?,
    };
    let sector = args
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| CliError::Usage("Invalid sector.".into()))?;
    let words: Vec<String> = args.collect();
    if words.is_empty() {
        return Err(CliError::Usage("No message supplied.".into()));
    }
    let req = Request::Message {
        name: name.clone(),
        sector,
        message: words,
    };
    match ctx.call("message", &name, req)? {
        Response::Done | Response::MessageOutput(None) => Ok(()),
        Response::MessageOutput(Some(s)) => ctx.write(&message_output(&s)),
        other => Err(unexpected("message", &other)),
    }
}

pub(super) fn wait(ctx: &mut Ctx<'_>, a: WaitArgs) -> Result<(), CliError> {
    let mut args = a.args.into_iter();
    let name = match ctx.name_by_uuid("wait")? {
        Some(n) => n,
        None => args
            .next()
            .ok_or_else(|| CliError::Usage("No device specified.".into()))?,
    };
    let event_nr = match args.next() {
        None => 0,
        Some(s) => s
            .parse::<u32>()
            .map_err(|_| CliError::Usage(format!("Invalid event number: {s}")))?,
    };
    let req = Request::Wait {
        name: name.clone(),
        event_nr,
        timeout_ms: a.timeout,
    };
    match ctx.call("wait", &name, req)? {
        Response::Event(n) => {
            if ctx.json {
                let v = serde_json::json!({ "name": name, "event_nr": n });
                ctx.write(&crate::format::json(&v))
            } else {
                ctx.verbose_info("info", &name)
            }
        }
        other => Err(unexpected("wait", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_replies_get_one_newline() {
        assert_eq!(message_output(""), "");
        assert_eq!(message_output("ok"), "ok\n");
        assert_eq!(message_output("a\nb\n"), "a\nb\n");
    }
}
