//! The daemon's sockets (listeners and connections) in one edge-triggered epoll set,
//! read and written by the driver itself without a task per connection.
//!
//! A task per connection costs two task wake-ups, two channel hops and a readiness
//! re-arm for every request. Here the driver asks the kernel once which sockets are ready
//! ([`Conns::poll`]), and reads or writes them right away when the core asks
//! ([`Conns::read`], [`Conns::send`]); a runtime only has to wake the driver when the
//! epoll descriptor ([`Conns::fd`]) becomes readable.
//!
//! Connections are registered edge-triggered for input, output and read hang-up, so a
//! connection costs nothing between edges: what an edge said is remembered (`readable`)
//! until a read proves it stale. Hang-up detection falls out of the same set: the kernel
//! reports HUP only when the peer is fully gone, never for a half-close (a client that
//! shut its write side and waits for the reply), so HUP is reported to the core as a
//! hang-up even while the core is not reading that connection (a queued request).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use rustix::event::epoll::{self, CreateFlags, EventData, EventFlags};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};

use inferd_core::{ConnId, Input, ListenerKind, Peer, Time, Transport};

/// Readiness events taken from the kernel per `epoll_wait`.
const EPOLL_BATCH: usize = 256;

/// The most bytes read in one go; a request line is rarely bigger.
const READ_CHUNK: usize = 16 * 1024;

/// Connections accepted from one listener per [`Conns::poll`]; the listener is
/// level-triggered, so the rest are picked up at the next poll.
const ACCEPTS_PER_POLL: usize = 64;

/// How long a listener rests after an accept error other than "try again" (out of
/// descriptors, typically), so the loop does not spin on a listener it cannot serve.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Listener tokens have the top bit set; connection tokens are connection ids.
const LISTENER_TAG: u64 = 1 << 63;

/// A listening socket and what it is for.
#[derive(Debug)]
enum Listener {
    Unix(UnixListener, ListenerKind),
    Tcp(TcpListener, ListenerKind),
}

impl Listener {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listener::Unix(l, _) => l.as_fd(),
            Listener::Tcp(l, _) => l.as_fd(),
        }
    }

    /// Accepts one connection: a non-blocking descriptor, its listener kind and peer.
    fn accept(&self) -> io::Result<(OwnedFd, ListenerKind, Peer)> {
        match self {
            Listener::Unix(l, kind) => {
                let (stream, _) = l.accept()?;
                stream.set_nonblocking(true)?;
                let peer = unix_peer(stream.as_fd());
                Ok((stream.into(), *kind, peer))
            }
            Listener::Tcp(l, kind) => {
                let (stream, addr) = l.accept()?;
                stream.set_nonblocking(true)?;
                // Frames are whole lines written at once; Nagle would only delay them.
                let _ = stream.set_nodelay(true);
                let peer = Peer {
                    transport: Transport::Tcp,
                    addr: addr.to_string(),
                    uid: None,
                    pid: None,
                };
                Ok((stream.into(), *kind, peer))
            }
        }
    }
}

/// Whether an accept failed because this process or the system has no descriptor left.
fn is_out_of_descriptors(e: &io::Error) -> bool {
    let code = e.raw_os_error();
    code == Some(Errno::MFILE.raw_os_error()) || code == Some(Errno::NFILE.raw_os_error())
}

/// A descriptor to hold in reserve (see `Conns::spare`); `None` if none can be had.
fn open_spare() -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()
}

/// The peer of a Unix connection, from SO_PEERCRED.
fn unix_peer(fd: std::os::fd::BorrowedFd<'_>) -> Peer {
    let creds = crate::peer::peer_credentials(fd);
    Peer {
        transport: Transport::Unix,
        addr: "unix".into(),
        uid: creds.map(|c| c.0),
        pid: creds.map(|c| c.1),
    }
}

/// One accepted connection and what the core asked of it.
#[derive(Debug)]
struct Conn {
    fd: OwnedFd,
    /// An edge said there is input, and no read has shown otherwise since.
    readable: bool,
    /// The peer shut its write side: the end of input is waiting to be read, and no
    /// further edge will announce it.
    read_hup: bool,
    /// The core asked for one read (`Output::Read`) that has not happened yet.
    credit: bool,
    /// The hang-up was reported to the core; it is reported once.
    hup_reported: bool,
    /// The peer's end of input counts as a hang-up when the core is not reading (HTTP:
    /// clients do not half-close, and a closed TCP peer shows only as end of input
    /// until a write fails, so a queued or prefilling request would go on unnoticed).
    eof_is_hangup: bool,
    /// Bytes of the outstanding `Output::Send` not yet written, from `written` on.
    out: Vec<u8>,
    written: usize,
}

/// Every socket of the daemon in one epoll set; see the module documentation.
pub struct Conns {
    epoll: OwnedFd,
    listeners: Vec<Option<Listener>>,
    /// Listeners resting after an accept error, and until when.
    resting: Vec<(usize, Time)>,
    conns: HashMap<ConnId, Conn>,
    next_conn: u64,
    /// A descriptor held in reserve: when accept fails for want of descriptors, it is
    /// given up for a moment to accept the waiting client and close it at once, so that
    /// clients are refused instead of hanging in the backlog.
    spare: Option<OwnedFd>,
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conns")
            .field("listeners", &self.listeners.iter().flatten().count())
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Conns {
    /// An empty set (a close-on-exec epoll instance).
    pub fn new() -> io::Result<Conns> {
        Ok(Conns {
            epoll: epoll::create(CreateFlags::CLOEXEC)?,
            listeners: Vec::new(),
            resting: Vec::new(),
            conns: HashMap::new(),
            next_conn: 1,
            spare: open_spare(),
        })
    }

    /// A descriptor for the set's epoll instance, for the runtime to await: it is
    /// readable whenever [`Conns::poll`] has something to report.
    pub fn fd(&self) -> io::Result<OwnedFd> {
        Ok(rustix::io::fcntl_dupfd_cloexec(&self.epoll, 0)?)
    }

    /// Starts accepting on a Unix listener.
    pub fn listen_unix(&mut self, listener: UnixListener, kind: ListenerKind) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        self.add_listener(Listener::Unix(listener, kind))
    }

    /// Starts accepting inference connections on a loopback TCP listener.
    pub fn listen_tcp(&mut self, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        self.add_listener(Listener::Tcp(listener, ListenerKind::Inference))
    }

    /// Starts accepting HTTP connections on a loopback TCP listener.
    pub fn listen_http(&mut self, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        self.add_listener(Listener::Tcp(listener, ListenerKind::Http))
    }

    fn add_listener(&mut self, listener: Listener) -> io::Result<()> {
        let token = LISTENER_TAG | self.listeners.len() as u64;
        // Level-triggered: a backlog left after ACCEPTS_PER_POLL is reported again.
        epoll::add(&self.epoll, listener.fd(), EventData::new_u64(token), EventFlags::IN)?;
        self.listeners.push(Some(listener));
        Ok(())
    }

    /// Stops accepting: closes every listener. Accepted connections stay.
    pub fn stop_listening(&mut self) {
        // Closing a descriptor removes it from the epoll set.
        self.listeners.iter_mut().for_each(|l| *l = None);
        self.resting.clear();
    }

    /// When a resting listener should be tried again, if one is resting.
    pub fn next_retry(&self) -> Option<Time> {
        self.resting.iter().map(|&(_, t)| t).min()
    }

    /// Takes what the kernel reports without blocking: accepts new connections, reads
    /// connections that have a read credit, continues pending writes, notices hang-ups.
    /// What happened is appended to `out`. Returns true when the set was drained (the
    /// epoll descriptor is no longer readable unless something new happened since).
    pub fn poll(&mut self, now: Time, out: &mut VecDeque<Input>) -> io::Result<bool> {
        self.wake_rested(now);
        // On the stack: rustix's event holds a pointer variant, which would make the set
        // (and the driver future holding it) not `Send`.
        let mut buf = [const { MaybeUninit::<epoll::Event>::uninit() }; EPOLL_BATCH];
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        let events = loop {
            match epoll::wait(&self.epoll, &mut buf[..], Some(&zero)) {
                Ok((events, _)) => break events,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let drained = events.len() < EPOLL_BATCH;
        for ev in events.iter() {
            let token = ev.data.u64();
            if token & LISTENER_TAG != 0 {
                let index = usize::try_from(token & !LISTENER_TAG).unwrap_or(usize::MAX);
                self.accept_from(index, now, out);
            } else {
                self.on_ready(ConnId(token), ev.flags, out);
            }
        }
        Ok(drained)
    }

    /// Re-arms listeners whose rest is over.
    fn wake_rested(&mut self, now: Time) {
        let mut i = 0;
        while i < self.resting.len() {
            let (index, until) = self.resting[i];
            if until > now {
                i += 1;
                continue;
            }
            self.resting.swap_remove(i);
            if let Some(Some(l)) = self.listeners.get(index) {
                let token = LISTENER_TAG | index as u64;
                if epoll::modify(&self.epoll, l.fd(), EventData::new_u64(token), EventFlags::IN)
                    .is_err()
                {
                    // Not re-armed: rest again rather than stop accepting for good.
                    self.resting.push((index, now + ACCEPT_BACKOFF));
                }
            }
        }
    }

    fn accept_from(&mut self, index: usize, now: Time, out: &mut VecDeque<Input>) {
        for _ in 0..ACCEPTS_PER_POLL {
            let Some(Some(listener)) = self.listeners.get(index) else { return };
            match listener.accept() {
                Ok((fd, listener, peer)) => {
                    let conn = ConnId(self.next_conn);
                    self.next_conn += 1;
                    let flags =
                        EventFlags::IN | EventFlags::OUT | EventFlags::RDHUP | EventFlags::ET;
                    if epoll::add(&self.epoll, &fd, EventData::new_u64(conn.0), flags).is_err() {
                        // Not watchable means not servable; closing it is all we can do.
                        continue;
                    }
                    self.conns.insert(
                        conn,
                        Conn {
                            fd,
                            readable: false,
                            read_hup: false,
                            credit: false,
                            hup_reported: false,
                            eof_is_hangup: listener == ListenerKind::Http,
                            out: Vec::new(),
                            written: 0,
                        },
                    );
                    out.push_back(Input::Accepted { conn, listener, peer });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // The client left before we accepted it, or a signal came: next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if is_out_of_descriptors(&e) && self.spare.is_some() => {
                    // Refuse the client with the reserve descriptor rather than leave it
                    // waiting; then take the reserve back (should that fail, the next
                    // shortage rests the listener instead).
                    self.spare = None;
                    // Closed before the reserve is taken back: it uses the same slot.
                    let refused = listener.accept().map(drop);
                    self.spare = open_spare();
                    if refused.is_err() {
                        self.rest(index, now);
                        return;
                    }
                }
                Err(_) => {
                    // Out of descriptors (with no reserve) or memory: rest the listener
                    // rather than spin on a level-triggered backlog we cannot take.
                    self.rest(index, now);
                    return;
                }
            }
        }
    }

    /// Stops watching listener `index` until `ACCEPT_BACKOFF` from `now`.
    fn rest(&mut self, index: usize, now: Time) {
        if let Some(Some(listener)) = self.listeners.get(index) {
            let _ = epoll::modify(
                &self.epoll,
                listener.fd(),
                EventData::new_u64(LISTENER_TAG | index as u64),
                EventFlags::empty(),
            );
            self.resting.push((index, now + ACCEPT_BACKOFF));
        }
    }

    fn on_ready(&mut self, conn: ConnId, flags: EventFlags, out: &mut VecDeque<Input>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if flags.intersects(EventFlags::IN | EventFlags::RDHUP) {
            c.readable = true;
        }
        if flags.contains(EventFlags::RDHUP) {
            c.read_hup = true;
        }
        if flags.intersects(EventFlags::HUP | EventFlags::ERR)
            || (c.read_hup && c.eof_is_hangup && !c.credit)
        {
            c.report_hangup(conn, out);
            return;
        }
        if flags.contains(EventFlags::OUT) && c.written < c.out.len() {
            c.flush(conn, out);
        }
        c.try_read(conn, out);
    }

    /// Gives `conn` a read credit and reads at once if input is known to be waiting;
    /// otherwise the read happens at the next input edge. The bytes (or the end of
    /// input, or the hang-up) are appended to `out`.
    pub fn read(&mut self, conn: ConnId, out: &mut VecDeque<Input>) {
        match self.conns.get_mut(&conn) {
            Some(c) => {
                c.credit = true;
                c.try_read(conn, out);
            }
            None => out.push_back(Input::HungUp { conn }),
        }
    }

    /// Writes `bytes` to `conn` now, as far as the socket takes them; the rest goes out
    /// at the next output edges. `Flushed` (or the hang-up) is appended to `out` once
    /// everything is written.
    pub fn send(&mut self, conn: ConnId, bytes: Vec<u8>, out: &mut VecDeque<Input>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            out.push_back(Input::HungUp { conn });
            return;
        };
        if c.written == c.out.len() {
            c.out = bytes;
            c.written = 0;
        } else {
            // The core sends once per flush; should it not, nothing is lost or reordered.
            c.out.extend_from_slice(&bytes);
        }
        c.flush(conn, out);
    }

    /// Closes `conn`, after one last attempt to write what is pending (a final error
    /// frame). Closing an unknown connection is fine.
    pub fn close(&mut self, conn: ConnId) {
        if let Some(mut c) = self.conns.remove(&conn)
            && c.written < c.out.len()
        {
            let _ = c.write_some();
        }
        // Dropping the descriptor closes the socket and removes it from the epoll set.
    }

    /// Closes every connection.
    pub fn close_all(&mut self) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.close(id);
        }
    }
}

impl Conn {
    fn report_hangup(&mut self, conn: ConnId, out: &mut VecDeque<Input>) {
        if !self.hup_reported {
            self.hup_reported = true;
            self.credit = false;
            out.push_back(Input::HungUp { conn });
        }
    }

    fn try_read(&mut self, conn: ConnId, out: &mut VecDeque<Input>) {
        if !self.credit || !self.readable || self.hup_reported {
            return;
        }
        // The buffer lives on this stack frame only, so an idle connection holds none;
        // left uninitialised, since zeroing 16 KiB per request shows in profiles.
        let mut buf = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let got = loop {
            match rustix::net::recv(&self.fd, &mut buf[..], RecvFlags::DONTWAIT) {
                Err(Errno::INTR) => continue,
                Ok(((bytes, _), _)) => break Ok(bytes.to_vec()),
                Err(e) => break Err(e),
            }
        };
        match got {
            Ok(bytes) if bytes.is_empty() => {
                self.credit = false;
                out.push_back(Input::ReadClosed { conn });
            }
            Ok(bytes) => {
                self.credit = false;
                // A short read took everything queued; more input makes a new edge. A
                // pending end of input makes none, so it is read next time.
                if bytes.len() < READ_CHUNK && !self.read_hup {
                    self.readable = false;
                }
                out.push_back(Input::Received { conn, bytes });
            }
            Err(Errno::AGAIN) => self.readable = false,
            Err(_) => self.report_hangup(conn, out),
        }
    }

    /// Writes until done or the socket is full; `Err` when the peer is gone.
    fn write_some(&mut self) -> Result<(), Errno> {
        while self.written < self.out.len() {
            // NOSIGNAL: a peer that left must not kill a host that kept SIGPIPE's default.
            match rustix::net::send(
                &self.fd,
                &self.out[self.written..],
                SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
            ) {
                Ok(n) => self.written += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn flush(&mut self, conn: ConnId, out: &mut VecDeque<Input>) {
        if self.hup_reported {
            return;
        }
        match self.write_some() {
            Ok(()) if self.written == self.out.len() => {
                self.out = Vec::new();
                self.written = 0;
                out.push_back(Input::Flushed { conn });
            }
            Ok(()) => {}
            Err(_) => self.report_hangup(conn, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;

    /// A set listening on a fresh socket, and the socket's path.
    fn listening(dir: &TempDir) -> (Conns, std::path::PathBuf) {
        let path = dir.join("s.sock");
        let mut set = Conns::new().unwrap();
        set.listen_unix(UnixListener::bind(&path).unwrap(), ListenerKind::Inference).unwrap();
        (set, path)
    }

    fn poll(set: &mut Conns) -> Vec<Input> {
        let mut out = VecDeque::new();
        assert!(set.poll(Time::ZERO, &mut out).unwrap(), "small sets drain in one poll");
        out.into()
    }

    /// Connects a client and returns it with the id the set gave it.
    fn connect(set: &mut Conns, path: &std::path::Path) -> (UnixStream, ConnId) {
        let client = UnixStream::connect(path).unwrap();
        let events = poll(set);
        match events.as_slice() {
            [Input::Accepted { conn, listener: ListenerKind::Inference, peer }] => {
                assert_eq!(peer.uid, Some(rustix::process::getuid().as_raw()));
                (client, *conn)
            }
            other => panic!("expected one Accepted, got {other:?}"),
        }
    }

    fn read_now(set: &mut Conns, conn: ConnId) -> Vec<Input> {
        let mut out = VecDeque::new();
        set.read(conn, &mut out);
        out.into()
    }

    fn received(events: &[Input]) -> Vec<u8> {
        match events {
            [Input::Received { bytes, .. }] => bytes.clone(),
            other => panic!("expected one Received, got {other:?}"),
        }
    }

    #[test]
    fn reads_only_with_a_credit_and_then_at_the_next_edge() {
        let dir = TempDir::new("conns-read");
        let (mut set, path) = listening(&dir);
        let (mut client, conn) = connect(&mut set, &path);
        // Input without a credit stays in the socket.
        client.write_all(b"one\n").unwrap();
        assert!(poll(&mut set).is_empty());
        assert_eq!(received(&read_now(&mut set, conn)), b"one\n");
        // A credit with nothing waiting reads nothing now (no edge since the short
        // read), and the bytes come with the next edge.
        assert!(read_now(&mut set, conn).is_empty());
        client.write_all(b"two\n").unwrap();
        assert_eq!(received(&poll(&mut set)), b"two\n");
        // One read per credit: more input waits for the next credit.
        client.write_all(b"three\n").unwrap();
        assert!(poll(&mut set).is_empty());
        assert_eq!(received(&read_now(&mut set, conn)), b"three\n");
    }

    #[test]
    fn half_close_gives_the_data_then_the_end_and_no_hang_up() {
        let dir = TempDir::new("conns-half");
        let (mut set, path) = listening(&dir);
        let (mut client, conn) = connect(&mut set, &path);
        client.write_all(b"{\"messages\":[]}\n").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        // Both arrived before the set looked; the end must still be read after the data.
        assert!(poll(&mut set).is_empty());
        assert_eq!(received(&read_now(&mut set, conn)), b"{\"messages\":[]}\n");
        assert!(matches!(read_now(&mut set, conn).as_slice(), [Input::ReadClosed { .. }]));
        // The reply still goes out.
        let mut out = VecDeque::new();
        set.send(conn, b"reply\n".to_vec(), &mut out);
        assert!(matches!(out.pop_front(), Some(Input::Flushed { conn: c }) if c == conn));
        let mut got = [0u8; 6];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"reply\n");
        // Then the client goes: reported once, as a hang-up.
        drop(client);
        assert!(matches!(poll(&mut set).as_slice(), [Input::HungUp { conn: c }] if *c == conn));
        assert!(poll(&mut set).is_empty());
    }

    #[test]
    fn a_client_leaving_while_not_read_is_noticed() {
        let dir = TempDir::new("conns-hup");
        let (mut set, path) = listening(&dir);
        let (a, _) = connect(&mut set, &path);
        let (b, b_id) = connect(&mut set, &path);
        let (c, _) = connect(&mut set, &path);
        // A queued request: written, never read, then the client leaves.
        (&b).write_all(b"queued\n").unwrap();
        drop(b);
        assert!(matches!(poll(&mut set).as_slice(), [Input::HungUp { conn }] if *conn == b_id));
        // The others stay quiet; a credit for the gone one reads nothing.
        assert!(poll(&mut set).is_empty());
        assert!(read_now(&mut set, b_id).is_empty());
        set.close(b_id);
        assert_eq!(set.conns.len(), 2);
        drop((a, c));
    }

    #[test]
    fn a_full_socket_flushes_later_and_close_gives_up() {
        let dir = TempDir::new("conns-full");
        let (mut set, path) = listening(&dir);
        let (mut client, conn) = connect(&mut set, &path);
        // More than any socket buffer: the write stops part-way.
        let big = vec![b'x'; 8 << 20];
        let mut out = VecDeque::new();
        set.send(conn, big.clone(), &mut out);
        assert!(out.is_empty(), "flushed without the client reading");
        assert!(poll(&mut set).is_empty());
        // The client reads it all; the set finishes the write at the output edges.
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 8 << 20];
            client.read_exact(&mut got).unwrap();
            (client, got)
        });
        let mut flushed = false;
        for _ in 0..100_000 {
            if poll(&mut set).iter().any(|e| matches!(e, Input::Flushed { conn: c } if *c == conn))
            {
                flushed = true;
                break;
            }
            std::thread::yield_now();
        }
        let (client, got) = reader.join().unwrap();
        assert!(flushed);
        assert!(got == big);
        // A second big write to a client that stops reading: close does not wait for it.
        set.send(conn, big, &mut out);
        assert!(out.is_empty());
        set.close(conn);
        assert!(set.conns.is_empty());
        drop(client);
    }

    #[test]
    fn close_writes_a_last_frame_that_fits() {
        let dir = TempDir::new("conns-close");
        let (mut set, path) = listening(&dir);
        let (mut client, conn) = connect(&mut set, &path);
        let mut out = VecDeque::new();
        set.send(conn, b"bye\n".to_vec(), &mut out);
        set.close(conn);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye\n");
        // Unknown connections: sends and reads report a hang-up, closing is harmless.
        let mut out = VecDeque::new();
        set.send(conn, b"late\n".to_vec(), &mut out);
        set.read(conn, &mut out);
        assert!(out.iter().all(|e| matches!(e, Input::HungUp { conn: c } if *c == conn)));
        assert_eq!(out.len(), 2);
        set.close(conn);
    }

    #[test]
    fn descriptor_is_readable_while_something_is_pending() {
        use rustix::event::{PollFd, PollFlags, poll as poll_fds};
        let dir = TempDir::new("conns-fd");
        let (mut set, path) = listening(&dir);
        let fd = set.fd().unwrap();
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        let readable = || {
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            poll_fds(&mut fds, Some(&zero)).unwrap();
            fds[0].revents().contains(PollFlags::IN)
        };
        assert!(!readable());
        let (client, _) = {
            let c = UnixStream::connect(&path).unwrap();
            assert!(readable());
            let events = poll(&mut set);
            assert_eq!(events.len(), 1);
            (c, ())
        };
        drop(client);
        assert!(readable());
        poll(&mut set);
        assert!(!readable());
    }

    #[test]
    fn many_connections_are_accepted_over_several_polls() {
        let dir = TempDir::new("conns-many");
        let (mut set, path) = listening(&dir);
        let count = ACCEPTS_PER_POLL * 2 + 3;
        let clients: Vec<_> = (0..count).map(|_| UnixStream::connect(&path).unwrap()).collect();
        let mut accepted = 0;
        let mut polls = 0;
        while accepted < count {
            let events = poll(&mut set);
            assert!(events.len() <= ACCEPTS_PER_POLL);
            accepted += events.len();
            polls += 1;
            assert!(polls <= 10, "accepted {accepted} of {count}");
        }
        assert_eq!(set.conns.len(), count);
        assert!(polls >= 3);
        set.stop_listening();
        // The listener is closed: its socket file refuses connections.
        assert!(UnixStream::connect(&path).is_err());
        set.close_all();
        assert!(set.conns.is_empty());
        drop(clients);
    }
}
