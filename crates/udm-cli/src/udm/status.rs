//! `udm status`: daemon reachability and what it serves.

use crate::error::CliError;
use crate::session::{unexpected, Session};
use serde::Serialize;
use udm_proto::{Request, Response};

/// What `udm status` reports.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct StatusReport {
    /// Control socket.
    pub socket: String,
    /// udmd version.
    pub daemon: String,
    /// Protocol version.
    pub protocol: u32,
    /// Disks (partitions not counted).
    pub disks: usize,
    /// Mapped devices.
    pub devices: usize,
    /// Of which suspended.
    pub suspended: usize,
    /// Of which interposing a device.
    pub interposing: usize,
    /// Exports.
    pub exports: usize,
    /// Disks, devices and exports kept but not served (a backing file could not be opened).
    pub unavailable: usize,
}

/// Gathers the report (four requests on one connection).
pub fn gather(s: &mut Session) -> Result<StatusReport, CliError> {
    let v = match s.call("version", "", Request::Version)? {
        Response::Version(v) => v,
        other => return Err(unexpected("version", &other)),
    };
    let disks = match s.call("disk list", "", Request::DiskList)? {
        Response::Disks(d) => d,
        other => return Err(unexpected("disk list", &other)),
    };
    let infos = match s.call("info", "", Request::Info { name: None })? {
        Response::Info(i) => i,
        other => return Err(unexpected("info", &other)),
    };
    let exports = match s.call("export list", "", Request::ExportList)? {
        Response::Exports(e) => e,
        other => return Err(unexpected("export list", &other)),
    };
    Ok(StatusReport {
        socket: s.socket().display().to_string(),
        daemon: v.daemon,
        protocol: v.protocol,
        disks: disks.len(),
        unavailable: disks.iter().filter(|d| d.unavailable.is_some()).count()
            + infos.iter().filter(|i| i.unavailable.is_some()).count()
            + exports.iter().filter(|e| e.unavailable.is_some()).count(),
        devices: infos.len(),
        suspended: infos.iter().filter(|i| i.suspended).count(),
        interposing: infos.iter().filter(|i| !i.interposers.is_empty()).count(),
        exports: exports.len(),
    })
}

/// The human form.
pub fn format(r: &StatusReport) -> String {
    let mut s = format!(
        "udmd:     running (udmd {}, protocol {}) at {}\n\
         disks:    {}\n\
         devices:  {} ({} suspended, {} interposing)\n\
         exports:  {}\n",
        r.daemon, r.protocol, r.socket, r.disks, r.devices, r.suspended, r.interposing, r.exports
    );
    if r.unavailable > 0 {
        s.push_str(&format!(
            "unavailable: {} (kept, waiting for their files; see `udmsetup disk list`, `ls`, \
             `export list`)\n",
            r.unavailable
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_form() {
        let r = StatusReport {
            socket: "/run/udm/control.sock".into(),
            daemon: "0.1.0".into(),
            protocol: 1,
            disks: 2,
            devices: 3,
            suspended: 1,
            interposing: 1,
            exports: 0,
            unavailable: 0,
        };
        assert_eq!(
            format(&r),
            "udmd:     running (udmd 0.1.0, protocol 1) at /run/udm/control.sock\n\
             disks:    2\n\
             devices:  3 (1 suspended, 1 interposing)\n\
             exports:  0\n"
        );
    }

    #[test]
    fn unreachable_daemon_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Session::new(&dir.path().join("none.sock"));
        let e = gather(&mut s).unwrap_err();
        assert!(matches!(e, CliError::Connect(_)));
        assert!(e.to_string().contains("is udmd running"));
    }
}
