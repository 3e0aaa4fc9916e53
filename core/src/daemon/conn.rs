//! The daemon's per-connection state: what every connection has (its output and where
//! its writes stand) and, in [`Role`], what only a client or only an admin subscriber
//! has. Modes are enums, so states that cannot happen together cannot be written down.
//! The HTTP state lives here too, so that this module needs nothing from the modules
//! that drive it.

use std::collections::VecDeque;

use super::{ConnId, ReqState};
use crate::framing::LineDecoder;
use crate::http::request::{Head, Limits, RequestReader};
use crate::time::Time;

/// Output is handed to the shell in chunks of about this size, so a write that takes
/// longer than the write timeout means a client that stopped reading, not one whose
/// backlog is simply large.
pub(super) const SEND_CHUNK: usize = 256 * 1024;

/// One accepted connection.
#[derive(Debug)]
pub(super) struct Conn {
    /// Output not yet handed to the shell, the current (unsealed) chunk.
    pub(super) out: Vec<u8>,
    /// Full chunks of output waiting behind the write in flight, oldest first.
    sealed: VecDeque<Vec<u8>>,
    /// Where the connection's writes stand.
    pub(super) flush: Flush,
    /// Close once everything written so far is flushed; nothing more is read.
    pub(super) closing: bool,
    /// What the connection is for, with the state only that kind has.
    pub(super) role: Role,
}

/// Where a connection's writes stand. A connection is on the flush queue at most once,
/// and never while a write is in flight (its `Flushed` queues it again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Flush {
    /// Nothing in flight, not queued.
    Idle,
    /// On the daemon's flush queue: its next `Send` goes out from `poll_output`.
    Queued,
    /// A `Send` is outstanding, issued at this time.
    Writing {
        /// When the `Send` was handed out.
        since: Time,
    },
}

/// What a connection is for.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "clients are the many connections and the few admin subscribers carried all \
              of this before the split too; boxing would cost every client an allocation"
)]
pub(super) enum Role {
    /// A client sending requests (protocol v1 or HTTP).
    Client(Client),
    /// An admin subscriber: status events out, nothing read.
    Admin(Subscriber),
}

/// An admin subscriber's backlog, counted in events, against the lag limit.
#[derive(Debug, Default)]
pub(super) struct Subscriber {
    /// Events appended since the last `Send`.
    pub(super) buffered: usize,
    /// Events in the `Send` in flight.
    pub(super) in_flight: usize,
}

/// A client connection: requests in, answers out, one request at a time.
#[derive(Debug)]
pub(super) struct Client {
    /// Where the read side stands.
    pub(super) read: ReadSide,
    /// Since when an unfinished request has been waiting for its remaining bytes.
    pub(super) partial_since: Option<Time>,
    /// The request in progress (queued or running), if any.
    pub(super) request: Option<ReqState>,
    /// The last request whose terminal frame is written into the output but not yet
    /// confirmed flushed: a write-stall drop says it was not delivered.
    pub(super) undelivered: Option<String>,
    /// How requests are framed on this connection.
    pub(super) proto: Proto,
}

/// Where a client connection's read side stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReadSide {
    /// No read asked for.
    Idle,
    /// An `Output::Read` is outstanding.
    Reading,
    /// The peer shut down its write side: nothing more will come.
    Eof,
}

/// How a client's requests are framed.
#[derive(Debug)]
pub(super) enum Proto {
    /// Protocol v1: NDJSON lines, behind a key line on authenticated TCP.
    Ndjson(Ndjson),
    /// OpenAI-compatible HTTP: the request reader and the answer in progress.
    Http(Box<HttpConn>),
}

/// A protocol v1 connection's input side.
#[derive(Debug)]
pub(super) struct Ndjson {
    /// Splits the bytes read into lines under the cap.
    pub(super) decoder: LineDecoder,
    /// Whether the key line is still owed.
    pub(super) auth: Auth,
}

/// Whether a protocol v1 connection still owes its TCP key line (spec §6).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Auth {
    /// Authenticated, or never asked to be (Unix socket, no key configured).
    Done,
    /// The key line is due.
    Pending {
        /// The unfinished line has a byte other than whitespace (a blank line before
        /// the key line is not the key line).
        line_started: bool,
        /// Bytes after the key line, held until the line is judged: the request behind
        /// it is measured against the frame cap, not the 4 KiB auth cap. Never more than
        /// the rest of the read that completed the key line: it is judged in the same
        /// step.
        held: Vec<u8>,
    },
}

/// What an HTTP connection holds besides the common connection state.
#[derive(Debug)]
pub(super) struct HttpConn {
    /// Bytes in, request heads and bodies out.
    pub(super) reader: RequestReader,
    /// The current request allows another one after it.
    pub(super) keep_alive: bool,
    /// The current request is `HEAD`: the answer goes without its body.
    pub(super) head_only: bool,
    /// The chunked head of a streamed answer is written: errors now go in the stream.
    pub(super) streaming: bool,
    /// The head of the request whose body is being read.
    pub(super) head: Option<Head>,
    /// The current stream's content-event prefix, built when the stream starts.
    pub(super) chunk_prefix: Vec<u8>,
}

impl HttpConn {
    /// A connection with no request yet, reading under `limits`.
    pub(super) fn new(limits: Limits) -> HttpConn {
        HttpConn {
            reader: RequestReader::new(limits),
            keep_alive: true,
            head_only: false,
            streaming: false,
            head: None,
            chunk_prefix: Vec::new(),
        }
    }
}

impl Conn {
    /// A connection with nothing written yet.
    pub(super) fn new(role: Role) -> Conn {
        Conn { out: Vec::new(), sealed: VecDeque::new(), flush: Flush::Idle, closing: false, role }
    }

    /// Whether anything is written and not yet handed to the shell.
    pub(super) fn has_output(&self) -> bool {
        !self.out.is_empty() || !self.sealed.is_empty()
    }

    /// Whether a `Send` is outstanding.
    pub(super) fn is_writing(&self) -> bool {
        matches!(self.flush, Flush::Writing { .. })
    }

    /// Bytes written but not yet handed to the shell.
    pub(super) fn unsent_bytes(&self) -> usize {
        self.sealed.iter().map(Vec::len).sum::<usize>() + self.out.len()
    }

    /// Closes the current chunk once it is big enough; the next frames start a new one.
    /// A single huge frame (a long `done`) is cut into chunks too, copying it once.
    pub(super) fn seal_if_full(&mut self) {
        if self.out.len() < SEND_CHUNK {
            return;
        }
        let whole = std::mem::take(&mut self.out);
        if whole.len() < 2 * SEND_CHUNK {
            self.sealed.push_back(whole);
        } else {
            self.sealed.extend(whole.chunks(SEND_CHUNK).map(<[u8]>::to_vec));
        }
    }

    /// The bytes of the next `Send`: the oldest sealed chunk, else all that is written.
    pub(super) fn next_send(&mut self) -> Vec<u8> {
        self.sealed.pop_front().unwrap_or_else(|| std::mem::take(&mut self.out))
    }

    /// Whether the connection carries requests (and counts against `max_connections`).
    pub(super) fn is_client(&self) -> bool {
        matches!(self.role, Role::Client(_))
    }

    /// The protocol v1 input side, if this is a protocol v1 client.
    pub(super) fn ndjson(&self) -> Option<&Ndjson> {
        match &self.role {
            Role::Client(Client { proto: Proto::Ndjson(n), .. }) => Some(n),
            _ => None,
        }
    }

    /// The protocol v1 input side, if this is a protocol v1 client.
    pub(super) fn ndjson_mut(&mut self) -> Option<&mut Ndjson> {
        match &mut self.role {
            Role::Client(Client { proto: Proto::Ndjson(n), .. }) => Some(n),
            _ => None,
        }
    }

    /// Whether the connection still owes its TCP key line.
    pub(super) fn awaits_auth(&self) -> bool {
        matches!(
            &self.role,
            Role::Client(Client {
                proto: Proto::Ndjson(Ndjson { auth: Auth::Pending { .. }, .. }),
                ..
            })
        )
    }

    /// Input bytes held for this connection: unfinished and pipelined lines or HTTP
    /// bytes, and bytes waiting for an auth verdict.
    pub(super) fn input_held(&self) -> usize {
        match &self.role {
            Role::Admin(_) => 0,
            Role::Client(cl) => match &cl.proto {
                Proto::Http(h) => h.reader.buffered(),
                Proto::Ndjson(n) => {
                    let held = match &n.auth {
                        Auth::Pending { held, .. } => held.len(),
                        Auth::Done => 0,
                    };
                    n.decoder.buffered() + held
                }
            },
        }
    }
}

impl Role {
    /// The client state, unless this is an admin subscriber.
    pub(super) fn client(&self) -> Option<&Client> {
        match self {
            Role::Client(cl) => Some(cl),
            Role::Admin(_) => None,
        }
    }

    /// The client state, unless this is an admin subscriber.
    pub(super) fn client_mut(&mut self) -> Option<&mut Client> {
        match self {
            Role::Client(cl) => Some(cl),
            Role::Admin(_) => None,
        }
    }

    /// The HTTP state, if this is an HTTP client.
    pub(super) fn http(&self) -> Option<&HttpConn> {
        match self {
            Role::Client(Client { proto: Proto::Http(h), .. }) => Some(h),
            _ => None,
        }
    }

    /// The HTTP state, if this is an HTTP client.
    pub(super) fn http_mut(&mut self) -> Option<&mut HttpConn> {
        match self {
            Role::Client(Client { proto: Proto::Http(h), .. }) => Some(h),
            _ => None,
        }
    }
}

/// Puts connection `id` on the flush queue unless it is queued already or a write is in
/// flight (its `Flushed` queues it again). The one place that does; it takes the queue
/// and the connection apart so that code already holding the connection (a token, an
/// admin event) can call it without looking the connection up again.
pub(super) fn enqueue_flush(flush_queue: &mut VecDeque<ConnId>, id: ConnId, c: &mut Conn) {
    if c.flush == Flush::Idle {
        c.flush = Flush::Queued;
        flush_queue.push_back(id);
    }
}
