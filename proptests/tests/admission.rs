//! `Admission` against the reference model (a counter and a FIFO) for arbitrary
//! sequences of admit, release and remove_waiting.

use inferd_core::admission::{Admission, Admit};
use inferd_proptests::model::{AdmissionModel, ModelAdmit};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Admit,
    Release,
    /// Remove the ticket at this index (mod the tickets issued so far).
    Remove(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![4 => Just(Op::Admit), 3 => Just(Op::Release), 2 => any::<usize>().prop_map(Op::Remove)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn matches_the_reference(
        permits in 1usize..4,
        depth in 0usize..6,
        ops in proptest::collection::vec(op(), 0..80),
    ) {
        let mut real = Admission::new(permits, depth);
        let mut model = AdmissionModel::new(permits, depth);
        let mut next = 0u32;
        for op in ops {
            match op {
                Op::Admit => {
                    let t = next;
                    next += 1;
                    let want = match model.admit(t) {
                        ModelAdmit::Run => Admit::Run,
                        ModelAdmit::Queued => Admit::Queued,
                        ModelAdmit::Full => Admit::Full,
                    };
                    prop_assert_eq!(real.admit(t), want, "admit {}", t);
                }
                Op::Release => {
                    if model.running == 0 {
                        continue;
                    }
                    prop_assert_eq!(real.release(), model.release(), "release");
                }
                Op::Remove(i) => {
                    if next == 0 {
                        continue;
                    }
                    let t = (i % next as usize) as u32;
                    prop_assert_eq!(real.remove_waiting(t), model.remove_waiting(t), "remove {}", t);
                }
            }
            prop_assert_eq!(real.running(), model.running);
            prop_assert_eq!(real.waiting(), model.waiting.len());
            prop_assert!(real.running() <= permits);
            prop_assert!(real.running() + real.waiting() <= permits + depth);
            let c = real.counters();
            prop_assert_eq!((c.admitted, c.rejected), (model.admitted, model.rejected));
            for t in 0..next {
                prop_assert_eq!(real.is_waiting(t), model.waiting.contains(&t));
            }
        }
        let drained: Vec<u32> = real.drain_waiting().collect();
        let want: Vec<u32> = model.waiting.iter().copied().collect();
        prop_assert_eq!(drained, want, "drain_waiting is oldest first");
        prop_assert_eq!(real.waiting(), 0);
    }
}
