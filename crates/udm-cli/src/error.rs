//! The CLI's error type: every failure carries the command and device it concerns, so the
//! report can follow dmsetup's `device-mapper: <op> ioctl on <name> failed: ...` form.

use crate::format;
use crate::input::InputError;
use udm_proto::{ClientError, ErrorReply};
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments (message in dmsetup's words where it has one).
    #[error("{0}")]
    Usage(String),
    /// Table input could not be read or parsed.
    #[error(transparent)]
    Input(#[from] InputError),
    /// udmd is not reachable.
    #[error("{0}")]
    Connect(ClientError),
    /// udmd refused the operation.
    #[error("{command} on {device} failed: {} [{}]", reply.message, reply.errno_name)]
    Refused {
        /// udmsetup command (`create`, `load`, ...).
        command: String,
        /// Device name (may be empty).
        device: String,
        /// The daemon's reply.
        reply: ErrorReply,
    },
    /// The control connection broke or spoke nonsense.
    #[error("{command}: {source}")]
    Client {
        /// udmsetup command.
        command: String,
        /// Cause.
        #[source]
        source: ClientError,
    },
    /// udmd answered with a reply of the wrong kind.
    #[error("{command}: unexpected reply from udmd: {got}")]
    Unexpected {
        /// udmsetup command.
        command: String,
        /// What came back.
        got: String,
    },
    /// The device does not exist (dmsetup: "Device does not exist.").
    #[error("Device does not exist.")]
    NoDevice {
        /// Device name.
        device: String,
        /// The daemon's message.
        message: String,
    },
    /// A report field could not be shown for some devices (dmsetup's `_do_report_object`
    /// failure); the text is dmsetup's, one or more lines.
    #[error("{}", .0.trim_end())]
    ReportField(String),
    /// A workflow refused or failed for a reason of its own, with the errno that names it.
    #[error("{message} [{}]", errno.name())]
    Workflow {
        /// The errno.
        errno: Errno,
        /// What happened and what to do.
        message: String,
    },
    /// Writing the output failed (e.g. a closed pipe).
    #[error("write error: {0}")]
    Output(#[from] std::io::Error),
}

impl HasErrno for CliError {
    fn errno(&self) -> Errno {
        match self {
            CliError::Usage(_) => Errno::EINVAL,
            CliError::Input(e) => e.errno(),
            CliError::Connect(e) | CliError::Client { source: e, .. } => e.errno(),
            CliError::Refused { reply, .. } => Errno(reply.errno),
            CliError::Unexpected { .. } => Errno::EPROTO,
            CliError::NoDevice { .. } | CliError::ReportField(_) => Errno::ENXIO,
            CliError::Workflow { errno, .. } => *errno,
            CliError::Output(e) => Errno::from_io(e),
        }
    }
}

impl CliError {
    /// Turns a client error into the CLI error of `command` on `device`; ENXIO of `info` and
    /// `status` becomes [`CliError::NoDevice`] as libdm turns it into "device does not exist"
    /// (`_do_dm_ioctl` clears DM_EXISTS_FLAG for INFO, MKNODES and STATUS only), and so does
    /// ENXIO of the udm-only verbs; every other dm command reports the ioctl failure.
    pub fn from_client(command: &str, device: &str, e: ClientError) -> CliError {
        match e {
            ClientError::Connect { .. } => CliError::Connect(e),
            ClientError::Refused(reply)
                if reply.errno == libc::ENXIO
                    && !device.is_empty()
                    && (matches!(command, "info" | "status")
                        || command.starts_with("disk")
                        || command.starts_with("export")) =>
            {
                CliError::NoDevice {
                    device: device.to_string(),
                    message: reply.message,
                }
            }
            ClientError::Refused(reply) => CliError::Refused {
                command: command.to_string(),
                device: device.to_string(),
                reply,
            },
            other => CliError::Client {
                command: command.to_string(),
                source: other,
            },
        }
    }

    /// The text printed on stderr (without `Command failed.`).
    pub fn report(&self, verbose: bool) -> String {
        match self {
            CliError::Refused {
                command,
                device,
                reply,
            } => format::error::refused(
                command,
                device,
                reply.errno,
                &reply.errno_name,
                &reply.message,
            ),
            CliError::NoDevice { message, .. } if verbose => {
                format!("Device does not exist.\nudmd: {message} [ENXIO]\n")
            }
            CliError::NoDevice { .. } => "Device does not exist.\n".into(),
            other => format!("{other}\n"),
        }
    }

    /// Whether dmsetup would follow the report with `Command failed.`.
    pub fn command_failed_line(&self) -> bool {
        !matches!(self, CliError::Usage(_) | CliError::Connect(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enxio_is_device_does_not_exist() {
        let e = CliError::from_client(
            "info",
            "nope",
            ClientError::Refused(ErrorReply {
                errno: libc::ENXIO,
                errno_name: "ENXIO".into(),
                message: "no mapped device nope".into(),
            }),
        );
        assert_eq!(e.report(false), "Device does not exist.\n");
        assert_eq!(e.errno(), Errno::ENXIO);
        // Other commands report the ioctl (dmsetup `table missing`, `remove missing`).
        let e = CliError::from_client(
            "table",
            "nope ",
            ClientError::Refused(ErrorReply {
                errno: libc::ENXIO,
                errno_name: "ENXIO".into(),
                message: "no mapped device nope".into(),
            }),
        );
        assert_eq!(
            e.report(false),
            "device-mapper: table ioctl on nope  failed: No such device or address\n\
             udmd: no mapped device nope [ENXIO]\n"
        );
        let e = CliError::from_client(
            "remove",
            "o",
            ClientError::Refused(ErrorReply {
                errno: libc::EBUSY,
                errno_name: "EBUSY".into(),
                message: "o is open (nbd:o)".into(),
            }),
        );
        assert_eq!(
            e.report(false),
            "device-mapper: remove ioctl on o failed: Device or resource busy\n\
             udmd: o is open (nbd:o) [EBUSY]\n"
        );
        assert!(e.command_failed_line());
    }
}
