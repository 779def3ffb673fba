//! The control server: one thread per connection, one JSON request per line, peers checked by
//! credentials. Every request that changes what a user set up is recorded in the state directory
//! before it is acknowledged.

use crate::exports::Exports;
use crate::state::{self, DaemonState, ExportConfig, STATE_VERSION};
use parking_lot::Mutex;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use udm_core::registry::{LoadFlags, ResumeOptions, SuspendFlags};
use udm_core::{CoreError, Registry};
use udm_proto::*;
use udm_target::table::{ConciseDevice, TableSpec};
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// The daemon's shared state.
pub struct Daemon {
    /// Devices.
    pub registry: Arc<Registry>,
    /// Exports.
    pub exports: Exports,
    /// Where state.json lives.
    pub state_dir: PathBuf,
    /// Serialises changes and their recording.
    pub change: Mutex<()>,
}

/// Set when shutdown begins: later changes are refused instead of being applied and then lost.
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// Refuses every later change with ESHUTDOWN (queries are still answered).
pub fn refuse_changes() {
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
}

fn err(e: impl HasErrno + std::fmt::Display) -> ErrorReply {
    let errno = e.errno();
    ErrorReply {
        errno: errno.0,
        errno_name: errno.name().to_string(),
        message: e.to_string(),
    }
}

fn parse_table(text: &str) -> Result<TableSpec, ErrorReply> {
    TableSpec::parse(text).map_err(err)
}

impl Daemon {
    /// Retries unavailable devices (all, or `name`) and then pending exports. Returns what
    /// came back; with `name`, ENODEV when that device is still unavailable. The caller holds
    /// the change lock and records the state afterwards.
    pub fn retry(&self, name: Option<&str>) -> Result<Vec<String>, CoreError> {
        let r = self.registry.retry_unavailable(name);
        let exports = self.exports.retry_pending();
        let mut back = r?;
        back.extend(exports);
        Ok(back)
    }

    /// Records the current configuration.
    pub fn save(&self) -> anyhow::Result<()> {
        let st = DaemonState {
            version: STATE_VERSION,
            registry: self.registry.config(),
            exports: self
                .exports
                .config()
                .into_iter()
                .map(|(device, export, read_only)| ExportConfig {
                    device,
                    export,
                    read_only,
                })
                .collect(),
        };
        state::save(&self.state_dir, &st)
    }

    fn names(&self, name: &Option<String>) -> Vec<String> {
        match name {
            Some(n) => vec![n.clone()],
            None => self
                .registry
                .list_mapped()
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
        }
    }

    fn info_record(&self, name: &str) -> Result<InfoRecord, ErrorReply> {
        self.registry.info(name).map_err(err)
    }

    /// Executes one request.
    ///
    /// Registry requests (suspend, resume, create, ...) run without the control lock: the
    /// registry serialises them itself, and one of them may wait for I/O that only another one
    /// (a `resume`) releases. The control lock covers export changes and the recording of the
    /// state, and is never held while waiting for a client or a suspended device: an export
    /// removal is taken out of the table under the lock and torn down after it is released.
    pub fn handle(&self, req: Request) -> Reply {
        let mutating = !matches!(
            req,
            Request::Version
                | Request::DiskList
                | Request::Info { .. }
                | Request::List
                | Request::Table { .. }
                | Request::Status { .. }
                | Request::Deps { .. }
                | Request::Targets
                | Request::Wait { .. }
                | Request::NameByUuid { .. }
                | Request::ExportList
        );
        if !mutating {
            return match self.read(req) {
                Ok(r) => Reply::Ok(r),
                Err(e) => Reply::Err(e),
            };
        }
        if SHUTTING_DOWN.load(Ordering::SeqCst) {
            return error_reply(
                Errno::ESHUTDOWN.0,
                "ESHUTDOWN",
                "udmd is shutting down; the change was not made".into(),
            );
        }
        if let Err(e) = absolute_paths(&req) {
            return Reply::Err(e);
        }
        match req {
            // Under the lock: these start exports (a returning disk starts its pending ones).
            Request::ExportAdd { .. } | Request::DiskAdd { .. } | Request::DiskRetry { .. } => {
                let _g = self.change.lock();
                let r = self.change(req);
                self.record_locked(r)
            }
            Request::ExportRemove { id } => {
                let (taken, reply) = {
                    let _g = self.change.lock();
                    match self.exports.take(&id) {
                        Ok(t) => (Some(t), self.record_locked(Ok(Response::Done))),
                        Err(e) => (None, self.record_locked(Err(err(e)))),
                    }
                };
                // Without the lock: the clients' in-flight requests may wait for a `resume`.
                if let Some(t) = taken {
                    self.exports.finish(t);
                }
                reply
            }
            other => {
                let r = self.change(other);
                let _g = self.change.lock();
                self.record_locked(r)
            }
        }
    }

    /// Records the state after a change (the control lock held) and makes the reply. A change
    /// that was applied but could not be recorded is reported as applied, with a warning; the
    /// next change records the state again.
    fn record_locked(&self, r: Result<Response, ErrorReply>) -> Reply {
        match (self.save(), r) {
            (Ok(()), Ok(resp)) => Reply::Ok(resp),
            (Ok(()), Err(e)) => Reply::Err(e),
            (Err(se), Err(e)) => {
                tracing::error!("cannot record state: {se:#}");
                Reply::Err(e)
            }
            (Err(e), Ok(response)) => {
                tracing::error!("cannot record state: {e:#}");
                Reply::Warned {
                    response,
                    warning: format!(
                        "the change was applied but could not be recorded in {}: {e:#}; it \
                         will be lost if udmd restarts before a later change is recorded",
                        state::state_file(&self.state_dir).display()
                    ),
                }
            }
        }
    }

    fn change(&self, req: Request) -> Result<Response, ErrorReply> {
        let reg = &self.registry;
        match req {
            Request::DiskAdd {
                name,
                path,
                create,
                read_only,
                direct,
            } => {
                let d = reg
                    .add_disk(
                        &name,
                        &path,
                        &udm_core::registry::DiskOptions {
                            read_only,
                            direct,
                            create,
                        },
                    )
                    .map_err(err)?;
                // A disk that was unavailable may be back: start its dependents' exports.
                self.exports.retry_pending();
                Ok(Response::Disks(vec![d]))
            }
            Request::DiskRetry { name } => {
                self.retry(name.as_deref()).map_err(err)?;
                Ok(Response::Disks(reg.disks()))
            }
            Request::DiskRemove { name } => {
                reg.remove_disk(&name).map(|_| Response::Done).map_err(err)
            }
            Request::Create {
                name,
                uuid,
                table,
                read_only,
                interpose,
                freeze,
            } => {
                let spec = table.as_deref().map(parse_table).transpose()?;
                let flags = LoadFlags {
                    read_only,
                    interpose,
                };
                reg.create(
                    &name,
                    uuid.as_deref(),
                    None,
                    spec.as_ref().map(|s| (s, flags)),
                    &ResumeOptions { freeze },
                )
                .map_err(err)?;
                Ok(Response::Info(vec![self.info_record(&name)?]))
            }
            Request::Load {
                name,
                table,
                read_only,
                interpose,
            } => {
                let spec = parse_table(&table)?;
                reg.load(
                    &name,
                    &spec,
                    LoadFlags {
                        read_only,
                        interpose,
                    },
                )
                .map(|_| Response::Done)
                .map_err(err)
            }
            Request::Resume { name, freeze } => reg
                .resume(&name, &ResumeOptions { freeze })
                .map(|_| Response::Done)
                .map_err(err),
            Request::Suspend {
                name,
                noflush,
                nolockfs,
            } => reg
                .suspend(&name, SuspendFlags { noflush, nolockfs })
                .map(|_| Response::Done)
                .map_err(err),
            Request::Clear { name } => reg.clear(&name).map(|_| Response::Done).map_err(err),
            Request::Remove {
                name,
                force,
                deferred,
            } => reg
                .remove(&name, force, deferred)
                .map(|_| Response::Done)
                .map_err(err),
            Request::Rename {
                name,
                new_name,
                set_uuid,
            } => match (new_name, set_uuid) {
                (Some(n), None) => reg.rename(&name, &n),
                (None, Some(u)) => reg.set_uuid(&name, &u),
                _ => Err(CoreError::invalid(
                    "rename needs either a new name or --setuuid UUID",
                )),
            }
            .map(|_| Response::Done)
            .map_err(err),
            Request::Message {
                name,
                sector,
                message,
            } => reg
                .message(&name, sector, &message)
                .map(Response::MessageOutput)
                .map_err(err),
            Request::ExportAdd {
                device,
                export,
                read_only,
            } => {
                self.exports.add(&device, &export, read_only).map_err(err)?;
                Ok(Response::Exports(self.exports.list()))
            }
            Request::ExportRemove { id } => self
                .exports
                .remove(&id)
                .map(|_| Response::Done)
                .map_err(err),
            other => self.read(other),
        }
    }

    fn read(&self, req: Request) -> Result<Response, ErrorReply> {
        let reg = &self.registry;
        match req {
            Request::Version => Ok(Response::Version(VersionRecord {
                daemon: env!("CARGO_PKG_VERSION").to_string(),
                protocol: PROTOCOL_VERSION,
                dm_interface: "4.50.0".to_string(),
            })),
            Request::DiskList => Ok(Response::Disks(reg.disks())),
            Request::Info { name } => {
                let mut v = Vec::new();
                for n in self.names(&name) {
                    v.push(self.info_record(&n)?);
                }
                Ok(Response::Info(v))
            }
            Request::List => Ok(Response::Devices(reg.devices())),
            Request::Table {
                name,
                inactive,
                concise,
            } => {
                let mut out = Vec::new();
                for n in self.names(&name) {
                    let lines = reg.table(&n, inactive).map_err(err)?;
                    out.push(DeviceLines { name: n, lines });
                }
                if concise {
                    return self.concise(&out);
                }
                Ok(Response::Lines(out))
            }
            Request::Status { name, inactive } => {
                let mut out = Vec::new();
                for n in self.names(&name) {
                    let lines = reg.status(&n, inactive).map_err(err)?;
                    out.push(DeviceLines { name: n, lines });
                }
                Ok(Response::Lines(out))
            }
            Request::Deps { name, inactive } => {
                let mut out = Vec::new();
                for n in self.names(&name) {
                    let deps = reg.deps(&n, inactive).map_err(err)?;
                    out.push(DeviceDeps {
                        name: n,
                        deps: deps
                            .into_iter()
                            .map(|(id, name)| DepRecord {
                                major: id.major,
                                minor: id.minor,
                                name,
                            })
                            .collect(),
                    });
                }
                Ok(Response::Deps(out))
            }
            Request::Targets => Ok(Response::Targets(
                reg.targets()
                    .into_iter()
                    .map(|(name, version)| TargetRecord { name, version })
                    .collect(),
            )),
            Request::Wait {
                name,
                event_nr,
                timeout_ms,
            } => {
                let timeout = Duration::from_millis(timeout_ms.unwrap_or(u64::MAX / 4));
                reg.wait_event(&name, event_nr, timeout)
                    .map(Response::Event)
                    .map_err(err)
            }
            Request::NameByUuid { uuid } => reg
                .name_by_uuid(&uuid)
                .map(Response::Name)
                .ok_or_else(|| err(CoreError::NoDevice(format!("with uuid {uuid}")))),
            Request::ExportList => Ok(Response::Exports(self.exports.list())),
            other => self.change(other),
        }
    }

    fn concise(&self, devs: &[DeviceLines]) -> Result<Response, ErrorReply> {
        let mut out = Vec::new();
        for d in devs {
            let info = self.registry.info(&d.name).map_err(err)?;
            out.push(ConciseDevice {
                name: d.name.clone(),
                uuid: info.uuid,
                minor: Some(info.minor),
                read_only: info.read_only,
                interpose: info.interposed,
                table: TableSpec {
                    lines: d.lines.clone(),
                },
            });
        }
        // dmsetup prints a device without a table as `name,uuid,minor,flags`, without the
        // empty table field (and its comma) that `ConciseDevice` writes to parse back.
        let parts: Vec<String> = out
            .iter()
            .map(|d| {
                let s = d.to_string();
                match s.strip_suffix(',') {
                    Some(t) if d.table.lines.is_empty() => t.to_string(),
                    _ => s,
                }
            })
            .collect();
        Ok(Response::Concise(parts.join(";")))
    }
}

/// The daemon's working directory is not the client's: paths must arrive absolute (udmsetup
/// makes them so).
fn absolute_paths(req: &Request) -> Result<(), ErrorReply> {
    let paths: Vec<&std::path::Path> = match req {
        Request::DiskAdd { path, .. } => vec![path.as_path()],
        Request::ExportAdd {
            export: ExportKind::Fuse { dir },
            ..
        } => vec![dir.as_path()],
        Request::ExportAdd {
            export: ExportKind::VhostUser { socket, .. },
            ..
        } => vec![socket.as_path()],
        Request::Create {
            freeze: Some(p), ..
        }
        | Request::Resume {
            freeze: Some(p), ..
        } => vec![p.as_path()],
        _ => vec![],
    };
    match paths.into_iter().find(|p| !p.is_absolute()) {
        Some(p) => Err(err(CoreError::invalid(format!(
            "path {} must be absolute: udmd does not share the caller's working directory",
            p.display()
        )))),
        None => Ok(()),
    }
}

/// Serves the control socket until the process exits.
pub fn serve(daemon: Arc<Daemon>, listener: UnixListener) {
    let me = udm_proto::peer::euid();
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        match udm_proto::peer::peer_uid(&stream) {
            Ok(uid) if udm_proto::peer::trusted(uid, me) => {}
            Ok(uid) => {
                tracing::warn!(
                    uid,
                    "control connection refused: peer is neither root nor the daemon's user"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!("control connection refused: no peer credentials: {e}");
                continue;
            }
        }
        let d = daemon.clone();
        let spawned = std::thread::Builder::new()
            .name("udm-control".into())
            .spawn(move || connection(d, stream));
        if let Err(e) = spawned {
            tracing::error!("cannot start control thread: {e}");
        }
    }
}

/// Longest control request line accepted: a table of thousands of lines fits many times over.
pub const MAX_LINE: usize = 1 << 20;

/// One line read from a control connection.
enum Line {
    Text(String),
    NotUtf8,
    TooLong,
    Eof,
}

/// Reads one line (without its newline) of at most [`MAX_LINE`] bytes, never buffering more.
fn read_line(r: &mut impl BufRead) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            if buf.is_empty() {
                return Ok(Line::Eof);
            }
            break;
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (avail.len(), false),
        };
        if buf.len() + take > MAX_LINE {
            return Ok(Line::TooLong);
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            break;
        }
    }
    Ok(match String::from_utf8(buf) {
        Ok(s) => Line::Text(s),
        Err(_) => Line::NotUtf8,
    })
}

fn error_reply(errno: i32, name: &str, message: String) -> Reply {
    Reply::Err(ErrorReply {
        errno,
        errno_name: name.into(),
        message,
    })
}

fn send(writer: &mut UnixStream, reply: &Reply) -> bool {
    let Ok(mut out) = serde_json::to_vec(reply) else {
        return false;
    };
    out.push(b'\n');
    writer.write_all(&out).is_ok()
}

fn connection(daemon: Arc<Daemon>, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let line = match read_line(&mut reader) {
            Ok(Line::Text(l)) => l,
            Ok(Line::Eof) | Err(_) => return,
            Ok(Line::NotUtf8) => {
                let r = error_reply(
                    Errno::EINVAL.0,
                    "EINVAL",
                    "malformed control request: not valid UTF-8".into(),
                );
                if !send(&mut writer, &r) {
                    return;
                }
                continue;
            }
            Ok(Line::TooLong) => {
                // The rest of the line is not read: answer and close the connection.
                let r = error_reply(
                    libc::EMSGSIZE,
                    "EMSGSIZE",
                    format!(
                        "control request longer than {} MiB; closing the connection",
                        MAX_LINE >> 20
                    ),
                );
                send(&mut writer, &r);
                return;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<RequestEnvelope>(&line) {
            Err(e) => error_reply(
                Errno::EINVAL.0,
                "EINVAL",
                format!("malformed control request: {e}"),
            ),
            Ok(env) if env.version != PROTOCOL_VERSION => error_reply(
                Errno::EPROTO.0,
                "EPROTO",
                format!(
                    "control protocol version {} is not supported (udmd speaks {PROTOCOL_VERSION})",
                    env.version
                ),
            ),
            Ok(env) => {
                tracing::debug!(request = ?env.request, "control request");
                daemon.handle(env.request)
            }
        };
        if !send(&mut writer, &reply) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<String> {
        let mut r = BufReader::with_capacity(7, input);
        let mut out = Vec::new();
        loop {
            match read_line(&mut r).unwrap() {
                Line::Text(t) => out.push(t),
                Line::NotUtf8 => out.push("<not utf8>".into()),
                Line::TooLong => {
                    out.push("<too long>".into());
                    return out;
                }
                Line::Eof => return out,
            }
        }
    }

    #[test]
    fn lines_are_bounded_and_checked() {
        assert_eq!(lines(b"ab\ncdefghijkl\n\nx"), ["ab", "cdefghijkl", "", "x"]);
        assert_eq!(lines(b"a\n\xff\xfe\nb\n"), ["a", "<not utf8>", "b"]);
        let mut big = vec![b'x'; MAX_LINE];
        big.push(b'\n');
        assert_eq!(lines(&big).len(), 1);
        big.insert(0, b'y');
        assert_eq!(lines(&big), ["<too long>"]);
    }
}
