//! End-to-end harness for inferd: starts the real daemon binaries as child processes
//! and talks to them over real Unix sockets.
//!
//! The same tests run against both shells: write a test as `fn name(shell: Shell)`
//! and list it in [`both_shells!`], which generates `smol::name` and `tokio::name`.
//!
//! The binaries are found next to the test executable (`target/<profile>/inferd` and
//! `target/<profile>/inferd-tokio`). Once per test process and shell the harness runs
//! `cargo build -p <package> --bin <name>`, which is quick when they are up to date and
//! makes `cargo test --workspace` work from a clean checkout without testing a stale
//! binary. `INFERD_E2E_NO_BUILD=1` skips that build (the binaries must then exist);
//! `INFERD_E2E_SMOL_BIN` / `INFERD_E2E_TOKIO_BIN` point at other binaries.
//!
//! Every daemon gets a fresh temporary directory (removed when the test ends), its own
//! runtime and log directories, `HOME` inside it and no `XDG_RUNTIME_DIR` or `INFERD_*`
//! variables, so nothing of the user's setup can leak in. A daemon still running when
//! its [`Daemon`] is dropped is killed with SIGKILL; when the test failed, the daemon's
//! stderr is printed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

pub use inferd_core::wire::{ErrorCode, Frame, StopReason, Usage};
pub use serde_json::{Value, json};

/// How long a daemon may take to become ready (a loaded 2-core machine, debug build).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a single read may block before the test fails instead of hanging.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take to exit after SIGTERM, or a one-shot command to finish.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Generates one `#[test]` per shell for each listed test function.
///
/// ```ignore
/// fn streaming(shell: Shell) { /* ... */ }
/// both_shells!(streaming, #[ignore = "bug: ..."] other_test);
/// ```
/// expands into `mod smol { #[test] fn streaming() { super::streaming(Shell::Smol) } … }`
/// and the same `mod tokio`. Use it once per test file. Attributes written before a
/// name (such as `#[ignore = "…"]`) go on both generated tests.
#[macro_export]
macro_rules! both_shells {
    ($($(#[$meta:meta])* $name:ident),+ $(,)?) => {
        mod smol {
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    super::$name($crate::Shell::Smol)
                }
            )+
        }
        mod tokio {
            $(
                $(#[$meta])*
                #[test]
                fn $name() {
                    super::$name($crate::Shell::Tokio)
                }
            )+
        }
    };
}

// ---- binaries ------------------------------------------------------------------------

/// Which runtime shell starts the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shell {
    /// `inferd` (package `inferd`, shell-smol/).
    Smol,
    /// `inferd-tokio` (package `inferd-tokio`, shell-tokio/).
    Tokio,
}

impl fmt::Display for Shell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.bin_name())
    }
}

impl Shell {
    /// The cargo package.
    pub fn package(self) -> &'static str {
        match self {
            Shell::Smol => "inferd",
            Shell::Tokio => "inferd-tokio",
        }
    }

    /// The binary's name.
    pub fn bin_name(self) -> &'static str {
        match self {
            Shell::Smol => "inferd",
            Shell::Tokio => "inferd-tokio",
        }
    }

    fn override_var(self) -> &'static str {
        match self {
            Shell::Smol => "INFERD_E2E_SMOL_BIN",
            Shell::Tokio => "INFERD_E2E_TOKIO_BIN",
        }
    }

    fn slot(self) -> &'static OnceLock<Result<PathBuf, String>> {
        static SMOL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        static TOKIO: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        match self {
            Shell::Smol => &SMOL,
            Shell::Tokio => &TOKIO,
        }
    }

    /// The daemon binary, built first (once per process) when needed.
    pub fn binary(self) -> PathBuf {
        match self.slot().get_or_init(|| locate_or_build(self)) {
            Ok(p) => p.clone(),
            Err(e) => panic!("{self}: no binary to test: {e}"),
        }
    }

    /// A command running this shell's binary in `tmp`'s clean environment.
    pub fn command(self, tmp: &TempDir) -> Command {
        clean_command(&self.binary(), tmp)
    }

    /// Starts describing a daemon (mock backend unless told otherwise).
    pub fn daemon(self) -> DaemonBuilder {
        DaemonBuilder::new(self)
    }
}

/// The client tool (`inferd generate`, `inferd status`): the smol shell's binary, used
/// against every daemon.
pub fn client_binary() -> PathBuf {
    Shell::Smol.binary()
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e/ has a parent").to_path_buf()
}

/// The committed tiny llama model.
pub fn tiny_model() -> PathBuf {
    workspace_root().join("tests/fixtures/tiny-scripted.gguf")
}

/// `target/<profile>`, from the test executable's path `target/<profile>/deps/<exe>`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the test executable has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps/ has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

fn locate_or_build(shell: Shell) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(shell.override_var()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{} points at {}, which is not a file", shell.override_var(), p.display()))
        };
    }
    let dir = profile_dir();
    let path = dir.join(shell.bin_name());
    if std::env::var_os("INFERD_E2E_NO_BUILD").is_some() {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{} is missing and INFERD_E2E_NO_BUILD is set", path.display()))
        };
    }
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root()).args([
        "build",
        "-p",
        shell.package(),
        "--bin",
        shell.bin_name(),
    ]);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("`{cmd:?}` failed ({}):\n{}", out.status, tail(&err, 6000)));
    }
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("cargo built {} but {} does not exist", shell.package(), path.display()))
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max { s } else { &s[s.ceil_char_boundary(s.len() - max)..] }
}

/// `bin` with the environment reduced to what is safe for a test: HOME in `tmp`, no
/// `XDG_RUNTIME_DIR`, no `INFERD_*` variables.
fn clean_command(bin: &Path, tmp: &TempDir) -> Command {
    let mut cmd = Command::new(bin);
    cmd.current_dir(tmp.path()).env("HOME", tmp.home()).env_remove("XDG_RUNTIME_DIR");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("INFERD_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

// ---- temporary directories -----------------------------------------------------------

/// A fresh directory under `std::env::temp_dir()`, removed on drop (kept when a test
/// panics and `INFERD_E2E_KEEP` is set, to look at what it left).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    guard: Option<tempfile::TempDir>,
}

impl TempDir {
    /// A new, empty, uniquely named directory (with an empty `home/` inside).
    pub fn new(tag: &str) -> TempDir {
        let tag: String =
            tag.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(16).collect();
        let guard = tempfile::Builder::new()
            .prefix(&format!("inferd-e2e-{tag}-"))
            .tempdir()
            .expect("create the temp dir");
        let path = guard.path().to_path_buf();
        fs::create_dir_all(path.join("home")).expect("create the temp dir's home");
        TempDir { path, guard: Some(guard) }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside it.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// The HOME given to child processes.
    pub fn home(&self) -> PathBuf {
        self.path.join("home")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking()
            && std::env::var_os("INFERD_E2E_KEEP").is_some()
            && let Some(guard) = self.guard.take()
        {
            eprintln!("keeping {}", guard.keep().display());
        }
    }
}

// ---- one-shot commands -----------------------------------------------------------------

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// How it exited.
    pub status: ExitStatus,
    /// Its stdout, lossily decoded.
    pub stdout: String,
    /// Its stderr, lossily decoded.
    pub stderr: String,
}

impl Output {
    /// The exit code (panics if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| panic!("killed by a signal: {self:?}"))
    }
}

/// Runs `cmd` to completion, killing it and failing the test after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    match status {
        Some(status) => Output { status, stdout, stderr },
        None => {
            panic!("{cmd:?} did not finish within {timeout:?}\nstdout: {stdout}\nstderr: {stderr}")
        }
    }
}

// ---- the daemon ------------------------------------------------------------------------

/// How to start a daemon.
#[must_use]
pub struct DaemonBuilder {
    shell: Shell,
    tmp: TempDir,
    backend: Option<String>,
    args: Vec<OsString>,
    config: serde_json::Map<String, Value>,
    runtime_dir: Option<PathBuf>,
    umask: Option<u32>,
    ulimits: Vec<String>,
}

impl DaemonBuilder {
    fn new(shell: Shell) -> DaemonBuilder {
        DaemonBuilder {
            shell,
            tmp: TempDir::new(shell.bin_name()),
            backend: Some("mock".into()),
            args: Vec::new(),
            config: serde_json::Map::new(),
            runtime_dir: None,
            umask: None,
            ulimits: Vec::new(),
        }
    }

    /// The temporary directory this daemon will live in.
    pub fn tmp(&self) -> &TempDir {
        &self.tmp
    }

    /// One more `serve` argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// More `serve` arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// `--backend KIND` (the default is `mock`).
    pub fn backend(mut self, kind: &str) -> Self {
        self.backend = Some(kind.into());
        self
    }

    /// No `--backend` flag at all.
    pub fn no_backend(mut self) -> Self {
        self.backend = None;
        self
    }

    /// A key of the config file written for this daemon (passed with `--config`).
    pub fn config(mut self, key: &str, value: Value) -> Self {
        self.config.insert(key.into(), value);
        self
    }

    /// Stats events every `ms` milliseconds (config `stats_interval_ms`), so tests that
    /// wait for a state through the admin socket see it quickly.
    pub fn fast_stats(self) -> Self {
        self.config("stats_interval_ms", json!(50))
    }

    /// Uses another runtime directory instead of `<tmp>/run`.
    pub fn runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.runtime_dir = Some(dir.into());
        self
    }

    /// Starts the daemon under this umask (through `/bin/sh -c 'umask M; exec …'`,
    /// which keeps the pid) instead of inheriting the test's.
    pub fn umask(mut self, mask: u32) -> Self {
        self.umask = Some(mask);
        self
    }

    /// Starts the daemon under a resource limit, given as the arguments of `/bin/sh`'s
    /// `ulimit` (`"-f 16"`: files of at most 16 blocks of 512 bytes; `"-Sn 64"`), set in
    /// the same way as [`umask`](Self::umask). Several calls apply in order.
    pub fn ulimit(mut self, args: &str) -> Self {
        self.ulimits.push(format!("ulimit {args}"));
        self
    }

    /// Starts the daemon without waiting for it.
    pub fn spawn(self) -> Daemon {
        let DaemonBuilder { shell, tmp, backend, args, config, runtime_dir, umask, ulimits } = self;
        let run_dir = runtime_dir.unwrap_or_else(|| tmp.join("run"));
        let log_dir = tmp.join("logs");
        let mut setup = ulimits;
        setup.extend(umask.map(|mask| format!("umask {mask:03o}")));
        let mut cmd = if setup.is_empty() {
            shell.command(&tmp)
        } else {
            let mut cmd = clean_command(Path::new("/bin/sh"), &tmp);
            cmd.arg("-c")
                .arg(format!("{} && exec \"$0\" \"$@\"", setup.join(" && ")))
                .arg(shell.binary());
            cmd
        };
        cmd.arg("serve");
        if let Some(b) = &backend {
            cmd.args(["--backend", b]);
        }
        cmd.arg("--runtime-dir").arg(&run_dir).arg("--log-dir").arg(&log_dir);
        if !config.is_empty() {
            let path = tmp.join("config.json");
            fs::write(&path, Value::Object(config).to_string()).expect("write config");
            cmd.arg("--config").arg(path);
        }
        cmd.args(&args);
        let stdout_path = tmp.join("daemon.stdout");
        let stderr_path = tmp.join("daemon.stderr");
        cmd.stdout(fs::File::create(&stdout_path).expect("create stdout file"));
        cmd.stderr(fs::File::create(&stderr_path).expect("create stderr file"));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Daemon { shell, child, exited: None, run_dir, log_dir, stdout_path, stderr_path, tmp }
    }

    /// Starts the daemon and waits until its inference socket accepts a connection.
    pub fn start(self) -> Daemon {
        let mut d = self.spawn();
        d.wait_ready();
        d
    }
}

/// A running (or exited) daemon in its own temporary directory.
pub struct Daemon {
    shell: Shell,
    child: Child,
    exited: Option<ExitStatus>,
    /// The runtime directory (`--runtime-dir`).
    pub run_dir: PathBuf,
    /// The log directory (`--log-dir`).
    pub log_dir: PathBuf,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    tmp: TempDir,
}

impl Daemon {
    /// Which shell runs it.
    pub fn shell(&self) -> Shell {
        self.shell
    }

    /// Its temporary directory.
    pub fn tmp(&self) -> &TempDir {
        &self.tmp
    }

    /// The inference socket's path.
    pub fn infer_path(&self) -> PathBuf {
        self.run_dir.join("infer.sock")
    }

    /// The admin socket's path.
    pub fn admin_path(&self) -> PathBuf {
        self.run_dir.join("admin.sock")
    }

    /// The lock file's path.
    pub fn lock_path(&self) -> PathBuf {
        self.run_dir.join("inferd.lock")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// What the daemon wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Polls until the inference socket accepts a connection; fails the test if the
    /// daemon exits first or [`STARTUP_TIMEOUT`] passes.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if UnixStream::connect(self.infer_path()).is_ok() {
                return;
            }
            if let Some(status) = self.exit_status() {
                panic!(
                    "{}: the daemon exited ({status}) before it was ready; stderr:\n{}",
                    self.shell,
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: the inference socket {} did not accept a connection within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                    self.shell,
                    self.infer_path().display(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls until the admin socket accepts a connection (it exists before readiness).
    pub fn wait_admin(&mut self) -> Admin {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(s) = UnixStream::connect(self.admin_path()) {
                return Admin::new(s);
            }
            if let Some(status) = self.exit_status() {
                panic!("{}: the daemon exited ({status}); stderr:\n{}", self.shell, self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "{}: no admin socket; stderr:\n{}",
                self.shell,
                self.stderr()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// A new connection to the inference socket.
    pub fn connect(&self) -> Client {
        Client::connect(&self.infer_path())
            .unwrap_or_else(|e| panic!("{}: connect to the inference socket: {e}", self.shell))
    }

    /// A new admin subscriber.
    pub fn admin(&self) -> Admin {
        let s = UnixStream::connect(self.admin_path())
            .unwrap_or_else(|e| panic!("{}: connect to the admin socket: {e}", self.shell));
        Admin::new(s)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, sig).expect("kill");
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.signal(rustix::process::Signal::TERM);
    }

    /// Waits for the process to exit; fails the test after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exit_status() {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: the daemon did not exit within {timeout:?}; stderr:\n{}",
                    self.shell,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        if self.exit_status().is_none() {
            self.sigterm();
        }
        self.wait_exit(EXIT_TIMEOUT)
    }

    /// The activity log's text (read it after the daemon exited: writes are batched).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_dir.join("inferd.ndjson")).unwrap_or_default()
    }

    /// The activity log's records, each checked to be a JSON object.
    pub fn log_records(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("activity log line is not JSON ({e}): {l}"));
                assert!(v.is_object(), "activity log line is not an object: {l}");
                v
            })
            .collect()
    }

    /// Sends one request on a new connection and returns its reply.
    pub fn ask(&self, req: &Value) -> Reply {
        let mut c = self.connect();
        c.send(req);
        c.read_reply()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "---- {} daemon stderr ({}) ----\n{}\n---- end ----",
                self.shell,
                self.stderr_path.display(),
                tail(&self.stderr(), 8000)
            );
        }
    }
}

// ---- requests and replies --------------------------------------------------------------

/// A request with one user message.
pub fn req(id: &str, prompt: &str) -> Value {
    json!({"id": id, "messages": [{"role": "user", "content": prompt}]})
}

/// A request with one user message and extra fields merged in.
pub fn req_with(id: &str, prompt: &str, extra: Value) -> Value {
    let mut r = req(id, prompt);
    if let (Some(o), Value::Object(e)) = (r.as_object_mut(), extra) {
        o.extend(e);
    }
    r
}

/// A request's frames: its tokens and the terminal frame.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The `token` frames' ids and contents, in order.
    pub tokens: Vec<(String, String)>,
    /// The `done` or `error` frame.
    pub terminal: Frame,
}

impl Reply {
    /// The concatenated token contents.
    pub fn streamed(&self) -> String {
        self.tokens.iter().map(|(_, c)| c.as_str()).collect()
    }

    /// The terminal frame's id.
    pub fn id(&self) -> &str {
        match &self.terminal {
            Frame::Done { id, .. } | Frame::Error { id, .. } => id,
            _ => unreachable!("terminal frames only"),
        }
    }

    /// Whether it ended with `done`.
    pub fn is_done(&self) -> bool {
        matches!(self.terminal, Frame::Done { .. })
    }

    /// The error code, if it ended with `error`.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match &self.terminal {
            Frame::Error { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The `done` frame's content, stop reason and usage; fails the test on an error.
    pub fn done(&self) -> (&str, StopReason, Usage) {
        match &self.terminal {
            Frame::Done { content, stop_reason, usage, .. } => (content, *stop_reason, *usage),
            other => panic!("expected done, got {other:?}"),
        }
    }

    /// The error code; fails the test on `done`.
    pub fn error(&self) -> ErrorCode {
        self.error_code().unwrap_or_else(|| panic!("expected an error, got {:?}", self.terminal))
    }
}

/// How a read ended without a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// read() returned 0.
    Eof,
    /// ECONNRESET (the daemon closed with our unread bytes in its buffer).
    Reset,
}

/// A client connection to the inference socket.
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects, with [`READ_TIMEOUT`] on reads.
    pub fn connect(path: &Path) -> io::Result<Client> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        let reader = BufReader::with_capacity(1 << 16, stream.try_clone()?);
        Ok(Client { stream, reader })
    }

    /// Changes the read timeout.
    pub fn set_read_timeout(&self, t: Duration) {
        self.stream.set_read_timeout(Some(t)).expect("set_read_timeout");
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends one request line.
    pub fn send(&mut self, req: &Value) {
        let mut line = req.to_string();
        line.push('\n');
        self.send_raw(line.as_bytes());
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the daemon");
    }

    /// Sends one request line, returning the write error (EPIPE when the daemon already
    /// closed the connection) instead of failing the test.
    pub fn try_send(&mut self, req: &Value) -> io::Result<()> {
        let mut line = req.to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes())
    }

    /// Whether the daemon has closed its end (POLLHUP), without reading anything: the
    /// unread frames stay in the socket buffer.
    pub fn peer_closed(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(&self.stream, PollFlags::empty())];
        let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
        poll(&mut fds, Some(&zero)).expect("poll");
        fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR)
    }

    /// Shuts down the write side (a half-close).
    pub fn shutdown_write(&self) {
        self.stream.shutdown(Shutdown::Write).expect("shutdown(Write)");
    }

    /// The next response line, or how the connection closed. A read timeout fails the test.
    pub fn next_line(&mut self) -> Result<Vec<u8>, Closed> {
        let mut line = Vec::new();
        loop {
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => return Err(Closed::Eof),
                Ok(_) if line.ends_with(b"\n") => {
                    line.pop();
                    return Ok(line);
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(Closed::Reset),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    panic!(
                        "no frame within the read timeout (partial line: {:?})",
                        String::from_utf8_lossy(&line)
                    )
                }
                Err(e) => panic!("read from the daemon: {e}"),
            }
        }
    }

    /// The next frame, or how the connection closed.
    pub fn next_frame(&mut self) -> Result<Frame, Closed> {
        let line = self.next_line()?;
        let v: Value = serde_json::from_slice(&line).unwrap_or_else(|e| {
            panic!(
                "the daemon sent a line that is not JSON ({e}): {}",
                String::from_utf8_lossy(&line)
            )
        });
        let ty = v["type"].as_str().unwrap_or_default();
        assert!(
            matches!(ty, "token" | "done" | "error"),
            "the inference socket carries only token/done/error frames, got: {v}"
        );
        Ok(Frame::parse(&line).unwrap_or_else(|e| panic!("bad frame ({e}): {v}")))
    }

    /// Reads one request's frames up to its terminal frame, or how the connection closed
    /// before it (with the tokens seen).
    pub fn try_read_reply(&mut self) -> Result<Reply, (Vec<(String, String)>, Closed)> {
        let mut tokens = Vec::new();
        loop {
            match self.next_frame() {
                Ok(Frame::Token { id, content }) => tokens.push((id, content)),
                Ok(f @ (Frame::Done { .. } | Frame::Error { .. })) => {
                    return Ok(Reply { tokens, terminal: f });
                }
                Ok(Frame::Unknown) => unreachable!("checked in next_frame"),
                Err(c) => return Err((tokens, c)),
            }
        }
    }

    /// Reads one request's frames; fails the test if the connection closes first.
    pub fn read_reply(&mut self) -> Reply {
        match self.try_read_reply() {
            Ok(r) => r,
            Err((tokens, how)) => panic!(
                "connection closed ({how:?}) before a terminal frame, after {} token(s)",
                tokens.len()
            ),
        }
    }

    /// Fails the test unless the daemon closes the connection without another frame.
    pub fn expect_closed(&mut self) {
        match self.next_line() {
            Err(_) => {}
            Ok(line) => panic!(
                "expected the daemon to close the connection, got: {}",
                String::from_utf8_lossy(&line)
            ),
        }
    }
}

// ---- the admin socket ------------------------------------------------------------------

/// An admin subscriber.
pub struct Admin {
    reader: BufReader<UnixStream>,
}

impl Admin {
    fn new(s: UnixStream) -> Admin {
        s.set_read_timeout(Some(READ_TIMEOUT)).expect("set_read_timeout");
        Admin { reader: BufReader::new(s) }
    }

    /// The next event, or `None` at EOF. Each event is checked against the envelope.
    pub fn next_event(&mut self) -> Option<Value> {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) => None,
            Ok(_) => {
                let v: Value = serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("admin line is not JSON ({e}): {}", String::from_utf8_lossy(&line))
                });
                assert_eq!(v["id"], "admin", "admin envelope: {v}");
                assert_eq!(v["type"], "status", "admin envelope: {v}");
                assert!(v["status"].is_string(), "admin envelope: {v}");
                if let Some(o) = v.as_object() {
                    for (k, f) in o {
                        assert!(
                            !f.is_null() || k == "total_bytes",
                            "admin fields are left out, never null: {v}"
                        );
                    }
                }
                Some(v)
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading the admin socket: {e}"),
        }
    }

    /// Reads events until a `stats` event satisfies `pred`; fails the test after
    /// `timeout` (naming `what`). Returns that event.
    pub fn wait_stats(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for stats: {what}; last stats: {last:?}");
            self.reader.get_ref().set_read_timeout(Some(left)).expect("set_read_timeout");
            let mut line = Vec::new();
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => panic!("admin socket closed while waiting for stats: {what}"),
                Ok(_) => {}
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    panic!("timed out waiting for stats: {what}; last stats: {last:?}")
                }
                Err(e) => panic!("reading the admin socket: {e}"),
            }
            let v: Value = serde_json::from_slice(&line).expect("admin line is JSON");
            if v["status"] == "stats" {
                if pred(&v) {
                    return v;
                }
                last = Some(v);
            }
        }
    }
}

/// A stats event's counter.
pub fn stat(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("stats without `{key}`: {v}"))
}

// ---- files -----------------------------------------------------------------------------

/// A path's permission bits and whether it is a socket, without following symlinks.
pub fn mode_of(p: &Path) -> Option<(u32, bool)> {
    let m = fs::symlink_metadata(p).ok()?;
    Some((m.permissions().mode() & 0o7777, m.file_type().is_socket()))
}

/// Counts occurrences (for tallies in tests).
pub fn tally<I: IntoIterator<Item = String>>(items: I) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

/// Polls `cond` every few milliseconds until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}
