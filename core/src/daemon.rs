//! The daemon state machine: everything that happens goes in through [`Daemon::handle`],
//! everything it wants done comes out of [`Daemon::poll_output`].

use std::time::Duration;

use crate::engine::{Capabilities, EngineError, EngineEvent, LoadPhase};
use crate::time::Time;
use crate::wire::GenerateRequest;

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
pub enum Input<'a> {
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
        /// What was read.
        bytes: &'a [u8],
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
        /// Index in the configured priority order.
        backend: usize,
        /// The phase.
        phase: LoadPhase,
    },
    /// A backend finished loading and is ready.
    BackendLoaded {
        /// Index in the configured priority order.
        backend: usize,
        /// What it can do.
        capabilities: Capabilities,
    },
    /// A backend failed to load; the daemon cannot start.
    BackendFailed {
        /// Index in the configured priority order.
        backend: usize,
        /// Why.
        error: EngineError,
    },
    /// A loaded backend became ready or not ready.
    BackendReadiness {
        /// Index in the configured priority order.
        backend: usize,
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
        /// Index of the backend in priority order.
        backend: usize,
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
    /// Exit the process with this status once the outputs before it are carried out.
    Exit {
        /// 0 after an orderly drain.
        code: i32,
        /// Why, for the operator (empty after an orderly drain).
        message: String,
    },
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
}

/// Placeholder so the shells can compile against the surface while the machine lands.
pub struct Daemon {
    _private: (),
}

impl Daemon {
    /// Feeds one input at time `now`.
    pub fn handle(&mut self, _now: Time, _input: Input<'_>) {}
    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        None
    }
    /// When to call `handle(now, Input::Timeout)` next.
    pub fn poll_timeout(&self) -> Option<Time> {
        None
    }
    #[allow(dead_code)]
    fn unused(_: Duration) {}
}
