//! Who is on the other end of a Unix socket, for the activity log.

use std::os::fd::AsFd;

/// The peer's `(uid, pid)` from `SO_PEERCRED`: the credentials of the process that
/// connected, captured by the kernel at `connect` time, so they cannot be forged by
/// what the client sends later. `None` when the socket has none (TCP, or an error).
pub fn peer_credentials(fd: impl AsFd) -> Option<(u32, u32)> {
    let cred = rustix::net::sockopt::socket_peercred(fd).ok()?;
    let pid = u32::try_from(cred.pid.as_raw_pid()).ok()?;
    Some((cred.uid.as_raw(), pid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn pair_reports_our_own_uid_and_pid() {
        let (a, b) = UnixStream::pair().unwrap();
        let ours = (rustix::process::geteuid().as_raw(), std::process::id());
        assert_eq!(peer_credentials(&a), Some(ours));
        assert_eq!(peer_credentials(&b), Some(ours));
    }

    #[test]
    fn tcp_has_no_peer_credentials() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert_eq!(peer_credentials(&client), None);
    }
}
