//! Admission: a daemon-wide bound on requests, with a FIFO wait list.
//!
//! `active` places generate, `queue` places wait in arrival order; past both a request
//! is refused at once (`queue_full`). A place is held until the request ends.

use std::collections::VecDeque;

/// The outcome of asking for a place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// A generating place is free: start now.
    Run,
    /// Waiting in line; [`Admission::release`] will hand it a place in arrival order.
    Queued,
    /// No room at all: refuse with `queue_full`.
    Full,
}

/// Counters for stats events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionCounters {
    /// Requests that got a place (ran or queued).
    pub admitted: u64,
    /// Requests refused for lack of room.
    pub rejected: u64,
}

/// Places and the wait list, keyed by the caller's ticket type.
#[derive(Debug)]
pub struct Admission<T> {
    active_permits: usize,
    queue_depth: usize,
    running: usize,
    waiting: VecDeque<T>,
    counters: AdmissionCounters,
}

impl<T: PartialEq + Copy> Admission<T> {
    /// `active_permits` generating places and `queue_depth` waiting places.
    pub fn new(active_permits: usize, queue_depth: usize) -> Self {
        Admission {
            active_permits,
            queue_depth,
            running: 0,
            waiting: VecDeque::new(),
            counters: AdmissionCounters::default(),
        }
    }

    /// Asks for a place for `ticket`.
    pub fn admit(&mut self, ticket: T) -> Admit {
        if self.running < self.active_permits && self.waiting.is_empty() {
            self.running += 1;
            self.counters.admitted += 1;
            Admit::Run
        } else if self.running + self.waiting.len() < self.active_permits + self.queue_depth {
            self.waiting.push_back(ticket);
            self.counters.admitted += 1;
            Admit::Queued
        } else {
            self.counters.rejected += 1;
            Admit::Full
        }
    }

    /// Returns a generating place; the longest-waiting ticket, if any, takes it.
    pub fn release(&mut self) -> Option<T> {
        debug_assert!(self.running > 0, "release without a running place");
        self.running = self.running.saturating_sub(1);
        self.promote()
    }

    /// Removes a waiting ticket (its client went away); false if it was not waiting.
    pub fn remove_waiting(&mut self, ticket: T) -> bool {
        match self.waiting.iter().position(|t| *t == ticket) {
            Some(i) => {
                self.waiting.remove(i);
                true
            }
            None => false,
        }
    }

    /// Empties the wait list (shutdown), oldest first.
    pub fn drain_waiting(&mut self) -> impl Iterator<Item = T> + '_ {
        self.waiting.drain(..)
    }

    /// Requests generating.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether `ticket` is in the wait list.
    pub fn is_waiting(&self, ticket: T) -> bool {
        self.waiting.contains(&ticket)
    }

    /// Admitted and rejected counts.
    pub fn counters(&self) -> AdmissionCounters {
        self.counters
    }

    fn promote(&mut self) -> Option<T> {
        if self.running < self.active_permits {
            let next = self.waiting.pop_front()?;
            self.running += 1;
            Some(next)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_and_queue_full() {
        let mut a = Admission::new(1, 2);
        assert_eq!(a.admit(1), Admit::Run);
        assert_eq!(a.admit(2), Admit::Queued);
        assert_eq!(a.admit(3), Admit::Queued);
        assert_eq!(a.admit(4), Admit::Full);
        assert_eq!(a.counters(), AdmissionCounters { admitted: 3, rejected: 1 });
        assert_eq!(a.release(), Some(2));
        assert_eq!(a.release(), Some(3));
        assert_eq!(a.release(), None);
        assert_eq!((a.running(), a.waiting()), (0, 0));
    }

    #[test]
    fn removing_a_waiter_frees_its_place() {
        let mut a = Admission::new(1, 1);
        assert_eq!(a.admit(1), Admit::Run);
        assert_eq!(a.admit(2), Admit::Queued);
        assert_eq!(a.admit(3), Admit::Full);
        assert!(a.remove_waiting(2));
        assert!(!a.remove_waiting(2));
        assert_eq!(a.admit(3), Admit::Queued);
        assert_eq!(a.release(), Some(3));
    }

    #[test]
    fn newcomers_do_not_jump_the_line() {
        let mut a = Admission::new(2, 2);
        assert_eq!(a.admit(1), Admit::Run);
        assert_eq!(a.admit(2), Admit::Run);
        assert_eq!(a.admit(3), Admit::Queued);
        assert_eq!(a.release(), Some(3));
        assert_eq!(a.admit(4), Admit::Queued);
        assert_eq!(a.running(), 2);
    }

    #[test]
    fn waiting_is_reported_and_promotion_respects_the_permits() {
        let mut a = Admission::new(2, 2);
        assert_eq!(a.admit(1), Admit::Run);
        assert_eq!(a.admit(2), Admit::Run);
        assert_eq!(a.admit(3), Admit::Queued);
        assert!(a.is_waiting(3));
        assert!(!a.is_waiting(1));
        // A released place goes to the waiter; the permits stay full, nobody else moves.
        assert_eq!(a.release(), Some(3));
        assert!(!a.is_waiting(3));
        assert_eq!(a.running(), 2);
        assert_eq!(a.admit(4), Admit::Queued);
        assert_eq!(a.admit(5), Admit::Queued);
        assert_eq!(a.admit(6), Admit::Full);
    }

    #[test]
    fn zero_queue_depth() {
        let mut a = Admission::new(1, 0);
        assert_eq!(a.admit(1), Admit::Run);
        assert_eq!(a.admit(2), Admit::Full);
        let drained: Vec<_> = a.drain_waiting().collect();
        assert!(drained.is_empty());
    }
}
