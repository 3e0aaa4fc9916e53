//! The activity log sink: `inferd.ndjson` in the log directory, written in batches and
//! rotated by size.
//!
//! When to rotate is decided by [`RotationPolicy`], a plain value with no IO, so the
//! rule can be tested (and reused by other sinks) on its own. [`ActivityLogFile`] does
//! the IO: buffering, one write per batch, renaming generations.
//!
//! A record reaches the file whole or not at all: when a write stops short (a full
//! disk, a file size limit), the file is cut back to the end of the last whole record,
//! so that the next record starts on a line of its own; the lost records are counted
//! ([`ActivityLogFile::records_dropped`]).

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

/// Where the log's bytes go: the log file, or a test double that fails on cue.
trait LogSink: std::fmt::Debug + Send {
    /// Appends some of `buf`, as `write(2)` on an `O_APPEND` file does.
    fn append(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Cuts the file to `len` bytes.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

impl LogSink for File {
    fn append(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write(buf)
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// The activity log file. Lines are collected with [`push`](Self::push) and written by
/// [`flush`](Self::flush); dropping it flushes what is left (errors are lost then).
#[derive(Debug)]
pub struct ActivityLogFile {
    path: PathBuf,
    file: Box<dyn LogSink>,
    policy: RotationPolicy,
    /// Pending lines, each ending with LF.
    buf: Vec<u8>,
    /// Where each pending line ends in `buf`, so that a batch is only ever cut between
    /// lines.
    ends: Vec<usize>,
    /// Records lost to write failures since the file was opened.
    dropped: u64,
    /// A failed write left part of a record at the end of the file, and cutting it off
    /// failed too: the length to cut back to before anything else is written.
    torn: Option<u64>,
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
        Ok(ActivityLogFile::with_sink(
            path,
            Box::new(file),
            RotationPolicy::new(max_bytes, keep, size),
        ))
    }

    fn with_sink(path: PathBuf, file: Box<dyn LogSink>, policy: RotationPolicy) -> Self {
        ActivityLogFile {
            path,
            file,
            policy,
            buf: Vec::new(),
            ends: Vec::new(),
            dropped: 0,
            torn: None,
        }
    }

    /// Records lost to write failures (a full disk, a file size limit) since the file
    /// was opened. Each was left out whole: the file never holds part of a record.
    pub fn records_dropped(&self) -> u64 {
        self.dropped
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
    /// On error the lines not yet written are dropped (and counted in
    /// [`records_dropped`](Self::records_dropped)), so that a full disk cannot make the
    /// buffer grow without bound; the error says which file failed.
    pub fn flush(&mut self) -> Result<(), LogFileError> {
        let mut written = 0;
        let result = self.write_pending(&mut written);
        if result.is_err() {
            self.dropped += (self.ends.len() - written) as u64;
        }
        self.buf.clear();
        self.ends.clear();
        result
    }

    /// Writes the pending lines; `written` counts those that reached the file whole.
    fn write_pending(&mut self, written: &mut usize) -> Result<(), LogFileError> {
        if let Some(len) = self.torn {
            self.file.truncate(len).map_err(|source| self.error("cut back", source))?;
            self.torn = None;
            self.policy.current = len;
        }
        // `planned` is the policy as if the pending chunk were already written, so each
        // line is judged against the file size it would really land on.
        let mut planned = self.policy;
        let mut first = 0;
        for i in 0..self.ends.len() {
            let line_start = if i == 0 { 0 } else { self.ends[i - 1] };
            let line_len = (self.ends[i] - line_start) as u64;
            if planned.must_rotate(line_len) {
                self.write_lines(first, i, written)?;
                first = i;
                self.rotate()?;
                planned = self.policy;
            }
            planned.wrote(line_len);
        }
        self.write_lines(first, self.ends.len(), written)
    }

    /// Writes pending lines `first..last` (usually in one call). Should the file take
    /// only part of them, it is cut back to the end of the last whole line.
    fn write_lines(
        &mut self,
        first: usize,
        last: usize,
        written: &mut usize,
    ) -> Result<(), LogFileError> {
        if first == last {
            return Ok(());
        }
        let start = if first == 0 { 0 } else { self.ends[first - 1] };
        let end = self.ends[last - 1];
        let base = self.policy.current;
        let mut done = 0;
        let failure = loop {
            if start + done == end {
                break None;
            }
            match self.file.append(&self.buf[start + done..end]) {
                Ok(0) => break Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        // Lines wholly written, and the bytes they take.
        let whole = self.ends[first..last].partition_point(|&e| e <= start + done);
        let kept = if whole == 0 { 0 } else { self.ends[first + whole - 1] - start };
        *written += whole;
        let Some(source) = failure else {
            self.policy.wrote(done as u64);
            return Ok(());
        };
        if done > kept {
            let len = base + kept as u64;
            if let Err(cut) = self.file.truncate(len) {
                // Cut it before the next write instead; until then the file is this long.
                self.torn = Some(len);
                self.policy.wrote(done as u64);
                return Err(self.error("cut back after a failed write", cut));
            }
        }
        self.policy.wrote(kept as u64);
        Err(self.error("write", source))
    }

    fn error(&self, op: &'static str, source: io::Error) -> LogFileError {
        LogFileError { op, path: self.path.clone(), source }
    }

    /// Shifts the generations up by one (`.2`→`.3`, `.1`→`.2`, file→`.1`), dropping the
    /// oldest, and reopens an empty file.
    fn rotate(&mut self) -> Result<(), LogFileError> {
        let keep = self.policy.keep;
        if keep == 0 {
            // No older generation is wanted: start the file over.
            self.file.truncate(0).map_err(|source| self.error("truncate", source))?;
            self.torn = None;
            self.policy.rotated();
            return Ok(());
        }
        for n in (1..keep).rev() {
            rename_if_present(&generation(&self.path, n), &generation(&self.path, n + 1))?;
        }
        // rename replaces the target, which is how the oldest generation is dropped.
        rename_if_present(&self.path, &generation(&self.path, 1))?;
        let (file, size) = open_log(&self.path)?;
        self.file = Box::new(file);
        self.torn = None;
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
    use crate::testutil::TempDir;

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

    /// A file in memory that takes at most `room` more bytes, then fails like a full
    /// disk; truncation fails while `cut_fails` is set.
    #[derive(Debug, Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<FakeDisk>>);

    #[derive(Debug, Default)]
    struct FakeDisk {
        bytes: Vec<u8>,
        room: usize,
        cut_fails: bool,
        writes: usize,
    }

    impl LogSink for Shared {
        fn append(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut d = self.0.lock().unwrap();
            d.writes += 1;
            if d.room == 0 {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(d.room);
            d.room -= n;
            d.bytes.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            let mut d = self.0.lock().unwrap();
            if d.cut_fails {
                return Err(io::Error::from_raw_os_error(5)); // EIO
            }
            let len = usize::try_from(len).unwrap();
            assert!(len <= d.bytes.len(), "truncate only ever cuts");
            d.room += d.bytes.len() - len;
            d.bytes.truncate(len);
            Ok(())
        }
    }

    fn fake_log(room: usize) -> (ActivityLogFile, Shared) {
        let disk = Shared::default();
        disk.0.lock().unwrap().room = room;
        let log = ActivityLogFile::with_sink(
            PathBuf::from("/fake/inferd.ndjson"),
            Box::new(disk.clone()),
            RotationPolicy::new(DEFAULT_MAX_BYTES, DEFAULT_KEEP, 0),
        );
        (log, disk)
    }

    fn text(disk: &Shared) -> String {
        String::from_utf8(disk.0.lock().unwrap().bytes.clone()).unwrap()
    }

    #[test]
    fn a_write_cut_short_leaves_only_whole_records_and_the_next_starts_its_own_line() {
        // Room for the first record and half of the second.
        let (mut log, disk) = fake_log(12);
        log.push("{\"a\":1}"); // 8 bytes with LF
        log.push("{\"bb\":22}"); // 10 bytes
        log.push("{\"c\":3}");
        let err = log.flush().unwrap_err();
        assert!(err.to_string().contains("cannot write"), "{err}");
        assert_eq!(text(&disk), "{\"a\":1}\n", "the torn record was cut off");
        assert_eq!(log.records_dropped(), 2);
        assert_eq!(log.policy().current, 8);
        assert_eq!(log.pending_bytes(), 0, "failed lines are not kept");

        // Space comes back: the next record lands on a line of its own.
        disk.0.lock().unwrap().room = 1000;
        log.push("{\"d\":4}");
        log.flush().unwrap();
        assert_eq!(text(&disk), "{\"a\":1}\n{\"d\":4}\n");
        assert_eq!(log.records_dropped(), 2);
        assert_eq!(log.policy().current, 16);
    }

    #[test]
    fn a_batch_goes_out_in_one_write_and_a_full_disk_drops_whole_batches() {
        let (mut log, disk) = fake_log(1000);
        for n in 0..10 {
            log.push(&format!("{{\"n\":{n}}}"));
        }
        log.flush().unwrap();
        assert_eq!(disk.0.lock().unwrap().writes, 1);
        disk.0.lock().unwrap().room = 0;
        log.push("{\"lost\":1}");
        log.push("{\"lost\":2}");
        assert!(log.flush().is_err());
        assert_eq!(log.records_dropped(), 2);
        assert_eq!(text(&disk).lines().count(), 10);
    }

    #[test]
    fn a_failed_cut_is_retried_before_the_next_write() {
        let (mut log, disk) = fake_log(5);
        disk.0.lock().unwrap().cut_fails = true;
        log.push("{\"a\":1}");
        let err = log.flush().unwrap_err();
        assert!(err.to_string().contains("cut back"), "{err}");
        assert_eq!(text(&disk), "{\"a\":", "the cut failed: the torn bytes are still there");

        // Still failing: nothing is appended behind the torn bytes.
        disk.0.lock().unwrap().room = 100;
        log.push("{\"b\":2}");
        assert!(log.flush().is_err());
        assert_eq!(text(&disk), "{\"a\":");
        assert_eq!(log.records_dropped(), 2);

        disk.0.lock().unwrap().cut_fails = false;
        log.push("{\"c\":3}");
        log.flush().unwrap();
        assert_eq!(text(&disk), "{\"c\":3}\n");
        assert_eq!(log.policy().current, 8);
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
