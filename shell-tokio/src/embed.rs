//! Running the daemon inside a program that already runs tokio.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use inferd_core::engine::Engine;
use inferd_core::{DaemonConfig, Stats, default_name};
use inferd_host::driver::{Driver, DriverHandle, ServeError, ServeSetup};
use inferd_host::signals::{
    self, Caught, SECOND_SIGNAL_EXIT_STATUS, SignalAction, SignalPolicy, startup_banner,
};
use inferd_host::{paths, socket};
use inferd_serve::{Paths, Prepared, ServeArgs, StartError};
use tokio::task::JoinHandle;

use crate::{AbortOnDrop, TokioRuntime};

/// Starts a daemon from a ready [`ServeSetup`] as a task of the current tokio runtime.
/// Returns a handle to stop it and read its counters, and the task, which ends with the
/// exit status and its reason once the daemon has drained. Whoever made the setup keeps
/// the instance lock (if any) until then.
///
/// # Panics
/// Outside a tokio runtime (IO and time drivers enabled).
pub fn start(setup: ServeSetup) -> (DriverHandle, JoinHandle<Result<(), ServeError>>) {
    let driver = Driver::new(TokioRuntime::current(), setup);
    let handle = driver.handle();
    (handle, tokio::spawn(driver.run()))
}

/// Starts what [`inferd_serve::prepare`] (or [`EmbedConfig::prepare`]) made; the task
/// holds the instance lock until the daemon exits.
///
/// # Panics
/// Outside a tokio runtime (IO and time drivers enabled).
pub fn start_prepared(prepared: Prepared) -> Embedded {
    let Prepared { setup, lock, paths } = prepared;
    let driver = Driver::new(TokioRuntime::current(), setup);
    let handle = driver.handle();
    let task = tokio::spawn(async move {
        let result = driver.run().await;
        drop(lock);
        result
    });
    Embedded { handle, task, paths }
}

/// A daemon running as a task; made by [`EmbedConfig::start`] or [`start_prepared`].
///
/// Dropping it leaves the daemon running; call [`Embedded::shutdown`] to stop it.
#[derive(Debug)]
pub struct Embedded {
    handle: DriverHandle,
    task: JoinHandle<Result<(), ServeError>>,
    paths: Paths,
}

impl Embedded {
    /// Asks the daemon to drain and exit, as SIGTERM does.
    pub fn shutdown(&self) {
        self.handle.shutdown();
    }

    /// The counters as of the daemon's last step.
    pub fn stats(&self) -> Stats {
        self.handle.stats()
    }

    /// A handle that outlives this value (to stop the daemon from elsewhere).
    pub fn handle(&self) -> &DriverHandle {
        &self.handle
    }

    /// Where the sockets, the lock and the log are.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// The inference socket (it exists once every backend is loaded).
    pub fn infer_socket(&self) -> &Path {
        &self.paths.infer
    }

    /// Waits for the daemon to exit: `Ok` after an orderly drain, else why it ended.
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task
            .await
            .unwrap_or_else(|e| Err(ServeError::Host(format!("the daemon task failed: {e}"))))
    }
}

/// A daemon for an embedding program: a runtime directory, a [`DaemonConfig`] and the
/// engines, in priority order. The sockets go to `<runtime_dir>/{admin,infer}.sock`, the
/// lock to `<runtime_dir>/inferd.lock`; no activity log unless [`EmbedConfig::log_dir`].
pub struct EmbedConfig {
    runtime_dir: PathBuf,
    config: DaemonConfig,
    engines: Vec<Arc<dyn Engine>>,
    log_dir: Option<PathBuf>,
    tcp: Option<String>,
    http: Option<String>,
    group: Option<String>,
}

impl EmbedConfig {
    /// A daemon serving `engines` with `config`. When `config.backends` is empty the
    /// backends are named after their engines' kinds (`mock`, `mock#2`, …).
    pub fn new(
        runtime_dir: impl Into<PathBuf>,
        config: DaemonConfig,
        engines: Vec<Arc<dyn Engine>>,
    ) -> Self {
        EmbedConfig {
            runtime_dir: runtime_dir.into(),
            config,
            engines,
            log_dir: None,
            tcp: None,
            http: None,
            group: None,
        }
    }

    /// Keeps the activity log in `dir`.
    pub fn log_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.log_dir = Some(dir.into());
        self
    }

    /// Also serves inference on this loopback TCP address.
    pub fn tcp(mut self, addr: impl Into<String>) -> Self {
        self.tcp = Some(addr.into());
        self
    }

    /// Also serves the OpenAI-compatible HTTP API on this loopback TCP address.
    pub fn http(mut self, addr: impl Into<String>) -> Self {
        self.http = Some(addr.into());
        self
    }

    /// Gives this group read/write access to the inference socket.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Where the files go.
    pub fn paths(&self) -> Paths {
        let dir = &self.runtime_dir;
        Paths {
            lock: dir.join(paths::LOCK_FILE),
            infer: dir.join(paths::INFER_SOCKET),
            admin: dir.join(paths::ADMIN_SOCKET),
            log_dir: self.log_dir.clone(),
            runtime_dir: dir.clone(),
        }
    }

    /// Checks the configuration and does the start-up steps: runtime directory, lock,
    /// admin socket, activity log.
    pub fn prepare(self) -> Result<Prepared, StartError> {
        let paths = self.paths();
        let EmbedConfig { mut config, engines, tcp, http, group, .. } = self;
        if engines.is_empty() {
            return Err(StartError::usage("no engine given"));
        }
        if config.backends.is_empty() {
            config.backends = backend_names(&engines);
        }
        if config.backends.len() != engines.len() {
            let message =
                format!("{} backend names for {} engines", config.backends.len(), engines.len());
            return Err(StartError::usage(message));
        }
        inferd_serve::prepare_files(config, engines, paths, group, tcp, http)
    }

    /// [`prepare`](EmbedConfig::prepare)s and starts the daemon as a task of the current
    /// tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime (IO and time drivers enabled).
    pub fn start(self) -> Result<Embedded, StartError> {
        Ok(start_prepared(self.prepare()?))
    }
}

/// Engine kinds as backend names, `#2`, `#3` … on repeats (as the config names them).
fn backend_names(engines: &[Arc<dyn Engine>]) -> Vec<String> {
    let kinds: Vec<&str> = engines.iter().map(|e| e.kind()).collect();
    (0..kinds.len()).map(|i| default_name(kinds[..i].iter().copied(), kinds[i])).collect()
}

/// Keeps the signal handler of [`shutdown_on_signals`] running; dropping it stops it.
#[derive(Debug)]
pub struct SignalGuard(#[allow(dead_code)] AbortOnDrop);

/// The daemon's signal behaviour: the first SIGTERM, SIGINT or SIGHUP asks the daemon
/// to drain, a second one exits the process at once with status 130. SIGXFSZ is caught
/// and passed over, so that a write past the file size limit fails instead of killing
/// the process.
///
/// Once installed, tokio keeps its handlers even after the guard is dropped, so these
/// signals no longer terminate the process by default (see tokio's `signal` docs).
pub fn shutdown_on_signals(handle: &DriverHandle) -> io::Result<SignalGuard> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // The policy (what each signal means) is host::signals::SignalPolicy, shared with
    // the smol shell; this only subscribes to the signals in tokio's terms.
    let mut hup = signal(SignalKind::hangup())?;
    let mut xfsz = signal(SignalKind::from_raw(signals::SIGXFSZ))?;
    let handle = handle.clone();
    let task = tokio::spawn(async move {
        let mut policy = SignalPolicy::default();
        loop {
            let (got, caught) = tokio::select! {
                s = term.recv() => (s, Caught::Terminate),
                s = int.recv() => (s, Caught::Interrupt),
                s = hup.recv() => (s, Caught::HangUp),
                s = xfsz.recv() => (s, Caught::FileSizeLimit),
            };
            if got.is_none() {
                return;
            }
            match policy.on_signal(caught) {
                SignalAction::Ignore => {}
                SignalAction::Drain => handle.shutdown(),
                SignalAction::ExitNow => std::process::exit(SECOND_SIGNAL_EXIT_STATUS),
            }
        }
    });
    Ok(SignalGuard(AbortOnDrop(task)))
}

/// `inferd-tokio serve` as a call: prepares from `args`, then serves in the calling task
/// with the signal behaviour of [`shutdown_on_signals`] until the daemon exits. Returns
/// its exit status and the reason; `Err` when it could not start.
///
/// # Panics
/// Outside a tokio runtime (IO, time and signal drivers enabled).
pub async fn serve(args: &ServeArgs) -> Result<Result<(), ServeError>, StartError> {
    let Prepared { setup, lock, paths } = inferd_serve::prepare(args)?;
    let driver = Driver::new(TokioRuntime::current(), setup);
    let signals = shutdown_on_signals(&driver.handle()).map_err(|e| {
        let _ = socket::remove_socket_file(&paths.admin);
        StartError::fail(format!("cannot install signal handlers: {e}"))
    })?;
    eprintln!("{}", startup_banner(&paths.admin, &paths.infer));
    let result = driver.run().await;
    drop(signals);
    drop(lock);
    Ok(result)
}
