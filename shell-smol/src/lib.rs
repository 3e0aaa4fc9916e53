//! inferd on smol: the [`Runtime`] implementation that drives the shared driver loop
//! with smol and async-io. Everything else lives in `inferd-core` (the daemon) and
//! `inferd-host` (the driver, the sockets, the OS glue); this crate is the runtime glue, the `inferd` binary and
//! its client.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use inferd_host::driver::{BorrowedFuture, Readiness, Runtime, Timer};
use smol::Async;

pub mod client;

/// The smol runtime: timers from async-io, and the driver's epoll descriptor watched by
/// async-io's reactor.
#[derive(Clone, Copy, Debug, Default)]
pub struct SmolRuntime;

impl SmolRuntime {
    /// The runtime.
    pub fn new() -> Self {
        SmolRuntime
    }
}

impl Runtime for SmolRuntime {
    fn timer(&self) -> Box<dyn Timer> {
        Box::new(SmolTimer(smol::Timer::never()))
    }

    fn readiness(&self, fd: OwnedFd) -> io::Result<Box<dyn Readiness>> {
        Ok(Box::new(SmolReadiness(Async::new(fd)?)))
    }
}

/// async-io's timer, re-armed in place (`set_after`).
struct SmolTimer(smol::Timer);

impl Timer for SmolTimer {
    fn reset(&mut self, after: Duration) {
        self.0.set_after(after);
    }

    fn wait(&mut self) -> BorrowedFuture<'_, ()> {
        Box::pin(async move {
            (&mut self.0).await;
        })
    }
}

/// The driver's epoll descriptor in async-io's reactor. async-io re-arms the (level
/// triggered, one-shot) registration on every wait, so readiness that came while the
/// driver was busy is reported at once.
struct SmolReadiness(Async<OwnedFd>);

impl Readiness for SmolReadiness {
    fn readable(&mut self) -> BorrowedFuture<'_, io::Result<()>> {
        Box::pin(self.0.readable())
    }
}
