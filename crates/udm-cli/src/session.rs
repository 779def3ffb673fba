//! A lazily connected control session: commands that fail before talking to udmd (bad
//! arguments, bad table text) never need the daemon.

use crate::error::CliError;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use udm_proto::{ControlClient, Request, Response};

/// The default control socket (`udm_proto::paths`).
pub fn default_socket() -> PathBuf {
    udm_proto::paths::control_socket(&udm_proto::paths::runtime_dir())
}

/// One connection to udmd, opened on first use.
pub struct Session {
    socket: PathBuf,
    client: Option<ControlClient>,
    timings: Vec<Timing>,
}

/// How long one control operation took, round trip (what `udm --timings` prints: a workflow's
/// phases are its operations).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Command, e.g. `suspend`.
    pub command: String,
    /// Device it acted on.
    pub device: String,
    /// Round-trip time.
    pub took: Duration,
}

impl Session {
    /// A session on `socket` (not connected yet).
    pub fn new(socket: &Path) -> Session {
        Session {
            socket: socket.to_path_buf(),
            client: None,
            timings: Vec::new(),
        }
    }

    /// Every control operation of this session so far, with its round-trip time.
    pub fn timings(&self) -> &[Timing] {
        &self.timings
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `req` on behalf of `command` on `device` (for error reports).
    pub fn call(
        &mut self,
        command: &str,
        device: &str,
        req: Request,
    ) -> Result<Response, CliError> {
        if self.client.is_none() {
            let c = ControlClient::connect(&self.socket)
                .map_err(|e| CliError::from_client(command, device, e))?;
            self.client = Some(c);
        }
        match self.client.as_mut() {
            Some(c) => {
                let start = Instant::now();
                let r = c
                    .call(req)
                    .map_err(|e| CliError::from_client(command, device, e));
                self.timings.push(Timing {
                    command: command.into(),
                    device: device.into(),
                    took: start.elapsed(),
                });
                for w in c.take_warnings() {
                    eprintln!("warning: {command}: {w}");
                }
                r
            }
            None => Err(CliError::Unexpected {
                command: command.into(),
                got: "no connection".into(),
            }),
        }
    }
}

/// An "unexpected reply" error naming the reply kind.
pub fn unexpected(command: &str, r: &Response) -> CliError {
    let got = serde_json::to_string(r).unwrap_or_else(|_| format!("{r:?}"));
    CliError::Unexpected {
        command: command.into(),
        got: got.chars().take(200).collect(),
    }
}
