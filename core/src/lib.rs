//! The sans-IO core of inferd.
//!
//! Everything the daemon decides lives here as plain state machines: no sockets, no
//! clock, no threads. Shells feed [`Input`]s into [`Daemon::handle`] with the current
//! [`Time`], then drain [`Daemon::poll_output`] and sleep until [`Daemon::poll_timeout`].
//! The same core runs under smol, tokio, a hand-written mio loop, and the deterministic
//! simulator.
//!
//! Comments citing "spec §N" refer to the sections of the protocol description,
//! `docs/protocol.md` at the root of the repository.
//!
//! This crate has no IO dependencies at all: the OS glue the shells share (lock file,
//! sockets, peer credentials, the activity log sink, the driver loop) is the separate
//! `inferd-host` crate, which depends on this one and never the other way round.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The APIs engines and shells build on.
pub mod activity;
pub mod engine;
pub mod redact;
pub mod sse;
pub mod wire;

// Parts the daemon is built from. Public only so that the property tests, fuzz targets
// and benchmarks of this workspace can drive them directly; hidden from the docs because
// they are not an API anyone else should depend on.
#[doc(hidden)]
pub mod admin;
#[doc(hidden)]
pub mod admission;
#[doc(hidden)]
pub mod framing;
#[doc(hidden)]
pub mod http;
#[doc(hidden)]
pub mod router;
#[doc(hidden)]
pub mod stop;

mod config;
mod daemon;
mod metrics;
mod time;
mod utf8;

pub use config::{BACKEND_KINDS, BackendSpec, ConfigError, DaemonConfig, Settings, default_name};
pub use daemon::{
    ConnId, Daemon, ExitReason, GenId, Input, ListenerKind, MAX_AUTH_LINE_BYTES, Output, Peer,
    Stats, Transport,
};
pub use router::{BackendId, BreakerPolicy, BreakerState};
pub use time::Time;
