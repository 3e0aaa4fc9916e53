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
use crate::logfile::ActivityLogFile;
use crate::socket;
use crate::time::MonotonicClock;
use inferd_core::engine::{CancelFlag, Engine, EngineEvent};
use inferd_core::{
    Daemon, DaemonConfig, ExitReason, GenId, Input, ListenerKind, Output, Stats, Time,
};

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

/// A boxed future borrowing its source, as [`Readiness::readable`] hands them out.
pub type BorrowedFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A descriptor a runtime watches for the driver (see [`Runtime::readiness`]).
pub trait Readiness: Send {
    /// Completes when the descriptor may have become readable since the previous call
    /// began; the caller then takes everything that is ready before calling again.
    /// Spurious completions are allowed, lost ones are not.
    fn readable(&mut self) -> BorrowedFuture<'_, io::Result<()>>;
}

/// A one-shot timer the driver re-arms instead of creating a new sleep per wait.
pub trait Timer: Send {
    /// Arms the timer to fire `after` from now, replacing any earlier deadline.
    fn reset(&mut self, after: Duration);
    /// Completes once the deadline of the last [`Timer::reset`] has passed. The driver
    /// only waits on an armed timer, and re-arms it after it fired.
    fn wait(&mut self) -> BorrowedFuture<'_, ()>;
}

/// The few things that differ between async runtimes.
pub trait Runtime: Clone + 'static {
    /// A timer, not armed yet.
    fn timer(&self) -> Box<dyn Timer>;
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
    events: Sender<Input>,
    stats: Arc<std::sync::Mutex<Stats>>,
}

impl DriverHandle {
    /// Asks the daemon to drain and exit, as SIGTERM does.
    pub fn shutdown(&self) {
        let _ = self.events.try_send(Input::Shutdown);
    }

    /// The counters as of the driver's last step.
    pub fn stats(&self) -> Stats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// A sender of events into the driver (signals, tests).
    pub fn events(&self) -> Sender<Input> {
        self.events.clone()
    }
}

/// The driver, made by [`Driver::new`] and consumed by [`Driver::run`].
pub struct Driver<R: Runtime> {
    rt: R,
    setup: ServeSetup,
    tx: Sender<Input>,
    rx: Receiver<Input>,
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
    ///
    /// Each round carries out what the daemon asked for, then takes the next event
    /// (waiting when there is none) and feeds it, with whatever else is already queued,
    /// as one batch.
    pub async fn run(self) -> Result<(), ServeError> {
        let mut serving = Serving::start(self)?;
        let result = loop {
            if let Some(end) = serving.carry_out() {
                break end;
            }
            serving.publish_stats();
            serving.yield_now_and_then().await;
            match serving.next_event().await {
                Next::Event(event) => serving.feed_batch(event),
                Next::Again => {}
                Next::End(end) => break end,
            }
        };
        serving.tear_down();
        result
    }
}

/// One run of the driver: the daemon, its sockets and engines, and what the loop
/// carries from one round to the next.
struct Serving {
    daemon: Daemon,
    clock: MonotonicClock,
    conns: Conns,
    /// The socket set's descriptor in the runtime's reactor.
    ready: Box<dyn Readiness>,
    pool: EnginePool,
    /// Cancellation flags of the generations under way.
    cancels: HashMap<GenId, CancelFlag>,
    /// What the last outputs brought (bytes read, flushes, inline engine events).
    pending: VecDeque<Input>,
    /// Control and loading events (unbounded).
    rx: Receiver<Input>,
    /// Generation events (bounded; see `GENERATION_EVENTS`).
    gen_rx: Receiver<Input>,
    log: Option<ActivityLogFile>,
    /// The activity log's writes are failing (reported once per streak).
    log_failing: bool,
    infer_bound: bool,
    infer_path: PathBuf,
    admin_path: PathBuf,
    group: Option<String>,
    tcp: Option<String>,
    stats: Arc<std::sync::Mutex<Stats>>,
    /// Rounds since the loop last yielded to the other tasks of its thread.
    busy: u32,
    /// Engine events taken since the socket set was last asked; see `SOCKETS_EVERY`.
    since_poll: u32,
    /// The wake-up for the earliest deadline, and the deadline it is armed for.
    timer: Box<dyn Timer>,
    armed: Option<Time>,
}

/// What [`Serving::next_event`] found.
enum Next {
    /// An event to feed.
    Event(Input),
    /// Something was done instead (a timer fired, sockets reported); go round again.
    Again,
    /// The host cannot go on.
    End(Result<(), ServeError>),
}

impl Serving {
    /// Sets up the socket set, the listeners that exist from the start and the engine
    /// pool, and starts loading the engines.
    fn start<R: Runtime>(driver: Driver<R>) -> Result<Serving, ServeError> {
        let Driver { rt, setup, tx, rx, stats } = driver;
        let ServeSetup { config, engines, admin, admin_path, infer_path, group, tcp, http, log } =
            setup;
        let clock = MonotonicClock::new();
        let daemon = Daemon::new(config, clock.now(), crate::time::unix_millis_now());
        let mut conns = Conns::new()
            .map_err(|e| ServeError::Host(format!("cannot create the socket set: {e}")))?;
        let ready = conns
            .fd()
            .and_then(|fd| rt.readiness(fd))
            .map_err(|e| ServeError::Host(format!("cannot watch the socket set: {e}")))?;
        conns
            .listen_unix(admin, ListenerKind::Admin)
            .map_err(|e| ServeError::Host(format!("cannot serve the admin socket: {e}")))?;
        if let Some(addr) = http.as_deref() {
            socket::bind_tcp_loopback(addr)
                .map_err(|e| e.to_string())
                .and_then(|l| {
                    conns.listen_http(l).map_err(|e| format!("cannot serve HTTP {addr}: {e}"))
                })
                .map_err(ServeError::Host)?;
        }
        // Engine events travel on their own bounded channel and are taken after socket
        // events: a `Flushed` must never wait behind thousands of queued tokens (the
        // write-stall timer would fire for a client that is reading fine), and an
        // engine faster than the driver blocks instead of growing a queue.
        let (gen_tx, gen_rx) = async_channel::bounded(GENERATION_EVENTS);
        let pool = EnginePool::new(engines, tx, gen_tx);
        pool.load_all();
        Ok(Serving {
            daemon,
            clock,
            conns,
            ready,
            pool,
            cancels: HashMap::new(),
            pending: VecDeque::new(),
            rx,
            gen_rx,
            log,
            log_failing: false,
            infer_bound: false,
            infer_path,
            admin_path,
            group,
            tcp,
            stats,
            busy: 0,
            since_poll: 0,
            timer: rt.timer(),
            armed: None,
        })
    }

    /// Carries out everything the daemon wants done; `Some` once the run is over.
    /// Reads and writes happen right here; what they bring (bytes, a flush) is queued
    /// as the next events.
    fn carry_out(&mut self) -> Option<Result<(), ServeError>> {
        while let Some(out) = self.daemon.poll_output() {
            match out {
                Output::Send { conn, bytes } => self.conns.send(conn, bytes, &mut self.pending),
                Output::Read { conn } => self.conns.read(conn, &mut self.pending),
                Output::Close { conn } => self.conns.close(conn),
                Output::Start { generation, backend, request } => {
                    let flag = self.pool.start(generation, backend, request, &mut self.pending);
                    self.cancels.insert(generation, flag);
                }
                Output::Cancel { generation } => {
                    if let Some(flag) = self.cancels.get(&generation) {
                        flag.cancel();
                    }
                }
                Output::Activity(line) => {
                    if let Some(log) = self.log.as_mut() {
                        log.push(&line);
                        if log.pending_bytes() >= LOG_BATCH_BYTES {
                            flush_log(log, &mut self.log_failing, &mut self.daemon);
                        }
                    }
                }
                Output::BindInference => {
                    match bind_inference(
                        &mut self.conns,
                        &self.infer_path,
                        self.group.as_deref(),
                        self.tcp.as_deref(),
                    ) {
                        Ok(()) => self.infer_bound = true,
                        Err(msg) => return Some(Err(ServeError::Host(msg))),
                    }
                }
                Output::StopAccepting => {
                    self.conns.stop_listening();
                    self.remove_socket_files();
                }
                Output::Exit { reason } if reason.is_orderly() => return Some(Ok(())),
                Output::Exit { reason } => return Some(Err(ServeError::Daemon(reason))),
            }
        }
        None
    }

    /// Makes the daemon's counters readable through the [`DriverHandle`].
    fn publish_stats(&self) {
        if let Ok(mut s) = self.stats.lock() {
            *s = self.daemon.stats();
        }
    }

    /// Lets the other tasks of this thread (signal handlers, an embedding host's) run
    /// now and then: with events always waiting, the loop would never yield.
    async fn yield_now_and_then(&mut self) {
        self.busy += 1;
        if self.busy >= YIELD_EVERY {
            self.busy = 0;
            futures_lite::future::yield_now().await;
        }
    }

    /// The next queued event, in the one order of preference: what the last outputs
    /// brought, then control events, then (when `engine` allows) engine events.
    fn take_queued(&mut self, engine: bool) -> Option<Input> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        if let Ok(event) = self.rx.try_recv() {
            return Some(event);
        }
        if engine && let Ok(event) = self.gen_rx.try_recv() {
            return Some(event);
        }
        None
    }

    /// The next event: a queued one, else a due timer, else socket readiness (asked at
    /// least every `SOCKETS_EVERY` engine events), else an engine event; when nothing is
    /// left, flushes the log and waits.
    async fn next_event(&mut self) -> Next {
        if let Some(event) = self.take_queued(false) {
            return Next::Event(event);
        }
        let now = self.clock.now();
        if self.daemon.poll_timeout().is_some_and(|t| t <= now) {
            self.daemon.handle(now, Input::Timeout);
            return Next::Again;
        }
        if self.since_poll < SOCKETS_EVERY && !self.gen_rx.is_empty() {
            return match self.gen_rx.try_recv() {
                Ok(event) => Next::Event(event),
                Err(_) => Next::Again,
            };
        }
        self.since_poll = 0;
        let drained = match self.conns.poll(now, &mut self.pending) {
            Ok(drained) => drained,
            Err(e) => {
                return Next::End(Err(ServeError::Host(format!("cannot poll the sockets: {e}"))));
            }
        };
        if !self.pending.is_empty() || !drained {
            return Next::Again;
        }
        if let Ok(event) = self.gen_rx.try_recv() {
            return Next::Event(event);
        }
        self.wait().await
    }

    /// Nothing is ready: flushes the log, arms the timer for the earliest deadline and
    /// waits for an event, the sockets or that deadline.
    async fn wait(&mut self) -> Next {
        if let Some(log) = self.log.as_mut() {
            flush_log(log, &mut self.log_failing, &mut self.daemon);
        }
        self.busy = 0;
        // The timer is re-armed only when the earliest deadline moved: it rarely does
        // (a write-stall check a minute out), and arming one costs a syscall.
        let deadline = match (self.daemon.poll_timeout(), self.conns.next_retry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.armed != deadline {
            if let Some(t) = deadline {
                self.timer.reset(self.clock.until(t));
            }
            self.armed = deadline;
        }
        let timer: Option<&mut dyn Timer> =
            if self.armed.is_some() { Some(&mut *self.timer) } else { None };
        match wait(&self.rx, &self.gen_rx, self.ready.as_mut(), timer).await {
            Woken::Event(event) => Next::Event(event),
            // Asked at the top of the next round.
            Woken::Sockets => Next::Again,
            Woken::SocketsFailed(e) => {
                Next::End(Err(ServeError::Host(format!("cannot wait for the sockets: {e}"))))
            }
            Woken::Deadline => {
                self.armed = None;
                self.daemon.handle(self.clock.now(), Input::Timeout);
                Next::Again
            }
        }
    }

    /// Feeds `first` and every event already queued after it (up to `MAX_BATCH`) before
    /// the outputs are carried out, so that what one wake-up brought (a token and the
    /// done after it, a flush and the next request) leaves as one write.
    fn feed_batch(&mut self, first: Input) {
        let now = self.clock.now();
        let mut event = first;
        let mut batch = 1;
        loop {
            self.feed(now, event);
            if batch == MAX_BATCH {
                break;
            }
            batch += 1;
            match self.take_queued(self.since_poll < SOCKETS_EVERY) {
                Some(next) => event = next,
                None => break,
            }
        }
    }

    /// Hands one event to the daemon; a generation's last event also retires its
    /// cancel flag.
    fn feed(&mut self, now: Time, input: Input) {
        if let Input::Engine { generation, event } = &input {
            self.since_poll += 1;
            if !matches!(event, EngineEvent::Token(_)) {
                self.cancels.remove(generation);
            }
        }
        self.daemon.handle(now, input);
    }

    /// Whatever the reason for leaving: closes connections, stops engines, tidies files.
    fn tear_down(mut self) {
        self.conns.close_all();
        for flag in self.cancels.values() {
            flag.cancel();
        }
        self.conns.stop_listening();
        self.remove_socket_files();
        if let Some(mut log) = self.log.take() {
            let _ = log.flush();
        }
    }

    /// Removes the socket files this run created.
    fn remove_socket_files(&self) {
        if self.infer_bound {
            let _ = socket::remove_socket_file(&self.infer_path);
        }
        let _ = socket::remove_socket_file(&self.admin_path);
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
    Event(Input),
    /// The socket set has something to report.
    Sockets,
    /// Waiting for the socket set failed.
    SocketsFailed(io::Error),
    /// The deadline passed.
    Deadline,
}

/// Waits for the next event, socket readiness or the deadline.
async fn wait(
    rx: &Receiver<Input>,
    gen_rx: &Receiver<Input>,
    ready: &mut dyn Readiness,
    timer: Option<&mut dyn Timer>,
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
    match timer {
        None => events.await,
        Some(timer) => {
            or(events, async {
                timer.wait().await;
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
