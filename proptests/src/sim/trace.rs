//! The events of a run: a ring of the last ones, formatted only when a run fails, or the
//! whole run (optionally one connection's story) for `sim --trace`.
//!
//! Lines carry simulated time only, so a seed's trace is the same on every run and machine.

use std::collections::{HashSet, VecDeque};

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

/// What a run keeps of its events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TraceMode {
    /// The last [`TRACE_LEN`] events, for a failure report.
    #[default]
    Tail,
    /// Every event of the run.
    Full,
    /// Every event that concerns one connection: its inputs and outputs, and the
    /// generations of its requests.
    Conn(u64),
}

/// The events of a run, as [`TraceMode`] says.
#[derive(Debug, Default)]
pub(crate) struct Trace {
    ring: VecDeque<Entry>,
    dropped: u64,
    mode: TraceMode,
    /// In [`TraceMode::Conn`], the generations started for that connection.
    gens: HashSet<u64>,
}

/// Whether `subject` names `prefix` followed by `n` as a whole word (`c3`, not `c31`).
fn names(subject: &str, prefix: char, n: u64) -> bool {
    let want = format!("{prefix}{n}");
    subject.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| w == want)
}

impl Trace {
    /// An empty trace keeping what `mode` says.
    pub(crate) fn new(mode: TraceMode) -> Trace {
        Trace { mode, ..Trace::default() }
    }

    /// In [`TraceMode::Conn`], generation `g` belongs to the traced connection when
    /// `conn` is it; its events are kept from now on.
    pub(crate) fn gen_of(&mut self, g: u64, conn: u64) {
        if self.mode == TraceMode::Conn(conn) {
            self.gens.insert(g);
        }
    }

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
        match self.mode {
            TraceMode::Full => {
                self.ring.push_back(e);
                return;
            }
            TraceMode::Conn(c) => {
                let mine = names(&e.subject, 'c', c)
                    || e.subject.starts_with('g')
                        && self.gens.iter().any(|&g| names(&e.subject, 'g', g));
                if mine {
                    self.ring.push_back(e);
                }
                return;
            }
            TraceMode::Tail => {}
        }
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
