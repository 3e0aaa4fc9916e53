//! The deterministic simulator as a test: a fixed range of seeds, plus seeds that once
//! failed (kept as regression tests). The runner (`--bin sim`) runs many more.

use inferd_proptests::sim::{self, Failure};

/// Seeds run on every `cargo test` (debug builds are ~20x slower than the runner).
const SEEDS: std::ops::Range<u64> = 0..1000;

/// Seeds that found a bug once, with what they found. They replay exactly as long as
/// the simulator's generator is unchanged; re-derive them when it changes.
const REGRESSIONS: &[(u64, &str)] = &[
    (4, "LineDecoder::next_line panics (stale scan offset) when a scanned partial line overflows"),
    (493, "TCP auth line + pipelined request over 4 KiB: frame_too_large under a larger cap"),
    (1785, "long request id: the drain-deadline error frame exceeds max_frame_bytes"),
    (9064, "long request id: the queue_full error frame exceeds max_frame_bytes"),
    (11173, "long request id: the circuit-breaker error frame exceeds max_frame_bytes"),
    (4961, "long request id: the 'response exceeds the frame cap' error itself exceeds it"),
];

fn report(failures: &[Failure], total: usize) -> String {
    let mut s = format!("{} of {total} seeds failed\n", failures.len());
    for f in failures {
        s.push_str(&format!("  seed {:?}: {}\n", f.seed, f.message.lines().next().unwrap_or("")));
    }
    if let Some(f) = failures.first() {
        s.push_str(&format!("\nfirst failure in full:\n{f}"));
    }
    s
}

fn run(seeds: impl Iterator<Item = u64>) -> (Vec<Failure>, usize, u64) {
    let (mut failures, mut n, mut requests) = (Vec::new(), 0, 0);
    for seed in seeds {
        n += 1;
        match sim::run_seed(seed) {
            Ok(s) => requests += s.requests,
            Err(f) => failures.push(f),
        }
    }
    (failures, n, requests)
}

#[test]
fn fixed_seed_range() {
    let (failures, n, requests) = run(SEEDS);
    assert!(requests > 1000, "the seeds simulated only {requests} requests");
    assert!(failures.is_empty(), "{}", report(&failures, n));
}

#[test]
fn regressions() {
    let (failures, n, _) = run(REGRESSIONS.iter().map(|r| r.0));
    assert!(failures.is_empty(), "{}", report(&failures, n));
}

#[test]
fn seeds_replay_exactly() {
    for seed in [3, 77, 1234] {
        let a = sim::run_seed(seed).map(|s| (s.requests, s.steps, s.sim_ms));
        let b = sim::run_seed(seed).map(|s| (s.requests, s.steps, s.sim_ms));
        assert_eq!(a.as_ref().ok(), b.as_ref().ok(), "seed {seed} does not replay");
        assert_eq!(a.is_err(), b.is_err());
    }
}

#[test]
fn fuzz_bytes_drive_the_simulator() {
    for data in [&b""[..], b"\x00\x00\x00", b"\xff\xff\xff\xff\xff", b"inferd simulator fuzz input"]
    {
        if let Err(f) = sim::run_bytes(data) {
            panic!("{f}");
        }
    }
}

#[test]
fn traces_are_identical_across_runs() {
    for seed in [5, 42] {
        let a = sim::trace_seed(seed, sim::TraceMode::Full);
        let b = sim::trace_seed(seed, sim::TraceMode::Full);
        assert!(a.1.len() > 20, "seed {seed}: a full trace has the whole run: {}", a.1.len());
        assert_eq!((&a.0, &a.1), (&b.0, &b.1), "seed {seed}: the trace differs between runs");
        assert_eq!(a.2.is_ok(), b.2.is_ok());
    }
}

#[test]
fn a_connection_trace_is_that_connections_story() {
    let (_, full, _) = sim::trace_seed(42, sim::TraceMode::Full);
    let (_, one, _) = sim::trace_seed(42, sim::TraceMode::Conn(1));
    assert!(!one.is_empty() && one.len() < full.len(), "{} of {}", one.len(), full.len());
    for line in &one {
        assert!(full.contains(line), "not in the full trace: {line}");
        let words: Vec<&str> = line.split(|c: char| !c.is_ascii_alphanumeric()).collect();
        assert!(
            words.contains(&"c1") || words.iter().any(|w| w.starts_with('g')),
            "not about c1 or its generations: {line}"
        );
    }
}
