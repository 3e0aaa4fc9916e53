//! SIGTERM draining (spec §4 Shutdown) and the activity log (spec §6).

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use inferd_e2e::*;

both_shells!(
    sigterm_with_50_requests_in_flight,
    sigterm_drain_timeout_cancels_long_generations,
    activity_log_records_without_prompts_or_secrets,
    sigterm_on_an_idle_daemon_tells_admin_subscribers,
);

/// Spec §4-§5: with nothing in flight, SIGTERM still sends every admin subscriber the
/// `draining` status before its connection closes.
fn sigterm_on_an_idle_daemon_tells_admin_subscribers(shell: Shell) {
    let mut d = shell.daemon().start();
    let mut admins: Vec<Admin> = (0..3).map(|_| d.admin()).collect();
    for a in &mut admins {
        while a.next_event().expect("an event")["status"] != "ready" {}
    }
    d.sigterm();
    for a in &mut admins {
        let mut last = None;
        while let Some(v) = a.next_event() {
            last = Some(v["status"].as_str().unwrap_or_default().to_owned());
        }
        assert_eq!(last.as_deref(), Some("draining"), "the last event before EOF");
    }
    assert!(d.wait_exit(EXIT_TIMEOUT).success());
}

/// 50 clients each send one request (4 generate, the rest queue); SIGTERM. Every client
/// ends with `done` or `error` (never EOF without a terminal frame), the socket files
/// are removed, the daemon exits 0.
fn sigterm_with_50_requests_in_flight(shell: Shell) {
    const N: usize = 50;
    let mut d = shell
        .daemon()
        .fast_stats()
        .args(["--active-permits", "4", "--queue-depth", "100"])
        .args(["--mock-token-delay-ms", "10", "--mock-tokens", "50"])
        .start();
    let mut admin = d.admin();
    let path = d.infer_path();
    let sent = Arc::new(Barrier::new(N + 1));
    let clients: Vec<_> = (0..N)
        .map(|i| {
            let path = path.clone();
            let sent = sent.clone();
            thread::spawn(move || {
                let c = Client::connect(&path);
                let mut c = match c {
                    Ok(mut c) => {
                        c.send(&req(&format!("q{i}"), "drain me"));
                        sent.wait();
                        c
                    }
                    Err(e) => {
                        sent.wait();
                        panic!("connect: {e}");
                    }
                };
                match c.try_read_reply() {
                    Ok(r) => {
                        assert_eq!(r.id(), format!("q{i}"));
                        match r.terminal {
                            Frame::Done { .. } => "done".to_string(),
                            Frame::Error { code, .. } => code.as_str().to_string(),
                            _ => unreachable!(),
                        }
                    }
                    Err((tokens, how)) => {
                        format!(
                            "closed without a terminal frame ({how:?}, {} tokens)",
                            tokens.len()
                        )
                    }
                }
            })
        })
        .collect();
    sent.wait();
    // Every request has been read and admitted (some may already be served).
    admin.wait_stats("all 50 admitted", Duration::from_secs(30), |s| {
        stat(s, "queued") + stat(s, "active") + stat(s, "served") == N as u64
    });
    d.sigterm();
    let mut saw_draining = false;
    while let Some(ev) = admin.next_event() {
        saw_draining |= ev["status"] == "draining";
    }
    let status = d.wait_exit(EXIT_TIMEOUT);
    let outcomes = tally(clients.into_iter().map(|t| t.join().expect("client thread")));
    eprintln!("{shell}: SIGTERM outcomes {outcomes:?}");
    for k in outcomes.keys() {
        assert!(k == "done" || k == "backend_unavailable", "bad outcome {k}: {outcomes:?}");
    }
    assert_eq!(outcomes.values().sum::<usize>(), N);
    assert!(status.success(), "exit status {status}; stderr:\n{}", d.stderr());
    assert!(!d.infer_path().exists(), "infer.sock left behind");
    assert!(!d.admin_path().exists(), "admin.sock left behind");
    assert!(saw_draining, "the admin subscriber never saw `draining`");
}

/// In-flight generations still running at the drain deadline end with an
/// `error{backend_unavailable}` frame; queued ones get it at once; exit 0.
fn sigterm_drain_timeout_cancels_long_generations(shell: Shell) {
    let mut d = shell
        .daemon()
        .fast_stats()
        .args(["--drain-timeout-secs", "1", "--active-permits", "2", "--queue-depth", "4"])
        .args(["--mock-token-delay-ms", "100", "--mock-tokens", "1000"])
        .start();
    let mut admin = d.admin();
    let mut streams: Vec<Client> = ["A", "B"]
        .iter()
        .map(|id| {
            let mut c = d.connect();
            c.send(&req_with(id, "a long answer", json!({"max_tokens": 1000})));
            assert!(matches!(c.next_frame(), Ok(Frame::Token { .. })), "{id} streams");
            c
        })
        .collect();
    let mut queued = d.connect();
    queued.send(&req("Q", "waiting"));
    admin.wait_stats("Q queued", Duration::from_secs(20), |s| stat(s, "queued") == 1);
    d.sigterm();
    let rq = queued.read_reply();
    assert_eq!(rq.error(), ErrorCode::BackendUnavailable);
    assert_eq!(rq.id(), "Q");
    for (c, id) in streams.iter_mut().zip(["A", "B"]) {
        let r = c.read_reply();
        assert_eq!(r.id(), id);
        assert_eq!(r.error(), ErrorCode::BackendUnavailable, "{id}: {:?}", r.terminal);
        assert!(r.tokens.len() < 999, "{id} ran to completion");
    }
    let status = d.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}; stderr:\n{}", d.stderr());
    assert!(!d.infer_path().exists() && !d.admin_path().exists(), "socket files left behind");
}

const SECRETS: [&str; 5] = [
    "PROMPT-MARKER-123",
    "hunter2",
    "sk-proj-abcdefghijklmnopqrstuvwx",
    "IDSECRET42",
    "sk-live-ABCDEFGHIJKLMNOPQRSTUV0123",
];

/// The activity log has the spec's records and fields, no prompt or output text, and
/// secrets in request ids are redacted.
fn activity_log_records_without_prompts_or_secrets(shell: Shell) {
    let mut d = shell.daemon().start();
    let prompt = "tell me PROMPT-MARKER-123 password=hunter2 sk-proj-abcdefghijklmnopqrstuvwx";
    let mut c = d.connect();
    c.send(&req("plain-id", prompt));
    let r = c.read_reply();
    // The mock echoes: the output carries the secrets too, and must not be logged either.
    assert!(r.done().0.contains("PROMPT-MARKER-123"));
    c.send(&req("req password=IDSECRET42", "x"));
    assert_eq!(c.read_reply().id(), "req password=IDSECRET42", "ids are echoed verbatim");
    c.send(&req("sk-live-ABCDEFGHIJKLMNOPQRSTUV0123", "y"));
    c.read_reply();
    c.send(&json!({"id": "rej", "messages": []}));
    assert_eq!(c.read_reply().error(), ErrorCode::InvalidRequest);
    drop(c);
    assert!(d.terminate().success(), "stderr:\n{}", d.stderr());

    let text = d.log_text();
    for s in SECRETS {
        assert!(!text.contains(s), "the activity log contains {s:?}:\n{text}");
        assert!(!d.stderr().contains(s), "stderr contains {s:?}");
    }
    assert!(!text.contains("tell me"), "prompt text in the log:\n{text}");
    let records = d.log_records();
    for r in &records {
        let t = r["t"].as_str().unwrap_or_else(|| panic!("no t: {r}"));
        assert!(
            t.len() >= 20 && t.as_bytes()[10] == b'T' && t.ends_with('Z'),
            "t not RFC 3339: {r}"
        );
        for k in ["level", "component", "msg"] {
            assert!(r[k].is_string(), "no {k}: {r}");
        }
    }
    let by_msg = |m: &str| records.iter().filter(move |r| r["msg"] == m).collect::<Vec<_>>();
    let accepted = by_msg("connection_accepted");
    assert!(!accepted.is_empty(), "no connection_accepted:\n{text}");
    let me = accepted
        .iter()
        .find(|r| r["peer_pid"] == std::process::id())
        .unwrap_or_else(|| panic!("no connection_accepted with our pid:\n{text}"));
    assert_eq!(me["transport"], "unix", "{me}");
    assert!(me["peer"].is_string(), "{me}");
    assert_eq!(me["peer_uid"], rustix::process::getuid().as_raw(), "{me}");

    let done = by_msg("request_done");
    let plain = done
        .iter()
        .find(|r| r["req_id"] == "plain-id")
        .unwrap_or_else(|| panic!("no request_done for plain-id:\n{text}"));
    assert_eq!(plain["backend"], "mock");
    assert_eq!(plain["stop_reason"], "end");
    for k in ["prompt_tokens", "completion_tokens", "queued_ms", "ttft_ms", "total_ms"] {
        assert!(plain[k].is_u64(), "request_done.{k} missing: {plain}");
    }
    assert_eq!(plain["completion_tokens"], 5);
    let redacted: Vec<&str> = done.iter().filter_map(|r| r["req_id"].as_str()).collect();
    assert!(redacted.iter().any(|id| id.starts_with("req password=")), "{redacted:?}");
    assert_eq!(done.len(), 3, "{text}");
    let rejected = by_msg("request_rejected");
    assert!(
        rejected.iter().any(|r| r["req_id"] == "rej" && r["code"] == "invalid_request"),
        "no request_rejected for rej:\n{text}"
    );
}
