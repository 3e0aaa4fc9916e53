//! The driver loop shared by every async shell: it owns the [`Daemon`], turns socket,
//! engine and signal events into inputs, and carries out the outputs.
//!
//! The driver reads and writes the sockets itself ([`Conns`]: one epoll set, no task per
//! connection). What differs per runtime (a timer, and waiting for the epoll descriptor
//! to become readable) sits behind the small [`Runtime`] trait; everything else is
//! written once, here.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_channel::{Receiver, Sender};

use crate::bridge::EnginePool;
use crate::conns::Conns;
pub use crate::event::Event;
use crate::logfile::ActivityLogFile;
use crate::socket;
use crate::time::MonotonicClock;
use inferd_core::config::DaemonConfig;
use inferd_core::daemon::{Daemon, ExitReason, GenId, Input, ListenerKind, Output, Stats};
use inferd_core::engine::{CancelFlag, Engine, EngineEvent};

/// Why [`Driver::run`] ended other than with an orderly drain.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The daemon ended on its own: a backend failed to load, or not in time.
    #[error(transparent)]
    Daemon(ExitReason),
    /// The host could not go on serving (socket set, listeners, polling); the text
    /// names what failed and the OS's reason.
    #[error("{0}")]
    Host(String),
}

/// A boxed future, as runtimes hand them out.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A boxed future borrowing its source, as [`Readiness::readable`] hands them out.
pub type BorrowedFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A descriptor a runtime watches for the driver (see [`Runtime::readiness`]).
pub trait Readiness: Send {
    /// Completes when the descriptor may have become readable since the previous call
    /// began; the caller then takes everything that is ready before calling again.
    /// Spurious completions are allowed, lost ones are not.
    fn readable(&mut self) -> BorrowedFuture<'_, io::Result<()>>;
}

/// The few things that differ between async runtimes.
pub trait Runtime: Clone + 'static {
    /// A future that completes after `d`.
    fn sleep(&self, d: Duration) -> BoxFuture;
    /// Wraps the driver's epoll descriptor so that the driver can wait for it.
    fn readiness(&self, fd: OwnedFd) -> io::Result<Box<dyn Readiness>>;
}

/// Everything the driver needs, prepared by the shell (lock held, admin socket bound).
pub struct ServeSetup {
    /// The state machine's configuration.
    pub config: DaemonConfig,
    /// Engines in priority order, matching `config.backends`.
    pub engines: Vec<Arc<dyn Engine>>,
    /// The admin listener, already bound with mode 0600.
    pub admin: UnixListener,
    /// The admin socket's path, removed at exit.
    pub admin_path: PathBuf,
    /// Where to bind the inference socket once ready.
    pub infer_path: PathBuf,
    /// Group to give the inference socket, if any.
    pub group: Option<String>,
    /// Loopback TCP address for inference, if any.
    pub tcp: Option<String>,
    /// Loopback TCP address of the OpenAI-compatible HTTP API, if any; bound at once,
    /// before the backends are ready.
    pub http: Option<String>,
    /// The activity log, if one is kept.
    pub log: Option<ActivityLogFile>,
}

/// A way to reach a running driver from outside: stop it and read its counters.
#[derive(Clone, Debug)]
pub struct DriverHandle {
    events: Sender<Event>,
    stats: Arc<std::sync::Mutex<Stats>>,
}

impl DriverHandle {
    /// Asks the daemon to drain and exit, as SIGTERM does.
    pub fn shutdown(&self) {
        let _ = self.events.try_send(Event::Shutdown);
    }

    /// The counters as of the driver's last step.
    pub fn stats(&self) -> Stats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// A sender of events into the driver (signals, tests).
    pub fn events(&self) -> Sender<Event> {
        self.events.clone()
    }
}

/// The driver, made by [`Driver::new`] and consumed by [`Driver::run`].
pub struct Driver<R: Runtime> {
    rt: R,
    setup: ServeSetup,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    stats: Arc<std::sync::Mutex<Stats>>,
}

/// Events handled in a row before the driver yields to the other tasks of its thread.
const YIELD_EVERY: u32 = 64;

/// Engine events queued at most before an engine thread waits for the driver.
const GENERATION_EVENTS: usize = 1024;

/// Log lines are written when the loop goes idle or once this much is pending.
const LOG_BATCH_BYTES: usize = 64 * 1024;

/// Events fed into the daemon in a row before its outputs are carried out.
const MAX_BATCH: usize = 64;

/// Engine events taken in a row before the socket set is asked again, so that a token
/// flood neither starves clients nor costs an `epoll_wait` per token.
const SOCKETS_EVERY: u32 = 64;

impl<R: Runtime> Driver<R> {
    /// A driver for `setup` on runtime `rt`.
    pub fn new(rt: R, setup: ServeSetup) -> Self {
        let (tx, rx) = async_channel::unbounded();
        Driver { rt, setup, tx, rx, stats: Arc::default() }
    }

    /// A handle to stop the driver and read its counters.
    pub fn handle(&self) -> DriverHandle {
        DriverHandle { events: self.tx.clone(), stats: self.stats.clone() }
    }

    /// Serves until the daemon exits: `Ok` after an orderly drain, else why not.
    pub async fn run(self) -> Result<(), ServeError> {
        let Driver { rt, setup, tx, rx, stats } = self;
        let ServeSetup {
            config,
            engines,
            admin,
            admin_path,
            infer_path,
            group,
            tcp,
            http,
            mut log,
        } = setup;
        let clock = MonotonicClock::new();
        let mut daemon = Daemon::new(config, clock.now(), crate::time::unix_millis_now());
        let mut conns = match Conns::new() {
            Ok(c) => c,
            Err(e) => return Err(ServeError::Host(format!("cannot create the socket set: {e}"))),
        };
        let mut ready = match conns.fd().and_then(|fd| rt.readiness(fd)) {
            Ok(r) => r,
            Err(e) => return Err(ServeError::Host(format!("cannot watch the socket set: {e}"))),
        };
        if let Err(e) = conns.listen_unix(admin, ListenerKind::Admin) {
            return Err(ServeError::Host(format!("cannot serve the admin socket: {e}")));
        }
        if let Some(addr) = http.as_deref() {
            let bound = socket::bind_tcp_loopback(addr).map_err(|e| e.to_string()).and_then(|l| {
                conns.listen_http(l).map_err(|e| format!("cannot serve HTTP {addr}: {e}"))
            });
            if let Err(msg) = bound {
                return Err(ServeError::Host(msg));
            }
        }
        // Engine events travel on their own bounded channel and are taken after socket
        // events: a `Flushed` must never wait behind thousands of queued tokens (the
        // write-stall timer would fire for a client that is reading fine), and an
        // engine faster than the driver blocks instead of growing a queue.
        let (gen_tx, gen_rx) = async_channel::bounded(GENERATION_EVENTS);
        let pool = EnginePool::new(engines, tx.clone(), gen_tx);
        pool.load_all();

        let mut cancels: HashMap<GenId, CancelFlag> = HashMap::new();
        let mut infer_bound = false;
        // The activity log's writes are failing (reported once per streak).
        let mut log_failing = false;
        let mut pending: VecDeque<Event> = VecDeque::new();
        let mut busy = 0u32;
        // Events taken since the socket set was last asked; see `SOCKETS_EVERY`.
        let mut since_poll = 0u32;
        let mut sleeper: Option<(inferd_core::time::Time, BoxFuture)> = None;
        let result = 'serve: loop {
            // Carry out everything the daemon wants done. Reads and writes happen right
            // here; what they bring (bytes, a flush) is queued as the next events.
            while let Some(out) = daemon.poll_output() {
                match out {
                    Output::Send { conn, bytes } => conns.send(conn, bytes, &mut pending),
                    Output::Read { conn } => conns.read(conn, &mut pending),
                    Output::Close { conn } => conns.close(conn),
                    Output::Start { generation, backend, request } => {
                        let flag = pool.start(generation, backend, request, &mut pending);
                        cancels.insert(generation, flag);
                    }
                    Output::Cancel { generation } => {
                        if let Some(flag) = cancels.get(&generation) {
                            flag.cancel();
                        }
                    }
                    Output::Activity(line) => {
                        if let Some(log) = log.as_mut() {
                            log.push(&line);
                            if log.pending_bytes() >= LOG_BATCH_BYTES {
                                flush_log(log, &mut log_failing, &mut daemon);
                            }
                        }
                    }
                    Output::BindInference => {
                        match bind_inference(
                            &mut conns,
                            &infer_path,
                            group.as_deref(),
                            tcp.as_deref(),
                        ) {
                            Ok(()) => infer_bound = true,
                            Err(msg) => break 'serve Err(ServeError::Host(msg)),
                        }
                    }
                    Output::StopAccepting => {
                        conns.stop_listening();
                        if infer_bound {
                            let _ = socket::remove_socket_file(&infer_path);
                        }
                        let _ = socket::remove_socket_file(&admin_path);
                    }
                    Output::Exit { reason } if reason.is_orderly() => break 'serve Ok(()),
                    Output::Exit { reason } => break 'serve Err(ServeError::Daemon(reason)),
                }
            }
            if let Ok(mut s) = stats.lock() {
                *s = daemon.stats();
            }
            // Let the other tasks of this thread (signal handlers, an embedding host's)
            // run now and then: with events always waiting, the loop would never yield.
            busy += 1;
            if busy >= YIELD_EVERY {
                busy = 0;
                futures_lite::future::yield_now().await;
            }
            // Next event: what the last outputs brought, control events, due timers,
            // socket readiness, then engine events (asking the sockets at least every
            // SOCKETS_EVERY engine events); when nothing is left, flush the log and wait.
            let now = clock.now();
            let event = if let Some(ev) = pending.pop_front() {
                ev
            } else if let Ok(ev) = rx.try_recv() {
                ev
            } else if daemon.poll_timeout().is_some_and(|t| t <= now) {
                daemon.handle(now, Input::Timeout);
                continue;
            } else if since_poll >= SOCKETS_EVERY || gen_rx.is_empty() {
                since_poll = 0;
                let drained = match conns.poll(now, &mut pending) {
                    Ok(d) => d,
                    Err(e) => {
                        break 'serve Err(ServeError::Host(format!(
                            "cannot poll the sockets: {e}"
                        )));
                    }
                };
                if !pending.is_empty() || !drained {
                    continue;
                }
                if let Ok(ev) = gen_rx.try_recv() {
                    ev
                } else {
                    if let Some(log) = log.as_mut() {
                        flush_log(log, &mut log_failing, &mut daemon);
                    }
                    busy = 0;
                    // One timer per deadline, kept across waits: the earliest deadline (a
                    // write-stall check a minute out) rarely moves, and arming a fresh
                    // timer on every wait costs a syscall per request.
                    let deadline = match (daemon.poll_timeout(), conns.next_retry()) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    if sleeper.as_ref().map(|(t, _)| *t) != deadline {
                        sleeper = deadline.map(|t| (t, rt.sleep(clock.until(t))));
                    }
                    match wait(&rx, &gen_rx, ready.as_mut(), sleeper.as_mut().map(|(_, f)| f)).await
                    {
                        Woken::Event(ev) => ev,
                        // Asked at the top of the next round.
                        Woken::Sockets => continue,
                        Woken::SocketsFailed(e) => {
                            break 'serve Err(ServeError::Host(format!(
                                "cannot wait for the sockets: {e}"
                            )));
                        }
                        Woken::Deadline => {
                            sleeper = None;
                            daemon.handle(clock.now(), Input::Timeout);
                            continue;
                        }
                    }
                }
            } else if let Ok(ev) = gen_rx.try_recv() {
                ev
            } else {
                continue;
            };
            let now = clock.now();
            // Feed every event already queued (in the same order of preference) before
            // carrying out the outputs, so that what one wake-up brought (a token and the
            // done after it, a flush and the next request) leaves as one write.
            let mut event = event;
            let mut batch = 1;
            loop {
                if matches!(event, Event::Engine { .. }) {
                    since_poll += 1;
                }
                match event {
                    Event::Accepted { conn, listener, peer } => {
                        daemon.handle(now, Input::Accepted { conn, listener, peer });
                    }
                    Event::Received { conn, bytes } => {
                        daemon.handle(now, Input::Received { conn, bytes: &bytes })
                    }
                    Event::ReadClosed { conn } => daemon.handle(now, Input::ReadClosed { conn }),
                    Event::HungUp { conn } => daemon.handle(now, Input::HungUp { conn }),
                    Event::Flushed { conn } => daemon.handle(now, Input::Flushed { conn }),
                    Event::Engine { generation, event } => {
                        if !matches!(event, EngineEvent::Token(_)) {
                            cancels.remove(&generation);
                        }
                        daemon.handle(now, Input::Engine { generation, event });
                    }
                    Event::BackendPhase { backend, phase } => {
                        daemon.handle(now, Input::BackendPhase { backend, phase })
                    }
                    Event::BackendLoaded { backend, capabilities } => {
                        daemon.handle(now, Input::BackendLoaded { backend, capabilities })
                    }
                    Event::BackendFailed { backend, error } => {
                        daemon.handle(now, Input::BackendFailed { backend, error })
                    }
                    Event::Shutdown => daemon.handle(now, Input::Shutdown),
                }
                if batch == MAX_BATCH {
                    break;
                }
                batch += 1;
                event = if let Some(ev) = pending.pop_front() {
                    ev
                } else if let Ok(ev) = rx.try_recv() {
                    ev
                } else if since_poll < SOCKETS_EVERY
                    && let Ok(ev) = gen_rx.try_recv()
                {
                    ev
                } else {
                    break;
                };
            }
        };
        // Whatever the reason for leaving: close connections, stop engines, tidy files.
        conns.close_all();
        for flag in cancels.values() {
            flag.cancel();
        }
        conns.stop_listening();
        if infer_bound {
            let _ = socket::remove_socket_file(&infer_path);
        }
        let _ = socket::remove_socket_file(&admin_path);
        if let Some(mut log) = log {
            let _ = log.flush();
        }
        result
    }
}

/// Writes the pending activity records and tells the daemon how many were lost so far.
/// A failure is reported once per streak, since a full disk fails every flush; the
/// report itself may fail (stderr on the same full disk, or a closed terminal) and must
/// not panic as `eprintln!` would.
fn flush_log(log: &mut ActivityLogFile, failing: &mut bool, daemon: &mut Daemon) {
    use std::io::Write;
    match log.flush() {
        Ok(()) => {
            if std::mem::take(failing) {
                let _ = writeln!(
                    io::stderr(),
                    "inferd: activity log: writing again ({} records dropped so far)",
                    log.records_dropped()
                );
            }
        }
        Err(e) => {
            if !std::mem::replace(failing, true) {
                let _ =
                    writeln!(io::stderr(), "inferd: {e}; records are dropped until writes succeed");
            }
        }
    }
    daemon.log_records_dropped(log.records_dropped());
}

/// What ended a wait.
enum Woken {
    /// An event came on a channel.
    Event(Event),
    /// The socket set has something to report.
    Sockets,
    /// Waiting for the socket set failed.
    SocketsFailed(io::Error),
    /// The deadline passed.
    Deadline,
}

/// Waits for the next event, socket readiness or the deadline.
async fn wait(
    rx: &Receiver<Event>,
    gen_rx: &Receiver<Event>,
    ready: &mut dyn Readiness,
    sleeper: Option<&mut BoxFuture>,
) -> Woken {
    use futures_lite::future::or;
    let channels = or(async { rx.recv().await.ok() }, async { gen_rx.recv().await.ok() });
    let events = or(
        async {
            match channels.await {
                Some(ev) => Woken::Event(ev),
                // Both senders live in this driver, so this cannot happen; treat it as a
                // deadline rather than spin.
                None => Woken::Deadline,
            }
        },
        async {
            match ready.readable().await {
                Ok(()) => Woken::Sockets,
                Err(e) => Woken::SocketsFailed(e),
            }
        },
    );
    match sleeper {
        None => events.await,
        Some(sleep) => {
            or(events, async {
                sleep.await;
                Woken::Deadline
            })
            .await
        }
    }
}

fn bind_inference(
    conns: &mut Conns,
    path: &std::path::Path,
    group: Option<&str>,
    tcp: Option<&str>,
) -> Result<(), String> {
    let listener = socket::bind_unix_listener(path, 0o660).map_err(|e| e.to_string())?;
    if let Some(group) = group {
        socket::chown_group(path, group).map_err(|e| e.to_string())?;
    }
    conns
        .listen_unix(listener, ListenerKind::Inference)
        .map_err(|e| format!("cannot serve {}: {e}", path.display()))?;
    if let Some(addr) = tcp {
        let listener = socket::bind_tcp_loopback(addr).map_err(|e| e.to_string())?;
        conns.listen_tcp(listener).map_err(|e| format!("cannot serve TCP {addr}: {e}"))?;
    }
    Ok(())
}
