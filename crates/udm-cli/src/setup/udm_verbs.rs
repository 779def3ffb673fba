//! The udm-only verbs: `disk add|remove|list`, `export add|remove|list`.

use super::cli::{DiskCommand, ExportCommand};
use super::Ctx;
use crate::error::CliError;
use crate::format::{self, report::ReportStyle};
use crate::session::unexpected;
use std::path::Path;
use udm_proto::{BitmapSpec, ExportKind, Request, Response};

pub(super) fn disk(ctx: &mut Ctx<'_>, d: DiskCommand) -> Result<(), CliError> {
    match d {
        DiskCommand::Add(a) => {
            let create = match a.create.as_deref() {
                None => None,
                Some(s) => Some(udm_types::units::parse_size(s).ok_or_else(|| {
                    CliError::Usage(format!(
                        "Invalid size for --create: '{s}' (a number of bytes, or with a K, M, G or T suffix)"
                    ))
                })?),
            };
            let req = Request::DiskAdd {
                name: a.name.clone(),
                path: absolute(&a.file),
                create,
                read_only: a.read_only,
                direct: a.direct,
            };
            // udmd answers Done or the new disk's record; dmsetup-style, print nothing.
            ctx.call("disk add", &a.name, req).map(|_| ())
        }
        DiskCommand::Remove { name } => {
            match ctx.call(
                "disk remove",
                &name,
                Request::DiskRemove { name: name.clone() },
            )? {
                Response::Done => Ok(()),
                other => Err(unexpected("disk remove", &other)),
            }
        }
        DiskCommand::Retry { name } => {
            let req = Request::DiskRetry { name: name.clone() };
            ctx.call("disk retry", name.as_deref().unwrap_or(""), req)
                .map(|_| ())
        }
        DiskCommand::List => match ctx.call("disk list", "", Request::DiskList)? {
            Response::Disks(v) if ctx.json => ctx.write(&format::json(&v)),
            Response::Disks(v) => ctx.write(&format::disk::disk_list(&v, &ReportStyle::default())),
            other => Err(unexpected("disk list", &other)),
        },
    }
}

pub(super) fn export(ctx: &mut Ctx<'_>, e: ExportCommand) -> Result<(), CliError> {
    match e {
        ExportCommand::Add(a) => {
            let kind = if let Some(dir) = a.fuse {
                ExportKind::Fuse {
                    dir: absolute(&dir),
                }
            } else if a.ublk {
                ExportKind::Ublk {
                    id: a.ublk_id,
                    queues: a.queues,
                    depth: a.queue_depth,
                }
            } else if let Some(socket) = a.vhost_user {
                ExportKind::VhostUser {
                    socket: absolute(&socket),
                    num_queues: a.num_queues.unwrap_or(1),
                }
            } else {
                let mut bitmaps = Vec::new();
                for b in &a.dirty_bitmaps {
                    let Some((name, file)) = b.split_once('=') else {
                        return Err(CliError::Usage(format!(
                            "--dirty-bitmap {b:?}: expected NAME=FILE"
                        )));
                    };
                    bitmaps.push(BitmapSpec {
                        name: name.to_string(),
                        file: absolute(Path::new(file)),
                    });
                }
                ExportKind::Nbd {
                    name: a.name,
                    insecure_tcp: a.insecure_tcp,
                    bitmaps,
                }
            };
            let kind_name = match &kind {
                ExportKind::Nbd { .. } => "nbd",
                ExportKind::Fuse { .. } => "fuse",
                ExportKind::Ublk { .. } => "ublk",
                ExportKind::VhostUser { .. } => "vhost-user",
            };
            let req = Request::ExportAdd {
                device: a.device.clone(),
                export: kind,
                read_only: a.read_only,
            };
            // udmd answers with the export list (or Done, then we ask for it).
            let list = match ctx.call("export add", &a.device, req)? {
                Response::Exports(v) => v,
                _ => match ctx.call("export list", "", Request::ExportList)? {
                    Response::Exports(v) => v,
                    other => return Err(unexpected("export list", &other)),
                },
            };
            // Tell the user the new export's id and where clients connect.
            if let Some(x) = list
                .iter()
                .rev()
                .find(|x| x.device == a.device && x.kind == kind_name)
            {
                ctx.write(&format!("{}\t{}\n", x.id, x.location))?;
            }
            Ok(())
        }
        ExportCommand::Remove { id } => {
            let id = resolve_export_id(ctx, &id)?;
            match ctx.call(
                "export remove",
                &id,
                Request::ExportRemove { id: id.clone() },
            )? {
                Response::Done => Ok(()),
                other => Err(unexpected("export remove", &other)),
            }
        }
        ExportCommand::List => match ctx.call("export list", "", Request::ExportList)? {
            Response::Exports(v) if ctx.json => ctx.write(&format::json(&v)),
            Response::Exports(v) => {
                ctx.write(&format::export::export_list(&v, &ReportStyle::default()))
            }
            other => Err(unexpected("export list", &other)),
        },
    }
}

/// `export remove` takes an export id (`nbd:vol`) or the name of a device with exactly one
/// export (`vol`); a device with several exports is refused with their ids.
fn resolve_export_id(ctx: &mut Ctx<'_>, arg: &str) -> Result<String, CliError> {
    let list = match ctx.call("export list", "", Request::ExportList)? {
        Response::Exports(v) => v,
        other => return Err(unexpected("export list", &other)),
    };
    if list.iter().any(|x| x.id == arg) {
        return Ok(arg.to_string());
    }
    let ids: Vec<&str> = list
        .iter()
        .filter(|x| x.device == arg)
        .map(|x| x.id.as_str())
        .collect();
    match ids.as_slice() {
        [] => Ok(arg.to_string()),
        [one] => Ok((*one).to_string()),
        many => Err(CliError::Usage(format!(
            "export remove: device {arg} has {} exports ({}); give the id of the one to remove",
            many.len(),
            many.join(", ")
        ))),
    }
}

/// udmd does not share our working directory: send paths absolute.
pub(crate) fn absolute(p: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
