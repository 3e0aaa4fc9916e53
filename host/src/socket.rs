//! Socket files and listeners: Unix sockets whose mode is in force from the moment the
//! file exists, stale-socket replacement, the optional group on `infer.sock`, and the
//! loopback-only TCP listener.

use std::fs::FileType;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::fs::Mode;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// How many connections the kernel queues before `accept`; a burst of clients retrying
/// after readiness should not see refusals.
pub const LISTEN_BACKLOG: i32 = 1024;

/// The TCP port used when a loopback address names none.
pub const DEFAULT_TCP_PORT: u16 = 47321;

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A symlink sits at the socket path; binding through it would create our socket
    /// wherever the link's owner chose.
    #[error("refusing the socket path {path}: it is a symlink")]
    Symlink {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket sits at the path; replacing it could destroy data.
    #[error("refusing the socket path {path}: a {kind} is there, not a socket")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
        /// What is there instead (`regular file`, `directory`, …).
        kind: &'static str,
    },
    /// A live process accepts connections on the socket.
    #[error("a daemon is already listening at {path}")]
    AlreadyListening {
        /// The socket path.
        path: PathBuf,
    },
    /// The path does not fit in a Unix socket address.
    #[error("the socket path {path} is too long for a Unix socket address (at most 107 bytes)")]
    PathTooLong {
        /// The socket path.
        path: PathBuf,
    },
    /// A system call on a Unix socket failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The group for `infer.sock` is neither a number nor a name in `/etc/group`.
    #[error("unknown group {group:?} for the socket {path}: not a gid and not in /etc/group")]
    UnknownGroup {
        /// The name as configured.
        group: String,
        /// The socket path.
        path: PathBuf,
    },
    /// The TCP address does not parse.
    #[error("invalid TCP address {addr:?}: expected PORT, HOST:PORT or [IPv6]:PORT on loopback")]
    InvalidTcpAddr {
        /// The address as configured.
        addr: String,
    },
    /// The TCP address is not a loopback address; the inference protocol has no
    /// transport security, so it must not be reachable from the network.
    #[error("refusing to listen on {addr}: only loopback (127.0.0.0/8, ::1, localhost) is allowed")]
    NotLoopback {
        /// The address as configured.
        addr: String,
    },
    /// Binding the TCP listener failed.
    #[error("cannot listen on TCP {addr}: {source}")]
    TcpBind {
        /// The resolved address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
}

/// A file type as it reads in an error message.
fn describe(file_type: FileType) -> &'static str {
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_file() {
        "regular file"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_symlink() {
        "symlink"
    } else {
        "special file"
    }
}

/// Creates a listening Unix socket at `path` whose file has exactly `mode` (e.g. 0o600,
/// 0o660) and was never more open than that.
///
/// Whatever sits at the path first: nothing is fine; a socket nobody listens on (a
/// previous daemon crashed) is removed and replaced; a socket with a live listener is
/// [`SocketError::AlreadyListening`]; a symlink or any other file is refused.
///
/// The returned listener is blocking and close-on-exec.
pub fn bind_unix_listener(path: impl AsRef<Path>, mode: u32) -> Result<UnixListener, SocketError> {
    let path = path.as_ref();
    let io_err = |op, source| SocketError::Io { op, path: path.to_owned(), source };
    clear_stale_socket(path)?;

    let addr = SocketAddrUnix::new(path)
        .map_err(|_| SocketError::PathTooLong { path: path.to_owned() })?;
    let fd: OwnedFd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| io_err("create a socket for", e.into()))?;
    // bind creates the file with the socket inode's mode (minus the umask), so setting
    // it first means the file never exists with the default 0777 & ~umask.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o777))
        .map_err(|e| io_err("set the mode of the socket", e.into()))?;
    rustix::net::bind(&fd, &addr).map_err(|e| io_err("bind the socket", e.into()))?;
    if let Err(e) = finish_bind(&fd, path, mode) {
        // Leave no dead socket file behind a failed setup.
        let _ = remove_socket_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// After `bind`: restores mode bits the umask removed, then listens.
fn finish_bind(fd: &OwnedFd, path: &Path, mode: u32) -> Result<(), SocketError> {
    let io_err = |op, source| SocketError::Io { op, path: path.to_owned(), source };
    // The umask may have removed bits we asked for (0660 under umask 022 leaves 0640, and
    // the group could not connect). Widening to the requested mode never exposes more
    // than the caller asked for. The path must still be a socket, so that chmod does not
    // follow a symlink swapped in meanwhile.
    let meta = std::fs::symlink_metadata(path).map_err(|e| io_err("inspect", e))?;
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
            kind: describe(meta.file_type()),
        });
    }
    if meta.mode() & 0o777 != mode & 0o777 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777))
            .map_err(|e| io_err("set the mode of the socket", e))?;
    }
    rustix::net::listen(fd, LISTEN_BACKLOG).map_err(|e| io_err("listen on the socket", e.into()))
}

/// Makes the path free for a new socket, or says why it cannot be.
fn clear_stale_socket(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(SocketError::Io { op: "inspect", path: path.to_owned(), source: e }),
    };
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        return Err(SocketError::Symlink { path: path.to_owned() });
    }
    if !file_type.is_socket() {
        return Err(SocketError::NotASocket { path: path.to_owned(), kind: describe(file_type) });
    }
    // Only a refused connect proves nobody listens; any other failure (EACCES, …) leaves
    // the question open, and removing a live daemon's socket would orphan it.
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::AlreadyListening { path: path.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(SocketError::Io {
                    op: "remove the stale socket",
                    path: path.to_owned(),
                    source: e,
                }),
            }
        }
        Err(e) => Err(SocketError::Io {
            op: "probe the existing socket",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Removes the socket file at `path` if it is a socket; nothing there is fine. Anything
/// else at the path is left alone and reported as [`SocketError::NotASocket`].
pub fn remove_socket_file(path: impl AsRef<Path>) -> Result<(), SocketError> {
    let path = path.as_ref();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                Err(SocketError::Io { op: "remove the socket", path: path.to_owned(), source: e })
            }
        },
        Ok(meta) => {
            Err(SocketError::NotASocket { path: path.to_owned(), kind: describe(meta.file_type()) })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SocketError::Io { op: "inspect", path: path.to_owned(), source: e }),
    }
}

/// Gives the socket file at `path` to `group` (a gid or a name from `/etc/group`),
/// leaving its owner alone; returns the gid. Does not follow a symlink at the path.
pub fn chown_group(path: impl AsRef<Path>, group: &str) -> Result<u32, SocketError> {
    let path = path.as_ref();
    let gid = match group.trim().parse::<u32>() {
        Ok(gid) => gid,
        Err(_) => {
            let table = std::fs::read_to_string("/etc/group").map_err(|e| SocketError::Io {
                op: "read /etc/group to set the group of",
                path: path.to_owned(),
                source: e,
            })?;
            find_group(&table, group.trim()).ok_or_else(|| SocketError::UnknownGroup {
                group: group.to_owned(),
                path: path.to_owned(),
            })?
        }
    };
    std::os::unix::fs::lchown(path, None, Some(gid)).map_err(|e| SocketError::Io {
        op: "change the group of",
        path: path.to_owned(),
        source: e,
    })?;
    Ok(gid)
}

/// The gid of group `name` in the text of an `/etc/group` file (`name:x:gid:members`).
pub fn find_group(etc_group: &str, name: &str) -> Option<u32> {
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        let entry = fields.next()?;
        if entry != name || entry.starts_with('#') {
            return None;
        }
        fields.nth(1)?.trim().parse().ok()
    })
}

/// Parses a loopback listen address: `PORT`, `127.0.0.1:PORT`, `[::1]:PORT`,
/// `localhost:PORT` (read as 127.0.0.1), or a bare loopback host with
/// [`DEFAULT_TCP_PORT`]. Any non-loopback address is refused.
pub fn parse_loopback_addr(addr: &str) -> Result<SocketAddr, SocketError> {
    let text = addr.trim();
    let invalid = || SocketError::InvalidTcpAddr { addr: addr.to_owned() };
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let parsed = if let Ok(port) = text.parse::<u16>() {
        SocketAddr::new(localhost, port)
    } else if let Ok(sa) = text.parse::<SocketAddr>() {
        sa
    } else if let Ok(ip) = text.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        SocketAddr::new(ip, DEFAULT_TCP_PORT)
    } else if text.eq_ignore_ascii_case("localhost") {
        SocketAddr::new(localhost, DEFAULT_TCP_PORT)
    } else {
        // Resolving names through DNS could yield a public address; only
        // "localhost" is taken on trust, and it is pinned to 127.0.0.1.
        let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
        let port = port.parse::<u16>().map_err(|_| invalid())?;
        if host.is_empty() {
            return Err(invalid());
        }
        if !host.eq_ignore_ascii_case("localhost") {
            return Err(SocketError::NotLoopback { addr: addr.to_owned() });
        }
        SocketAddr::new(localhost, port)
    };
    if !parsed.ip().is_loopback() {
        return Err(SocketError::NotLoopback { addr: addr.to_owned() });
    }
    Ok(parsed)
}

/// Binds a TCP listener on a loopback address (see [`parse_loopback_addr`]). Port 0
/// picks a free port; ask the listener for `local_addr()`.
pub fn bind_tcp_loopback(addr: &str) -> Result<TcpListener, SocketError> {
    let sa = parse_loopback_addr(addr)?;
    TcpListener::bind(sa).map_err(|source| SocketError::TcpBind { addr: sa, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::io::{Read, Write};

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn mode_is_exact_right_after_bind() {
        let tmp = TempDir::new("socket-mode");
        for mode in [0o600, 0o660] {
            let path = tmp.join(&format!("s{mode:o}.sock"));
            let listener = bind_unix_listener(&path, mode).unwrap();
            assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
            assert_eq!(mode_of(&path), mode, "{path:?}");
            drop(listener);
        }
    }

    #[test]
    fn listener_accepts_connections() {
        let tmp = TempDir::new("socket-accept");
        let path = tmp.join("infer.sock");
        let listener = bind_unix_listener(&path, 0o600).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[test]
    fn stale_socket_is_replaced() {
        let tmp = TempDir::new("socket-stale");
        let path = tmp.join("infer.sock");
        // A listener dropped without removing its file, as after a crash.
        drop(UnixListener::bind(&path).unwrap());
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        let listener = bind_unix_listener(&path, 0o600).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        UnixStream::connect(&path).unwrap();
        drop(listener);
    }

    #[test]
    fn live_socket_is_refused_and_left_alone() {
        let tmp = TempDir::new("socket-live");
        let path = tmp.join("infer.sock");
        let live = bind_unix_listener(&path, 0o600).unwrap();
        let err = bind_unix_listener(&path, 0o600).unwrap_err();
        assert!(matches!(err, SocketError::AlreadyListening { .. }), "{err:?}");
        assert_eq!(err.to_string(), format!("a daemon is already listening at {}", path.display()));
        // The first daemon still works.
        UnixStream::connect(&path).unwrap();
        drop(live);
    }

    #[test]
    fn symlink_and_other_files_are_refused() {
        let tmp = TempDir::new("socket-refuse");
        let target = tmp.join("target.sock");
        let link = tmp.join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = bind_unix_listener(&link, 0o600).unwrap_err();
        assert!(matches!(err, SocketError::Symlink { .. }), "{err:?}");
        assert!(err.to_string().contains(&link.display().to_string()));
        assert!(std::fs::symlink_metadata(&target).is_err());

        let file = tmp.join("file.sock");
        std::fs::write(&file, b"precious").unwrap();
        let err = bind_unix_listener(&file, 0o600).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket { kind: "regular file", .. }), "{err:?}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");

        let dir = tmp.join("dir.sock");
        std::fs::create_dir(&dir).unwrap();
        assert!(matches!(
            bind_unix_listener(&dir, 0o600),
            Err(SocketError::NotASocket { kind: "directory", .. })
        ));
    }

    #[test]
    fn overlong_path_is_reported() {
        let tmp = TempDir::new("socket-long");
        let path = tmp.0.join("x".repeat(120));
        assert!(matches!(bind_unix_listener(&path, 0o600), Err(SocketError::PathTooLong { .. })));
    }

    #[test]
    fn remove_only_removes_sockets() {
        let tmp = TempDir::new("socket-remove");
        let path = tmp.join("admin.sock");
        let listener = bind_unix_listener(&path, 0o600).unwrap();
        remove_socket_file(&path).unwrap();
        assert!(std::fs::symlink_metadata(&path).is_err());
        // Already gone: fine.
        remove_socket_file(&path).unwrap();
        drop(listener);

        let file = tmp.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(remove_socket_file(&file), Err(SocketError::NotASocket { .. })));
        assert!(file.exists());
    }

    #[test]
    fn group_lookup_and_chown() {
        let table = "# comment\nroot:x:0:\nwheel:x:10:alice,bob\nbroken\ninferd:x:1234:\n";
        assert_eq!(find_group(table, "wheel"), Some(10));
        assert_eq!(find_group(table, "inferd"), Some(1234));
        assert_eq!(find_group(table, "whee"), None);
        assert_eq!(find_group(table, "broken"), None);

        let tmp = TempDir::new("socket-group");
        let path = tmp.join("infer.sock");
        let _listener = bind_unix_listener(&path, 0o660).unwrap();
        let ours = rustix::process::getegid().as_raw();
        assert_eq!(chown_group(&path, &ours.to_string()).unwrap(), ours);
        assert_eq!(std::fs::symlink_metadata(&path).unwrap().gid(), ours);
        // "root" exists in every /etc/group this runs on.
        if rustix::process::geteuid().as_raw() == 0 {
            assert_eq!(chown_group(&path, "root").unwrap(), 0);
        }
        let err = chown_group(&path, "no-such-group-inferd").unwrap_err();
        assert!(matches!(err, SocketError::UnknownGroup { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-group-inferd"));
    }

    #[test]
    fn loopback_addresses_parse() {
        let v4 = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        assert_eq!(parse_loopback_addr("127.0.0.1:47321").unwrap(), v4(47321));
        assert_eq!(parse_loopback_addr("localhost:8080").unwrap(), v4(8080));
        assert_eq!(parse_loopback_addr("LOCALHOST:8080").unwrap(), v4(8080));
        assert_eq!(parse_loopback_addr(" 9000 ").unwrap(), v4(9000));
        assert_eq!(parse_loopback_addr("localhost").unwrap(), v4(DEFAULT_TCP_PORT));
        assert_eq!(parse_loopback_addr("127.0.0.1").unwrap(), v4(DEFAULT_TCP_PORT));
        assert_eq!(parse_loopback_addr("127.1.2.3:5").unwrap().ip().to_string(), "127.1.2.3");
        let v6 = parse_loopback_addr("[::1]:47321").unwrap();
        assert_eq!(v6, "[::1]:47321".parse().unwrap());
        assert_eq!(parse_loopback_addr("::1").unwrap().port(), DEFAULT_TCP_PORT);
    }

    #[test]
    fn non_loopback_tcp_is_refused() {
        for addr in [
            "0.0.0.0:47321",
            "192.168.1.2:80",
            "[::]:1",
            "[::ffff:127.0.0.1]:1",
            "example.com:80",
            "10.0.0.1",
        ] {
            let err = parse_loopback_addr(addr).unwrap_err();
            assert!(matches!(err, SocketError::NotLoopback { .. }), "{addr}: {err:?}");
            assert!(err.to_string().contains(addr), "{err}");
            assert!(bind_tcp_loopback(addr).is_err());
        }
        for addr in ["", "localhost:", "localhost:99999", "127.0.0.1:x", ":80x"] {
            let err = parse_loopback_addr(addr).unwrap_err();
            assert!(matches!(err, SocketError::InvalidTcpAddr { .. }), "{addr:?}: {err:?}");
        }
    }

    #[test]
    fn tcp_listener_binds_on_loopback() {
        let listener = bind_tcp_loopback("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        assert!(local.ip().is_loopback());
        std::net::TcpStream::connect(local).unwrap();
        // The port is now taken: the error names the address.
        let err = bind_tcp_loopback(&local.to_string()).unwrap_err();
        assert!(matches!(err, SocketError::TcpBind { .. }), "{err:?}");
        assert!(err.to_string().contains(&local.to_string()));
    }
}
