//! `Router` and its breakers against the reference model, for arbitrary interleavings
//! of route, report (success, failure, neutral, shared failure), set_ready and clock advances
//! (including big jumps).

use std::time::Duration;

use inferd_core::Time;
use inferd_core::router::{BackendId, BreakerPolicy, Outcome, Route, Router};
use inferd_proptests::model::RouterModel;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Route,
    /// Report the outstanding route at this index (mod their number).
    Report(usize, Outcome),
    SetReady(BackendId, bool),
    Advance(u64),
}

fn outcome() -> impl Strategy<Value = Outcome> {
    // Few incident numbers, so that several reports name the same one.
    prop_oneof![
        1 => Just(Outcome::Success),
        2 => Just(Outcome::Failure),
        1 => Just(Outcome::Neutral),
        2 => (0u64..3).prop_map(Outcome::SharedFailure),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Route),
        4 => (any::<usize>(), outcome()).prop_map(|(i, o)| Op::Report(i, o)),
        1 => (0usize..4, any::<bool>()).prop_map(|(b, r)| Op::SetReady(BackendId(b), r)),
        3 => (0u64..3_000).prop_map(Op::Advance),
        1 => (0u64..200_000).prop_map(Op::Advance),
        1 => (1u64..10_000_000_000).prop_map(Op::Advance),
    ]
}

fn policy() -> impl Strategy<Value = BreakerPolicy> {
    (1u32..5, 1u64..120_000, 1u64..60_000).prop_map(|(t, w, c)| BreakerPolicy {
        failure_threshold: t,
        failure_window: Duration::from_millis(w),
        cooldown: Duration::from_millis(c),
    })
}

/// Runs `ops` on the router and the model side by side; with `cooldown_end`, also
/// compares `next_cooldown_end` (restricted to the future) with the model's.
fn run(
    n: usize,
    policy: BreakerPolicy,
    initially_ready: &[bool],
    ops: Vec<Op>,
    cooldown_end: bool,
) -> Result<(), TestCaseError> {
    let mut real = Router::new(n, policy);
    let mut model = RouterModel::new(n, policy);
    for (i, ready) in initially_ready.iter().take(n).enumerate() {
        let b = BackendId(i);
        real.set_ready(b, *ready);
        model.set_ready(b, *ready);
    }
    let mut now = Time::ZERO;
    let mut out: Vec<Route> = Vec::new();
    for op in ops {
        match op {
            Op::Route => {
                let got = real.route(now);
                prop_assert_eq!(got, model.route(now), "route at {:?}", now);
                if let Some(r) = got {
                    prop_assert!(real.is_ready(r.backend), "routed to a backend not ready");
                    if r.trial {
                        prop_assert!(
                            !out.iter().any(|o| o.backend == r.backend && o.trial),
                            "a second half-open trial on backend {}",
                            r.backend
                        );
                    }
                    out.push(r);
                }
            }
            Op::Report(i, outcome) => {
                if out.is_empty() {
                    continue;
                }
                let r = out.remove(i % out.len());
                real.report(r, outcome, now);
                model.report(r, outcome, now);
            }
            Op::SetReady(b, ready) => {
                real.set_ready(b, ready);
                model.set_ready(b, ready);
            }
            Op::Advance(ms) => now = now + Duration::from_millis(ms),
        }
        for b in (0..n).map(BackendId) {
            prop_assert_eq!(
                real.breaker_state(b, now),
                model.state(b, now),
                "backend {} at {:?}",
                b,
                now
            );
            prop_assert_eq!(real.is_ready(b), model.is_ready(b));
        }
        if cooldown_end {
            prop_assert_eq!(
                real.next_cooldown_end(now),
                model.next_future_cooldown_end(now),
                "next_cooldown_end at {:?}",
                now
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn matches_the_reference(
        n in 1usize..4,
        policy in policy(),
        initially_ready in proptest::collection::vec(any::<bool>(), 4),
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        run(n, policy, &initially_ready, ops, false)?;
    }

    /// `next_cooldown_end` names the earliest cooldown still running (an expired one
    /// must not hide a later one).
    #[test]
    fn next_cooldown_end_is_the_earliest_running_cooldown(
        n in 1usize..4,
        policy in policy(),
        initially_ready in proptest::collection::vec(any::<bool>(), 4),
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        run(n, policy, &initially_ready, ops, true)?;
    }
}
