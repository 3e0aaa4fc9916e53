//! The descriptor budget: raising the soft `RLIMIT_NOFILE` to the hard limit, and how
//! many inference connections the rest leaves room for.
//!
//! A daemon whose connections can use up every descriptor cannot accept (`EMFILE`),
//! answer or even refuse: clients wait in the listen backlog. So `max_connections` is
//! clamped to what the limit leaves once the daemon's own descriptors and a reserve are
//! set aside; past it, connections are accepted and closed at once, as the spec says.

use std::io;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors kept for everything but inference connections and admin subscribers:
/// the inference and TCP listeners, the epoll sets and the runtime's own descriptors,
/// engine files, the log file while it rotates, and headroom.
pub const RESERVED_DESCRIPTORS: u64 = 32;

/// Raises the soft descriptor limit to the hard one (as Go's runtime and most servers
/// do: the soft default of 1024 is a guard for `select(2)`, which nothing here uses).
/// Returns the soft limit now in force, `None` when unlimited. When raising fails the
/// old limit stays, and is returned.
pub fn raise_descriptor_limit() -> Option<u64> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    if current != maximum
        && setrlimit(Resource::Nofile, Rlimit { current: maximum, maximum }).is_ok()
    {
        return maximum;
    }
    current
}

/// Descriptors this process has open now (Linux: the entries of `/proc/self/fd`).
pub fn open_descriptors() -> io::Result<u64> {
    let entries = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    // The directory being listed was one of them.
    Ok(entries.saturating_sub(1))
}

/// The most inference connections a process limited to `limit` descriptors, with
/// `in_use` open already, can hold while keeping the reserve and room for `admins`
/// subscribers (the configured cap); at least 1.
pub fn connection_allowance(limit: u64, in_use: u64, admins: u64) -> u64 {
    limit.saturating_sub(in_use.saturating_add(RESERVED_DESCRIPTORS).saturating_add(admins)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowance_keeps_the_reserve_and_never_reaches_zero() {
        assert_eq!(connection_allowance(1024, 10, 64), 1024 - 10 - 32 - 64);
        assert_eq!(connection_allowance(1024, 10, 4), 1024 - 10 - 32 - 4);
        assert_eq!(connection_allowance(100, 10, 64), 1);
        assert_eq!(connection_allowance(0, 0, 64), 1);
        assert_eq!(connection_allowance(u64::MAX, 5, 64), u64::MAX - 5 - 32 - 64);
        assert_eq!(connection_allowance(1024, 5, u64::MAX), 1);
    }

    #[test]
    fn open_descriptors_counts_at_least_the_standard_streams() {
        let n = open_descriptors().unwrap();
        assert!(n >= 3, "{n}");
        assert!(getrlimit(Resource::Nofile).current.is_none_or(|limit| n <= limit), "{n}");
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let hard = getrlimit(Resource::Nofile).maximum;
        assert_eq!(raise_descriptor_limit(), hard);
        assert_eq!(getrlimit(Resource::Nofile).current, hard);
    }
}
