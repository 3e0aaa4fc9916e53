//! inferd on tokio: the [`Runtime`] implementation that drives the shared driver loop
//! with tokio, and an API to run the daemon inside a program that already runs tokio.
//!
//! Everything else (the daemon, the driver, the OS glue) lives in `inferd-core`; the
//! command line and the start-up steps live in `inferd-serve`. See [`EmbedConfig`] to
//! start a daemon with your own engines, [`serve`] to run `inferd-tokio serve` as a call.
//!
//! The driver future is `Send`, so it runs on a multi-thread runtime as well as on a
//! current-thread one; the `inferd-tokio` binary uses a current-thread runtime, like the
//! smol shell's single executor (engines run on threads of their own either way).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_channel::Sender;
use inferd_core::daemon::ListenerKind;
use inferd_core::host::driver::{
    AcceptCtx, AcceptGuard, BoxFuture, ConnTasks, Event, Runtime, WriteCmd, WriteOutcome,
    read_once, report_read, tcp_peer, unix_peer, write_or_close,
};
use inferd_core::host::hangup::HangupWatcher;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::runtime::Handle;
use tokio::task::{AbortHandle, JoinHandle};

mod embed;

pub use embed::{
    EmbedConfig, Embedded, SignalGuard, serve, shutdown_on_signals, start, start_prepared,
};
pub use inferd_core::host::driver::{DriverHandle, ServeSetup};
pub use inferd_serve::{Paths, Prepared, ServeArgs, StartError};

/// The tokio runtime: tasks go to the runtime behind a [`Handle`].
///
/// Background tasks that have no guard of their own (the hang-up watcher) stop when the
/// last clone of this value is dropped, which the driver does when it returns.
#[derive(Clone, Debug)]
pub struct TokioRuntime {
    handle: Handle,
    background: Arc<Background>,
}

#[derive(Debug, Default)]
struct Background(Mutex<Vec<AbortHandle>>);

impl Drop for Background {
    fn drop(&mut self) {
        let tasks = self.0.get_mut().unwrap_or_else(PoisonError::into_inner);
        tasks.iter().for_each(AbortHandle::abort);
    }
}

impl TokioRuntime {
    /// A runtime spawning onto `handle`.
    pub fn new(handle: Handle) -> Self {
        TokioRuntime { handle, background: Arc::default() }
    }

    /// A runtime spawning onto the tokio runtime this is called from.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn current() -> Self {
        Self::new(Handle::current())
    }
}

/// Keeps a task alive; dropping it aborts the task (an accept loop, the signal handler).
#[derive(Debug)]
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Pause after a failed accept (out of descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

impl Runtime for TokioRuntime {
    fn sleep(&self, d: Duration) -> BoxFuture {
        // A tokio timer binds to the runtime it is created in.
        let _in = self.handle.enter();
        Box::pin(tokio::time::sleep(d))
    }

    fn listen_unix(
        &self,
        listener: UnixListener,
        kind: ListenerKind,
        ctx: AcceptCtx,
    ) -> io::Result<AcceptGuard> {
        listener.set_nonblocking(true)?;
        let _in = self.handle.enter();
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let task = self.handle.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let tasks = ctx.register(stream.as_fd(), kind, unix_peer(stream.as_fd()));
                        let (read, write) = stream.into_split();
                        spawn_conn(read, write, tasks);
                    }
                    Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
                }
            }
        });
        Ok(Box::new(AbortOnDrop(task)))
    }

    fn listen_tcp(
        &self,
        listener: std::net::TcpListener,
        ctx: AcceptCtx,
    ) -> io::Result<AcceptGuard> {
        listener.set_nonblocking(true)?;
        let _in = self.handle.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let task = self.handle.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, addr)) => {
                        let _ = stream.set_nodelay(true);
                        let peer = tcp_peer(Some(addr));
                        let tasks = ctx.register(stream.as_fd(), ListenerKind::Inference, peer);
                        let (read, write) = stream.into_split();
                        spawn_conn(read, write, tasks);
                    }
                    Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
                }
            }
        });
        Ok(Box::new(AbortOnDrop(task)))
    }

    fn watch_hangups(&self, watcher: Arc<HangupWatcher>, events: Sender<Event>) -> io::Result<()> {
        let _in = self.handle.enter();
        // tokio 1.54 deprecates the safe constructors in favour of the `unsafe`
        // `AsyncFd::register_with_interest`, whose contract is that the descriptor stays
        // open and the same while registered. `WatcherFd` guarantees that (it owns the
        // epoll fd through the Arc and never swaps it), and this crate forbids `unsafe`;
        // AsyncFd handles a plain epoll fd fine.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(WatcherFd(watcher), Interest::READABLE)?;
        let task = self.handle.spawn(async move {
            let mut ids = Vec::new();
            while let Ok(mut guard) = fd.readable().await {
                // Clear before draining: a hang-up that lands after the drain makes a new
                // edge, so none is lost.
                guard.clear_ready();
                ids.clear();
                if fd.get_ref().0.poll_hung_up(&mut ids).is_err() {
                    break;
                }
                for &id in &ids {
                    let conn = inferd_core::ConnId(id);
                    if events.send(Event::HungUp { conn }).await.is_err() {
                        return;
                    }
                }
            }
        });
        let mut tasks = self.background.0.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.push(task.abort_handle());
        Ok(())
    }
}

/// The hang-up watcher's epoll descriptor, as AsyncFd wants it.
struct WatcherFd(Arc<HangupWatcher>);

impl AsRawFd for WatcherFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The read half of a connection: readiness, then a non-blocking read.
trait ReadHalf: Send + Sync + 'static {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
}

macro_rules! read_half {
    ($($t:ty),*) => {$(
        impl ReadHalf for $t {
            fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$t>::readable(self)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
        }
    )*};
}
read_half!(tokio::net::unix::OwnedReadHalf, tokio::net::tcp::OwnedReadHalf);

/// `try_read` as `std::io::Read`, for the shared [`read_once`].
struct TryRead<'a, R>(&'a R);

impl<R: ReadHalf> io::Read for TryRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// Starts a connection's reader and writer tasks.
fn spawn_conn<R, W, S>(read: R, write: W, tasks: ConnTasks)
where
    R: ReadHalf,
    W: AsyncWrite + AsRef<S> + Unpin + Send + 'static,
    S: AsFd,
{
    let tasks = Arc::new(tasks);
    let r_tasks = tasks.clone();
    tokio::spawn(async move {
        while r_tasks.reads.recv().await.is_ok() {
            // One read per credit. The 16 KiB buffer lives in `read_once`'s frame only,
            // so a connection waiting here holds none.
            let outcome = loop {
                if let Err(e) = read.readable().await {
                    break Err(e);
                }
                match read_once(TryRead(&read)) {
                    Ok(Some(bytes)) => break Ok(bytes),
                    Ok(None) => continue,
                    Err(e) => break Err(e),
                }
            };
            if !report_read(&r_tasks, outcome) {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let conn = tasks.conn;
        let mut write = write;
        while let Ok(cmd) = tasks.writes.recv().await {
            match cmd {
                WriteCmd::Bytes(bytes) => {
                    let event = match write_or_close(write.write_all(&bytes), &tasks.writes).await {
                        WriteOutcome::Written => Event::Flushed { conn },
                        WriteOutcome::Failed => Event::HungUp { conn },
                        WriteOutcome::Closed => break,
                    };
                    let ok = matches!(event, Event::Flushed { .. });
                    if tasks.events.send(event).await.is_err() || !ok {
                        break;
                    }
                }
                WriteCmd::Close => break,
            }
        }
        // Both directions, so the client sees the end and our reader wakes and ends.
        let _ = rustix::net::shutdown(write.as_ref(), rustix::net::Shutdown::Both);
    });
}
