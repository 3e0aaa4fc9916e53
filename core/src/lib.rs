//! The sans-IO core of inferd.
//!
//! Everything the daemon decides lives here as plain state machines: no sockets, no
//! clock, no threads. Shells feed [`daemon::Input`]s into [`daemon::Daemon::handle`] with
//! the current [`time::Time`], then drain [`daemon::Daemon::poll_output`] and sleep until
//! [`daemon::Daemon::poll_timeout`]. The same core runs under smol, tokio, a hand-written
//! mio loop, and the deterministic simulator.
//!
//! Comments citing "spec §N" refer to the sections of the protocol description,
//! `docs/protocol.md` at the root of the repository.
//!
//! This crate has no IO dependencies at all: the OS glue the shells share (lock file,
//! sockets, peer credentials, the activity log sink, the driver loop) is the separate
//! `inferd-host` crate, which depends on this one and never the other way round.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod activity;
pub mod admin;
pub mod admission;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod framing;
pub mod http;
pub mod metrics;
pub mod redact;
pub mod router;
pub mod sse;
pub mod stop;
pub mod time;
pub mod utf8;
pub mod wire;

pub use daemon::{ConnId, Daemon, ExitReason, GenId, Input, Output};
pub use router::BackendId;
pub use time::Time;
