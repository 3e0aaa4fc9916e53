//! Signal numbers the shells need beside those their runtimes name, and the signal
//! policy both shells share.

/// SIGXFSZ, which a write past `RLIMIT_FSIZE` raises. Its default action kills the
/// process, leaving the sockets behind and clients without a terminal frame, so the
/// shells register a handler that does nothing: the write then fails with `EFBIG`, and
/// the activity log reports it and drops the record like any other write failure. For
/// runtimes whose signal API takes raw numbers (tokio's `SignalKind::from_raw`).
pub const SIGXFSZ: i32 = rustix::process::Signal::XFSZ.as_raw();

/// The signals both shells watch, named independently of any runtime's signal API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caught {
    /// SIGTERM: a service manager's stop.
    Terminate,
    /// SIGINT: Ctrl-C.
    Interrupt,
    /// SIGHUP: the terminal or session the daemon ran in is gone. Its default action
    /// would kill the daemon with the sockets left behind, so it drains like SIGTERM.
    HangUp,
    /// SIGXFSZ (see [`SIGXFSZ`]): passed over.
    FileSizeLimit,
}

/// What a shell does about a caught signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// Nothing.
    Ignore,
    /// Ask the driver to drain (as `DriverHandle::shutdown` does).
    Drain,
    /// Exit the process at once with [`SECOND_SIGNAL_EXIT_STATUS`], without draining.
    ExitNow,
}

/// The exit status after a second stop signal: the operator wants out now.
pub const SECOND_SIGNAL_EXIT_STATUS: i32 = 130;

/// The daemon's signal policy, one for both shells: the first SIGTERM, SIGINT or SIGHUP
/// drains, a second one exits at once; SIGXFSZ is ignored.
#[derive(Debug, Default)]
pub struct SignalPolicy {
    stops_seen: u32,
}

impl SignalPolicy {
    /// Decides what `signal` means now, and says so on stderr where there is something
    /// to say.
    pub fn on_signal(&mut self, signal: Caught) -> SignalAction {
        use std::io::Write;
        if signal == Caught::FileSizeLimit {
            return SignalAction::Ignore;
        }
        self.stops_seen += 1;
        if self.stops_seen > 1 {
            // The terminal may be gone (SIGHUP): a failed write must not panic, as
            // eprintln! would, least of all in the middle of a drain.
            let _ = writeln!(std::io::stderr(), "inferd: second signal, exiting without draining");
            return SignalAction::ExitNow;
        }
        if signal == Caught::HangUp {
            let _ = writeln!(std::io::stderr(), "inferd: SIGHUP: draining as for SIGTERM");
        }
        SignalAction::Drain
    }
}

/// The line both shells print on stderr once the admin socket exists.
pub fn startup_banner(admin: &std::path::Path, infer: &std::path::Path) -> String {
    format!(
        "inferd: admin socket {}; inference socket {} once ready",
        admin.display(),
        infer.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_stop_drains_second_exits_and_xfsz_never_counts() {
        let mut p = SignalPolicy::default();
        assert_eq!(p.on_signal(Caught::FileSizeLimit), SignalAction::Ignore);
        assert_eq!(p.on_signal(Caught::HangUp), SignalAction::Drain);
        assert_eq!(p.on_signal(Caught::FileSizeLimit), SignalAction::Ignore);
        assert_eq!(p.on_signal(Caught::Interrupt), SignalAction::ExitNow);
        let mut p = SignalPolicy::default();
        assert_eq!(p.on_signal(Caught::Terminate), SignalAction::Drain);
        assert_eq!(p.on_signal(Caught::Terminate), SignalAction::ExitNow);
    }
}
