//! Where the daemon keeps its sockets, lock, logs and config, and how its private
//! directories are made.
//!
//! The resolution rules are pure functions of the environment values so that tests can
//! feed them any environment; thin wrappers read the real one.

use std::ffi::OsStr;
use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The inference socket's file name inside the runtime dir.
pub const INFER_SOCKET: &str = "infer.sock";
/// The admin socket's file name inside the runtime dir.
pub const ADMIN_SOCKET: &str = "admin.sock";
/// The single-instance lock file's name inside the runtime dir.
pub const LOCK_FILE: &str = "inferd.lock";

/// Why a private directory could not be made safe to use.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// A symlink sits where the directory should be; following it could hand our
    /// sockets to whoever controls the link's target.
    #[error("refusing {path}: it is a symlink, not a directory")]
    Symlink {
        /// The offending path.
        path: PathBuf,
    },
    /// Something other than a directory sits at the path.
    #[error("refusing {path}: it exists and is not a directory")]
    NotADirectory {
        /// The offending path.
        path: PathBuf,
    },
    /// The directory belongs to another user, who could read or replace what we put in it.
    #[error("refusing {path}: it is owned by uid {owner}, not by us (uid {ours})")]
    NotOwned {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        ours: u32,
    },
    /// The directory has the sticky bit, the mark of a shared directory such as `/tmp`;
    /// making it private would break everyone else who uses it.
    #[error("refusing to make {path} private: it is a shared (sticky) directory")]
    Shared {
        /// The directory.
        path: PathBuf,
    },
    /// A filesystem call failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What we were doing, as a verb phrase.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// The runtime directory from the spec's chain: `$XDG_RUNTIME_DIR/inferd/`, else
/// `$HOME/.inferd/run/`, else `/tmp/inferd-<uid>/`.
///
/// Unset, empty and relative values are skipped: the XDG base-directory spec says a
/// relative path must be ignored, and a socket path that depends on the working
/// directory would not be found by clients.
pub fn resolve_runtime_dir(
    xdg_runtime_dir: Option<&OsStr>,
    home: Option<&OsStr>,
    uid: u32,
) -> PathBuf {
    if let Some(xdg) = usable_dir(xdg_runtime_dir) {
        return xdg.join("inferd");
    }
    if let Some(home) = usable_dir(home) {
        return home.join(".inferd").join("run");
    }
    PathBuf::from(format!("/tmp/inferd-{uid}"))
}

/// [`resolve_runtime_dir`] with the process's environment and real uid.
pub fn runtime_dir() -> PathBuf {
    resolve_runtime_dir(
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        std::env::var_os("HOME").as_deref(),
        rustix::process::getuid().as_raw(),
    )
}

/// The activity log directory: `$INFERD_LOG_DIR` if set and non-empty, else
/// `<home>/.inferd/logs/`; `None` when neither is known.
pub fn resolve_log_dir(inferd_log_dir: Option<&OsStr>, home: Option<&Path>) -> Option<PathBuf> {
    // An explicit log dir may be relative: the operator chose it on purpose.
    if let Some(dir) = inferd_log_dir.filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let home = home.filter(|h| h.is_absolute())?;
    Some(home.join(".inferd").join("logs"))
}

/// [`resolve_log_dir`] with the process's environment and home directory.
pub fn default_log_dir() -> Option<PathBuf> {
    resolve_log_dir(std::env::var_os("INFERD_LOG_DIR").as_deref(), std::env::home_dir().as_deref())
}

/// The config file under a home directory: `<home>/.inferd/config.json`; `None` without a
/// usable (absolute) home.
pub fn resolve_config_path(home: Option<&Path>) -> Option<PathBuf> {
    let home = home.filter(|h| h.is_absolute())?;
    Some(home.join(".inferd").join("config.json"))
}

/// [`resolve_config_path`] with the process's home directory (`~/.inferd/config.json`).
pub fn default_config_path() -> Option<PathBuf> {
    resolve_config_path(std::env::home_dir().as_deref())
}

/// An environment value usable as a base directory: set, non-empty and absolute.
fn usable_dir(value: Option<&OsStr>) -> Option<&Path> {
    value.map(Path::new).filter(|p| p.is_absolute())
}

/// Makes `path` a directory only we can use: creates it (and missing parents) with mode
/// 0700, refuses a symlink or non-directory at the final component, refuses a directory
/// owned by another user, and tightens an existing one of ours to 0700.
///
/// The checks run on a descriptor opened with `O_NOFOLLOW`, so a symlink swapped in
/// between the creation and the check is refused rather than followed.
pub fn ensure_private_dir(path: impl AsRef<Path>) -> Result<(), PathError> {
    let path = path.as_ref();
    let io_err = |op, source| PathError::Io { op, path: path.to_owned(), source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(PathError::Symlink { path: path.to_owned() });
        }
        Ok(meta) if !meta.is_dir() => {
            return Err(PathError::NotADirectory { path: path.to_owned() });
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Parents get 0700 too: `~/.inferd` holds the config and logs as well.
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| io_err("create directory", e))?;
        }
        Err(e) => return Err(io_err("inspect", e)),
    }

    let dir =
        OpenOptions::new().read(true).custom_flags(nofollow_directory_flags()).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(code) if code == rustix::io::Errno::LOOP.raw_os_error() => {
                    PathError::Symlink { path: path.to_owned() }
                }
                Some(code) if code == rustix::io::Errno::NOTDIR.raw_os_error() => {
                    PathError::NotADirectory { path: path.to_owned() }
                }
                _ => io_err("open directory", e),
            },
        )?;
    let meta = dir.metadata().map_err(|e| io_err("inspect", e))?;
    let ours = rustix::process::geteuid().as_raw();
    if meta.uid() != ours {
        return Err(PathError::NotOwned { path: path.to_owned(), owner: meta.uid(), ours });
    }
    let mode = meta.mode() & 0o7777;
    if mode != 0o700 {
        if mode & 0o1000 != 0 {
            return Err(PathError::Shared { path: path.to_owned() });
        }
        dir.set_permissions(std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err("set mode 0700 on", e))?;
    }
    Ok(())
}

/// `O_DIRECTORY | O_NOFOLLOW` as the raw flags std's `custom_flags` takes.
fn nofollow_directory_flags() -> i32 {
    let flags = rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::NOFOLLOW;
    i32::try_from(flags.bits()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn runtime_dir_follows_the_chain() {
        let os = |s: &'static str| Some(OsStr::new(s));
        assert_eq!(
            resolve_runtime_dir(os("/run/user/1000"), os("/home/a"), 1000),
            PathBuf::from("/run/user/1000/inferd")
        );
        assert_eq!(
            resolve_runtime_dir(None, os("/home/a"), 1000),
            PathBuf::from("/home/a/.inferd/run")
        );
        assert_eq!(
            resolve_runtime_dir(os(""), os("/home/a"), 1000),
            PathBuf::from("/home/a/.inferd/run")
        );
        assert_eq!(
            resolve_runtime_dir(os("run"), os("/home/a"), 1000),
            PathBuf::from("/home/a/.inferd/run")
        );
        assert_eq!(resolve_runtime_dir(None, None, 1000), PathBuf::from("/tmp/inferd-1000"));
        assert_eq!(resolve_runtime_dir(os(""), os("relative"), 0), PathBuf::from("/tmp/inferd-0"));
        // The wrapper reads something of the same shape; it must be absolute.
        assert!(runtime_dir().is_absolute());
    }

    #[test]
    fn log_dir_and_config_path() {
        let home = Some(Path::new("/home/a"));
        assert_eq!(
            resolve_log_dir(Some(OsStr::new("/var/log/x")), home),
            Some(PathBuf::from("/var/log/x"))
        );
        assert_eq!(
            resolve_log_dir(Some(OsStr::new("")), home),
            Some(PathBuf::from("/home/a/.inferd/logs"))
        );
        assert_eq!(resolve_log_dir(None, home), Some(PathBuf::from("/home/a/.inferd/logs")));
        assert_eq!(resolve_log_dir(None, None), None);
        assert_eq!(resolve_config_path(home), Some(PathBuf::from("/home/a/.inferd/config.json")));
        assert_eq!(resolve_config_path(Some(Path::new("rel"))), None);
        assert_eq!(resolve_config_path(None), None);
    }

    #[test]
    fn creates_private_dir_and_parents() {
        let tmp = TempDir::new("paths-create");
        let dir = tmp.join("a/b/run");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode_of(&dir), 0o700);
        assert_eq!(mode_of(&tmp.join("a")), 0o700);
        // Idempotent.
        ensure_private_dir(&dir).unwrap();
    }

    #[test]
    fn tightens_an_open_dir_of_ours() {
        let tmp = TempDir::new("paths-tighten");
        let dir = tmp.join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode_of(&dir), 0o700);
    }

    #[test]
    fn refuses_symlink_file_and_sticky_dir() {
        let tmp = TempDir::new("paths-refuse");
        let target = tmp.join("target");
        std::fs::create_dir(&target).unwrap();
        let link = tmp.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = ensure_private_dir(&link).unwrap_err();
        assert!(matches!(err, PathError::Symlink { .. }), "{err}");
        assert!(err.to_string().contains(&link.display().to_string()));

        let file = tmp.join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(ensure_private_dir(&file), Err(PathError::NotADirectory { .. })));

        let sticky = tmp.join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(matches!(ensure_private_dir(&sticky), Err(PathError::Shared { .. })));
        assert_eq!(mode_of(&sticky), 0o1777);
    }

    #[test]
    fn refuses_a_dir_owned_by_someone_else() {
        // Only root can give a directory away; elsewhere there is nothing to set up.
        if rustix::process::geteuid().as_raw() != 0 {
            return;
        }
        let tmp = TempDir::new("paths-owner");
        let dir = tmp.join("theirs");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let err = ensure_private_dir(&dir).unwrap_err();
        assert!(matches!(err, PathError::NotOwned { owner: 65534, ours: 0, .. }), "{err}");
    }
}
