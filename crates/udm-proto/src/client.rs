//! A blocking client of the control socket.

use crate::types::{ErrorReply, Reply, Request, RequestEnvelope, Response};
use crate::PROTOCOL_VERSION;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon is not reachable.
    #[error("cannot connect to udmd at {path}: {source} (is udmd running? start it with `udmd`)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket is served by another user than root or ourselves: it may be a trap planted
    /// in a shared directory, so nothing is sent to it.
    #[error("refusing to talk to {path}: it is served by uid {uid}, neither root nor this user (is UDM_RUNTIME_DIR a shared directory?)")]
    Untrusted {
        /// Socket path.
        path: PathBuf,
        /// The uid of the process serving it.
        uid: u32,
    },
    /// The connection broke.
    #[error("control connection to udmd failed: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon sent something unreadable.
    #[error("bad reply from udmd: {0}")]
    Decode(#[from] serde_json::Error),
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(ErrorReply),
}

impl udm_types::errno::HasErrno for ClientError {
    fn errno(&self) -> udm_types::Errno {
        match self {
            ClientError::Connect { .. } => udm_types::Errno::ENXIO,
            ClientError::Untrusted { .. } => udm_types::Errno::EPERM,
            ClientError::Io(e) => udm_types::Errno::from_io(e),
            ClientError::Decode(_) => udm_types::Errno::EPROTO,
            ClientError::Refused(e) => udm_types::Errno(e.errno),
        }
    }
}

/// A connection to `udmd`.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    warnings: Vec<String>,
}

impl ControlClient {
    /// Connects to the control socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let uid = crate::peer::peer_uid(&s)?;
        if !crate::peer::trusted(uid, crate::peer::euid()) {
            return Err(ClientError::Untrusted {
                path: path.to_path_buf(),
                uid,
            });
        }
        let writer = s.try_clone()?;
        Ok(ControlClient {
            reader: BufReader::new(s),
            writer,
            warnings: Vec::new(),
        })
    }

    /// Warnings that came with successful replies since the last call (for the user's stderr).
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// Sends one request and waits for its reply. A warning that comes with a success is kept
    /// for [`ControlClient::take_warnings`].
    pub fn call(&mut self, request: Request) -> Result<Response, ClientError> {
        let env = RequestEnvelope {
            version: PROTOCOL_VERSION,
            request,
        };
        let mut line = serde_json::to_vec(&env)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut buf = String::new();
        let n = self.reader.read_line(&mut buf)?;
        if n == 0 {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "udmd closed the connection",
            )));
        }
        match serde_json::from_str::<Reply>(&buf)? {
            Reply::Ok(r) => Ok(r),
            Reply::Err(e) => Err(ClientError::Refused(e)),
            Reply::Warned { response, warning } => {
                self.warnings.push(warning);
                Ok(response)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ExportKind;

    #[test]
    fn requests_round_trip_as_json() {
        let reqs = vec![
            Request::Version,
            Request::Create {
                name: "a".into(),
                uuid: None,
                table: Some("0 8 zero".into()),
                read_only: false,
                interpose: true,
                freeze: None,
            },
            Request::ExportAdd {
                device: "a".into(),
                export: ExportKind::Nbd {
                    name: None,
                    insecure_tcp: false,
                    bitmaps: Vec::new(),
                },
                read_only: true,
            },
        ];
        for r in reqs {
            let env = RequestEnvelope {
                version: PROTOCOL_VERSION,
                request: r,
            };
            let s = serde_json::to_string(&env).unwrap();
            let back: RequestEnvelope = serde_json::from_str(&s).unwrap();
            assert_eq!(back, env);
        }
    }

    #[test]
    fn warnings_come_with_the_response() {
        let dir = std::env::temp_dir().join(format!("udm-proto-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let reply = Reply::Warned {
                response: Response::Done,
                warning: "not recorded".into(),
            };
            let mut out = serde_json::to_vec(&reply).unwrap();
            out.push(b'\n');
            w.write_all(&out).unwrap();
        });
        let mut c = ControlClient::connect(&path).unwrap();
        assert_eq!(c.call(Request::Version).unwrap(), Response::Done);
        assert_eq!(c.take_warnings(), vec!["not recorded".to_string()]);
        assert!(c.take_warnings().is_empty());
        t.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(serde_json::from_str::<RequestEnvelope>(
            "{\"version\":1,\"request\":{\"op\":\"nope\"}}"
        )
        .is_err());
    }
}
