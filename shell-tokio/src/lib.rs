//! inferd on tokio: the [`Runtime`] implementation that drives the shared driver loop
//! with tokio, and an API to run the daemon inside a program that already runs tokio.
//!
//! Everything else lives in `inferd-core` (the daemon) and `inferd-host` (the driver, the
//! OS glue); the command line and the start-up steps live in `inferd-serve`. See [`EmbedConfig`] to
//! start a daemon with your own engines, [`serve`] to run `inferd-tokio serve` as a call.
//!
//! The driver future is `Send`, so it runs on a multi-thread runtime as well as on a
//! current-thread one; the `inferd-tokio` binary uses a current-thread runtime, like the
//! smol shell's single executor (engines run on threads of their own either way).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::time::Duration;

use inferd_host::driver::{BorrowedFuture, Readiness, Runtime, Timer};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

mod embed;

pub use embed::{
    EmbedConfig, Embedded, SignalGuard, serve, shutdown_on_signals, start, start_prepared,
};
pub use inferd_host::driver::{DriverHandle, ServeError, ServeSetup};
pub use inferd_serve::{Paths, Prepared, ServeArgs, StartError, StartErrorKind};

/// The tokio runtime: timers and the driver's epoll descriptor are registered with the
/// runtime behind a [`Handle`].
#[derive(Clone, Debug)]
pub struct TokioRuntime {
    handle: Handle,
}

impl TokioRuntime {
    /// A runtime using `handle`.
    pub fn new(handle: Handle) -> Self {
        TokioRuntime { handle }
    }

    /// A runtime using the tokio runtime this is called from.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn current() -> Self {
        Self::new(Handle::current())
    }
}

/// Keeps a task alive; dropping it aborts the task (the signal handler).
#[derive(Debug)]
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Runtime for TokioRuntime {
    fn timer(&self) -> Box<dyn Timer> {
        // A tokio timer binds to the runtime it is created in. Not armed until reset;
        // the driver never waits on it before.
        let _in = self.handle.enter();
        Box::new(TokioTimer(Box::pin(tokio::time::sleep(Duration::ZERO))))
    }

    fn readiness(&self, fd: OwnedFd) -> io::Result<Box<dyn Readiness>> {
        let _in = self.handle.enter();
        // tokio 1.54 deprecates the safe constructors in favour of the `unsafe`
        // `AsyncFd::register_with_interest`, whose contract is that the descriptor stays
        // open and the same while registered. `EpollFd` guarantees that (it owns the
        // descriptor and never swaps it), and this crate forbids `unsafe`.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(EpollFd(fd), Interest::READABLE)?;
        Ok(Box::new(TokioReadiness(fd)))
    }
}

/// tokio's sleep, re-armed in place (`Sleep::reset`).
struct TokioTimer(Pin<Box<tokio::time::Sleep>>);

impl Timer for TokioTimer {
    fn reset(&mut self, after: Duration) {
        self.0.as_mut().reset(tokio::time::Instant::now() + after);
    }

    fn wait(&mut self) -> BorrowedFuture<'_, ()> {
        Box::pin(self.0.as_mut())
    }
}

/// The driver's epoll descriptor, as AsyncFd wants it.
struct EpollFd(OwnedFd);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The driver's epoll descriptor in tokio's reactor (edge-triggered).
struct TokioReadiness(AsyncFd<EpollFd>);

impl Readiness for TokioReadiness {
    fn readable(&mut self) -> BorrowedFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let mut guard = self.0.readable().await?;
            // Cleared before the driver takes what is ready: readiness that lands while
            // it does makes a new edge, so none is lost.
            guard.clear_ready();
            Ok(())
        })
    }
}
