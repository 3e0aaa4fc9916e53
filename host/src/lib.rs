//! OS glue shared by the runtime shells: lock file, socket files and modes, peer
//! credentials, runtime paths, the activity log sink, and the daemon's sockets in one epoll set.
//!
//! Only the shells use this crate; the sans-IO core (`inferd-core`) never imports it,
//! and this crate never imports a shell or an engine.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod fdlimit;
pub mod lock;
pub mod logfile;
pub mod paths;
pub mod peer;
pub mod signals;
pub mod socket;
pub mod time;

pub mod bridge;
pub mod conns;
pub mod driver;
#[cfg(test)]
mod testutil;
