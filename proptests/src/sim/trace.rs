//! A ring buffer of the last events of a run, formatted only when a run fails.

use std::collections::VecDeque;

/// How many events a failing run shows.
pub const TRACE_LEN: usize = 200;

/// Bytes of a payload kept per event.
const SNIP: usize = 100;

/// Which way an event went.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Dir {
    /// Fed to the daemon.
    In,
    /// Drained from the daemon.
    Out,
    /// The simulated world (client, engine, clock).
    Sim,
}

#[derive(Debug)]
struct Entry {
    t_ms: u64,
    dir: Dir,
    what: &'static str,
    subject: String,
    snip: Option<(Box<[u8]>, usize)>,
}

/// The last [`TRACE_LEN`] events.
#[derive(Debug, Default)]
pub(crate) struct Trace {
    ring: VecDeque<Entry>,
    dropped: u64,
}

impl Trace {
    pub(crate) fn push(&mut self, t_ms: u64, dir: Dir, what: &'static str, subject: String) {
        self.push_entry(Entry { t_ms, dir, what, subject, snip: None });
    }

    pub(crate) fn push_bytes(
        &mut self,
        t_ms: u64,
        dir: Dir,
        what: &'static str,
        subject: String,
        bytes: &[u8],
    ) {
        let keep = &bytes[..bytes.len().min(SNIP)];
        self.push_entry(Entry { t_ms, dir, what, subject, snip: Some((keep.into(), bytes.len())) });
    }

    fn push_entry(&mut self, e: Entry) {
        if self.ring.len() == TRACE_LEN {
            self.ring.pop_front();
            self.dropped += 1;
        }
        self.ring.push_back(e);
    }

    /// One line per event, oldest first.
    pub(crate) fn render(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.ring.len() + 1);
        if self.dropped > 0 {
            out.push(format!("… {} earlier events not shown", self.dropped));
        }
        for e in &self.ring {
            let arrow = match e.dir {
                Dir::In => "->",
                Dir::Out => "<-",
                Dir::Sim => "..",
            };
            let mut line = format!(
                "{:>6}.{:03}s {arrow} {:<14} {}",
                e.t_ms / 1000,
                e.t_ms % 1000,
                e.what,
                e.subject
            );
            if let Some((b, len)) = &e.snip {
                let text = String::from_utf8_lossy(b);
                line.push_str(&format!(" [{len}B] {:?}", text));
                if *len > b.len() {
                    line.push('…');
                }
            }
            out.push(line);
        }
        out
    }
}
