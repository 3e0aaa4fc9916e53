//! The driver loop shared by every async shell: it owns the [`Daemon`], turns socket,
//! engine and signal events into inputs, and carries out the outputs.
//!
//! What differs per runtime (spawning tasks, timers, wrapping sockets) sits behind the
//! small [`Runtime`] trait; everything else is written once, here.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_channel::{Receiver, Sender};

use crate::config::DaemonConfig;
use crate::daemon::{ConnId, Daemon, GenId, Input, ListenerKind, Output, Peer, Stats};
use crate::engine::{CancelFlag, Capabilities, Engine, EngineError, EngineEvent, LoadPhase};
use crate::host::bridge::EnginePool;
use crate::host::hangup::HangupWatcher;
use crate::host::logfile::ActivityLogFile;
use crate::host::socket;
use crate::host::time::MonotonicClock;

/// A boxed future, as runtimes hand them out.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Something that happened, reported to the driver by tasks and threads.
#[derive(Debug)]
pub enum Event {
    /// A connection was accepted and its tasks started.
    Accepted {
        /// Its name.
        conn: ConnId,
        /// Which listener.
        listener: ListenerKind,
        /// Who.
        peer: Peer,
        /// How to reach its tasks.
        handle: ConnHandle,
    },
    /// Bytes read after a read credit.
    Received {
        /// Which connection.
        conn: ConnId,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The peer shut down its write side.
    ReadClosed {
        /// Which connection.
        conn: ConnId,
    },
    /// The peer is gone.
    HungUp {
        /// Which connection.
        conn: ConnId,
    },
    /// A write finished.
    Flushed {
        /// Which connection.
        conn: ConnId,
    },
    /// An engine reported on a generation.
    Engine {
        /// Which generation.
        generation: GenId,
        /// What happened.
        event: EngineEvent,
    },
    /// A backend's loading progressed.
    BackendPhase {
        /// Which backend.
        backend: usize,
        /// The phase.
        phase: LoadPhase,
    },
    /// A backend is ready.
    BackendLoaded {
        /// Which backend.
        backend: usize,
        /// What it can do.
        capabilities: Capabilities,
    },
    /// A backend failed to load.
    BackendFailed {
        /// Which backend.
        backend: usize,
        /// Why.
        error: EngineError,
    },
    /// SIGTERM/SIGINT or a host's stop request.
    Shutdown,
}

/// What the driver tells a connection's writer task.
#[derive(Debug)]
pub enum WriteCmd {
    /// Write these bytes, then report [`Event::Flushed`].
    Bytes(Vec<u8>),
    /// Shut the socket down and end the connection's tasks.
    Close,
}

/// The driver's end of a connection's tasks.
#[derive(Debug)]
pub struct ConnHandle {
    /// One message per read credit.
    pub reads: Sender<()>,
    /// Writes and the close.
    pub writes: Sender<WriteCmd>,
}

/// The channels a connection's tasks use; made by [`AcceptCtx::register`].
#[derive(Debug)]
pub struct ConnTasks {
    /// The connection's name.
    pub conn: ConnId,
    /// Read credits from the driver.
    pub reads: Receiver<()>,
    /// Write commands from the driver.
    pub writes: Receiver<WriteCmd>,
    /// Where to report.
    pub events: Sender<Event>,
}

/// What an accept loop needs: where to report, how to name connections, and the
/// hang-up watcher to register them with.
#[derive(Clone, Debug)]
pub struct AcceptCtx {
    events: Sender<Event>,
    ids: Arc<AtomicU64>,
    hangups: Arc<HangupWatcher>,
}

impl AcceptCtx {
    /// Names a freshly accepted connection, watches it for hang-ups, and announces it to
    /// the driver. Returns the channels its reader and writer tasks serve.
    pub fn register(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        listener: ListenerKind,
        peer: Peer,
    ) -> ConnTasks {
        let conn = ConnId(self.ids.fetch_add(1, Ordering::Relaxed));
        // Without the watcher a client leaving mid-request is still noticed at the next
        // write; the watcher only makes it sooner.
        let _ = self.hangups.add(fd, conn.0);
        let (read_tx, read_rx) = async_channel::unbounded();
        let (write_tx, write_rx) = async_channel::unbounded();
        let handle = ConnHandle { reads: read_tx, writes: write_tx };
        let _ = self.events.try_send(Event::Accepted { conn, listener, peer, handle });
        ConnTasks { conn, reads: read_rx, writes: write_rx, events: self.events.clone() }
    }
}

/// The peer of a Unix connection, from SO_PEERCRED.
pub fn unix_peer(fd: std::os::fd::BorrowedFd<'_>) -> Peer {
    let creds = crate::host::peer::peer_credentials(fd);
    Peer {
        transport: crate::daemon::Transport::Unix,
        addr: "unix".into(),
        uid: creds.map(|c| c.0),
        pid: creds.map(|c| c.1),
    }
}

/// The peer of a TCP connection.
pub fn tcp_peer(addr: Option<std::net::SocketAddr>) -> Peer {
    Peer {
        transport: crate::daemon::Transport::Tcp,
        addr: addr.map_or_else(|| "tcp".into(), |a| a.to_string()),
        uid: None,
        pid: None,
    }
}

/// Keeps an accept loop alive; dropping it stops accepting.
pub type AcceptGuard = Box<dyn Send>;

/// The few things that differ between async runtimes.
pub trait Runtime: Clone + 'static {
    /// A future that completes after `d`.
    fn sleep(&self, d: Duration) -> BoxFuture;
    /// Spawns an accept loop on a Unix listener; each connection gets a reader and a
    /// writer task (see [`AcceptCtx::register`]).
    fn listen_unix(
        &self,
        listener: UnixListener,
        kind: ListenerKind,
        ctx: AcceptCtx,
    ) -> io::Result<AcceptGuard>;
    /// Spawns an accept loop on a loopback TCP listener (inference only).
    fn listen_tcp(
        &self,
        listener: std::net::TcpListener,
        ctx: AcceptCtx,
    ) -> io::Result<AcceptGuard>;
    /// Spawns a task that awaits the watcher's descriptor and reports
    /// [`Event::HungUp`] for each connection it names.
    fn watch_hangups(&self, watcher: Arc<HangupWatcher>, events: Sender<Event>) -> io::Result<()>;
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

    /// Serves until the daemon exits; returns the exit status and the reason.
    pub async fn run(self) -> (i32, String) {
        let Driver { rt, setup, tx, rx, stats } = self;
        let ServeSetup { config, engines, admin, admin_path, infer_path, group, tcp, mut log } =
            setup;
        let clock = MonotonicClock::new();
        let mut daemon = Daemon::new(config, clock.now(), crate::host::time::unix_millis_now());
        let hangups = match HangupWatcher::new() {
            Ok(w) => Arc::new(w),
            Err(e) => return (1, format!("cannot create the hang-up watcher: {e}")),
        };
        if let Err(e) = rt.watch_hangups(hangups.clone(), tx.clone()) {
            return (1, format!("cannot watch for hang-ups: {e}"));
        }
        let ctx = AcceptCtx { events: tx.clone(), ids: Arc::new(AtomicU64::new(1)), hangups };
        let mut listeners: Vec<AcceptGuard> = Vec::new();
        match rt.listen_unix(admin, ListenerKind::Admin, ctx.clone()) {
            Ok(g) => listeners.push(g),
            Err(e) => return (1, format!("cannot serve the admin socket: {e}")),
        }
        // Engine events travel on their own bounded channel and are taken after socket
        // events: a `Flushed` must never wait behind thousands of queued tokens (the
        // write-stall timer would fire for a client that is reading fine), and an
        // engine faster than the driver blocks instead of growing a queue.
        let (gen_tx, gen_rx) = async_channel::bounded(GENERATION_EVENTS);
        let pool = EnginePool::new(engines, tx.clone(), gen_tx);
        pool.load_all();

        let mut conns: HashMap<ConnId, ConnHandle> = HashMap::new();
        let mut cancels: HashMap<GenId, CancelFlag> = HashMap::new();
        let mut infer_bound = false;
        let mut pending: VecDeque<Event> = VecDeque::new();
        let mut busy = 0u32;
        let mut sleeper: Option<(crate::time::Time, BoxFuture)> = None;
        let result = 'serve: loop {
            // Carry out everything the daemon wants done.
            while let Some(out) = daemon.poll_output() {
                match out {
                    Output::Send { conn, bytes } => {
                        let sent = conns
                            .get(&conn)
                            .is_some_and(|h| h.writes.try_send(WriteCmd::Bytes(bytes)).is_ok());
                        if !sent {
                            pending.push_back(Event::HungUp { conn });
                        }
                    }
                    Output::Read { conn } => {
                        let sent = conns.get(&conn).is_some_and(|h| h.reads.try_send(()).is_ok());
                        if !sent {
                            pending.push_back(Event::HungUp { conn });
                        }
                    }
                    Output::Close { conn } => {
                        if let Some(h) = conns.remove(&conn) {
                            let _ = h.writes.try_send(WriteCmd::Close);
                        }
                    }
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
                                let _ = log.flush();
                            }
                        }
                    }
                    Output::BindInference => {
                        match bind_inference(
                            &rt,
                            &ctx,
                            &infer_path,
                            group.as_deref(),
                            tcp.as_deref(),
                        ) {
                            Ok(mut guards) => {
                                infer_bound = true;
                                listeners.append(&mut guards);
                            }
                            Err(msg) => break 'serve (1, msg),
                        }
                    }
                    Output::StopAccepting => {
                        listeners.clear();
                        if infer_bound {
                            let _ = socket::remove_socket_file(&infer_path);
                        }
                        let _ = socket::remove_socket_file(&admin_path);
                    }
                    Output::Exit { code, message } => break 'serve (code, message),
                }
            }
            if let Ok(mut s) = stats.lock() {
                *s = daemon.stats();
            }
            // Next event: socket and control events first, then due timers, then engine
            // events; when nothing is queued, flush the log and wait.
            // Let the connection tasks on this thread run now and then: with engine
            // events always waiting, the loop would otherwise never yield, and writers
            // could not produce the `Flushed` the write-stall timer waits for.
            busy += 1;
            if busy >= YIELD_EVERY {
                busy = 0;
                futures_lite::future::yield_now().await;
            }
            let event = if let Some(ev) = pending.pop_front() {
                ev
            } else if let Ok(ev) = rx.try_recv() {
                ev
            } else if daemon.poll_timeout().is_some_and(|t| t <= clock.now()) {
                daemon.handle(clock.now(), Input::Timeout);
                continue;
            } else if let Ok(ev) = gen_rx.try_recv() {
                ev
            } else {
                if let Some(log) = log.as_mut()
                    && let Err(e) = log.flush()
                {
                    eprintln!("inferd: activity log: {e}");
                }
                busy = 0;
                // One timer per deadline, kept across waits: the earliest deadline (a
                // write-stall check a minute out) rarely moves, and arming a fresh timer
                // on every wait costs a syscall per request.
                let deadline = daemon.poll_timeout();
                if sleeper.as_ref().map(|(t, _)| *t) != deadline {
                    sleeper = deadline.map(|t| (t, rt.sleep(clock.until(t))));
                }
                match wait(&rx, &gen_rx, sleeper.as_mut().map(|(_, f)| f)).await {
                    Some(ev) => ev,
                    None => {
                        sleeper = None;
                        daemon.handle(clock.now(), Input::Timeout);
                        continue;
                    }
                }
            };
            let now = clock.now();
            // Feed every event already queued (in the same order of preference) before
            // carrying out the outputs, so that what one wake-up brought (a token and the
            // done after it, a flush and the next request) leaves as one write.
            let mut event = event;
            let mut batch = 1;
            loop {
                match event {
                    Event::Accepted { conn, listener, peer, handle } => {
                        conns.insert(conn, handle);
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
                } else if let Ok(ev) = gen_rx.try_recv() {
                    ev
                } else {
                    break;
                };
            }
        };
        // Whatever the reason for leaving: close connections, stop engines, tidy files.
        for (_, h) in conns.drain() {
            let _ = h.writes.try_send(WriteCmd::Close);
        }
        for flag in cancels.values() {
            flag.cancel();
        }
        drop(listeners);
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

/// Waits for the next event or the deadline (`None` when the deadline came first).
async fn wait(
    rx: &Receiver<Event>,
    gen_rx: &Receiver<Event>,
    sleeper: Option<&mut BoxFuture>,
) -> Option<Event> {
    let recv = futures_lite::future::or(async { rx.recv().await.ok() }, async {
        gen_rx.recv().await.ok()
    });
    match sleeper {
        None => recv.await,
        Some(sleep) => {
            futures_lite::future::or(recv, async {
                sleep.await;
                None
            })
            .await
        }
    }
}

fn bind_inference<R: Runtime>(
    rt: &R,
    ctx: &AcceptCtx,
    path: &std::path::Path,
    group: Option<&str>,
    tcp: Option<&str>,
) -> Result<Vec<AcceptGuard>, String> {
    let mut guards = Vec::new();
    let listener = socket::bind_unix_listener(path, 0o660).map_err(|e| e.to_string())?;
    if let Some(group) = group {
        socket::chown_group(path, group).map_err(|e| e.to_string())?;
    }
    guards.push(
        rt.listen_unix(listener, ListenerKind::Inference, ctx.clone())
            .map_err(|e| format!("cannot serve {}: {e}", path.display()))?,
    );
    if let Some(addr) = tcp {
        let listener = socket::bind_tcp_loopback(addr).map_err(|e| e.to_string())?;
        guards.push(
            rt.listen_tcp(listener, ctx.clone())
                .map_err(|e| format!("cannot serve TCP {addr}: {e}"))?,
        );
    }
    Ok(guards)
}

/// How a connection's write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Every byte was written: report [`Event::Flushed`].
    Written,
    /// The peer is gone: report [`Event::HungUp`].
    Failed,
    /// The driver closed the connection meanwhile: stop.
    Closed,
}

/// Runs one write, giving up when the driver closes the connection meanwhile: a write
/// stuck on a full socket (a client that never reads) must not keep a connection the
/// daemon has dropped alive. While a write is in flight the only command that can come
/// is the close, since the core has at most one `Send` per connection outstanding.
pub async fn write_or_close<F>(write: F, commands: &Receiver<WriteCmd>) -> WriteOutcome
where
    F: Future<Output = io::Result<()>>,
{
    futures_lite::future::or(
        async {
            match write.await {
                Ok(()) => WriteOutcome::Written,
                Err(_) => WriteOutcome::Failed,
            }
        },
        async {
            let _ = commands.recv().await;
            WriteOutcome::Closed
        },
    )
    .await
}

/// Reads once from a non-blocking descriptor into a fresh buffer sized to what came.
/// `Ok(None)` means the read would block.
pub fn read_once(mut r: impl io::Read) -> io::Result<Option<Vec<u8>>> {
    // The buffer lives on this stack frame only, not in any connection's future, so an
    // idle connection holds no read buffer.
    let mut buf = [0u8; 16 * 1024];
    match r.read(&mut buf) {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reports the outcome of one read to the driver; returns false when the reader should stop.
pub fn report_read(tasks: &ConnTasks, outcome: io::Result<Vec<u8>>) -> bool {
    let conn = tasks.conn;
    let (event, go_on) = match outcome {
        Ok(bytes) if bytes.is_empty() => (Event::ReadClosed { conn }, true),
        Ok(bytes) => (Event::Received { conn, bytes }, true),
        Err(_) => (Event::HungUp { conn }, false),
    };
    tasks.events.try_send(event).is_ok() && go_on
}
