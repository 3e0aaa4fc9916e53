//! The daemon state machine: everything that happens goes in through [`Daemon::handle`],
//! everything it wants done comes out of [`Daemon::poll_output`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::activity::{Level, Record, WallClock};
use crate::admin::{self, AdminState, StatsEvent};
use crate::admission::{Admission, Admit};
use crate::config::DaemonConfig;
use crate::engine::{
    Capabilities, Completion, EngineError, EngineErrorKind, EngineEvent, LoadPhase,
};
use crate::framing::{Line, LineDecoder};
use crate::http::openai::CompletionMeta;
use crate::http::request::Limits as HttpLimits;
use crate::router::{BackendId, Outcome, Route, Router};
use crate::stop::{StopMatcher, TokenText};
use crate::time::Time;
use crate::wire::{
    self, AuthLine, DoneFrame, ErrorCode, GenerateRequest, Request, StopReason, Timings,
};
use conn::{
    Auth, Client, Conn, Flush, HttpConn, Ndjson, Proto, ReadSide, Role, Subscriber, enqueue_flush,
};

/// A connection, named by the shell when it accepts it (unique for the daemon's life).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A generation, named by the core when it starts one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenId(pub u64);

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// The inference socket (Unix or loopback TCP): requests in, frames out.
    Inference,
    /// The admin socket: status events out, nothing read.
    Admin,
    /// The OpenAI-compatible HTTP listener (loopback TCP): exists from startup, so
    /// `/health` can say the daemon is loading; inference waits for readiness.
    Http,
}

impl ListenerKind {
    /// Whether connections of this kind carry requests (and count against
    /// `max_connections`).
    fn serves_requests(self) -> bool {
        matches!(self, ListenerKind::Inference | ListenerKind::Http)
    }
}

/// How a peer reached the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A Unix domain socket.
    Unix,
    /// Loopback TCP (authenticated when an API key is set).
    Tcp,
}

impl Transport {
    /// The name used in activity records.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Unix socket or TCP.
    pub transport: Transport,
    /// The peer's address as text (socket path or `ip:port`), for the activity log.
    pub addr: String,
    /// The peer's uid (SO_PEERCRED), when known.
    pub uid: Option<u32>,
    /// The peer's pid (SO_PEERCRED), when known.
    pub pid: Option<u32>,
}

/// Everything that can happen to the daemon.
#[derive(Debug)]
pub enum Input {
    /// The shell accepted a connection and named it `conn`.
    Accepted {
        /// The new connection's name.
        conn: ConnId,
        /// Which listener.
        listener: ListenerKind,
        /// Who it is.
        peer: Peer,
    },
    /// Bytes read from a connection (after an [`Output::Read`]).
    Received {
        /// Which connection.
        conn: ConnId,
        /// What was read. Owned, so that an input can travel through a channel from
        /// the host's event sources to the loop that feeds the daemon.
        bytes: Vec<u8>,
    },
    /// The peer shut down its write side (read returned 0). It may still be reading.
    ReadClosed {
        /// Which connection.
        conn: ConnId,
    },
    /// The peer is gone (HUP, ERR, ECONNRESET, EPIPE). Nothing more can be sent.
    HungUp {
        /// Which connection.
        conn: ConnId,
    },
    /// Every byte of the last [`Output::Send`] on this connection was written.
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
    /// A backend moved to a new loading phase.
    BackendPhase {
        /// Which backend.
        backend: BackendId,
        /// The phase.
        phase: LoadPhase,
    },
    /// A backend finished loading and is ready.
    BackendLoaded {
        /// Which backend.
        backend: BackendId,
        /// What it can do.
        capabilities: Capabilities,
    },
    /// A backend failed to load; the daemon cannot start.
    BackendFailed {
        /// Which backend.
        backend: BackendId,
        /// Why.
        error: EngineError,
    },
    /// A loaded backend became ready or not ready.
    BackendReadiness {
        /// Which backend.
        backend: BackendId,
        /// Whether it can take requests.
        ready: bool,
    },
    /// The deadline from [`Daemon::poll_timeout`] passed.
    Timeout,
    /// SIGTERM/SIGINT: drain and exit.
    Shutdown,
}

/// Everything the daemon wants done.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Write these bytes to the connection, then report [`Input::Flushed`]. At most one
    /// `Send` per connection is outstanding at a time.
    Send {
        /// Which connection.
        conn: ConnId,
        /// What to write.
        bytes: Vec<u8>,
    },
    /// The core wants more bytes from this connection: read once, then report
    /// [`Input::Received`], [`Input::ReadClosed`] or [`Input::HungUp`].
    Read {
        /// Which connection.
        conn: ConnId,
    },
    /// Close the connection now and forget it. Every accepted connection gets exactly one.
    Close {
        /// Which connection.
        conn: ConnId,
    },
    /// Run a generation on a backend; report its events as [`Input::Engine`].
    Start {
        /// The generation's name.
        generation: GenId,
        /// Which backend.
        backend: BackendId,
        /// What to generate.
        request: GenerateRequest,
    },
    /// Raise the cancel flag of a running generation. Its engine still reports its end.
    Cancel {
        /// Which generation.
        generation: GenId,
    },
    /// Append this line (redacted, with its LF) to the activity log.
    Activity(String),
    /// Every backend is ready: create the inference listener(s) now.
    BindInference,
    /// Shutting down: close the listeners; accept nothing more.
    StopAccepting,
    /// The daemon is done: end once the outputs before it are carried out. The core
    /// says why; the shells decide what exit status and text that means.
    Exit {
        /// Why the daemon ended.
        reason: ExitReason,
    },
}

/// Why the daemon ended ([`Output::Exit`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExitReason {
    /// An orderly end: drained after a shutdown request.
    #[error("drained after a shutdown request")]
    Drained,
    /// A backend failed while the daemon was starting.
    #[error("backend {backend} failed to load: {error}")]
    BackendFailedToLoad {
        /// The backend's name.
        backend: String,
        /// What the engine reported.
        error: String,
    },
    /// Some backends were still loading when the ready timeout passed.
    #[error("backends not ready after {secs} s: {}", waiting.join(", "))]
    NotReadyInTime {
        /// The ready timeout, in seconds.
        secs: u64,
        /// The backends still loading.
        waiting: Vec<String>,
    },
}

impl ExitReason {
    /// Whether this is the orderly end after a shutdown request (not a failure).
    pub fn is_orderly(&self) -> bool {
        matches!(self, ExitReason::Drained)
    }
}

/// One line taken off a NDJSON connection, sorted for the line loop.
enum LineIn {
    /// Over the frame cap.
    TooLarge,
    /// What should be a TCP connection's authentication line (`None`: it is not one).
    Auth(Option<AuthLine>),
    /// A request line, decoded or refused.
    Request(Result<wire::Request, wire::DecodeError>),
}

/// A snapshot of the daemon's counters, for stats events and embedding hosts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests waiting for a place.
    pub queued: u32,
    /// Requests generating.
    pub active: u32,
    /// Open inference connections.
    pub connections: u32,
    /// Requests that ended with `done`.
    pub served: u64,
    /// Requests refused with `queue_full`.
    pub rejected: u64,
    /// Prompt tokens of the requests that ended with `done`.
    pub prompt_tokens: u64,
    /// Of those, the tokens an engine reused from its cache instead of computing them.
    pub prompt_cached_tokens: u64,
    /// Completion tokens of the requests that ended with `done`.
    pub completion_tokens: u64,
    /// Activity records the host could not write (see [`Daemon::log_records_dropped`]).
    pub log_records_dropped: u64,
}

/// Hashes the daemon's own sequential ids with one multiply: SipHash's protection
/// against chosen keys buys nothing for ids nobody else picks, and it sits on the
/// per-token path.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing spreads sequential ids over the high bits the table uses.
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// The message of requests refused because the daemon is shutting down.
const DRAINING: &str = "daemon is draining";

/// The longest TCP authentication line accepted (spec §6).
pub const MAX_AUTH_LINE_BYTES: usize = 4096;

/// How long after the drain deadline the daemon waits for final frames to flush.
const DRAIN_FLUSH_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum TimerKey {
    WriteStall(ConnId),
    ReadIdle(ConnId),
    /// A TCP client's key line is due.
    AuthDeadline(ConnId),
    Stats,
    ReadyDeadline,
    DrainDeadline,
    DrainGrace,
    /// The last frames to admin subscribers (the `draining` status) had their chance.
    AdminFlush,
}

/// The daemon's deadlines: at most one per key, in deadline order. Setting a key again
/// moves its deadline and stopping it removes it, so nothing stale is left to wake the
/// host for nothing.
#[derive(Debug, Default)]
struct Timers {
    by_key: HashMap<TimerKey, Time>,
    order: BTreeSet<(Time, TimerKey)>,
}

impl Timers {
    /// Sets `key` to fire at `at`, replacing its earlier deadline if any.
    fn set(&mut self, key: TimerKey, at: Time) {
        if let Some(old) = self.by_key.insert(key, at) {
            self.order.remove(&(old, key));
        }
        self.order.insert((at, key));
    }

    /// Removes `key`'s deadline, if set.
    fn stop(&mut self, key: TimerKey) {
        if let Some(old) = self.by_key.remove(&key) {
            self.order.remove(&(old, key));
        }
    }

    /// Whether `key` has a deadline.
    fn is_set(&self, key: TimerKey) -> bool {
        self.by_key.contains_key(&key)
    }

    /// The earliest deadline.
    fn next(&self) -> Option<Time> {
        self.order.first().map(|(at, _)| *at)
    }

    /// Takes the earliest key whose deadline is at or before `now`.
    fn pop_due(&mut self, now: Time) -> Option<TimerKey> {
        let &(at, key) = self.order.first()?;
        if at > now {
            return None;
        }
        self.order.remove(&(at, key));
        self.by_key.remove(&key);
        Some(key)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    Draining,
    Exited,
}

#[derive(Debug)]
enum ReqPhase {
    Queued(GenerateRequest, StopMatcher),
    Running(GenId),
}

/// How a request's result reaches its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    /// Protocol v1 frames.
    Ndjson,
    /// An OpenAI-shaped HTTP answer.
    Http {
        /// Send a usage event at the end of a stream.
        include_usage: bool,
        /// Unix seconds when the request arrived, repeated in every object.
        created: u64,
    },
}

#[derive(Debug)]
struct ReqState {
    id: String,
    stream: bool,
    reply: Reply,
    admitted: Time,
    phase: ReqPhase,
}

#[derive(Debug)]
struct Gen {
    conn: Option<ConnId>,
    req_id: String,
    stream: bool,
    route: Route,
    admitted: Time,
    started: Time,
    first_token: Option<Time>,
    content: String,
    /// Token bytes to text, ended early by the request's stop sequences.
    text: TokenText,
    /// A stop sequence matched: the generation was cancelled by the daemon itself and
    /// ends as a normal completion.
    stopped: bool,
    reply: Reply,
    tokens_sent: u32,
    /// When the client's side ended (hang-up, drop, drain deadline). Its `request_done`
    /// waits for the engine's own account, which has the prompt's size.
    cancelled_at: Option<Time>,
}

#[derive(Debug)]
struct BackendInfo {
    name: String,
    loaded: bool,
}

/// The daemon: connections, requests, admission, routing, admin and activity, as one
/// state machine driven by [`Daemon::handle`] and drained by [`Daemon::poll_output`].
#[derive(Debug)]
pub struct Daemon {
    cfg: DaemonConfig,
    wall: WallClock,
    now: Time,
    phase: Phase,
    conns: IdMap<ConnId, Conn>,
    inference_conns: u32,
    admin_conns: Vec<ConnId>,
    gens: IdMap<GenId, Gen>,
    next_gen: u64,
    admission: Admission<ConnId>,
    router: Router,
    backends: Vec<BackendInfo>,
    outputs: VecDeque<Output>,
    flush_queue: VecDeque<ConnId>,
    timers: Timers,
    admin_state: AdminState,
    capabilities_frames: Vec<u8>,
    stats_dirty: bool,
    served: u64,
    /// Running totals over requests that ended with `done`, for the stats event.
    prompt_tokens_total: u64,
    prompt_cached_total: u64,
    completion_tokens_total: u64,
    /// Reported by the host, which owns the log file.
    log_records_dropped: u64,
    exit_requested: bool,
    /// Draining is over; admin subscribers are being flushed and closed before the exit.
    admins_closing: bool,
    /// The admin flush grace passed: exit whether or not they read their last frames.
    admin_flush_expired: bool,
    /// Requests by how they ended (`done`, `cancelled`, or an error code), for
    /// `/metrics`.
    outcomes: std::collections::BTreeMap<&'static str, u64>,
    /// Names HTTP requests, which bring no id of their own.
    next_http_id: u64,
    /// Admission to first token, both transports, for `/metrics`.
    ttft_hist: crate::metrics::Histogram,
    /// Admission to the terminal answer (done or error), both transports.
    duration_hist: crate::metrics::Histogram,
}

impl Daemon {
    /// A daemon that starts at `now`; `wall_unix_ms` is the wall clock at that moment
    /// (for activity timestamps only).
    pub fn new(cfg: DaemonConfig, now: Time, wall_unix_ms: u64) -> Daemon {
        let backends = cfg
            .backends
            .iter()
            .map(|name| BackendInfo { name: name.clone(), loaded: false })
            .collect();
        let mut d = Daemon {
            admission: Admission::new(cfg.active_permits as usize, cfg.queue_depth as usize),
            router: Router::new(cfg.backends.len(), cfg.breaker),
            backends,
            wall: WallClock::new(now, wall_unix_ms),
            now,
            phase: Phase::Starting,
            conns: IdMap::default(),
            inference_conns: 0,
            admin_conns: Vec::new(),
            gens: IdMap::default(),
            next_gen: 1,
            outputs: VecDeque::new(),
            flush_queue: VecDeque::new(),
            timers: Timers::default(),
            admin_state: AdminState::Starting,
            capabilities_frames: Vec::new(),
            stats_dirty: false,
            served: 0,
            prompt_tokens_total: 0,
            prompt_cached_total: 0,
            completion_tokens_total: 0,
            log_records_dropped: 0,
            exit_requested: false,
            admins_closing: false,
            admin_flush_expired: false,
            outcomes: std::collections::BTreeMap::new(),
            next_http_id: 1,
            ttft_hist: crate::metrics::Histogram::latency(),
            duration_hist: crate::metrics::Histogram::latency(),
            cfg,
        };
        if !d.cfg.ready_timeout.is_zero() {
            d.arm(now + d.cfg.ready_timeout, TimerKey::ReadyDeadline);
        }
        d
    }

    /// Feeds one input at time `now` (never earlier than the last `now`).
    pub fn handle(&mut self, now: Time, input: Input) {
        self.now = self.now.max(now);
        if self.phase == Phase::Exited {
            return;
        }
        match input {
            Input::Accepted { conn, listener, peer } => self.on_accepted(conn, listener, peer),
            Input::Received { conn, bytes } => self.on_received(conn, &bytes),
            Input::ReadClosed { conn } => self.on_read_closed(conn),
            Input::HungUp { conn } => self.drop_conn(conn),
            Input::Flushed { conn } => self.on_flushed(conn),
            Input::Engine { generation, event } => self.on_engine(generation, event),
            Input::BackendPhase { backend: _, phase } => {
                let state = if self.phase == Phase::Starting {
                    AdminState::LoadingModel(phase)
                } else {
                    AdminState::Restarting(phase)
                };
                self.set_admin_state(state);
            }
            Input::BackendLoaded { backend, capabilities } => self.on_loaded(backend, capabilities),
            Input::BackendFailed { backend, error } => {
                let name = self.backend_name(backend).to_owned();
                if self.phase == Phase::Starting {
                    self.exit(ExitReason::BackendFailedToLoad {
                        backend: name,
                        error: error.to_string(),
                    });
                } else {
                    self.router.set_ready(backend, false);
                }
            }
            Input::BackendReadiness { backend, ready } => {
                self.router.set_ready(backend, ready);
                self.stats_dirty = true;
            }
            Input::Timeout => self.on_timeout(),
            Input::Shutdown => self.on_shutdown(),
        }
        self.arm_stats();
        self.maybe_exit();
    }

    /// The next thing to do, if any. Call until `None` after every `handle`.
    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(o) = self.outputs.pop_front() {
            return Some(o);
        }
        // Sends go out last so a burst of tokens from one `handle` leaves as one write.
        while let Some(id) = self.flush_queue.pop_front() {
            let now = self.now;
            let Some(c) = self.conns.get_mut(&id) else { continue };
            if c.flush != Flush::Queued {
                continue;
            }
            if !c.has_output() {
                c.flush = Flush::Idle;
                continue;
            }
            c.flush = Flush::Writing { since: now };
            if let Role::Admin(sub) = &mut c.role {
                sub.in_flight = std::mem::take(&mut sub.buffered);
            }
            let bytes = c.next_send();
            let arm =
                !self.timers.is_set(TimerKey::WriteStall(id)) && !self.cfg.write_timeout.is_zero();
            if arm {
                let at = now + self.cfg.write_timeout;
                self.arm(at, TimerKey::WriteStall(id));
            }
            return Some(Output::Send { conn: id, bytes });
        }
        None
    }

    /// When to call `handle(now, Input::Timeout)` next, if anything is pending.
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.phase == Phase::Exited {
            return None;
        }
        self.timers.next()
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let c = self.admission.counters();
        Stats {
            queued: self.admission.waiting() as u32,
            active: self.admission.running() as u32,
            connections: self.inference_conns,
            served: self.served,
            rejected: c.rejected,
            prompt_tokens: self.prompt_tokens_total,
            prompt_cached_tokens: self.prompt_cached_total,
            completion_tokens: self.completion_tokens_total,
            log_records_dropped: self.log_records_dropped,
        }
    }

    /// The host reports how many activity records it has lost to write failures so far
    /// (a running total), for the stats event: the log itself cannot say it is missing
    /// records.
    pub fn log_records_dropped(&mut self, total: u64) {
        if total != self.log_records_dropped {
            self.log_records_dropped = total;
            self.stats_dirty = true;
            self.arm_stats();
        }
    }

    /// Whether every backend is loaded and the inference listener may exist.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Whether the daemon has emitted [`Output::Exit`].
    pub fn has_exited(&self) -> bool {
        self.phase == Phase::Exited
    }

    /// Generations started and not yet reported finished by their engine.
    pub fn generations_running(&self) -> usize {
        self.gens.len()
    }

    /// Open connections of both kinds.
    pub fn connections_open(&self) -> usize {
        self.conns.len()
    }

    /// The most input bytes held for any one connection (unfinished lines, pipelined
    /// lines, bytes waiting for an auth verdict). Bounded by the larger of the frame cap
    /// and the auth cap, plus one CR and one read: what the simulator checks.
    pub fn max_input_held(&self) -> usize {
        self.conns.values().map(Conn::input_held).max().unwrap_or(0)
    }

    // ---- connections -------------------------------------------------------------

    fn on_accepted(&mut self, id: ConnId, listener: ListenerKind, peer: Peer) {
        if self.conns.contains_key(&id) {
            return;
        }
        // The HTTP listener exists from startup (its `/health` reports loading); the
        // inference sockets only once ready.
        let refuse = self.phase == Phase::Draining
            || (listener.serves_requests() && self.inference_conns >= self.cfg.max_connections)
            || (listener == ListenerKind::Inference && self.phase != Phase::Ready);
        if refuse {
            self.outputs.push_back(Output::Close { conn: id });
            return;
        }
        let needs_auth = peer.transport == Transport::Tcp
            && listener == ListenerKind::Inference
            && self.cfg.api_key.is_some();
        if needs_auth && self.unauthenticated() >= self.unauthenticated_budget() {
            // Strangers without a key cannot take the places of the Unix-socket clients.
            let rec = self
                .record(Level::Warn, "tcp_unauthenticated_limit")
                .str("peer", &peer.addr)
                .num("limit", self.unauthenticated_budget() as u64);
            self.log(rec);
            self.outputs.push_back(Output::Close { conn: id });
            return;
        }
        if listener == ListenerKind::Admin && !self.make_room_for_admin() {
            self.outputs.push_back(Output::Close { conn: id });
            return;
        }
        let cap = if needs_auth { MAX_AUTH_LINE_BYTES } else { self.cfg.max_frame_bytes };
        let proto = match listener {
            ListenerKind::Http => Proto::Http(Box::new(HttpConn::new(HttpLimits::with_max_body(
                self.cfg.max_frame_bytes,
            )))),
            _ => Proto::Ndjson(Ndjson {
                decoder: LineDecoder::new(cap),
                auth: if needs_auth {
                    Auth::Pending { line_started: false, held: Vec::new() }
                } else {
                    Auth::Done
                },
            }),
        };
        match listener {
            ListenerKind::Inference | ListenerKind::Http => {
                self.inference_conns += 1;
                self.stats_dirty = true;
                let transport = match listener {
                    ListenerKind::Http => "http",
                    _ => peer.transport.as_str(),
                };
                let rec = self
                    .record(Level::Info, "connection_accepted")
                    .str("transport", transport)
                    .str("peer", &peer.addr)
                    .opt_num("peer_uid", peer.uid.map(u64::from))
                    .opt_num("peer_pid", peer.pid.map(u64::from));
                self.log(rec);
                let conn = Conn::new(Role::Client(Client {
                    // The `Read` below.
                    read: ReadSide::Reading,
                    partial_since: None,
                    request: None,
                    undelivered: None,
                    proto,
                }));
                self.conns.insert(id, conn);
                self.outputs.push_back(Output::Read { conn: id });
                if needs_auth && !self.cfg.auth_timeout.is_zero() {
                    let at = self.now + self.cfg.auth_timeout;
                    self.arm(at, TimerKey::AuthDeadline(id));
                }
            }
            ListenerKind::Admin => {
                // Replay: capabilities so far, then one snapshot, then live events.
                let mut conn = Conn::new(Role::Admin(Subscriber { buffered: 1, in_flight: 0 }));
                conn.out.extend_from_slice(&self.capabilities_frames);
                admin::encode_state(&mut conn.out, &self.admin_state);
                self.conns.insert(id, conn);
                self.admin_conns.push(id);
                self.queue_flush(id);
            }
        }
    }

    fn on_received(&mut self, id: ConnId, bytes: &[u8]) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        let Role::Client(cl) = &mut c.role else { return };
        if cl.read == ReadSide::Reading {
            cl.read = ReadSide::Idle;
        }
        if c.closing {
            return;
        }
        match &mut cl.proto {
            Proto::Http(h) => h.reader.push(bytes),
            Proto::Ndjson(Ndjson { decoder, auth: Auth::Done }) => decoder.push(bytes),
            Proto::Ndjson(Ndjson { decoder, auth: Auth::Pending { line_started, held } }) => {
                // Up to the end of the first non-blank line goes to the decoder (under the
                // auth cap); the rest waits for the verdict, which comes in this same step.
                let mut key_line_end = None;
                for (i, &b) in bytes.iter().enumerate() {
                    match b {
                        b'\n' if *line_started => {
                            key_line_end = Some(i + 1);
                            break;
                        }
                        b'\n' | b' ' | b'\t' | b'\r' => {}
                        _ => *line_started = true,
                    }
                }
                let end = key_line_end.unwrap_or(bytes.len());
                if key_line_end.is_some() {
                    *line_started = false;
                }
                decoder.push(&bytes[..end]);
                held.extend_from_slice(&bytes[end..]);
            }
        }
        self.process_lines(id);
    }

    /// TCP connections still owing their key line.
    fn unauthenticated(&self) -> usize {
        self.conns.values().filter(|c| c.awaits_auth()).count()
    }

    /// How many connections may be waiting to authenticate at once: a quarter of
    /// `max_connections`, at least one.
    fn unauthenticated_budget(&self) -> usize {
        usize::try_from(self.cfg.max_connections / 4).unwrap_or(usize::MAX).max(1)
    }

    /// Whether an admin subscriber may join: below the cap, or after the oldest
    /// subscriber that lags behind (output not yet written) made way for it.
    fn make_room_for_admin(&mut self) -> bool {
        if self.admin_conns.len() < self.cfg.max_admin_subscribers {
            return true;
        }
        let lagging = self
            .admin_conns
            .iter()
            .copied()
            .find(|id| self.conns.get(id).is_some_and(|c| c.is_writing() || c.has_output()));
        let Some(oldest) = lagging else {
            let rec = self
                .record(Level::Warn, "admin_subscriber_refused")
                .num("limit", self.cfg.max_admin_subscribers as u64);
            self.log(rec);
            return false;
        };
        let rec = self
            .record(Level::Warn, "admin_subscriber_replaced")
            .num("limit", self.cfg.max_admin_subscribers as u64);
        self.log(rec);
        self.drop_conn(oldest);
        true
    }

    fn on_read_closed(&mut self, id: ConnId) {
        let Some(cl) = self.conns.get_mut(&id).and_then(|c| c.role.client_mut()) else { return };
        cl.read = ReadSide::Eof;
        if cl.request.is_none() {
            self.process_lines(id);
        }
    }

    /// Takes request lines off the connection while it has no request in progress,
    /// then asks for more bytes, or closes when the peer has finished sending.
    fn process_lines(&mut self, id: ConnId) {
        if self.conns.get(&id).is_some_and(|c| c.role.http().is_some()) {
            self.process_http(id);
            return;
        }
        loop {
            let Some(c) = self.conns.get_mut(&id) else { return };
            let closing = c.closing;
            let Some(cl) = c.role.client_mut() else { return };
            let Proto::Ndjson(n) = &mut cl.proto else { return };
            if cl.request.is_some() || closing {
                return;
            }
            let authed = n.auth == Auth::Done;
            let line = match n.decoder.next_line() {
                None => break,
                Some(Line::TooLarge) => LineIn::TooLarge,
                Some(Line::Complete(line)) if authed => LineIn::Request(wire::decode_request(line)),
                Some(Line::Complete(line)) => {
                    LineIn::Auth(serde_json::from_slice::<AuthLine>(line).ok())
                }
            };
            match line {
                LineIn::TooLarge if !authed => self.reject_auth(id),
                LineIn::TooLarge => {
                    let rec = self.record(Level::Warn, "request_oversized");
                    self.log(rec);
                    let cap = self.cfg.max_frame_bytes;
                    self.send_error(
                        id,
                        "",
                        ErrorCode::FrameTooLarge,
                        &format!("request line exceeds {cap} bytes"),
                    );
                    self.close_after_flush(id);
                }
                LineIn::Auth(auth) => {
                    let key = self.cfg.api_key.as_deref().unwrap_or_default().as_bytes();
                    match auth {
                        Some(a)
                            if a.kind == "auth"
                                && wire::constant_time_eq(a.key.as_bytes(), key) =>
                        {
                            let cap = self.cfg.max_frame_bytes;
                            if let Some(n) = self.conns.get_mut(&id).and_then(Conn::ndjson_mut) {
                                let auth = std::mem::replace(&mut n.auth, Auth::Done);
                                n.decoder.set_cap(cap);
                                if let Auth::Pending { held, .. } = auth {
                                    n.decoder.push(&held);
                                }
                            }
                        }
                        _ => self.reject_auth(id),
                    }
                }
                LineIn::Request(Err(e)) => {
                    let e = self.bound_error_id(e);
                    self.reject(id, e.id(), ErrorCode::InvalidRequest, e.message());
                    if e.closes_connection() {
                        self.close_after_flush(id);
                    }
                }
                LineIn::Request(Ok(req)) => self.on_request(id, req),
            }
        }
        // Out of complete lines: ask for more, or finish a half-closed connection.
        let Some(n) = self.conns.get(&id).and_then(Conn::ndjson) else { return };
        let partial = n.decoder.has_partial();
        self.await_more(id, partial, true);
    }

    /// A connection out of complete requests: closes it at EOF (a partial one is dropped,
    /// spec §1), keeps the read timer on an unfinished one, and asks for more bytes when
    /// `wants` (shared by the NDJSON and HTTP readers).
    fn await_more(&mut self, id: ConnId, partial: bool, wants: bool) {
        let now = self.now;
        let read_timeout = self.cfg.read_timeout;
        let Some(c) = self.conns.get_mut(&id) else { return };
        let closing = c.closing;
        let Some(cl) = c.role.client_mut() else { return };
        if cl.request.is_some() || closing {
            return;
        }
        if cl.read == ReadSide::Eof {
            self.close_after_flush(id);
            return;
        }
        if partial {
            if cl.partial_since.is_none() {
                cl.partial_since = Some(now);
                if !read_timeout.is_zero() && !self.timers.is_set(TimerKey::ReadIdle(id)) {
                    self.arm(now + read_timeout, TimerKey::ReadIdle(id));
                }
            }
        } else {
            cl.partial_since = None;
        }
        let Some(cl) = self.conns.get_mut(&id).and_then(|c| c.role.client_mut()) else { return };
        if wants && cl.read == ReadSide::Idle {
            cl.read = ReadSide::Reading;
            self.outputs.push_back(Output::Read { conn: id });
        }
    }

    fn reject_auth(&mut self, id: ConnId) {
        let rec = self.record(Level::Warn, "tcp_auth_rejected");
        self.log(rec);
        self.drop_conn(id);
    }

    fn close_after_flush(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        c.closing = true;
        if !c.has_output() && !c.is_writing() {
            self.finish_conn(id);
        }
    }

    fn on_flushed(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        if c.is_writing() {
            c.flush = Flush::Idle;
        }
        let has_output = c.has_output();
        match &mut c.role {
            Role::Admin(sub) => sub.in_flight = 0,
            Role::Client(cl) if !has_output => cl.undelivered = None,
            Role::Client(_) => {}
        }
        if c.has_output() {
            self.queue_flush(id);
        } else if c.closing {
            self.finish_conn(id);
        }
    }

    /// The peer is gone or must be dropped: cancel its request, free its place, close.
    fn drop_conn(&mut self, id: ConnId) {
        let cl = self.conns.get_mut(&id).and_then(|c| c.role.client_mut());
        if let Some(req) = cl.and_then(|cl| cl.request.take()) {
            self.cancel_request(id, req);
        }
        self.finish_conn(id);
    }

    /// Forgets a connection and tells the shell to close it.
    fn finish_conn(&mut self, id: ConnId) {
        let Some(c) = self.conns.remove(&id) else { return };
        self.timers.stop(TimerKey::WriteStall(id));
        self.timers.stop(TimerKey::ReadIdle(id));
        self.timers.stop(TimerKey::AuthDeadline(id));
        if c.is_client() {
            self.inference_conns -= 1;
            self.stats_dirty = true;
        } else {
            self.admin_conns.retain(|a| *a != id);
        }
        self.outputs.push_back(Output::Close { conn: id });
    }

    /// Queues connection `id` to be flushed if it has output waiting (see
    /// [`enqueue_flush`], which callers holding the connection use directly).
    fn queue_flush(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(&id)
            && c.has_output()
        {
            enqueue_flush(&mut self.flush_queue, id, c);
        }
    }

    fn send_error(&mut self, id: ConnId, req_id: &str, code: ErrorCode, message: &str) {
        if self.conns.get(&id).is_some_and(|c| c.role.http().is_some()) {
            self.http_error(id, &crate::http::openai::ApiError::from_code(code, message), None);
            return;
        }
        if let Some(c) = self.conns.get_mut(&id) {
            wire::encode_error(&mut c.out, req_id, code, message);
        }
        self.queue_flush(id);
    }

    // ---- requests ------------------------------------------------------------------

    /// The longest request id echoed: every frame carries it, and frames must stay under
    /// the cap (spec §1) whatever the id \[ours\].
    fn max_id_bytes(&self) -> usize {
        (self.cfg.max_frame_bytes / 4).min(4096)
    }

    /// An error whose id is too long to echo is answered with an empty id.
    fn bound_error_id(&self, e: wire::DecodeError) -> wire::DecodeError {
        use wire::DecodeError::{Invalid, Undecodable};
        let max = self.max_id_bytes();
        match e {
            Undecodable { id, message } if id.len() > max => {
                Undecodable { id: String::new(), message }
            }
            Invalid { id, message } if id.len() > max => Invalid { id: String::new(), message },
            e => e,
        }
    }

    /// Refuses a request before it reaches an engine: records it and answers the error.
    fn reject(&mut self, id: ConnId, req_id: &str, code: ErrorCode, message: &str) {
        self.count_outcome(code.as_str());
        let rec = self
            .record(Level::Warn, "request_rejected")
            .str("req_id", req_id)
            .str("code", code.as_str());
        self.log(rec);
        self.send_error(id, req_id, code, message);
    }

    fn on_request(&mut self, id: ConnId, req: Request) {
        let max_id = self.max_id_bytes();
        if req.id.len() > max_id {
            let msg = format!("`id` is {} bytes, more than {max_id}", req.id.len());
            self.reject(id, "", ErrorCode::InvalidRequest, &msg);
            return;
        }
        if self.phase == Phase::Draining {
            self.reject(id, &req.id, ErrorCode::BackendUnavailable, DRAINING);
            self.close_after_flush(id);
            return;
        }
        // Checked by the decoder; should it still fail, the request goes without.
        let stop = StopMatcher::new(&req.stop).unwrap_or_else(|_| no_stop());
        self.admit(id, req.id, req.stream, Reply::Ndjson, req.params, stop);
    }

    /// A decoded, valid request (of either transport) asks for a place: it starts,
    /// waits, or is refused with `queue_full`.
    fn admit(
        &mut self,
        id: ConnId,
        req_id: String,
        stream: bool,
        reply: Reply,
        params: GenerateRequest,
        stop: StopMatcher,
    ) {
        let now = self.now;
        let Some(c) = self.conns.get_mut(&id).and_then(|c| c.role.client_mut()) else { return };
        c.partial_since = None;
        match self.admission.admit(id) {
            Admit::Run => {
                self.stats_dirty = true;
                let req = ReqState {
                    id: req_id,
                    stream,
                    reply,
                    admitted: now,
                    phase: ReqPhase::Running(GenId(0)),
                };
                self.start(id, req, params, stop);
            }
            Admit::Queued => {
                self.stats_dirty = true;
                c.request = Some(ReqState {
                    id: req_id,
                    stream,
                    reply,
                    admitted: now,
                    phase: ReqPhase::Queued(params, stop),
                });
            }
            Admit::Full => {
                self.stats_dirty = true;
                let msg = format!(
                    "queue full: {} generating and {} waiting",
                    self.admission.running(),
                    self.admission.waiting()
                );
                self.reject(id, &req_id, ErrorCode::QueueFull, &msg);
            }
        }
    }

    /// Starts a request that holds a generating place, or fails it when no backend can
    /// take it (then the place passes on). `req.phase` is replaced.
    fn start(&mut self, id: ConnId, req: ReqState, params: GenerateRequest, stop: StopMatcher) {
        let ReqState { id: req_id, stream, reply, admitted, phase: _ } = req;
        let now = self.now;
        let Some(route) = self.router.route(now) else {
            let msg = if self.router.next_cooldown_end(now).is_some() {
                "no backend available: circuit breaker open"
            } else {
                "no backend is ready"
            };
            self.reject(id, &req_id, ErrorCode::BackendUnavailable, msg);
            if let Some(cl) = self.conns.get_mut(&id).and_then(|c| c.role.client_mut()) {
                cl.request = None;
            }
            self.release_place();
            self.process_lines(id);
            return;
        };
        let generation = GenId(self.next_gen);
        self.next_gen += 1;
        self.gens.insert(
            generation,
            Gen {
                conn: Some(id),
                req_id: req_id.clone(),
                stream,
                route,
                admitted,
                started: now,
                first_token: None,
                cancelled_at: None,
                content: String::new(),
                text: TokenText::new(stop),
                stopped: false,
                reply,
                tokens_sent: 0,
            },
        );
        if let Some(cl) = self.conns.get_mut(&id).and_then(|c| c.role.client_mut()) {
            cl.request = Some(ReqState {
                id: req_id,
                stream,
                reply,
                admitted,
                phase: ReqPhase::Running(generation),
            });
        }
        self.outputs.push_back(Output::Start {
            generation,
            backend: route.backend,
            request: params,
        });
    }

    /// Returns a generating place; queued requests take it in arrival order.
    fn release_place(&mut self) {
        self.stats_dirty = true;
        let mut next = self.admission.release();
        while let Some(id) = next.take() {
            let Some(c) = self.conns.get_mut(&id).and_then(|c| c.role.client_mut()) else {
                next = self.admission.release();
                continue;
            };
            match c.request.take() {
                Some(ReqState {
                    id: req_id,
                    stream,
                    reply,
                    admitted,
                    phase: ReqPhase::Queued(params, stop),
                }) => {
                    // `start` releases again by itself when it cannot route.
                    let req = ReqState {
                        id: req_id,
                        stream,
                        reply,
                        admitted,
                        phase: ReqPhase::Running(GenId(0)),
                    };
                    self.start(id, req, params, stop);
                }
                other => {
                    c.request = other;
                    next = self.admission.release();
                }
            }
        }
    }

    /// The client of `req` went away (or the drain deadline passed): stop it quietly.
    fn cancel_request(&mut self, _id: ConnId, req: ReqState) {
        let now = self.now;
        match req.phase {
            ReqPhase::Queued(..) => {
                self.admission.remove_waiting(_id);
                self.stats_dirty = true;
                self.count_outcome("cancelled");
                let rec = self
                    .record(Level::Info, "request_done")
                    .str("req_id", &req.id)
                    .str("stop_reason", StopReason::Cancelled.as_str())
                    .num("queued_ms", now.millis_since(req.admitted))
                    .num("total_ms", now.millis_since(req.admitted));
                self.log(rec);
            }
            ReqPhase::Running(generation) => {
                let Some(g) = self.gens.get_mut(&generation) else { return };
                let route = g.route;
                g.conn = None;
                g.cancelled_at = Some(now);
                self.count_outcome("cancelled");
                self.outputs.push_back(Output::Cancel { generation });
                self.router.report(route, Outcome::Neutral, now);
                self.release_place();
            }
        }
    }

    // ---- engine events -------------------------------------------------------------

    fn on_engine(&mut self, generation: GenId, event: EngineEvent) {
        let Some(g) = self.gens.get_mut(&generation) else { return };
        let Some(conn) = g.conn else {
            // Cancelled: the place is already free; forget it once the engine is done,
            // with the record its account completes.
            let prompt_tokens = match &event {
                EngineEvent::Token(_) => return,
                EngineEvent::Done(c) => Some(c.usage.prompt_tokens),
                EngineEvent::Failed(_) => None,
            };
            if let Some(g) = self.gens.remove(&generation) {
                self.log_cancelled(&g, prompt_tokens);
            }
            return;
        };
        match event {
            EngineEvent::Token(bytes) => {
                let now = self.now;
                let cap = self.cfg.max_frame_bytes;
                if g.stopped {
                    // Text after a stop sequence is never shown; the engine is stopping.
                    return;
                }
                if g.first_token.is_none() {
                    g.first_token = Some(now);
                    self.ttft_hist.observe(now.saturating_since(g.admitted));
                }
                let start = g.content.len();
                if g.text.push(&bytes, &mut g.content) {
                    g.stopped = true;
                    self.outputs.push_back(Output::Cancel { generation });
                }
                g.tokens_sent += 1;
                if g.stream
                    && g.content.len() > start
                    && let Some(c) = self.conns.get_mut(&conn)
                {
                    let piece = &g.content[start..];
                    match g.reply {
                        Reply::Ndjson => encode_token_capped(&mut c.out, &g.req_id, piece, cap),
                        Reply::Http { created, .. } => {
                            let model = self
                                .backends
                                .get(g.route.backend.0)
                                .map_or("?", |b| b.name.as_str());
                            let meta = CompletionMeta { id: &g.req_id, created, model };
                            http::write_stream_piece(c, &meta, piece);
                        }
                    }
                    c.seal_if_full();
                    enqueue_flush(&mut self.flush_queue, conn, c);
                }
            }
            EngineEvent::Done(done) => self.finish_gen(generation, conn, Ok(done)),
            EngineEvent::Failed(e) => self.finish_gen(generation, conn, Err(e)),
        }
    }

    /// What follows a generation's terminal frame on either transport: the output is
    /// sealed and marked undelivered until flushed, the breaker hears the outcome, the
    /// connection flushes and the admission place is freed.
    fn settle_gen(&mut self, conn: ConnId, g: &Gen, outcome: Outcome) {
        self.duration_hist.observe(self.now.saturating_since(g.admitted));
        if let Some(c) = self.conns.get_mut(&conn) {
            c.seal_if_full();
            if let Some(cl) = c.role.client_mut() {
                cl.undelivered = Some(g.req_id.clone());
            }
        }
        self.router.report(g.route, outcome, self.now);
        self.queue_flush(conn);
        self.release_place();
    }

    /// The `request_done` of a cancelled generation: what the client received, and the
    /// prompt's size when the engine told it.
    fn log_cancelled(&mut self, g: &Gen, prompt_tokens: Option<u32>) {
        let Some(at) = g.cancelled_at else { return };
        let rec = self
            .record(Level::Info, "request_done")
            .str("req_id", &g.req_id)
            .str("backend", self.backend_name(g.route.backend))
            .str("stop_reason", StopReason::Cancelled.as_str())
            .opt_num("prompt_tokens", prompt_tokens.map(u64::from))
            .num("completion_tokens", g.tokens_sent.into())
            .num("queued_ms", g.started.millis_since(g.admitted))
            .opt_num("ttft_ms", g.first_token.map(|t| t.millis_since(g.admitted)))
            .num("total_ms", at.millis_since(g.admitted));
        self.log(rec);
    }

    /// Forgets every generation (the daemon stops waiting for its engines); cancelled
    /// ones get their record now, without the engine's account.
    fn forget_gens(&mut self) {
        let mut gens: Vec<(GenId, Gen)> = self.gens.drain().collect();
        gens.sort_by_key(|(id, _)| *id);
        for (_, g) in &gens {
            self.log_cancelled(g, None);
        }
    }

    fn finish_gen(
        &mut self,
        generation: GenId,
        conn: ConnId,
        result: Result<Completion, EngineError>,
    ) {
        let Some(mut g) = self.gens.remove(&generation) else { return };
        let now = self.now;
        if let Err(EngineError { retry_after: Some(after), .. }) = &result {
            self.router.retry_after(g.route.backend, now + *after);
        }
        let start = g.content.len();
        g.text.finish(&mut g.content);
        // A matched stop sequence ends the text normally: the cancellation was ours.
        let result = match result {
            _ if !g.stopped => result,
            Ok(done) => Ok(Completion { stop_reason: StopReason::End, ..done }),
            Err(_) => Ok(Completion {
                usage: wire::Usage { prompt_tokens: 0, completion_tokens: g.tokens_sent },
                stop_reason: StopReason::End,
                prompt_cached_tokens: 0,
            }),
        };
        if let Reply::Http { .. } = g.reply {
            self.finish_http_gen(g, conn, start, result);
            return;
        }
        let backend = self.backends[g.route.backend.0].name.clone();
        let timings = Timings {
            queued_ms: g.started.millis_since(g.admitted),
            ttft_ms: g.first_token.unwrap_or(now).millis_since(g.admitted),
            total_ms: now.millis_since(g.admitted),
        };
        let cap = self.cfg.max_frame_bytes;
        let draining = self.phase == Phase::Draining;
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if let Some(cl) = c.role.client_mut() {
            cl.request = None;
        }
        if g.stream && g.content.len() > start {
            encode_token_capped(&mut c.out, &g.req_id, &g.content[start..], cap);
        }
        let outcome = match result {
            Ok(Completion { usage, stop_reason, prompt_cached_tokens }) => {
                let mark = c.out.len();
                wire::encode_done(
                    &mut c.out,
                    &DoneFrame {
                        id: &g.req_id,
                        content: &g.content,
                        usage,
                        stop_reason,
                        backend: &backend,
                        timings: self.cfg.timings.then_some(timings),
                    },
                );
                if c.out.len() - mark - 1 > cap {
                    c.out.truncate(mark);
                    let msg = format!("response exceeds the {cap}-byte frame cap");
                    wire::encode_error(&mut c.out, &g.req_id, ErrorCode::BackendUnavailable, &msg);
                }
                self.served += 1;
                *self.outcomes.entry("done").or_insert(0) += 1;
                self.prompt_tokens_total += u64::from(usage.prompt_tokens);
                self.prompt_cached_total += u64::from(prompt_cached_tokens);
                self.completion_tokens_total += u64::from(usage.completion_tokens);
                let rec = self
                    .record(Level::Info, "request_done")
                    .str("req_id", &g.req_id)
                    .str("backend", &backend)
                    .str("stop_reason", stop_reason.as_str())
                    .num("prompt_tokens", usage.prompt_tokens.into())
                    .num("prompt_cached_tokens", prompt_cached_tokens.into())
                    .num("completion_tokens", usage.completion_tokens.into())
                    .num("queued_ms", timings.queued_ms)
                    .num("ttft_ms", timings.ttft_ms)
                    .num("total_ms", timings.total_ms);
                self.log(rec);
                Outcome::Success
            }
            Err(e) => {
                let mid_stream = g.tokens_sent > 0;
                let code = match (mid_stream, e.kind) {
                    // The client's fault whenever the engine found it (spec §2).
                    (_, EngineErrorKind::InvalidRequest) => ErrorCode::InvalidRequest,
                    (false, EngineErrorKind::Internal) => ErrorCode::Internal,
                    _ => ErrorCode::BackendUnavailable,
                };
                wire::encode_error(
                    &mut c.out,
                    &g.req_id,
                    code,
                    &format!("backend {backend}: {}", e.message),
                );
                let rec = if mid_stream {
                    self.record(Level::Warn, "request_error_mid_stream")
                        .str("req_id", &g.req_id)
                        .str("backend", &backend)
                        .num("completion_tokens", g.tokens_sent.into())
                        .str("error", &e.message)
                } else {
                    self.record(Level::Warn, "request_rejected")
                        .str("req_id", &g.req_id)
                        .str("backend", &backend)
                        .str("code", code.as_str())
                        .str("error", &e.message)
                };
                self.log(rec);
                self.count_outcome(code.as_str());
                breaker_outcome(&e)
            }
        };
        self.settle_gen(conn, &g, outcome);
        if draining {
            self.close_after_flush(conn);
        } else {
            self.process_lines(conn);
        }
    }

    // ---- backends, admin, stats ----------------------------------------------------

    fn backend_name(&self, backend: BackendId) -> &str {
        self.backends.get(backend.0).map_or("?", |b| b.name.as_str())
    }

    fn on_loaded(&mut self, backend: BackendId, mut caps: Capabilities) {
        let Some(info) = self.backends.get_mut(backend.0) else { return };
        info.loaded = true;
        caps.backend = info.name.clone();
        let mut frame = Vec::new();
        admin::encode_capabilities(&mut frame, &caps);
        self.capabilities_frames.extend_from_slice(&frame);
        self.publish(&frame);
        self.router.set_ready(backend, true);
        if self.phase == Phase::Starting && self.backends.iter().all(|b| b.loaded) {
            self.phase = Phase::Ready;
            self.set_admin_state(AdminState::Ready);
            self.outputs.push_back(Output::BindInference);
        }
    }

    fn set_admin_state(&mut self, state: AdminState) {
        let mut frame = Vec::new();
        admin::encode_state(&mut frame, &state);
        self.admin_state = state;
        self.publish(&frame);
    }

    /// Appends an event to every admin subscriber; drops those too far behind.
    fn publish(&mut self, frame: &[u8]) {
        let limit = self.cfg.admin_lag_limit;
        let mut laggards = Vec::new();
        for id in &self.admin_conns {
            if let Some(c) = self.conns.get_mut(id) {
                let Role::Admin(sub) = &mut c.role else { continue };
                if c.closing {
                    continue;
                }
                c.out.extend_from_slice(frame);
                sub.buffered += 1;
                if sub.buffered + sub.in_flight > limit {
                    laggards.push(*id);
                } else {
                    enqueue_flush(&mut self.flush_queue, *id, c);
                }
            }
        }
        for id in laggards {
            self.finish_conn(id);
        }
    }

    fn arm_stats(&mut self) {
        if self.stats_dirty && !self.timers.is_set(TimerKey::Stats) && !self.admin_conns.is_empty()
        {
            let at = self.now + self.cfg.stats_interval;
            self.arm(at, TimerKey::Stats);
        }
    }

    fn publish_stats(&mut self) {
        let now = self.now;
        let s = self.stats();
        let breakers: Vec<(&str, &'static str)> = self
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.name.as_str(), self.router.breaker_state(BackendId(i), now).as_str()))
            .collect();
        let mut frame = Vec::new();
        admin::encode_stats(
            &mut frame,
            &StatsEvent {
                queued: s.queued,
                active: s.active,
                connections: s.connections,
                served: s.served,
                rejected: s.rejected,
                prompt_tokens: s.prompt_tokens,
                prompt_cached_tokens: s.prompt_cached_tokens,
                completion_tokens: s.completion_tokens,
                log_records_dropped: s.log_records_dropped,
                breakers,
            },
        );
        self.publish(&frame);
    }

    // ---- timers, shutdown ----------------------------------------------------------

    fn arm(&mut self, at: Time, key: TimerKey) {
        self.timers.set(key, at);
    }

    fn on_timeout(&mut self) {
        let now = self.now;
        while let Some(key) = self.timers.pop_due(now) {
            self.fire(key, now);
        }
    }

    fn fire(&mut self, key: TimerKey, now: Time) {
        match key {
            TimerKey::WriteStall(id) => {
                let timeout = self.cfg.write_timeout;
                let Some(c) = self.conns.get_mut(&id) else { return };
                match c.flush {
                    Flush::Writing { since } if now.saturating_since(since) >= timeout => {
                        // The activity log must not leave `request_done` as the last word
                        // on output the client never received.
                        let pending = c.unsent_bytes();
                        let undelivered = c.role.client_mut().and_then(|cl| cl.undelivered.take());
                        let rec = self
                            .record(Level::Warn, "write_timeout")
                            .opt_str("undelivered_req_id", undelivered.as_deref())
                            .num("unsent_bytes", pending as u64);
                        self.log(rec);
                        self.drop_conn(id);
                    }
                    Flush::Writing { since } => {
                        self.arm(since + timeout, TimerKey::WriteStall(id));
                    }
                    Flush::Idle | Flush::Queued => {}
                }
            }
            TimerKey::AuthDeadline(id) => {
                if self.conns.get(&id).is_some_and(|c| c.awaits_auth() && !c.closing) {
                    let rec = self.record(Level::Warn, "tcp_auth_timeout");
                    self.log(rec);
                    self.drop_conn(id);
                }
            }
            TimerKey::ReadIdle(id) => {
                let timeout = self.cfg.read_timeout;
                let Some(c) = self.conns.get(&id).and_then(|c| c.role.client()) else { return };
                match c.partial_since {
                    Some(since)
                        if c.request.is_none() && now.saturating_since(since) >= timeout =>
                    {
                        // A slow sender: close without a frame, as for a peer gone quiet.
                        self.drop_conn(id);
                    }
                    Some(since) => {
                        self.arm(since + timeout, TimerKey::ReadIdle(id));
                    }
                    None => {}
                }
            }
            TimerKey::Stats => {
                if self.stats_dirty {
                    self.stats_dirty = false;
                    self.publish_stats();
                }
            }
            TimerKey::ReadyDeadline => {
                if self.phase == Phase::Starting {
                    let waiting: Vec<String> = self
                        .backends
                        .iter()
                        .filter(|b| !b.loaded)
                        .map(|b| b.name.clone())
                        .collect();
                    let secs = self.cfg.ready_timeout.as_secs();
                    self.exit(ExitReason::NotReadyInTime { secs, waiting });
                }
            }
            TimerKey::DrainDeadline => self.drain_deadline(),
            TimerKey::DrainGrace => {
                // The overall exit deadline: admin subscribers had their chance too. They are
                // closed in `maybe_exit`, after what is already writable went out.
                let ids: Vec<ConnId> =
                    self.conns.iter().filter(|(_, c)| c.is_client()).map(|(id, _)| *id).collect();
                for id in ids {
                    self.drop_conn(id);
                }
                self.forget_gens();
                self.exit_requested = true;
                self.admin_flush_expired = true;
            }
            TimerKey::AdminFlush => self.admin_flush_expired = true,
        }
    }

    fn on_shutdown(&mut self) {
        if self.phase == Phase::Draining {
            return;
        }
        let was_starting = self.phase == Phase::Starting;
        self.phase = Phase::Draining;
        self.outputs.push_back(Output::StopAccepting);
        self.set_admin_state(AdminState::Draining);
        let now = self.now;
        // Queued requests get `backend_unavailable` and their connection closes.
        let waiting: Vec<ConnId> = self.admission.drain_waiting().collect();
        for id in waiting {
            let cl = self.conns.get_mut(&id).and_then(|c| c.role.client_mut());
            if let Some(req) = cl.and_then(|cl| cl.request.take()) {
                self.reject(id, &req.id, ErrorCode::BackendUnavailable, DRAINING);
            }
            self.close_after_flush(id);
        }
        // Idle connections close now; running requests finish first.
        let idle: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.role.client().is_some_and(|cl| cl.request.is_none()))
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.close_after_flush(id);
        }
        if was_starting {
            self.exit_requested = true;
        } else {
            self.arm(now + self.cfg.drain_timeout, TimerKey::DrainDeadline);
            self.arm(now + self.cfg.drain_timeout + DRAIN_FLUSH_GRACE, TimerKey::DrainGrace);
        }
    }

    /// The drain deadline passed: cancel what still runs, with an error terminal frame.
    fn drain_deadline(&mut self) {
        let running: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.role.client().is_some_and(|cl| {
                    matches!(cl.request, Some(ReqState { phase: ReqPhase::Running(_), .. }))
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in running {
            let Some(cl) = self.conns.get_mut(&id).and_then(|c| c.role.client_mut()) else {
                continue;
            };
            let Some(req) = cl.request.take() else { continue };
            let req_id = req.id.clone();
            self.cancel_request(id, req);
            self.send_error(
                id,
                &req_id,
                ErrorCode::BackendUnavailable,
                "daemon is draining: drain deadline reached, generation cancelled",
            );
            self.close_after_flush(id);
        }
    }

    fn maybe_exit(&mut self) {
        if self.phase != Phase::Draining {
            return;
        }
        let inference_left = self.conns.values().any(Conn::is_client);
        if !self.exit_requested && (inference_left || !self.gens.is_empty()) {
            return;
        }
        if !self.admins_closing {
            // Every subscriber gets what was queued for it, the `draining` status included,
            // before its connection closes, even when nothing was in flight (spec §4, §5).
            self.admins_closing = true;
            for id in self.admin_conns.clone() {
                self.close_after_flush(id);
            }
            if !self.admin_conns.is_empty() {
                let at = self.now + DRAIN_FLUSH_GRACE;
                self.arm(at, TimerKey::AdminFlush);
            }
        }
        if self.admin_conns.is_empty() || self.admin_flush_expired {
            self.exit(ExitReason::Drained);
        }
    }

    fn exit(&mut self, reason: ExitReason) {
        if self.phase == Phase::Exited {
            return;
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.drop_conn(id);
        }
        for generation in self.gens.keys().copied().collect::<Vec<_>>() {
            self.outputs.push_back(Output::Cancel { generation });
        }
        self.forget_gens();
        self.phase = Phase::Exited;
        self.outputs.push_back(Output::Exit { reason });
    }

    // ---- activity ------------------------------------------------------------------

    fn record(&self, level: Level, msg: &str) -> Record {
        Record::new(self.wall.unix_ms(self.now), level, "daemon", msg)
    }

    fn log(&mut self, rec: Record) {
        self.outputs.push_back(Output::Activity(rec.finish()));
    }
}

/// What an engine failure tells the circuit breaker. A client error says nothing about
/// the backend: not counted, and a half-open trial that ends this way leaves the next
/// request to be the trial (spec §4). A failure several requests share (one decode that
/// failed a batch) is counted once.
fn breaker_outcome(e: &EngineError) -> Outcome {
    match (e.kind, e.incident) {
        (EngineErrorKind::InvalidRequest, _) => Outcome::Neutral,
        (_, Some(incident)) => Outcome::SharedFailure(incident),
        (_, None) => Outcome::Failure,
    }
}

/// Appends `piece` as token frames no larger than `cap`: a piece too big for one frame
/// (escaping can grow text sixfold) is split at character boundaries, which keeps the
/// concatenation of the tokens equal to `done.content`.
fn encode_token_capped(out: &mut Vec<u8>, id: &str, piece: &str, cap: usize) {
    let mark = out.len();
    wire::encode_token(out, id, piece);
    if out.len() - mark - 1 <= cap || piece.chars().nth(1).is_none() {
        return;
    }
    out.truncate(mark);
    // The character boundary at or before the middle, but never before the end of the
    // first character: the piece has at least two, so both halves are non-empty.
    let first = piece.chars().next().map_or(0, char::len_utf8);
    let mid = piece.floor_char_boundary(piece.len() / 2).max(first);
    encode_token_capped(out, id, &piece[..mid], cap);
    encode_token_capped(out, id, &piece[mid..], cap);
}

/// A matcher that never stops: the fallback should sequences the decoder already
/// validated be refused here after all.
fn no_stop() -> StopMatcher {
    match StopMatcher::new::<&str>(&[]) {
        Ok(m) => m,
        // No sequences cannot be too many or too long.
        Err(_) => unreachable!("an empty stop list is always valid"),
    }
}

mod conn;
mod http;

#[cfg(test)]
mod tests;
