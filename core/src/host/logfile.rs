//! The activity log sink: `inferd.ndjson` in the log directory, written in batches and
//! rotated by size.
//!
//! When to rotate is decided by [`RotationPolicy`], a plain value with no IO, so the
//! rule can be tested (and reused by other sinks) on its own. [`ActivityLogFile`] does
//! the IO: buffering, one `write_all` per batch, renaming generations.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The log file's name inside the log directory.
pub const LOG_FILE_NAME: &str = "inferd.ndjson";

/// Rotate once the file would pass this size (16 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Older generations kept (`.1` `.2` `.3`).
pub const DEFAULT_KEEP: u32 = 3;

/// When the log file must be rotated. Pure bookkeeping: the caller reports what it
/// wrote and when it rotated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationPolicy {
    /// The size a file may reach.
    pub max_bytes: u64,
    /// How many older generations to keep.
    pub keep: u32,
    /// The current file's size.
    pub current: u64,
}

impl RotationPolicy {
    /// A policy for a file that already holds `current` bytes.
    pub fn new(max_bytes: u64, keep: u32, current: u64) -> RotationPolicy {
        RotationPolicy { max_bytes, keep, current }
    }

    /// Whether writing `incoming` more bytes must go to a fresh file: it would push the
    /// file over `max_bytes`. An empty file is never rotated, since a fresh one would
    /// overflow just the same; an oversized write then lands whole in one file.
    pub fn must_rotate(&self, incoming: u64) -> bool {
        self.current > 0 && self.current.saturating_add(incoming) > self.max_bytes
    }

    /// The file was rotated: the current one is empty.
    pub fn rotated(&mut self) {
        self.current = 0;
    }

    /// `n` bytes were appended to the current file.
    pub fn wrote(&mut self, n: u64) {
        self.current = self.current.saturating_add(n);
    }
}

impl Default for RotationPolicy {
    fn default() -> Self {
        RotationPolicy::new(DEFAULT_MAX_BYTES, DEFAULT_KEEP, 0)
    }
}

/// Why the activity log could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("activity log: cannot {op} {path}: {source}")]
pub struct LogFileError {
    /// What we were doing.
    pub op: &'static str,
    /// On which file or directory.
    pub path: PathBuf,
    /// The OS error.
    pub source: io::Error,
}

/// The activity log file. Lines are collected with [`push`](Self::push) and written by
/// [`flush`](Self::flush); dropping it flushes what is left (errors are lost then).
#[derive(Debug)]
pub struct ActivityLogFile {
    path: PathBuf,
    file: File,
    policy: RotationPolicy,
    /// Pending lines, each ending with LF.
    buf: Vec<u8>,
    /// Where each pending line ends in `buf`, so that a batch is only ever cut between
    /// lines.
    ends: Vec<usize>,
}

impl ActivityLogFile {
    /// Opens `<dir>/inferd.ndjson` with the default rotation (16 MiB, 3 generations).
    pub fn open(dir: impl AsRef<Path>) -> Result<ActivityLogFile, LogFileError> {
        ActivityLogFile::open_with(dir, DEFAULT_MAX_BYTES, DEFAULT_KEEP)
    }

    /// Opens `<dir>/inferd.ndjson` for appending, rotating at `max_bytes` and keeping
    /// `keep` older generations. A missing directory is created with mode 0700 (an
    /// existing one is left as it is: the operator may share it); the file is created
    /// with mode 0600, and tightened to 0600 if it is more open.
    pub fn open_with(
        dir: impl AsRef<Path>,
        max_bytes: u64,
        keep: u32,
    ) -> Result<ActivityLogFile, LogFileError> {
        let dir = dir.as_ref();
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|source| {
            LogFileError { op: "create the directory", path: dir.to_owned(), source }
        })?;
        let path = dir.join(LOG_FILE_NAME);
        let (file, size) = open_log(&path)?;
        Ok(ActivityLogFile {
            path,
            file,
            policy: RotationPolicy::new(max_bytes, keep, size),
            buf: Vec::new(),
            ends: Vec::new(),
        })
    }

    /// The current log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rotation bookkeeping, including the current file's size.
    pub fn policy(&self) -> &RotationPolicy {
        &self.policy
    }

    /// Bytes waiting for [`flush`](Self::flush).
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Queues one line (already redacted). A missing final LF is added; the line is
    /// never split across files.
    pub fn push(&mut self, line: &str) {
        self.buf.extend_from_slice(line.as_bytes());
        if !line.ends_with('\n') {
            self.buf.push(b'\n');
        }
        self.ends.push(self.buf.len());
    }

    /// Writes every queued line, rotating first whenever the next lines would push the
    /// file over the limit. Usually that is a single `write_all`.
    ///
    /// On error the lines not yet written are dropped, so that a full disk cannot make
    /// the buffer grow without bound; the error says which file failed.
    pub fn flush(&mut self) -> Result<(), LogFileError> {
        let result = self.write_pending();
        self.buf.clear();
        self.ends.clear();
        result
    }

    fn write_pending(&mut self) -> Result<(), LogFileError> {
        // `planned` is the policy as if the pending chunk were already written, so each
        // line is judged against the file size it would really land on.
        let mut planned = self.policy;
        let mut start = 0;
        let mut line_start = 0;
        for i in 0..self.ends.len() {
            let end = self.ends[i];
            let line_len = (end - line_start) as u64;
            if planned.must_rotate(line_len) {
                self.write_chunk(start, line_start)?;
                start = line_start;
                self.rotate()?;
                planned = self.policy;
            }
            planned.wrote(line_len);
            line_start = end;
        }
        self.write_chunk(start, line_start)
    }

    fn write_chunk(&mut self, start: usize, end: usize) -> Result<(), LogFileError> {
        if start == end {
            return Ok(());
        }
        let chunk = &self.buf[start..end];
        self.file.write_all(chunk).map_err(|source| LogFileError {
            op: "write",
            path: self.path.clone(),
            source,
        })?;
        self.policy.wrote(chunk.len() as u64);
        Ok(())
    }

    /// Shifts the generations up by one (`.2`→`.3`, `.1`→`.2`, file→`.1`), dropping the
    /// oldest, and reopens an empty file.
    fn rotate(&mut self) -> Result<(), LogFileError> {
        let keep = self.policy.keep;
        if keep == 0 {
            // No older generation is wanted: start the file over.
            self.file.set_len(0).map_err(|source| LogFileError {
                op: "truncate",
                path: self.path.clone(),
                source,
            })?;
            self.policy.rotated();
            return Ok(());
        }
        for n in (1..keep).rev() {
            rename_if_present(&generation(&self.path, n), &generation(&self.path, n + 1))?;
        }
        // rename replaces the target, which is how the oldest generation is dropped.
        rename_if_present(&self.path, &generation(&self.path, 1))?;
        let (file, size) = open_log(&self.path)?;
        self.file = file;
        self.policy.rotated();
        self.policy.wrote(size);
        Ok(())
    }
}

impl Drop for ActivityLogFile {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// `<path>.<n>`.
fn generation(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn rename_if_present(from: &Path, to: &Path) -> Result<(), LogFileError> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LogFileError { op: "rotate", path: from.to_owned(), source }),
    }
}

/// Opens the log for appending (0600, no symlink followed) and returns its size.
fn open_log(path: &Path) -> Result<(File, u64), LogFileError> {
    let err = |op| move |source| LogFileError { op, path: path.to_owned(), source };
    let nofollow = i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).unwrap_or(0);
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nofollow)
        .open(path)
        .map_err(err("open"))?;
    let meta = file.metadata().map_err(err("inspect"))?;
    if !meta.is_file() {
        let source = io::Error::new(io::ErrorKind::InvalidInput, "not a regular file");
        return Err(LogFileError { op: "use", path: path.to_owned(), source });
    }
    if meta.mode() & 0o077 != 0 {
        // Activity records carry peer identities; keep them from other users.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err("set mode 0600 on"))?;
    }
    Ok((file, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::testutil::TempDir;

    #[test]
    fn policy_rotates_only_when_the_write_would_overflow() {
        let mut p = RotationPolicy::new(100, 3, 0);
        // An empty file takes anything, even an oversized write.
        assert!(!p.must_rotate(500));
        p.wrote(60);
        assert!(!p.must_rotate(40));
        assert!(p.must_rotate(41));
        p.rotated();
        assert_eq!(p.current, 0);
        assert!(!p.must_rotate(100));
        p.wrote(u64::MAX);
        assert!(p.must_rotate(1));
        assert_eq!(RotationPolicy::default(), RotationPolicy::new(16 * 1024 * 1024, 3, 0));
    }

    #[test]
    fn creates_private_dir_and_file_and_appends() {
        let tmp = TempDir::new("log-open");
        let dir = tmp.join("logs/deeper");
        let mut log = ActivityLogFile::open(&dir).unwrap();
        assert_eq!(log.path(), dir.join("inferd.ndjson"));
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(log.path()).unwrap().mode() & 0o777, 0o600);
        log.push("{\"a\":1}\n");
        log.push("{\"b\":2}");
        assert_eq!(log.pending_bytes(), 16);
        // Nothing reaches the file before flush.
        assert_eq!(std::fs::read(log.path()).unwrap(), b"");
        log.flush().unwrap();
        assert_eq!(log.pending_bytes(), 0);
        drop(log);

        // Reopening appends and knows the size already there.
        let mut log = ActivityLogFile::open(&dir).unwrap();
        assert_eq!(log.policy().current, 16);
        log.push("{\"c\":3}");
        drop(log); // flushes
        assert_eq!(
            std::fs::read_to_string(dir.join("inferd.ndjson")).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n"
        );
    }

    #[test]
    fn existing_open_file_is_tightened_and_symlink_refused() {
        let tmp = TempDir::new("log-modes");
        let path = tmp.join(LOG_FILE_NAME);
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(ActivityLogFile::open(&tmp.0).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);

        let other = TempDir::new("log-link");
        std::os::unix::fs::symlink(tmp.join("elsewhere"), other.join(LOG_FILE_NAME)).unwrap();
        let err = ActivityLogFile::open(&other.0).unwrap_err();
        assert!(err.to_string().contains(LOG_FILE_NAME), "{err}");
        assert!(!tmp.join("elsewhere").exists());
    }

    /// Every file of the log, newest first, that exists.
    fn generations(dir: &Path) -> Vec<(String, String)> {
        let base = dir.join(LOG_FILE_NAME);
        let mut files = vec![(LOG_FILE_NAME.to_owned(), std::fs::read_to_string(&base).unwrap())];
        for n in 1..10 {
            if let Ok(text) = std::fs::read_to_string(generation(&base, n)) {
                files.push((format!("{LOG_FILE_NAME}.{n}"), text));
            }
        }
        files
    }

    #[test]
    fn rotation_keeps_three_generations_with_whole_lines() {
        let tmp = TempDir::new("log-rotate");
        let max = 100;
        let mut log = ActivityLogFile::open_with(&tmp.0, max, 3).unwrap();
        let mut all = Vec::new();
        // Lines of varying length, flushed in batches of varying size, including a batch
        // much larger than max_bytes.
        let mut n = 0;
        for batch in [1, 3, 7, 2, 20, 1, 1, 5, 9, 4] {
            for _ in 0..batch {
                let line = format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(n % 17));
                log.push(&line);
                all.push(line);
                n += 1;
            }
            log.flush().unwrap();
            assert!(log.policy().current <= max);
        }
        drop(log);

        let files = generations(&tmp.0);
        let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            ["inferd.ndjson", "inferd.ndjson.1", "inferd.ndjson.2", "inferd.ndjson.3"]
        );
        for (name, text) in &files {
            assert!(text.len() as u64 <= max, "{name} has {} bytes", text.len());
            assert!(text.ends_with('\n'), "{name} ends mid-line");
            for line in text.lines() {
                serde_json::from_str::<serde_json::Value>(line).unwrap();
            }
        }
        // Oldest to newest, the kept files hold a suffix of what was written, in order.
        let kept: Vec<&str> = files.iter().rev().flat_map(|(_, text)| text.lines()).collect();
        let expected: Vec<&str> =
            all[all.len() - kept.len()..].iter().map(String::as_str).collect();
        assert_eq!(kept, expected);
        assert!(kept.len() < all.len(), "the oldest generations were dropped");
    }

    #[test]
    fn a_line_longer_than_the_limit_gets_a_file_of_its_own() {
        let tmp = TempDir::new("log-long");
        let mut log = ActivityLogFile::open_with(&tmp.0, 10, 3).unwrap();
        log.push("short");
        log.push(&"y".repeat(30));
        log.push("tail");
        log.flush().unwrap();
        drop(log);
        let files = generations(&tmp.0);
        let texts: Vec<&str> = files.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(texts, ["tail\n", &format!("{}\n", "y".repeat(30)), "short\n"]);
    }

    #[test]
    fn keep_zero_starts_the_file_over() {
        let tmp = TempDir::new("log-keep0");
        let mut log = ActivityLogFile::open_with(&tmp.0, 10, 0).unwrap();
        log.push("aaaaaa");
        log.flush().unwrap();
        log.push("bbbbbb");
        log.flush().unwrap();
        drop(log);
        let files = generations(&tmp.0);
        assert_eq!(files, [(LOG_FILE_NAME.to_owned(), "bbbbbb\n".to_owned())]);
    }
}
