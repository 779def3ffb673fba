//! Error reports. dmsetup (libdm `libdm/ioctl/libdm-iface.c` `_do_dm_ioctl`) prints
//! `device-mapper: <op> ioctl on <name> failed: <strerror>` and then `Command failed.`; udmsetup
//! prints the same first line (scripts grep for it) followed by udmd's own message, which names
//! the actual problem, with its symbolic errno.

/// `strerror(errno)` without Rust's ` (os error N)` suffix.
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The libdm ioctl name of a udmsetup command (`_cmd_data_v4` in libdm-iface.c).
pub fn ioctl_name(command: &str) -> &str {
    match command {
        "load" | "reload" => "reload",
        "wait" => "waitevent",
        "targets" => "versions",
        "ls" => "names",
        other => other,
    }
}

/// The full report of a refused operation: the dmsetup line, then `udmd: message [ERRNO]`.
pub fn refused(command: &str, device: &str, errno: i32, errno_name: &str, message: &str) -> String {
    let first = if command.starts_with("disk") || command.starts_with("export") {
        // udm-only verbs have no dm ioctl to name.
        let dev = if device.is_empty() {
            String::new()
        } else {
            format!(" {device}")
        };
        format!("udmsetup: {command}{dev} failed: {}", strerror(errno))
    } else {
        let on = if device.is_empty() {
            String::new()
        } else {
            format!(" on {device}")
        };
        format!(
            "device-mapper: {} ioctl{on} failed: {}",
            ioctl_name(command),
            strerror(errno)
        )
    };
    format!("{first}\nudmd: {message} [{errno_name}]\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmsetup_style_first_line_then_daemon_message() {
        assert_eq!(
            refused(
                "load",
                "o",
                libc::EBUSY,
                "EBUSY",
                "vda is exported (nbd:vda); use --interpose"
            ),
            "device-mapper: reload ioctl on o failed: Device or resource busy\n\
             udmd: vda is exported (nbd:vda); use --interpose [EBUSY]\n"
        );
        assert_eq!(
            refused(
                "disk add",
                "vda",
                libc::ENOENT,
                "ENOENT",
                "/x: no such file"
            ),
            "udmsetup: disk add vda failed: No such file or directory\n\
             udmd: /x: no such file [ENOENT]\n"
        );
        assert_eq!(strerror(libc::ENXIO), "No such device or address");
        assert_eq!(ioctl_name("targets"), "versions");
    }
}
