//! What the host's event sources report to the driver: the socket set ([`crate::conns`]),
//! the engine threads ([`crate::bridge`]) and a stop request.
//!
//! It sits in its own module, below the driver and the sources, so that the sources do
//! not import the driver that imports them.

use inferd_core::engine::{Capabilities, EngineError, EngineEvent, LoadPhase};
use inferd_core::{BackendId, ConnId, GenId, ListenerKind, Peer};

/// Something that happened, reported to the driver by tasks and threads.
#[derive(Debug)]
pub enum Event {
    /// A connection was accepted.
    Accepted {
        /// Its name.
        conn: ConnId,
        /// Which listener.
        listener: ListenerKind,
        /// Who.
        peer: Peer,
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
        backend: BackendId,
        /// The phase.
        phase: LoadPhase,
    },
    /// A backend is ready.
    BackendLoaded {
        /// Which backend.
        backend: BackendId,
        /// What it can do.
        capabilities: Capabilities,
    },
    /// A backend failed to load.
    BackendFailed {
        /// Which backend.
        backend: BackendId,
        /// Why.
        error: EngineError,
    },
    /// SIGTERM/SIGINT or a host's stop request.
    Shutdown,
}
