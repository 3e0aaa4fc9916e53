//! The single-instance lock: an exclusive, non-blocking `flock` on `inferd.lock`.
//!
//! The lock lives in the open file description, not in the file: the file stays on disk
//! after exit, and a daemon that dies for any reason releases the lock with its
//! descriptors, so there is never a stale lock to clean up.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use rustix::io::Errno;

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("another inferd daemon holds the lock at {}{}", path.display(), held_by(*pid))]
    Held {
        /// The lock file.
        path: PathBuf,
        /// The holder's pid, as it wrote it into the file, when readable.
        pid: Option<u32>,
    },
    /// A symlink sits at the lock path; following it would let its owner point us at a
    /// file of their choosing.
    #[error("refusing the lock file {path}: it is a symlink")]
    Symlink {
        /// The lock path.
        path: PathBuf,
    },
    /// Something other than a regular file sits at the lock path.
    #[error("refusing the lock file {path}: it is not a regular file")]
    NotRegular {
        /// The lock path.
        path: PathBuf,
    },
    /// A filesystem call failed.
    #[error("cannot {op} the lock file {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The lock path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// The " (pid N)" suffix of [`LockError::Held`], empty when the pid is unknown.
fn held_by(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// A held single-instance lock. Dropping it releases the lock; the file stays.
#[derive(Debug)]
pub struct InstanceLock {
    /// Keeps the locked open file description alive.
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the exclusive lock at `path`, creating the file (mode 0600) if needed, and
    /// writes our pid into it for the message a second daemon prints.
    ///
    /// Refuses a symlink or a non-regular file at the path. Returns
    /// [`LockError::Held`] at once, without waiting, when another daemon holds it.
    pub fn acquire(path: impl AsRef<Path>) -> Result<InstanceLock, LockError> {
        let path = path.as_ref();
        let io_err = |op, source| LockError::Io { op, path: path.to_owned(), source };
        // The lstat gives the clear message; O_NOFOLLOW and the fstat below close the
        // race where the path changes between the two.
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(LockError::Symlink { path: path.to_owned() });
            }
            Ok(meta) if !meta.is_file() => {
                return Err(LockError::NotRegular { path: path.to_owned() });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspect", e)),
        }
        // O_NONBLOCK keeps a FIFO swapped in after the lstat from blocking the open;
        // it has no effect on a regular file. std adds O_CLOEXEC itself.
        let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(i32::try_from(flags.bits()).unwrap_or(0))
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(code) if code == Errno::LOOP.raw_os_error() => {
                    LockError::Symlink { path: path.to_owned() }
                }
                Some(code) if code == Errno::ISDIR.raw_os_error() => {
                    LockError::NotRegular { path: path.to_owned() }
                }
                _ => io_err("open", e),
            })?;
        let meta = file.metadata().map_err(|e| io_err("inspect", e))?;
        if !meta.is_file() {
            return Err(LockError::NotRegular { path: path.to_owned() });
        }
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                return Err(LockError::Held { path: path.to_owned(), pid: read_pid(&mut file) });
            }
            Err(e) => return Err(io_err("lock", e.into())),
        }
        // The pid is only a hint for the operator; the lock is already ours if writing fails.
        let _ = write_pid(&mut file);
        Ok(InstanceLock { _file: file, path: path.to_owned() })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Replaces the file's content with our pid and a newline.
fn write_pid(file: &mut File) -> io::Result<()> {
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
}

/// The pid the holder wrote, if the file holds one.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn second_acquire_is_refused_until_the_first_is_dropped() {
        let tmp = TempDir::new("lock-held");
        let path = tmp.join("inferd.lock");
        let first = InstanceLock::acquire(&path).unwrap();
        assert_eq!(first.path(), path);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{}\n", std::process::id()));

        // flock belongs to the open file description, so a second open in the same
        // process conflicts just as another daemon would.
        let err = InstanceLock::acquire(&path).unwrap_err();
        match &err {
            LockError::Held { path: p, pid } => {
                assert_eq!(p, &path);
                assert_eq!(*pid, Some(std::process::id()));
            }
            other => panic!("expected Held, got {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "another inferd daemon holds the lock at {}",
                path.display()
            )),
            "{message}"
        );

        drop(first);
        let again = InstanceLock::acquire(&path).unwrap();
        assert!(path.exists());
        drop(again);
        // The file stays on disk.
        assert!(path.exists());
    }

    #[test]
    fn a_stale_file_from_an_earlier_run_is_reused() {
        let tmp = TempDir::new("lock-stale");
        let path = tmp.join("inferd.lock");
        std::fs::write(&path, b"999999\nold junk that is longer than a pid\n").unwrap();
        let _lock = InstanceLock::acquire(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{}\n", std::process::id()));
    }

    #[test]
    fn symlink_is_refused() {
        let tmp = TempDir::new("lock-symlink");
        let target = tmp.join("elsewhere");
        let link = tmp.join("inferd.lock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = InstanceLock::acquire(&link).unwrap_err();
        assert!(matches!(err, LockError::Symlink { .. }), "{err:?}");
        assert!(err.to_string().contains(&link.display().to_string()));
        // Nothing was created through the link.
        assert!(!target.exists());
    }

    #[test]
    fn directory_and_fifo_are_refused() {
        let tmp = TempDir::new("lock-dir");
        let dir = tmp.join("inferd.lock");
        std::fs::create_dir(&dir).unwrap();
        let err = InstanceLock::acquire(&dir).unwrap_err();
        assert!(matches!(err, LockError::NotRegular { .. }), "{err:?}");
        assert!(err.to_string().contains("not a regular file"));

        let fifo = tmp.join("fifo.lock");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600))
            .unwrap();
        assert!(matches!(InstanceLock::acquire(&fifo), Err(LockError::NotRegular { .. })));
    }

    #[test]
    fn missing_parent_is_an_io_error_naming_the_path() {
        let tmp = TempDir::new("lock-missing");
        let path = tmp.join("no/such/dir/inferd.lock");
        let err = InstanceLock::acquire(&path).unwrap_err();
        assert!(matches!(err, LockError::Io { op: "open", .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }
}
