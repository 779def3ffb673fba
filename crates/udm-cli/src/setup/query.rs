//! Read commands: info, ls, deps, status, table, targets, version. Each prints dmsetup's
//! format, or the protocol records with `--json`.

use super::cli::{DepsArgs, InfoArgs, LsArgs, StatusArgs, TableArgs};
use super::Ctx;
use crate::error::CliError;
use crate::format::{self, deps::DevNameStyle, ls::TreeOptions, report::ReportStyle};
use crate::session::unexpected;
use udm_proto::{
    DeviceDeps, DeviceKindRecord, DeviceLines, DeviceRecord, InfoRecord, Request, Response,
};

/// dmsetup's `multiple_devices`: no device named (all devices), or more than one.
fn multiple(names: &[String], uuid: bool) -> bool {
    (names.is_empty() && !uuid) || names.len() > 1
}

/// The devices to report: `None` = all.
fn targets_of(
    ctx: &mut Ctx<'_>,
    command: &str,
    names: Vec<String>,
) -> Result<Option<Vec<String>>, CliError> {
    if !names.is_empty() {
        return Ok(Some(names));
    }
    Ok(ctx.name_by_uuid(command)?.map(|n| vec![n]))
}

fn all_infos(ctx: &mut Ctx<'_>) -> Result<Vec<InfoRecord>, CliError> {
    match ctx.call("info", "", Request::Info { name: None })? {
        Response::Info(mut v) => {
            v.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(v)
        }
        other => Err(unexpected("info", &other)),
    }
}

fn list(ctx: &mut Ctx<'_>) -> Result<Vec<DeviceRecord>, CliError> {
    match ctx.call("ls", "", Request::List)? {
        Response::Devices(v) => Ok(v),
        other => Err(unexpected("ls", &other)),
    }
}

/// The mapped devices of `List`.
pub(super) fn mapped(ctx: &mut Ctx<'_>) -> Result<Vec<DeviceRecord>, CliError> {
    let mut v = list(ctx)?;
    v.retain(|d| d.kind == DeviceKindRecord::Mapped);
    Ok(v)
}

pub(super) fn info(ctx: &mut Ctx<'_>, a: InfoArgs) -> Result<(), CliError> {
    let infos = match targets_of(ctx, "info", a.names)? {
        None => all_infos(ctx)?,
        Some(names) => {
            let mut v = Vec::new();
            for n in names {
                v.push(ctx.info_of("info", &n)?);
            }
            v
        }
    };
    if ctx.json {
        return ctx.write(&format::json(&infos));
    }
    if infos.is_empty() {
        return ctx.write(format::ls::NO_DEVICES);
    }
    let (with_bdev, without): (Vec<InfoRecord>, Vec<InfoRecord>) =
        infos.iter().cloned().partition(|i| !i.no_block_device);
    if a.columns {
        let fields = format::info::parse_fields(a.options.as_deref()).map_err(CliError::Usage)?;
        if fields.contains(&format::info::Field::ReadAhead) {
            without
                .iter()
                .for_each(|i| eprint!("{}", format::info::no_block_device(i)));
        }
        // dmsetup leaves out the row of a device without a `dm-N` name and fails.
        let (rows, failed) = if fields.contains(&format::info::Field::BlkDevName) {
            (with_bdev, without)
        } else {
            (infos, Vec::new())
        };
        let mut style = if a.noheadings {
            ReportStyle::noheadings()
        } else {
            ReportStyle::default()
        };
        if let Some(sep) = a.separator {
            style.separator = sep;
            style.aligned = false;
        }
        ctx.write(&format::info::info_columns(&rows, &fields, &style))?;
        if failed.is_empty() {
            return Ok(());
        }
        let why: String = failed.iter().map(format::info::no_blkdevname).collect();
        return Err(CliError::ReportField(why));
    }
    let text: String = infos.iter().map(format::info::info_long).collect();
    ctx.write(&text)?;
    without
        .iter()
        .for_each(|i| eprint!("{}", format::info::no_block_device(i)));
    Ok(())
}

pub(super) fn ls(ctx: &mut Ctx<'_>, a: LsArgs) -> Result<(), CliError> {
    let devs = list(ctx)?;
    if ctx.json {
        return ctx.write(&format::json(&devs));
    }
    if let Some(t) = a.target {
        let all = lines_of(ctx, "table", None, false)?;
        let mapped: std::collections::HashMap<&str, &DeviceRecord> =
            devs.iter().map(|d| (d.name.as_str(), d)).collect();
        if all.is_empty() {
            return ctx.write(format::ls::NO_DEVICES);
        }
        let hits: Vec<(String, u32, u32)> = all
            .iter()
            .filter(|d| d.lines.iter().any(|l| l.target_type == t))
            .filter_map(|d| mapped.get(d.name.as_str()))
            .map(|d| (d.name.clone(), d.major, d.minor))
            .collect();
        return ctx.write(&format::ls::ls_with_target(&hits));
    }
    if a.tree {
        let mut o = TreeOptions::parse(a.options.as_deref(), ctx.utf8).map_err(CliError::Usage)?;
        if let Some(cols) = ctx.term_columns {
            // dmsetup: winsz.ws_col - 3 when stdout is a terminal (not with vt100).
            if cols > 3 && o.symbols != format::ls::TREE_VT100 {
                o.termwidth = cols - 3;
            }
        }
        let infos = if o.active || o.rw || o.open || o.uuid {
            all_infos(ctx)?
        } else {
            Vec::new()
        };
        return ctx.write(&format::ls::ls_tree(&devs, &infos, &o));
    }
    let style = match a.options.as_deref() {
        Some(s) => DevNameStyle::parse(s).map_err(CliError::Usage)?,
        None => DevNameStyle::DevNo,
    };
    ctx.write(&format::ls::ls_names(&devs, style))
}

fn lines_of(
    ctx: &mut Ctx<'_>,
    command: &str,
    names: Option<Vec<String>>,
    inactive: bool,
) -> Result<Vec<DeviceLines>, CliError> {
    let req = |name: Option<String>| {
        if command == "table" {
            Request::Table {
                name,
                inactive,
                concise: false,
            }
        } else {
            Request::Status { name, inactive }
        }
    };
    match names {
        None => match ctx.call(command, "", req(None))? {
            Response::Lines(mut v) => {
                v.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(v)
            }
            other => Err(unexpected(command, &other)),
        },
        Some(names) => {
            let mut out = Vec::new();
            for n in names {
                match ctx.call(command, &n, req(Some(n.clone())))? {
                    Response::Lines(v) => out.extend(v),
                    other => return Err(unexpected(command, &other)),
                }
            }
            Ok(out)
        }
    }
}

fn print_lines(
    ctx: &mut Ctx<'_>,
    command: &str,
    names: Vec<String>,
    target: Option<String>,
    inactive: bool,
) -> Result<(), CliError> {
    let multi = multiple(&names, ctx.uuid.is_some());
    let sel = targets_of(ctx, command, names)?;
    let all = sel.is_none();
    let devs = lines_of(ctx, command, sel, inactive)?;
    if ctx.json {
        return ctx.write(&format::json(&devs));
    }
    if all && devs.is_empty() {
        return ctx.write(format::ls::NO_DEVICES);
    }
    if ctx.verbose > 0 {
        // dmsetup -v: the device's info before its first line, no prefix, blank line after
        // each device when several are printed.
        for d in &devs {
            let i = ctx.info_of("info", &d.name)?;
            ctx.write(&format::info::info_long(&i))?;
            let text =
                format::lines::device_lines(std::slice::from_ref(d), target.as_deref(), false);
            ctx.write(&text)?;
            if multi {
                ctx.write("\n")?;
            }
        }
        return Ok(());
    }
    let text = format::lines::device_lines(&devs, target.as_deref(), multi);
    ctx.write(&text)
}

pub(super) fn status(ctx: &mut Ctx<'_>, a: StatusArgs) -> Result<(), CliError> {
    print_lines(ctx, "status", a.names, a.target, a.inactive)
}

pub(super) fn table(ctx: &mut Ctx<'_>, a: TableArgs) -> Result<(), CliError> {
    if !a.concise {
        return print_lines(ctx, "table", a.names, a.target, a.inactive);
    }
    let sel = targets_of(ctx, "table", a.names)?;
    let names: Vec<Option<String>> = match sel {
        None => vec![None],
        Some(v) => v.into_iter().map(Some).collect(),
    };
    let mut parts = Vec::new();
    for n in names {
        let dev = n.clone().unwrap_or_default();
        let req = Request::Table {
            name: n,
            inactive: a.inactive,
            concise: true,
        };
        match ctx.call("table", &dev, req)? {
            Response::Concise(s) => {
                if !s.is_empty() {
                    parts.push(s)
                }
            }
            other => return Err(unexpected("table", &other)),
        }
    }
    if ctx.json {
        return ctx.write(&format::json(&parts.join(";")));
    }
    if parts.is_empty() {
        return Ok(());
    }
    ctx.write(&format!("{}\n", parts.join(";")))
}

pub(super) fn deps(ctx: &mut Ctx<'_>, a: DepsArgs) -> Result<(), CliError> {
    let style = match a.options.as_deref() {
        Some(s) => DevNameStyle::parse(s).map_err(CliError::Usage)?,
        None => DevNameStyle::DevNo,
    };
    let multi = multiple(&a.names, ctx.uuid.is_some());
    let sel = targets_of(ctx, "deps", a.names)?;
    let all = sel.is_none();
    let mut out: Vec<DeviceDeps> = Vec::new();
    match sel {
        None => match ctx.call(
            "deps",
            "",
            Request::Deps {
                name: None,
                inactive: a.inactive,
            },
        )? {
            Response::Deps(mut v) => {
                v.sort_by(|a, b| a.name.cmp(&b.name));
                out.extend(v);
            }
            other => return Err(unexpected("deps", &other)),
        },
        Some(names) => {
            for n in names {
                let req = Request::Deps {
                    name: Some(n.clone()),
                    inactive: a.inactive,
                };
                // A missing device fails the deps ioctl (ENXIO), as in dmsetup.
                match ctx.call("deps", &n, req)? {
                    Response::Deps(v) => out.extend(v),
                    other => return Err(unexpected("deps", &other)),
                }
            }
        }
    }
    if ctx.json {
        return ctx.write(&format::json(&out));
    }
    if all && out.is_empty() {
        return ctx.write(format::ls::NO_DEVICES);
    }
    let mapped: std::collections::HashSet<(u32, u32)> = if style == DevNameStyle::BlkDevName {
        list(ctx)?
            .iter()
            .filter(|d| d.kind == DeviceKindRecord::Mapped)
            .map(|d| (d.major, d.minor))
            .collect()
    } else {
        Default::default()
    };
    let mut text = String::new();
    for d in &out {
        // dmsetup -v: the device's info before its dependencies (`_deps`).
        if ctx.verbose > 0 {
            text.push_str(&format::info::info_long(&ctx.info_of("info", &d.name)?));
        }
        text.push_str(&format::deps::deps_line(d, multi, style, &|dep| {
            mapped.contains(&(dep.major, dep.minor))
        }));
    }
    ctx.write(&text)
}

pub(super) fn targets(ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    match ctx.call("targets", "", Request::Targets)? {
        Response::Targets(t) if ctx.json => ctx.write(&format::json(&t)),
        Response::Targets(t) => ctx.write(&format::targets::targets(&t)),
        other => Err(unexpected("targets", &other)),
    }
}

pub(super) fn version(ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    let cli = env!("CARGO_PKG_VERSION");
    match ctx.call("version", "", Request::Version) {
        Ok(Response::Version(v)) if ctx.json => ctx.write(&format::json(&v)),
        Ok(Response::Version(v)) => ctx.write(&format::targets::version(cli, Some(&v))),
        Ok(other) => Err(unexpected("version", &other)),
        Err(e) => {
            // dmsetup prints the library line even when the driver is unreachable.
            if !ctx.json {
                ctx.write(&format::targets::version(cli, None))?;
            }
            Err(e)
        }
    }
}
