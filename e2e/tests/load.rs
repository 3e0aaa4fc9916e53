//! Admission under load, cancellation on hang-up, and slow readers (spec §4).

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use inferd_e2e::*;

both_shells!(
    burst_of_200_clients,
    cancel_while_queued_and_while_streaming,
    slow_reader_is_dropped_after_write_timeout,
    fast_engine_does_not_starve_readers,
);

/// 200 clients connect, then all send at once: each gets exactly one terminal frame,
/// `done` or `queue_full`; at least the 1 active + 10 queued are served.
fn burst_of_200_clients(shell: Shell) {
    const N: usize = 200;
    let d = shell
        .daemon()
        .args(["--queue-depth", "10", "--active-permits", "1"])
        .args(["--mock-token-delay-ms", "20", "--mock-tokens", "5"])
        .start();
    let path = d.infer_path();
    let go = Arc::new(Barrier::new(N));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let path = path.clone();
            let go = go.clone();
            thread::spawn(move || {
                let c = Client::connect(&path);
                go.wait(); // even after a failed connect, so no thread waits forever
                let mut c = c.expect("connect");
                let id = format!("c{i}");
                c.send(&req(&id, "burst"));
                let r = c.read_reply();
                assert_eq!(r.id(), id);
                // Exactly one terminal frame: nothing follows it (checked with a short
                // read after a half-close, so the daemon sees EOF and closes).
                c.shutdown_write();
                assert_eq!(c.next_line(), Err(Closed::Eof), "{id}: more frames after the terminal");
                match r.terminal {
                    Frame::Done { .. } => "done".to_string(),
                    Frame::Error { code, .. } => code.as_str().to_string(),
                    _ => unreachable!(),
                }
            })
        })
        .collect();
    let outcomes = tally(threads.into_iter().map(|t| t.join().expect("client thread")));
    eprintln!("{shell}: burst outcomes {outcomes:?}");
    let done = outcomes.get("done").copied().unwrap_or(0);
    let full = outcomes.get("queue_full").copied().unwrap_or(0);
    assert_eq!(done + full, N, "only done and queue_full expected: {outcomes:?}");
    assert!(full > 0, "{outcomes:?}");
    assert!(done >= 11, "{outcomes:?}");
}

/// Active 1, queue 1. A streams slowly; B queues, then hangs up, which frees the
/// place: C is then queued (not refused). A hangs up mid-stream, and C is served at
/// once instead of after A's long stream. The log records both cancellations.
fn cancel_while_queued_and_while_streaming(shell: Shell) {
    let mut d = shell
        .daemon()
        .fast_stats()
        .args(["--active-permits", "1", "--queue-depth", "1"])
        .args(["--mock-token-delay-ms", "200", "--mock-tokens", "1000"])
        .start();
    let mut admin = d.admin();
    let mut a = d.connect();
    a.send(&req_with("A", "long stream", json!({"max_tokens": 1000})));
    assert!(matches!(a.next_frame(), Ok(Frame::Token { .. })), "A streams");

    let mut b = d.connect();
    b.send(&req("B", "queued then gone"));
    admin.wait_stats("B queued", Duration::from_secs(20), |s| stat(s, "queued") == 1);
    drop(b);
    // Hang-up detection while queued releases B's place.
    admin.wait_stats("B's place released", Duration::from_secs(20), |s| stat(s, "queued") == 0);

    let mut c = d.connect();
    c.send(&req_with("C", "after the others", json!({"max_tokens": 3})));
    let s = admin.wait_stats("C queued", Duration::from_secs(20), |s| stat(s, "queued") == 1);
    assert_eq!(stat(&s, "rejected"), 0, "C was refused: {s}");

    // A leaves mid-stream; C must not wait for A's 1000 × 200 ms.
    let t = Instant::now();
    drop(a);
    let r = c.read_reply();
    assert_eq!(r.done().0, "after the others");
    assert!(t.elapsed() < Duration::from_secs(20), "C waited {:?}", t.elapsed());

    // A new client is served promptly too.
    let mut e = d.connect();
    e.send(&req_with("E", "fresh", json!({"max_tokens": 2})));
    assert_eq!(e.read_reply().done().2.completion_tokens, 2);

    assert!(d.terminate().success());
    let records = d.log_records();
    let cancelled: Vec<&str> = records
        .iter()
        .filter(|r| r["msg"] == "request_done" && r["stop_reason"] == "cancelled")
        .filter_map(|r| r["req_id"].as_str())
        .collect();
    assert!(cancelled.contains(&"A"), "no cancelled record for A: {cancelled:?}\n{}", d.log_text());
    assert!(cancelled.contains(&"B"), "no cancelled record for B: {cancelled:?}\n{}", d.log_text());
}

/// A client that never reads is dropped after the write timeout while others are
/// served; when it finally reads it sees frames, then the close, and no terminal frame.
fn slow_reader_is_dropped_after_write_timeout(shell: Shell) {
    let d = shell
        .daemon()
        .args(["--write-timeout-secs", "1", "--active-permits", "2"])
        // 1 ms per 4 KB token fills the socket buffer in well under a second without
        // flooding the daemon (see fast_engine_does_not_starve_readers for that).
        .args(["--mock-tokens", "100000", "--mock-token-delay-ms", "1"])
        .start();
    let word = "w".repeat(4096);
    let mut slow = d.connect();
    slow.send(&req_with("slow", &word, json!({"max_tokens": 100000})));
    // Meanwhile another client is served.
    let mut other = d.connect();
    other.send(&req_with("other", "quick one", json!({"max_tokens": 3})));
    let r = other.read_reply();
    assert_eq!(r.done().0, "quick one quick");
    // The daemon closes the stuck connection (seen as POLLHUP, reading nothing).
    wait_until("the daemon closes the slow reader", Duration::from_secs(15), || slow.peer_closed());
    // Still serving.
    let r = d.ask(&req_with("after", "still serving", json!({"max_tokens": 2})));
    assert_eq!(r.done().0, "still serving");
    // Now read: the buffered tokens, then EOF or reset, never a terminal frame.
    match slow.try_read_reply() {
        Ok(r) => panic!("the slow reader got a terminal frame: {:?}", r.terminal),
        Err((tokens, _how)) => {
            assert!(!tokens.is_empty(), "the socket buffer should have held some tokens");
            assert!(tokens.len() < 100000);
        }
    }
}

/// A client that reads as fast as it can is not mistaken for a slow reader while the
/// engine produces tokens faster than the daemon writes them, and an admin subscriber
/// stays connected through the flood.
fn fast_engine_does_not_starve_readers(shell: Shell) {
    // 12,000 tokens of 4 KiB: a long flood whose `done` (48 MiB) still fits the 64 MiB cap.
    const TOKENS: u32 = 12000;
    let d = shell
        .daemon()
        .fast_stats()
        .args(["--write-timeout-secs", "3", "--mock-tokens", &TOKENS.to_string()])
        .start();
    let mut admin = d.admin();
    let mut c = d.connect();
    c.send(&req_with("flood", &"f".repeat(4096), json!({"max_tokens": TOKENS})));
    match c.try_read_reply() {
        Ok(r) => {
            assert_eq!(r.done().2.completion_tokens, TOKENS);
            assert_eq!(r.tokens.len(), TOKENS as usize);
        }
        Err((tokens, how)) => panic!(
            "a client reading promptly was dropped ({how:?}) after {} of {TOKENS} tokens",
            tokens.len()
        ),
    }
    admin.wait_stats("served 1 (admin subscriber still connected)", Duration::from_secs(20), |s| {
        stat(s, "served") == 1 && stat(s, "active") == 0
    });
}
