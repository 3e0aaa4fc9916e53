//! Driving `inferd_core::Daemon` from your own event loop: a single-threaded mio poll
//! loop serving the inference protocol on a Unix socket with the mock engine.
//!
//! This is what the runtime shells do, written out by hand and without the shared
//! driver: feed socket readiness and engine events in with `Daemon::handle`, carry out
//! everything `Daemon::poll_output` asks for, and sleep until `Daemon::poll_timeout`.
//!
//! ```text
//! cargo run -p inferd-example-mio -- --socket /tmp/mio.sock [--exit-after-requests N]
//! printf '{"id":"1","messages":[{"role":"user","content":"hello"}]}\n' | nc -U /tmp/mio.sock
//! ```
//!
//! It exits when the daemon says so (`Output::Exit`), after draining once N requests were
//! served when `--exit-after-requests N` is given, or on SIGTERM/SIGINT (default action).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use inferd_core::engine::{CancelFlag, Engine, EngineEvent};
use inferd_core::{
    BackendId, ConnId, Daemon, DaemonConfig, GenId, Input, ListenerKind, Output, Peer, Time,
    Transport,
};
use inferd_engine_mock::{MockConfig, MockEngine};
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// Connection `ConnId(n)` is registered as `Token(n)`; ids start above the fixed tokens.
const FIRST_CONN: u64 = 2;

/// One accepted connection and what the core asked of it.
struct Conn {
    stream: UnixStream,
    /// Readiness was reported and no read has hit `WouldBlock` since (mio is
    /// edge-triggered, so this is remembered until the core hands out a read credit).
    readable: bool,
    /// The core asked for one read (`Output::Read`) that has not happened yet.
    credit: bool,
    /// The outstanding `Output::Send` and how much of it is written.
    out: Vec<u8>,
    written: usize,
}

/// What the loop owns besides the daemon.
struct Host {
    poll: Poll,
    socket: PathBuf,
    listener: Option<UnixListener>,
    conns: HashMap<ConnId, Conn>,
    next_conn: u64,
    engine: Arc<dyn Engine>,
    cancels: HashMap<GenId, CancelFlag>,
    engine_tx: Sender<(GenId, EngineEvent)>,
    waker: Arc<Waker>,
    origin: Instant,
}

impl Host {
    /// The core's clock: nanoseconds since the loop started.
    fn now(&self) -> Time {
        Time::from_nanos(u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    /// Carries out every output; returns the exit status once the daemon wants out.
    fn drain(&mut self, daemon: &mut Daemon) -> io::Result<Option<i32>> {
        while let Some(output) = daemon.poll_output() {
            match output {
                Output::Send { conn, bytes } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.out = bytes;
                        c.written = 0;
                        self.flush(daemon, conn);
                    }
                }
                Output::Read { conn } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.credit = true;
                        self.read(daemon, conn);
                    }
                }
                Output::Close { conn } => self.close(conn),
                Output::Start { generation, backend: _, request } => {
                    let cancel = CancelFlag::new();
                    self.cancels.insert(generation, cancel.clone());
                    let (engine, tx, waker) =
                        (self.engine.clone(), self.engine_tx.clone(), self.waker.clone());
                    // The engine blocks its thread; events come back through the channel,
                    // and the waker makes `poll` return to pick them up.
                    std::thread::spawn(move || {
                        let send = |event| {
                            let _ = tx.send((generation, event));
                            let _ = waker.wake();
                        };
                        let result = engine.generate(&request, &cancel, &mut |bytes| {
                            send(EngineEvent::Token(bytes.to_vec()))
                        });
                        send(match result {
                            Ok(done) => EngineEvent::Done(done),
                            Err(e) => EngineEvent::Failed(e),
                        });
                    });
                }
                Output::Cancel { generation } => {
                    if let Some(flag) = self.cancels.get(&generation) {
                        flag.cancel();
                    }
                }
                Output::Activity(line) => eprint!("{line}"),
                Output::BindInference => {
                    let mut listener = UnixListener::bind(&self.socket)?;
                    self.poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
                    self.listener = Some(listener);
                    eprintln!("mio_embed: serving on {}", self.socket.display());
                }
                Output::StopAccepting => {
                    if let Some(mut listener) = self.listener.take() {
                        let _ = self.poll.registry().deregister(&mut listener);
                        let _ = std::fs::remove_file(&self.socket);
                    }
                }
                Output::Exit { reason } if reason.is_orderly() => return Ok(Some(0)),
                Output::Exit { reason } => {
                    eprintln!("mio_embed: {reason}");
                    return Ok(Some(1));
                }
            }
        }
        Ok(None)
    }

    /// Reads once if the core granted a credit and the socket may have bytes.
    fn read(&mut self, daemon: &mut Daemon, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        if !(c.credit && c.readable) {
            return;
        }
        let mut buf = [0u8; 16 * 1024];
        let input = loop {
            match c.stream.read(&mut buf) {
                Ok(0) => break Input::ReadClosed { conn: id },
                Ok(n) => break Input::Received { conn: id, bytes: buf[..n].to_vec() },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Drained: wait for the next readiness edge, keeping the credit.
                    c.readable = false;
                    return;
                }
                Err(_) => break Input::HungUp { conn: id },
            }
        };
        c.credit = false;
        let gone = matches!(input, Input::HungUp { .. });
        let now = self.now();
        daemon.handle(now, input);
        if gone {
            self.close(id);
        }
    }

    /// Writes what is left of the outstanding `Send`; reports `Flushed` once all is out.
    fn flush(&mut self, daemon: &mut Daemon, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else { return };
        while c.written < c.out.len() {
            match c.stream.write(&c.out[c.written..]) {
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // EPIPE, ECONNRESET: the client is gone.
                    let now = self.now();
                    daemon.handle(now, Input::HungUp { conn: id });
                    self.close(id);
                    return;
                }
            }
        }
        if !c.out.is_empty() {
            c.out = Vec::new();
            let now = self.now();
            daemon.handle(now, Input::Flushed { conn: id });
        }
    }

    fn close(&mut self, id: ConnId) {
        if let Some(mut c) = self.conns.remove(&id) {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    fn accept(&mut self, daemon: &mut Daemon) -> io::Result<()> {
        let Some(listener) = &self.listener else { return Ok(()) };
        loop {
            let (mut stream, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let conn = ConnId(self.next_conn);
            self.next_conn += 1;
            register(self.poll.registry(), &mut stream, conn)?;
            self.conns.insert(
                conn,
                Conn { stream, readable: false, credit: false, out: Vec::new(), written: 0 },
            );
            let peer =
                Peer { transport: Transport::Unix, addr: "unix".into(), uid: None, pid: None };
            let now = self.now();
            daemon.handle(now, Input::Accepted { conn, listener: ListenerKind::Inference, peer });
        }
    }

    /// Readiness on a connection: remember readability, notice hang-ups, keep writing.
    fn ready(&mut self, daemon: &mut Daemon, event: &mio::event::Event) {
        let id = ConnId(event.token().0 as u64);
        let Some(c) = self.conns.get_mut(&id) else { return };
        if event.is_readable() {
            c.readable = true;
        }
        // HUP or ERR means the client is gone; IN+RDHUP alone is only a half-close,
        // which the next read reports as `ReadClosed`.
        if event.is_write_closed() || event.is_error() {
            let now = self.now();
            daemon.handle(now, Input::HungUp { conn: id });
            self.close(id);
            return;
        }
        if event.is_writable() {
            self.flush(daemon, id);
        }
        self.read(daemon, id);
    }
}

fn register(registry: &Registry, stream: &mut UnixStream, conn: ConnId) -> io::Result<()> {
    let token = Token(usize::try_from(conn.0).unwrap_or(usize::MAX));
    registry.register(stream, token, Interest::READABLE | Interest::WRITABLE)
}

fn main() -> ExitCode {
    let mut socket = None;
    let mut exit_after: Option<u64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--socket", Some(path)) => socket = Some(PathBuf::from(path)),
            ("--exit-after-requests", Some(n)) if n.parse::<u64>().is_ok() => {
                exit_after = n.parse().ok();
            }
            _ => socket = None,
        }
    }
    let Some(socket) = socket else {
        eprintln!("usage: mio_embed --socket PATH [--exit-after-requests N]");
        return ExitCode::from(2);
    };
    match run(socket, exit_after) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("mio_embed: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(socket: PathBuf, exit_after: Option<u64>) -> io::Result<i32> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (engine_tx, engine_rx): (_, Receiver<(GenId, EngineEvent)>) = mpsc::channel();
    let mut host = Host {
        poll,
        socket,
        listener: None,
        conns: HashMap::new(),
        next_conn: FIRST_CONN,
        engine: Arc::new(MockEngine::new(MockConfig::default())),
        cancels: HashMap::new(),
        engine_tx,
        waker,
        origin: Instant::now(),
    };
    let config = DaemonConfig { backends: vec!["mock".into()], ..DaemonConfig::default() };
    let wall_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut daemon = Daemon::new(config, host.now(), wall_ms);

    // Load the backend before the loop (the mock is instant; a real model would load on a
    // thread and report through the channel like a generation does).
    let mut phases = Vec::new();
    let loaded = host.engine.load(&mut |phase| phases.push(phase));
    for phase in phases {
        daemon.handle(host.now(), Input::BackendPhase { backend: BackendId(0), phase });
    }
    match loaded {
        Ok(capabilities) => {
            daemon.handle(host.now(), Input::BackendLoaded { backend: BackendId(0), capabilities })
        }
        Err(error) => {
            daemon.handle(host.now(), Input::BackendFailed { backend: BackendId(0), error })
        }
    }

    let mut events = Events::with_capacity(256);
    let mut draining = false;
    let code = loop {
        if let Some(code) = host.drain(&mut daemon)? {
            break code;
        }
        if !draining && exit_after.is_some_and(|n| daemon.stats().served >= n) {
            draining = true;
            daemon.handle(host.now(), Input::Shutdown);
            continue;
        }
        let timeout = daemon.poll_timeout().map(|t| t.saturating_since(host.now()));
        if let Err(e) = host.poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in events.iter() {
            match event.token() {
                LISTENER => host.accept(&mut daemon)?,
                WAKER => {
                    while let Ok((generation, event)) = engine_rx.try_recv() {
                        if !matches!(event, EngineEvent::Token(_)) {
                            host.cancels.remove(&generation);
                        }
                        daemon.handle(host.now(), Input::Engine { generation, event });
                    }
                }
                _ => host.ready(&mut daemon, event),
            }
        }
        let now = host.now();
        if daemon.poll_timeout().is_some_and(|t| t <= now) {
            daemon.handle(now, Input::Timeout);
        }
    };
    // Leaving: stop what still runs and tidy the socket file.
    for flag in host.cancels.values() {
        flag.cancel();
    }
    if host.listener.take().is_some() {
        let _ = std::fs::remove_file(&host.socket);
    }
    Ok(code)
}
