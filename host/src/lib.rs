//! OS glue shared by the runtime shells: lock file, socket files and modes, peer
//! credentials, runtime paths, the activity log sink, and the daemon's sockets in one epoll set.
//!
//! Only the shells use this module; the state machines of the core never import it.

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
