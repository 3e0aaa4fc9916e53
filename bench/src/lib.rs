//! Shared pieces of inferd's benchmark binaries (`loadbench`, `enginebench`): starting a
//! daemon binary in a private directory, reading its CPU time and memory from `/proc`,
//! and minimal blocking NDJSON and HTTP clients.
//!
//! The machine these run on is shared and noisy, so every figure worth keeping is a
//! ratio against a baseline measured in the same process run.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod http;
pub use http::HttpClient;

/// A directory removed when dropped.
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// A fresh directory under the system temp dir, named after `tag` (`tempfile` makes
    /// it unique). Kept short: Unix socket paths inside it must fit in 108 bytes.
    pub fn new(tag: &str) -> io::Result<TempDir> {
        Ok(TempDir(tempfile::Builder::new().prefix(&format!("ib-{tag}-")).tempdir()?))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// The kernel's clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// utime + stime in clock ticks of a process (every thread) or, with `tid`, of one
/// thread, from `/proc/<pid>[/task/<tid>]/stat`.
pub fn cpu_ticks(pid: u32, tid: Option<i32>) -> io::Result<u64> {
    let path = match tid {
        Some(t) => format!("/proc/{pid}/task/{t}/stat"),
        None => format!("/proc/{pid}/stat"),
    };
    let text = fs::read_to_string(path)?;
    // The command name may hold spaces and parentheses: fields start after the last `)`.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After `)`: state is field 3 of the man page, so utime (14) and stime (15) are at
    // indices 11 and 12 here.
    let field = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("malformed /proc stat"))
    };
    Ok(field(11)? + field(12)?)
}

/// Clock ticks to microseconds.
pub fn ticks_to_micros(ticks: u64) -> f64 {
    ticks as f64 * 1e6 / clock_ticks_per_second() as f64
}

/// The resident set size of a process in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS"))
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The thread id of the calling thread.
pub fn gettid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// Raises the soft descriptor limit to the hard one (idle-connection runs open many).
pub fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut r = getrlimit(Resource::Nofile);
    if r.current < r.maximum {
        r.current = r.maximum;
        let _ = setrlimit(Resource::Nofile, r);
    }
}

/// The workspace's `target/release` directory as seen from a bench binary: the
/// directory of the running executable.
pub fn sibling_binary(name: &str) -> PathBuf {
    let here = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
    match here {
        Some(dir) if dir.join(name).exists() => dir.join(name),
        _ => PathBuf::from("target/release").join(name),
    }
}

/// A daemon process started by a benchmark, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// Its inference socket.
    pub socket: PathBuf,
    /// Where its stderr goes.
    pub stderr_path: PathBuf,
    /// A short name for tables.
    pub label: String,
    _dir: TempDir,
}

/// How to start a daemon binary.
#[derive(Clone, Debug)]
pub struct DaemonSpec {
    /// The binary.
    pub bin: PathBuf,
    /// The subcommand before the flags (`serve`), if any.
    pub subcommand: Option<String>,
    /// The flags after `--runtime-dir` and `--log-dir`, e.g. `--backend mock`.
    pub args: Vec<String>,
    /// How long to wait for the inference socket.
    pub ready_timeout: Duration,
}

impl Daemon {
    /// Starts `spec` with a private runtime directory, log directory and an empty config
    /// file, and waits until its inference socket accepts connections.
    pub fn start(spec: &DaemonSpec, label: &str) -> Result<Daemon, String> {
        let dir = TempDir::new("d").map_err(|e| format!("temp dir: {e}"))?;
        let config = dir.path().join("config.json");
        fs::write(&config, "{}").map_err(|e| format!("{}: {e}", config.display()))?;
        let stderr_path = dir.path().join("stderr.log");
        let stderr = fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&spec.bin);
        if let Some(s) = &spec.subcommand {
            cmd.arg(s);
        }
        cmd.arg("--config")
            .arg(&config)
            .arg("--runtime-dir")
            .arg(dir.path())
            .arg("--log-dir")
            .arg(dir.path().join("logs"))
            .args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", spec.bin.display()))?;
        let mut d = Daemon {
            pid: child.id(),
            child,
            socket: dir.path().join("infer.sock"),
            stderr_path,
            label: label.to_owned(),
            _dir: dir,
        };
        let deadline = Instant::now() + spec.ready_timeout;
        loop {
            if UnixStream::connect(&d.socket).is_ok() {
                return Ok(d);
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}) before serving:\n{}",
                    spec.bin.display(),
                    d.stderr_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} not serving after {:?}:\n{}",
                    spec.bin.display(),
                    spec.ready_timeout,
                    d.stderr_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last lines the daemon wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        let text = fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// utime + stime of the whole process, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.pid, None).unwrap_or(0)
    }

    /// utime + stime in clock ticks per thread name (threads of one name summed).
    pub fn thread_ticks(&self) -> BTreeMap<String, u64> {
        let mut by_name = BTreeMap::new();
        let Ok(tasks) = fs::read_dir(format!("/proc/{}/task", self.pid)) else { return by_name };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else {
                continue;
            };
            let name = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let ticks = cpu_ticks(self.pid, Some(tid)).unwrap_or(0);
            *by_name.entry(name.trim().to_owned()).or_insert(0) += ticks;
        }
        by_name
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid).unwrap_or(0)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.is_running() {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What kind of response frame a line is, found without parsing the whole line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// `token`.
    Token,
    /// `done`.
    Done,
    /// `error`.
    Error,
    /// Anything else.
    Other,
}

/// The frame type of one compact NDJSON line. `"type":"` cannot occur inside a JSON
/// string (its quotes would be escaped), so the first match is the key.
pub fn frame_kind(line: &[u8]) -> FrameKind {
    const KEY: &[u8] = br#""type":""#;
    let Some(at) = line.windows(KEY.len()).position(|w| w == KEY) else {
        return FrameKind::Other;
    };
    let rest = &line[at + KEY.len()..];
    if rest.starts_with(b"token\"") {
        FrameKind::Token
    } else if rest.starts_with(b"done\"") {
        FrameKind::Done
    } else if rest.starts_with(b"error\"") {
        FrameKind::Error
    } else {
        FrameKind::Other
    }
}

/// The outcome of one request on a [`Client`].
#[derive(Debug)]
pub struct Exchange {
    /// From writing the request to reading the first frame.
    pub first: Duration,
    /// From writing the request to reading the terminal frame.
    pub terminal: Duration,
    /// Token frames read.
    pub tokens: u32,
    /// Whether the terminal frame was `done` (else `error`).
    pub ok: bool,
}

/// A persistent, blocking client connection.
#[derive(Debug)]
pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    line: Vec<u8>,
}

impl Client {
    /// Connects to a Unix socket.
    pub fn connect(path: &Path) -> io::Result<Client> {
        let writer = UnixStream::connect(path)?;
        let reader = BufReader::with_capacity(64 * 1024, writer.try_clone()?);
        Ok(Client { writer, reader, line: Vec::with_capacity(4096) })
    }

    /// Sends one request line (with its LF) and reads frames up to the terminal one.
    pub fn exchange(&mut self, request: &[u8]) -> io::Result<Exchange> {
        let start = Instant::now();
        self.writer.write_all(request)?;
        let mut first = None;
        let mut tokens = 0;
        loop {
            self.line.clear();
            if self.reader.read_until(b'\n', &mut self.line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
            }
            let now = start.elapsed();
            first.get_or_insert(now);
            match frame_kind(&self.line) {
                FrameKind::Token => tokens += 1,
                kind @ (FrameKind::Done | FrameKind::Error) => {
                    return Ok(Exchange {
                        first: first.unwrap_or(now),
                        terminal: now,
                        tokens,
                        ok: kind == FrameKind::Done,
                    });
                }
                FrameKind::Other => {}
            }
        }
    }

    /// The last line read (the terminal frame after [`Client::exchange`]).
    pub fn last_line(&self) -> &[u8] {
        &self.line
    }
}

/// The machine's price of one wake-up round trip: two threads bounce one byte over a
/// Unix socket pair `n` times. Returns (wall µs, process CPU µs) per round trip; every
/// request a server answers costs at least one such round trip.
pub fn pingpong(n: u32) -> (f64, f64) {
    use std::io::Read;
    let Ok((mut a, mut b)) = UnixStream::pair() else { return (f64::NAN, f64::NAN) };
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        for _ in 0..n {
            if b.read_exact(&mut byte).is_err() || b.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let pid = std::process::id();
    let cpu0 = cpu_ticks(pid, None).unwrap_or(0);
    let start = Instant::now();
    let mut byte = [0u8; 1];
    for _ in 0..n {
        if a.write_all(&byte).is_err() || a.read_exact(&mut byte).is_err() {
            break;
        }
    }
    let wall = start.elapsed();
    let _ = echo.join();
    let cpu = ticks_to_micros(cpu_ticks(pid, None).unwrap_or(0).saturating_sub(cpu0));
    (wall.as_secs_f64() * 1e6 / f64::from(n), cpu / f64::from(n))
}

/// The `p`-th percentile (0..=100) of sorted values, nearest rank.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of some values (upper median for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_kinds() {
        assert_eq!(frame_kind(br#"{"type":"token","id":"a","content":"x"}"#), FrameKind::Token);
        assert_eq!(frame_kind(br#"{"id":"a","type":"done"}"#), FrameKind::Done);
        assert_eq!(frame_kind(br#"{"type":"error","id":"\"type\":\"token\""}"#), FrameKind::Error);
        assert_eq!(frame_kind(br#"{"id":"a"}"#), FrameKind::Other);
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile::<u32>(&[], 50.0), 0);
    }

    #[test]
    fn proc_readers() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        assert!(cpu_ticks(pid, None).is_ok());
        assert!(cpu_ticks(pid, Some(gettid())).is_ok());
        assert!(fd_count(pid).unwrap() > 0);
    }
}
