//! Routing: backends in priority order, each behind a circuit breaker (spec §4).
//!
//! A request goes to the first backend that is ready and whose breaker lets it through.
//! `failure_threshold` failures within `failure_window` open a breaker for `cooldown`;
//! then exactly one trial request goes through (half-open): success closes the breaker,
//! failure reopens it. The clock is a parameter.
//!
//! A backend may also say how long it wants to be left alone (an upstream's
//! `Retry-After`): [`Router::retry_after`] records that, and the breaker, whenever it is
//! open, stays open at least until then.

use std::collections::VecDeque;
use std::time::Duration;

use crate::time::Time;

/// Breaker settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Failures within the window that open the breaker.
    pub failure_threshold: u32,
    /// How far back failures count.
    pub failure_window: Duration,
    /// How long an open breaker refuses requests.
    pub cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failure_threshold: 3,
            failure_window: Duration::from_secs(60),
            cooldown: Duration::from_secs(30),
        }
    }
}

/// A breaker's state as stats report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests are refused until the cooldown ends.
    Open,
    /// One trial request may go through, or is in flight.
    HalfOpen,
}

impl BreakerState {
    /// The name in stats events.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// How a routed request ended, as far as the breaker cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The backend served it.
    Success,
    /// The backend failed it (before or during the stream).
    Failure,
    /// It ended for a reason that says nothing about the backend (client cancel, drain).
    Neutral,
    /// The backend failed it as part of a failure several requests share (one decode
    /// that failed a whole batch), named by the engine's incident number: the breaker
    /// counts the incident once, not once per request it failed.
    SharedFailure(u64),
}

/// A backend, named by its index in the configured priority order (0 is tried first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub usize);

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a request was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Which backend.
    pub backend: BackendId,
    /// Whether this request is the half-open trial.
    pub trial: bool,
}

#[derive(Debug)]
enum Breaker {
    Closed { failures: VecDeque<Time> },
    Open { until: Time },
    HalfOpen { trial_in_flight: bool },
}

#[derive(Debug)]
struct Backend {
    ready: bool,
    breaker: Breaker,
    /// The latest time the backend asked not to be tried before (`Retry-After`).
    not_before: Option<Time>,
    /// The last shared failure the breaker counted, so that the other requests the same
    /// incident failed are not counted again.
    last_incident: Option<u64>,
}

impl Backend {
    /// When a breaker opening at `now` closes again: after the cooldown, and not before
    /// the backend's own `Retry-After`.
    fn open_until(&self, now: Time, policy: BreakerPolicy) -> Time {
        let until = now + policy.cooldown;
        self.not_before.map_or(until, |t| t.max(until))
    }
}

/// The router over all configured backends.
#[derive(Debug)]
pub struct Router {
    policy: BreakerPolicy,
    backends: Vec<Backend>,
}

impl Router {
    /// `count` backends, none ready yet.
    pub fn new(count: usize, policy: BreakerPolicy) -> Self {
        let backends = (0..count)
            .map(|_| Backend {
                ready: false,
                breaker: Breaker::Closed { failures: VecDeque::new() },
                not_before: None,
                last_incident: None,
            })
            .collect();
        Router { policy, backends }
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether there are no backends.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Marks a backend ready or not.
    pub fn set_ready(&mut self, backend: BackendId, ready: bool) {
        if let Some(b) = self.backends.get_mut(backend.0) {
            b.ready = ready;
        }
    }

    /// Whether a backend is ready.
    pub fn is_ready(&self, backend: BackendId) -> bool {
        self.backends.get(backend.0).is_some_and(|b| b.ready)
    }

    /// Whether every backend is ready.
    pub fn all_ready(&self) -> bool {
        self.backends.iter().all(|b| b.ready)
    }

    /// Picks the first ready backend whose breaker lets a request through, and takes
    /// the half-open trial if that is what lets it through.
    pub fn route(&mut self, now: Time) -> Option<Route> {
        for (i, b) in self.backends.iter_mut().enumerate() {
            if !b.ready {
                continue;
            }
            if let Breaker::Open { until } = b.breaker
                && now >= until
            {
                b.breaker = Breaker::HalfOpen { trial_in_flight: false };
            }
            match &mut b.breaker {
                Breaker::Closed { .. } => {
                    return Some(Route { backend: BackendId(i), trial: false });
                }
                Breaker::HalfOpen { trial_in_flight } if !*trial_in_flight => {
                    *trial_in_flight = true;
                    return Some(Route { backend: BackendId(i), trial: true });
                }
                _ => {}
            }
        }
        None
    }

    /// Records how a routed request ended.
    pub fn report(&mut self, route: Route, outcome: Outcome, now: Time) {
        let policy = self.policy;
        let Some(b) = self.backends.get_mut(route.backend.0) else { return };
        let (outcome, incident) = match outcome {
            // Counted already when another request of the incident reported it. A trial
            // always settles (the half-open state waits for it), so it counts anyway.
            Outcome::SharedFailure(id) if b.last_incident == Some(id) && !route.trial => return,
            Outcome::SharedFailure(id) => (Outcome::Failure, Some(id)),
            other => (other, None),
        };
        match (&mut b.breaker, route.trial) {
            (Breaker::HalfOpen { .. }, true) => {
                b.breaker = match outcome {
                    Outcome::Success => Breaker::Closed { failures: VecDeque::new() },
                    Outcome::Neutral => Breaker::HalfOpen { trial_in_flight: false },
                    Outcome::Failure | Outcome::SharedFailure(_) => {
                        b.last_incident = incident.or(b.last_incident);
                        Breaker::Open { until: b.open_until(now, policy) }
                    }
                };
            }
            (Breaker::Closed { failures }, false) if outcome == Outcome::Failure => {
                b.last_incident = incident.or(b.last_incident);
                while failures
                    .front()
                    .is_some_and(|&t| now.saturating_since(t) >= policy.failure_window)
                {
                    failures.pop_front();
                }
                failures.push_back(now);
                if failures.len() >= policy.failure_threshold as usize {
                    b.breaker = Breaker::Open { until: b.open_until(now, policy) };
                }
            }
            // Outcomes of requests routed before the breaker changed state say nothing
            // about the backend's state now.
            _ => {}
        }
    }

    /// Records that `backend` asked not to be tried before `not_before` (an upstream's
    /// `Retry-After` on a 429 or 503). The hint does not count as a failure by itself
    /// (the failure that carries it is reported as usual); it makes an open breaker,
    /// whether open already or opened by a later failure, stay open at least until
    /// then. A later, earlier hint does not shorten an earlier, later one.
    pub fn retry_after(&mut self, backend: BackendId, not_before: Time) {
        let Some(b) = self.backends.get_mut(backend.0) else { return };
        let latest = b.not_before.map_or(not_before, |t| t.max(not_before));
        b.not_before = Some(latest);
        if let Breaker::Open { until } = &mut b.breaker {
            *until = (*until).max(latest);
        }
    }

    /// A backend's breaker state at `now` (an expired cooldown reads as half-open).
    pub fn breaker_state(&self, backend: BackendId, now: Time) -> BreakerState {
        match self.backends.get(backend.0).map(|b| &b.breaker) {
            Some(Breaker::Open { until }) if now < *until => BreakerState::Open,
            Some(Breaker::Open { .. }) | Some(Breaker::HalfOpen { .. }) => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// When the earliest cooldown still running at `now` ends, if any.
    pub fn next_cooldown_end(&self, now: Time) -> Option<Time> {
        self.backends
            .iter()
            .filter_map(|b| match b.breaker {
                Breaker::Open { until } if until > now => Some(until),
                _ => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B0: BackendId = BackendId(0);
    const B1: BackendId = BackendId(1);

    fn t(s: u64) -> Time {
        Time::from_secs(s)
    }

    fn ready_router(n: usize) -> Router {
        let mut r = Router::new(n, BreakerPolicy::default());
        for i in 0..n {
            r.set_ready(BackendId(i), true);
        }
        r
    }

    #[test]
    fn a_backend_id_prints_as_its_index() {
        // Traces, logs and admin text name backends by the bare index, as before the type.
        assert_eq!(BackendId(3).to_string(), "3");
        assert_eq!(format!("backend {}", B1), "backend 1");
    }

    #[test]
    fn priority_order_and_readiness() {
        assert!(Router::new(0, BreakerPolicy::default()).is_empty());
        let mut r = Router::new(2, BreakerPolicy::default());
        assert_eq!((r.len(), r.is_empty()), (2, false));
        assert!(!r.all_ready());
        assert_eq!(r.route(t(0)), None);
        r.set_ready(B1, true);
        assert_eq!(r.route(t(0)), Some(Route { backend: B1, trial: false }));
        r.set_ready(B0, true);
        assert!(r.all_ready());
        assert_eq!(r.route(t(0)), Some(Route { backend: B0, trial: false }));
    }

    #[test]
    fn opens_after_threshold_within_window() {
        let mut r = ready_router(2);
        let route = Route { backend: B0, trial: false };
        r.report(route, Outcome::Failure, t(0));
        r.report(route, Outcome::Failure, t(10));
        assert_eq!(r.breaker_state(B0, t(10)), BreakerState::Closed);
        r.report(route, Outcome::Failure, t(20));
        assert_eq!(r.breaker_state(B0, t(20)), BreakerState::Open);
        assert_eq!(r.route(t(21)), Some(Route { backend: B1, trial: false }));
        assert_eq!(r.next_cooldown_end(t(21)), Some(t(50)));
        assert_eq!(r.next_cooldown_end(t(50)), None);
        // The cooldown is over at its end, not one tick later.
        assert_eq!(r.breaker_state(B0, t(49)), BreakerState::Open);
        assert_eq!(r.breaker_state(B0, t(50)), BreakerState::HalfOpen);
    }

    #[test]
    fn failures_outside_window_do_not_count() {
        let mut r = ready_router(1);
        let route = Route { backend: B0, trial: false };
        r.report(route, Outcome::Failure, t(0));
        r.report(route, Outcome::Failure, t(30));
        r.report(route, Outcome::Failure, t(61));
        assert_eq!(r.breaker_state(B0, t(61)), BreakerState::Closed);
        r.report(route, Outcome::Failure, t(62));
        assert_eq!(r.breaker_state(B0, t(62)), BreakerState::Open);
    }

    #[test]
    fn neutral_and_success_do_not_count() {
        let mut r = ready_router(1);
        let route = Route { backend: B0, trial: false };
        for i in 0..10 {
            r.report(route, Outcome::Neutral, t(i));
            r.report(route, Outcome::Success, t(i));
        }
        assert_eq!(r.breaker_state(B0, t(10)), BreakerState::Closed);
    }

    fn open(r: &mut Router, at: u64) {
        let route = Route { backend: B0, trial: false };
        for _ in 0..3 {
            r.report(route, Outcome::Failure, t(at));
        }
    }

    #[test]
    fn half_open_lets_exactly_one_trial_through() {
        let mut r = ready_router(1);
        open(&mut r, 0);
        assert_eq!(r.route(t(29)), None);
        let trial = r.route(t(30)).unwrap();
        assert!(trial.trial);
        assert_eq!(r.route(t(30)), None, "second request during the trial");
        r.report(trial, Outcome::Success, t(31));
        assert_eq!(r.breaker_state(B0, t(31)), BreakerState::Closed);
        assert_eq!(r.route(t(31)), Some(Route { backend: B0, trial: false }));
    }

    #[test]
    fn failed_trial_reopens_for_another_cooldown() {
        let mut r = ready_router(1);
        open(&mut r, 0);
        let trial = r.route(t(30)).unwrap();
        r.report(trial, Outcome::Failure, t(35));
        assert_eq!(r.breaker_state(B0, t(35)), BreakerState::Open);
        assert_eq!(r.route(t(64)), None);
        assert!(r.route(t(65)).unwrap().trial);
    }

    #[test]
    fn cancelled_trial_frees_the_trial_slot() {
        let mut r = ready_router(1);
        open(&mut r, 0);
        let trial = r.route(t(30)).unwrap();
        r.report(trial, Outcome::Neutral, t(31));
        assert_eq!(r.breaker_state(B0, t(31)), BreakerState::HalfOpen);
        assert!(r.route(t(31)).unwrap().trial);
    }

    #[test]
    fn stale_outcomes_are_ignored() {
        let mut r = ready_router(1);
        open(&mut r, 0);
        // A request routed before the breaker opened finishes late.
        r.report(Route { backend: B0, trial: false }, Outcome::Success, t(1));
        assert_eq!(r.breaker_state(B0, t(1)), BreakerState::Open);
    }

    #[test]
    fn retry_after_keeps_an_opening_breaker_open_longer() {
        // The hint comes with the failure that opens the breaker.
        let mut r = ready_router(2);
        let route = Route { backend: B0, trial: false };
        r.report(route, Outcome::Failure, t(0));
        r.report(route, Outcome::Failure, t(1));
        assert_eq!(r.breaker_state(B0, t(2)), BreakerState::Closed, "a hint is not a failure");
        r.retry_after(B0, t(2) + Duration::from_secs(120));
        assert_eq!(r.breaker_state(B0, t(2)), BreakerState::Closed, "a hint is not a failure");
        r.report(route, Outcome::Failure, t(2));
        assert_eq!(r.next_cooldown_end(t(2)), Some(t(122)));
        assert_eq!(r.route(t(32)), Some(Route { backend: B1, trial: false }), "past the cooldown");
        assert_eq!(r.breaker_state(B0, t(121)), BreakerState::Open);
        assert_eq!(r.route(t(122)), Some(Route { backend: B0, trial: true }));
    }

    #[test]
    fn retry_after_extends_an_open_breaker_and_never_shortens_it() {
        let mut r = ready_router(1);
        open(&mut r, 0);
        r.retry_after(B0, t(90));
        assert_eq!(r.next_cooldown_end(t(0)), Some(t(90)));
        r.retry_after(B0, t(5));
        assert_eq!(r.next_cooldown_end(t(0)), Some(t(90)), "a shorter hint later");
        assert_eq!(r.route(t(89)), None);
        let trial = r.route(t(90)).unwrap();
        // The failed trial reopens for the cooldown: the old hint has passed.
        r.report(trial, Outcome::Failure, t(91));
        assert_eq!(r.next_cooldown_end(t(91)), Some(t(121)));
        // A hint shorter than the cooldown changes nothing.
        r.retry_after(B0, t(100));
        assert_eq!(r.next_cooldown_end(t(91)), Some(t(121)));
    }

    #[test]
    fn a_shared_failure_counts_once_per_incident() {
        // Threshold 3: four requests failed by one decode are one failure, not an open
        // breaker; two more incidents open it.
        let mut r = ready_router(2);
        let route = Route { backend: B0, trial: false };
        for _ in 0..4 {
            r.report(route, Outcome::SharedFailure(7), t(0));
        }
        assert_eq!(r.breaker_state(B0, t(0)), BreakerState::Closed);
        r.report(route, Outcome::SharedFailure(8), t(1));
        r.report(route, Outcome::SharedFailure(8), t(1));
        assert_eq!(r.breaker_state(B0, t(1)), BreakerState::Closed);
        r.report(route, Outcome::SharedFailure(9), t(2));
        assert_eq!(r.breaker_state(B0, t(2)), BreakerState::Open);
        // Incidents are per backend: the same number on another backend counts there.
        let other = Route { backend: B1, trial: false };
        r.report(other, Outcome::SharedFailure(9), t(2));
        r.report(other, Outcome::Failure, t(2));
        assert_eq!(r.breaker_state(B1, t(2)), BreakerState::Closed);
        r.report(other, Outcome::SharedFailure(9), t(3));
        assert_eq!(r.breaker_state(B1, t(3)), BreakerState::Closed, "9 counted already on 1");
    }

    #[test]
    fn a_trial_failed_by_a_shared_failure_reopens() {
        let mut r = ready_router(1);
        open(&mut r, 0);
        // A request routed while closed, failed by the same decode as the trial, reports
        // first: stale, so not counted, and the trial still settles the half-open state.
        let trial = r.route(t(30)).unwrap();
        r.report(Route { backend: B0, trial: false }, Outcome::SharedFailure(1), t(31));
        assert_eq!(r.breaker_state(B0, t(31)), BreakerState::HalfOpen);
        r.report(trial, Outcome::SharedFailure(1), t(31));
        assert_eq!(r.breaker_state(B0, t(31)), BreakerState::Open);
        assert_eq!(r.next_cooldown_end(t(31)), Some(t(61)));
    }
}
