//! Who is at the other end of the control socket. Both sides check: the daemon serves only root
//! and its own user, and the CLI talks only to a daemon run by root or by itself, so a socket
//! planted in a predictable directory (the `/tmp/udm-<uid>` fallback) cannot collect commands.

use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

/// The uid of the peer of a Unix stream (SO_PEERCRED).
pub fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given; the fd is a live socket.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether a peer of uid `peer` may be trusted by a process of effective uid `me`.
pub fn trusted(peer: u32, me: u32) -> bool {
    peer == me || peer == 0
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_pair_peer_is_ourselves() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        assert_eq!(peer_uid(&a).expect("peer"), euid());
        assert!(trusted(euid(), euid()));
        assert!(trusted(0, 1000));
        assert!(!trusted(1001, 1000));
    }
}
