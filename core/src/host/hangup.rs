//! Hang-up detection for connections the daemon is not reading: an epoll set that only
//! reports HUP and ERR.
//!
//! A client that closes while its request is queued or prefilling must be noticed
//! without reading from the socket (the next request's bytes must stay unread), and a
//! half-close (client shut down only its write side) must not count as leaving. Reading
//! cannot tell the two apart (both give EOF), and async runtimes' readiness cannot wait
//! for HUP after a half-close. An epoll registration with an empty interest set gets
//! exactly HUP and ERR, which the kernel reports only when the peer is fully gone.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::epoll::{self, CreateFlags, EventData, EventFlags};
use rustix::io::Errno;

/// How many events one `epoll_wait` collects; more are picked up by looping.
const BATCH: usize = 64;

/// A set of connections watched for hang-ups, each named by a `u64` id.
///
/// Each registration reports at most once (`EPOLLONESHOT`), so a shell that has not yet
/// removed a hung-up connection does not see the epoll fd stay readable forever.
/// [`remove`](HangupWatcher::remove) a connection once it is answered or closed.
#[derive(Debug)]
pub struct HangupWatcher {
    epoll: OwnedFd,
}

impl HangupWatcher {
    /// An empty watcher (a close-on-exec epoll instance).
    pub fn new() -> io::Result<HangupWatcher> {
        Ok(HangupWatcher { epoll: epoll::create(CreateFlags::CLOEXEC)? })
    }

    /// Starts watching `fd` under `id`. Watching the same connection twice is an error
    /// (`EEXIST`).
    pub fn add(&self, fd: impl AsFd, id: u64) -> io::Result<()> {
        // No interest bits: HUP and ERR are always reported, and asking for nothing else
        // keeps a half-close (IN|RDHUP) quiet.
        epoll::add(&self.epoll, fd, EventData::new_u64(id), EventFlags::ONESHOT)?;
        Ok(())
    }

    /// Stops watching `fd`. `id` is what it was added under; epoll identifies the
    /// registration by the descriptor, so it is only taken for symmetry with
    /// [`add`](HangupWatcher::add). A connection not (or no longer) watched is fine.
    pub fn remove(&self, fd: impl AsFd, id: u64) -> io::Result<()> {
        let _ = id;
        match epoll::delete(&self.epoll, fd) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends the ids of watched connections whose peer has gone (HUP or ERR) to `out`,
    /// without blocking; returns how many were added. Each hang-up is reported once.
    pub fn poll_hung_up(&self, out: &mut Vec<u64>) -> io::Result<usize> {
        let before = out.len();
        let mut events = Vec::with_capacity(BATCH);
        loop {
            events.clear();
            let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
            match epoll::wait(&self.epoll, rustix::buffer::spare_capacity(&mut events), Some(&zero))
            {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            out.extend(events.iter().map(|event| event.data.u64()));
            if events.len() < BATCH {
                return Ok(out.len() - before);
            }
        }
    }
}

impl AsFd for HangupWatcher {
    /// The epoll descriptor: it becomes readable when a hang-up is pending, so a shell
    /// can await it in its runtime, then call [`HangupWatcher::poll_hung_up`].
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;

    fn hung(watcher: &HangupWatcher) -> Vec<u64> {
        let mut out = Vec::new();
        let n = watcher.poll_hung_up(&mut out).unwrap();
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn half_close_is_quiet_and_close_is_reported_once() {
        let watcher = HangupWatcher::new().unwrap();
        let (server, client) = UnixStream::pair().unwrap();
        watcher.add(&server, 7).unwrap();
        assert!(hung(&watcher).is_empty());

        // A client that sent its request and shut down its write side still waits for
        // the reply.
        (&client).write_all(b"{\"messages\":[]}\n").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert!(hung(&watcher).is_empty());

        drop(client);
        assert_eq!(hung(&watcher), [7]);
        // Reported once, though the peer stays gone.
        assert!(hung(&watcher).is_empty());
        watcher.remove(&server, 7).unwrap();
        // Removing twice is harmless.
        watcher.remove(&server, 7).unwrap();
    }

    #[test]
    fn only_the_connection_that_left_is_reported() {
        let watcher = HangupWatcher::new().unwrap();
        let pairs: Vec<_> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
        for (id, (server, _)) in pairs.iter().enumerate() {
            watcher.add(server, id as u64 + 100).unwrap();
        }
        let mut pairs = pairs;
        let (_server, client) = pairs.remove(1);
        drop(client);
        assert_eq!(hung(&watcher), [101]);
        // The others stay open and quiet.
        assert!(hung(&watcher).is_empty());
        drop(pairs);
    }

    #[test]
    fn removed_connections_are_not_reported() {
        let watcher = HangupWatcher::new().unwrap();
        let (server, client) = UnixStream::pair().unwrap();
        watcher.add(&server, 1).unwrap();
        watcher.remove(&server, 1).unwrap();
        drop(client);
        assert!(hung(&watcher).is_empty());
    }

    #[test]
    fn adding_twice_is_an_error() {
        let watcher = HangupWatcher::new().unwrap();
        let (server, _client) = UnixStream::pair().unwrap();
        watcher.add(&server, 1).unwrap();
        assert!(watcher.add(&server, 2).is_err());
    }

    #[test]
    fn many_hangups_are_all_collected() {
        let watcher = HangupWatcher::new().unwrap();
        let mut servers = Vec::new();
        let count = BATCH as u64 * 2 + 5;
        for id in 0..count {
            let (server, client) = UnixStream::pair().unwrap();
            watcher.add(&server, id).unwrap();
            servers.push(server);
            drop(client);
        }
        let mut ids = hung(&watcher);
        ids.sort_unstable();
        assert_eq!(ids, (0..count).collect::<Vec<_>>());
    }

    #[test]
    fn epoll_fd_is_readable_when_a_hangup_is_pending() {
        use rustix::event::{PollFd, PollFlags, poll};
        let watcher = HangupWatcher::new().unwrap();
        let (server, client) = UnixStream::pair().unwrap();
        watcher.add(&server, 3).unwrap();
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        let readable = |w: &HangupWatcher| {
            let mut fds = [PollFd::new(w, PollFlags::IN)];
            poll(&mut fds, Some(&zero)).unwrap();
            fds[0].revents().contains(PollFlags::IN)
        };
        assert!(!readable(&watcher));
        drop(client);
        assert!(readable(&watcher));
        assert_eq!(hung(&watcher), [3]);
        assert!(!readable(&watcher));
    }
}
