//! Reference models: deliberately simple restatements of the spec that the real state
//! machines are checked against (by the property tests and by the simulator).

use std::collections::VecDeque;

use inferd_core::Time;
use inferd_core::router::{BackendId, BreakerPolicy, BreakerState, Outcome, Route};

/// One result of splitting a byte stream into request lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefLine {
    /// A complete non-blank line, without LF and without one trailing CR.
    Line(Vec<u8>),
    /// A line longer than the cap; nothing after it is read.
    TooLarge,
}

/// What the reference splitter makes of a whole stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefSplit {
    /// Complete lines in order, ending with `TooLarge` if an oversize line was met.
    pub lines: Vec<RefLine>,
    /// The unfinished last line (bytes after the last LF), when no `TooLarge` was met.
    pub tail: Vec<u8>,
}

impl RefSplit {
    /// Whether the splitter stopped at an oversize line.
    pub fn overflowed(&self) -> bool {
        self.lines.last() == Some(&RefLine::TooLarge)
    }

    /// Whether an unfinished line, blank or not (or an oversize one), is pending: what
    /// `LineDecoder::has_partial` must say once every complete line is taken.
    pub fn has_partial(&self) -> bool {
        self.overflowed() || !self.tail.is_empty()
    }
}

fn is_blank_byte(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r')
}

/// Splits `stream` the way spec §1 says, all at once: lines end at LF, one CR before
/// the LF is dropped, whitespace-only lines are skipped, a line whose content is over
/// `cap` bytes ends the stream with `TooLarge`. An unfinished last line is already known
/// to be too large at `cap + 1` bytes unless its last byte is a CR (which an LF may still
/// strip), and at `cap + 2` bytes in any case.
pub fn split_lines(stream: &[u8], cap: usize) -> RefSplit {
    let mut lines = Vec::new();
    let mut rest = stream;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        let mut line = &rest[..i];
        rest = &rest[i + 1..];
        if let [head @ .., b'\r'] = line {
            line = head;
        }
        if line.len() > cap {
            lines.push(RefLine::TooLarge);
            return RefSplit { lines, tail: Vec::new() };
        }
        if line.iter().all(|&b| is_blank_byte(b)) {
            continue;
        }
        lines.push(RefLine::Line(line.to_vec()));
    }
    if unfinished_over_cap(rest, cap) {
        lines.push(RefLine::TooLarge);
        return RefSplit { lines, tail: Vec::new() };
    }
    RefSplit { lines, tail: rest.to_vec() }
}

/// Whether the bytes of an unfinished line are already known to be over the cap.
fn unfinished_over_cap(line: &[u8], cap: usize) -> bool {
    line.len() > cap + 1 || (line.len() == cap + 1 && line.last() != Some(&b'\r'))
}

/// How many bytes of a line (LF not yet seen) reveal that it is over the cap: `cap + 1`
/// when its byte at `cap` is not a CR, else `cap + 2`.
fn overflow_reveal(line: &[u8], cap: usize) -> usize {
    if line.get(cap) == Some(&b'\r') { cap + 2 } else { cap + 1 }
}

/// The stream position (bytes pushed) from which an oversize line is known: once
/// `cap + 1` of its bytes arrived unless the last of them is a CR, else once `cap + 2`
/// arrived (an LF arriving instead ends a line of exactly the cap). `None` when no line
/// is over the cap.
pub fn overflow_known_at(stream: &[u8], cap: usize) -> Option<usize> {
    let mut start = 0;
    while start <= stream.len() {
        let rest = &stream[start..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let mut content = &rest[..i];
                if let [head @ .., b'\r'] = content {
                    content = head;
                }
                if content.len() > cap {
                    return Some(start + overflow_reveal(rest, cap));
                }
                start += i + 1;
            }
            None => {
                let at = overflow_reveal(rest, cap);
                return (rest.len() >= at).then_some(start + at);
            }
        }
    }
    None
}

/// Whether `LineDecoder::has_partial` must be true after the first `pos` bytes of
/// `stream` were pushed and every complete line taken (`overflow_at` from
/// [`overflow_known_at`]).
pub fn partial_at(stream: &[u8], pos: usize, overflow_at: Option<usize>) -> bool {
    if overflow_at.is_some_and(|at| pos >= at) {
        return true;
    }
    let prefix = &stream[..pos];
    prefix.last().is_some_and(|&b| b != b'\n')
}

/// What [`AdmissionModel::admit`] decided (mirrors `inferd_core::admission::Admit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelAdmit {
    /// Generates now.
    Run,
    /// Waits in line.
    Queued,
    /// Refused.
    Full,
}

/// Admission as the spec states it: a count of generating places and a FIFO of waiters.
#[derive(Clone, Debug)]
pub struct AdmissionModel {
    /// Generating places.
    pub permits: usize,
    /// Waiting places.
    pub depth: usize,
    /// Places generating now.
    pub running: usize,
    /// Waiters, oldest first.
    pub waiting: VecDeque<u32>,
    /// Requests that got a place.
    pub admitted: u64,
    /// Requests refused.
    pub rejected: u64,
}

impl AdmissionModel {
    /// `permits` generating and `depth` waiting places.
    pub fn new(permits: usize, depth: usize) -> Self {
        AdmissionModel {
            permits,
            depth,
            running: 0,
            waiting: VecDeque::new(),
            admitted: 0,
            rejected: 0,
        }
    }

    /// A request asks for a place. Newcomers never overtake waiters.
    pub fn admit(&mut self, ticket: u32) -> ModelAdmit {
        let held = self.running + self.waiting.len();
        if self.waiting.is_empty() && self.running < self.permits {
            self.running += 1;
            self.admitted += 1;
            ModelAdmit::Run
        } else if held < self.permits + self.depth {
            self.waiting.push_back(ticket);
            self.admitted += 1;
            ModelAdmit::Queued
        } else {
            self.rejected += 1;
            ModelAdmit::Full
        }
    }

    /// A generating request ended; the oldest waiter (if any) starts.
    pub fn release(&mut self) -> Option<u32> {
        assert!(self.running > 0, "model: release without a running place");
        self.running -= 1;
        if self.running < self.permits
            && let Some(t) = self.waiting.pop_front()
        {
            self.running += 1;
            return Some(t);
        }
        None
    }

    /// A waiter left.
    pub fn remove_waiting(&mut self, ticket: u32) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|t| *t != ticket);
        before != self.waiting.len()
    }
}

/// One backend's breaker in the reference model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelBreaker {
    /// Requests flow; the times of recent failures.
    Closed(Vec<Time>),
    /// Refusing until `until`.
    Open {
        /// End of the cooldown.
        until: Time,
    },
    /// Cooldown over: one trial may go (or is in flight).
    HalfOpen {
        /// Whether the trial is out.
        trial_out: bool,
    },
}

/// The router and its breakers, restated from spec §4.
#[derive(Clone, Debug)]
pub struct RouterModel {
    /// The breaker policy.
    pub policy: BreakerPolicy,
    /// Per backend: ready, breaker.
    pub backends: Vec<(bool, ModelBreaker)>,
    /// Per backend: the latest `Retry-After` deadline it asked for (spec: an open
    /// breaker stays open at least that long, whenever it opens).
    pub not_before: Vec<Option<Time>>,
    /// Per backend: the shared failure (incident) last counted, so the other requests
    /// one incident failed do not count again.
    pub last_incident: Vec<Option<u64>>,
}

impl RouterModel {
    /// `n` backends, none ready, all breakers closed.
    pub fn new(n: usize, policy: BreakerPolicy) -> Self {
        RouterModel {
            policy,
            backends: vec![(false, ModelBreaker::Closed(Vec::new())); n],
            not_before: vec![None; n],
            last_incident: vec![None; n],
        }
    }

    /// Marks a backend ready or not.
    pub fn set_ready(&mut self, backend: BackendId, ready: bool) {
        if let Some(b) = self.backends.get_mut(backend.0) {
            b.0 = ready;
        }
    }

    /// Whether a backend is ready.
    pub fn is_ready(&self, backend: BackendId) -> bool {
        self.backends.get(backend.0).is_some_and(|b| b.0)
    }

    /// The first ready backend whose breaker lets a request through; a half-open
    /// breaker lets exactly one trial through.
    pub fn route(&mut self, now: Time) -> Option<Route> {
        for (i, (ready, br)) in self.backends.iter_mut().enumerate() {
            if !*ready {
                continue;
            }
            if let ModelBreaker::Open { until } = br
                && now >= *until
            {
                *br = ModelBreaker::HalfOpen { trial_out: false };
            }
            match br {
                ModelBreaker::Closed(_) => {
                    return Some(Route { backend: BackendId(i), trial: false });
                }
                ModelBreaker::HalfOpen { trial_out: false } => {
                    *br = ModelBreaker::HalfOpen { trial_out: true };
                    return Some(Route { backend: BackendId(i), trial: true });
                }
                _ => {}
            }
        }
        None
    }

    /// A backend asked not to be tried before `not_before` (an upstream's 429 or 503
    /// with `Retry-After`): an open breaker, now or later, stays open at least until
    /// the latest such deadline.
    pub fn retry_after(&mut self, backend: BackendId, not_before: Time) {
        let Some(slot) = self.not_before.get_mut(backend.0) else { return };
        let latest = slot.map_or(not_before, |t| t.max(not_before));
        *slot = Some(latest);
        if let Some((_, ModelBreaker::Open { until })) = self.backends.get_mut(backend.0) {
            *until = (*until).max(latest);
        }
    }

    /// How a routed request ended.
    pub fn report(&mut self, route: Route, outcome: Outcome, now: Time) {
        let policy = self.policy;
        let hint = self.not_before.get(route.backend.0).copied().flatten();
        let open_until = |now: Time| {
            let until = now + policy.cooldown;
            hint.map_or(until, |t| t.max(until))
        };
        let Some((_, br)) = self.backends.get_mut(route.backend.0) else { return };
        let Some(last_incident) = self.last_incident.get_mut(route.backend.0) else { return };
        // One incident counts once; a trial always settles the half-open state.
        let incident = match outcome {
            Outcome::SharedFailure(id) if *last_incident == Some(id) && !route.trial => return,
            Outcome::SharedFailure(id) => Some(id),
            _ => None,
        };
        let outcome = if incident.is_some() { Outcome::Failure } else { outcome };
        if route.trial {
            assert_eq!(
                *br,
                ModelBreaker::HalfOpen { trial_out: true },
                "model: a trial ended while backend {} was not half-open with a trial out",
                route.backend
            );
            *br = match outcome {
                Outcome::Success => ModelBreaker::Closed(Vec::new()),
                Outcome::Neutral => ModelBreaker::HalfOpen { trial_out: false },
                Outcome::Failure | Outcome::SharedFailure(_) => {
                    if incident.is_some() {
                        *last_incident = incident;
                    }
                    ModelBreaker::Open { until: open_until(now) }
                }
            };
            return;
        }
        if let ModelBreaker::Closed(fails) = br
            && outcome == Outcome::Failure
        {
            if incident.is_some() {
                *last_incident = incident;
            }
            fails.push(now);
            // Failures older than the window no longer count.
            fails.retain(|&t| now.saturating_since(t) < policy.failure_window);
            if fails.len() >= policy.failure_threshold as usize {
                *br = ModelBreaker::Open { until: open_until(now) };
            }
        }
    }

    /// The state a stats event shows at `now`.
    pub fn state(&self, backend: BackendId, now: Time) -> BreakerState {
        match &self.backends[backend.0].1 {
            ModelBreaker::Closed(_) => BreakerState::Closed,
            ModelBreaker::Open { until } if now < *until => BreakerState::Open,
            ModelBreaker::Open { .. } | ModelBreaker::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// The earliest cooldown end still in the future.
    pub fn next_future_cooldown_end(&self, now: Time) -> Option<Time> {
        self.backends
            .iter()
            .filter_map(|(_, b)| match b {
                ModelBreaker::Open { until } if *until > now => Some(*until),
                _ => None,
            })
            .min()
    }

    /// Trials in flight on a backend (0 or 1 by construction; the sim asserts it).
    pub fn trial_out(&self, backend: BackendId) -> bool {
        matches!(self.backends[backend.0].1, ModelBreaker::HalfOpen { trial_out: true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_positions() {
        assert_eq!(overflow_known_at(b"abcd\nx\n", 3), Some(4));
        assert_eq!(overflow_known_at(b"abc\r\nx\n", 3), None);
        assert_eq!(overflow_known_at(b"abc\r\r\n", 3), Some(5));
        assert_eq!(overflow_known_at(b"ok\nabcdefg", 3), Some(7));
        assert_eq!(overflow_known_at(b"abcd", 3), Some(4));
        assert_eq!(overflow_known_at(b"abc\r", 3), None);
        assert!(partial_at(b"ok\n  x", 6, None));
        assert!(partial_at(b"ok\n  x", 5, None), "a blank partial line is partial");
        assert!(!partial_at(b"ok\n  x", 3, None));
    }

    #[test]
    fn split_basics() {
        let s = split_lines(b"a\r\n  \n\tb\nxyz", 3);
        assert_eq!(s.lines, vec![RefLine::Line(b"a".to_vec()), RefLine::Line(b"\tb".to_vec())]);
        assert_eq!(s.tail, b"xyz");
        assert!(s.has_partial());
        let s = split_lines(b"abcd\nok\n", 3);
        assert_eq!(s.lines, vec![RefLine::TooLarge]);
        let s = split_lines(b"abc\r", 3);
        assert!(s.lines.is_empty(), "cap + 1 ending in CR: an LF may still come");
        let s = split_lines(b"abcd", 3);
        assert_eq!(s.lines, vec![RefLine::TooLarge], "cap + 1 without a CR");
        let s = split_lines(b"abc\rx", 3);
        assert_eq!(s.lines, vec![RefLine::TooLarge]);
    }
}
