//! inferd on smol: the [`Runtime`] implementation that drives the shared driver loop
//! with smol and async-io. Everything else (the daemon, the driver, the OS glue) lives
//! in `inferd-core`; this crate is the runtime glue, the `inferd` binary and its client.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use async_channel::Sender;
use futures_lite::AsyncWriteExt;
use inferd_core::daemon::ListenerKind;
use inferd_core::host::driver::{
    AcceptCtx, AcceptGuard, BoxFuture, ConnTasks, Event, Runtime, WriteCmd, WriteOutcome,
    read_once, report_read, tcp_peer, unix_peer, write_or_close,
};
use inferd_core::host::hangup::HangupWatcher;
use smol::{Async, Executor};

pub mod client;

/// The smol runtime: every task of the daemon runs on one executor (one thread), so the
/// driver and the connection tasks wake each other without crossing threads.
#[derive(Clone)]
pub struct SmolRuntime {
    ex: Arc<Executor<'static>>,
}

impl SmolRuntime {
    /// A runtime spawning onto `ex`.
    pub fn new(ex: Arc<Executor<'static>>) -> Self {
        SmolRuntime { ex }
    }
}

/// Pause after a failed accept (out of descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

impl Runtime for SmolRuntime {
    fn sleep(&self, d: Duration) -> BoxFuture {
        Box::pin(async move {
            smol::Timer::after(d).await;
        })
    }

    fn listen_unix(
        &self,
        listener: UnixListener,
        kind: ListenerKind,
        ctx: AcceptCtx,
    ) -> io::Result<AcceptGuard> {
        let listener = Async::new(listener)?;
        let ex = self.ex.clone();
        let task = self.ex.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let peer = unix_peer(stream.as_fd());
                        let tasks = ctx.register(stream.as_fd(), kind, peer);
                        spawn_conn(&ex, stream, tasks);
                    }
                    Err(_) => {
                        smol::Timer::after(ACCEPT_BACKOFF).await;
                    }
                }
            }
        });
        Ok(Box::new(task))
    }

    fn listen_tcp(
        &self,
        listener: std::net::TcpListener,
        ctx: AcceptCtx,
    ) -> io::Result<AcceptGuard> {
        let listener = Async::new(listener)?;
        let ex = self.ex.clone();
        let task = self.ex.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, addr)) => {
                        let _ = stream.get_ref().set_nodelay(true);
                        let tasks = ctx.register(
                            stream.as_fd(),
                            ListenerKind::Inference,
                            tcp_peer(Some(addr)),
                        );
                        spawn_conn(&ex, stream, tasks);
                    }
                    Err(_) => {
                        smol::Timer::after(ACCEPT_BACKOFF).await;
                    }
                }
            }
        });
        Ok(Box::new(task))
    }

    fn watch_hangups(&self, watcher: Arc<HangupWatcher>, events: Sender<Event>) -> io::Result<()> {
        let fd = Async::new(watcher.clone())?;
        self.ex
            .spawn(async move {
                let mut ids = Vec::new();
                while fd.readable().await.is_ok() {
                    ids.clear();
                    if watcher.poll_hung_up(&mut ids).is_err() {
                        break;
                    }
                    for &id in &ids {
                        let conn = inferd_core::ConnId(id);
                        if events.send(Event::HungUp { conn }).await.is_err() {
                            return;
                        }
                    }
                }
            })
            .detach();
        Ok(())
    }
}

/// Starts a connection's reader and writer tasks.
fn spawn_conn<T>(ex: &Executor<'static>, stream: Async<T>, tasks: ConnTasks)
where
    T: AsFd + Send + Sync + 'static,
    for<'a> &'a T: Read + io::Write,
    for<'a> &'a Async<T>: futures_lite::AsyncWrite,
    T: Shutdown,
{
    let stream = Arc::new(stream);
    let tasks = Arc::new(tasks);
    let (r_stream, r_tasks) = (stream.clone(), tasks.clone());
    ex.spawn(async move {
        while r_tasks.reads.recv().await.is_ok() {
            // Wait for readiness before reading: right after a reply the client has not
            // sent its next request yet, and a speculative read would only say EAGAIN.
            let outcome = match r_stream.readable().await {
                // `read_with` retries on WouldBlock, which `read_once` reports as `None`.
                Ok(()) => {
                    r_stream
                        .read_with(|s| {
                            read_once(s).and_then(|got| got.ok_or(io::ErrorKind::WouldBlock.into()))
                        })
                        .await
                }
                Err(e) => Err(e),
            };
            if !report_read(&r_tasks, outcome) {
                break;
            }
        }
    })
    .detach();
    ex.spawn(async move {
        let conn = tasks.conn;
        while let Ok(cmd) = tasks.writes.recv().await {
            match cmd {
                WriteCmd::Bytes(bytes) => {
                    let mut w = &*stream;
                    let event = match write_or_close(w.write_all(&bytes), &tasks.writes).await {
                        WriteOutcome::Written => Event::Flushed { conn },
                        WriteOutcome::Failed => Event::HungUp { conn },
                        WriteOutcome::Closed => break,
                    };
                    let failed = matches!(event, Event::HungUp { .. });
                    if tasks.events.send(event).await.is_err() || failed {
                        break;
                    }
                }
                WriteCmd::Close => break,
            }
        }
        stream.get_ref().shutdown_both();
    })
    .detach();
}

/// Shuts a socket down in both directions, so its reader wakes and ends.
trait Shutdown {
    fn shutdown_both(&self);
}

impl Shutdown for std::os::unix::net::UnixStream {
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Shutdown for std::net::TcpStream {
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}
