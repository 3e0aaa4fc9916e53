//! Streaming, error codes and connection semantics (spec §1–§4).

use inferd_e2e::*;

both_shells!(
    streaming,
    stream_false_gives_only_done,
    several_requests_and_pipelining,
    invalid_request_decodable_keeps_connection_open,
    invalid_request_undecodable_closes_with_salvaged_id,
    frame_too_large_closes,
    queue_full_keeps_connection_open,
    backend_unavailable_keeps_connection_open,
    mid_stream_failure_ends_with_error,
    half_close_still_gets_the_reply,
    slow_sender_is_closed_but_idle_is_not,
    max_connections_closes_extra_connections,
);

/// Tokens then `done`; `done.content` is the concatenation of the tokens and, with the
/// echo mock, the prompt itself; the id is echoed on every frame.
fn streaming(shell: Shell) {
    let d = shell.daemon().start();
    let mut c = d.connect();
    c.send(&req("s1", "alpha beta gamma delta"));
    let r = c.read_reply();
    let (content, stop, usage) = r.done();
    assert_eq!(r.id(), "s1");
    assert!(r.tokens.iter().all(|(id, _)| id == "s1"), "{:?}", r.tokens);
    let pieces: Vec<&str> = r.tokens.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(pieces, ["alpha", " beta", " gamma", " delta"]);
    assert_eq!(content, r.streamed());
    assert_eq!(content, "alpha beta gamma delta");
    assert_eq!(stop, StopReason::End);
    assert_eq!(usage.completion_tokens, 4);
    assert!(usage.prompt_tokens >= 1);
    match &r.terminal {
        Frame::Done { backend, .. } => assert_eq!(backend, "mock"),
        _ => unreachable!(),
    }
}

fn stream_false_gives_only_done(shell: Shell) {
    let d = shell.daemon().start();
    let mut c = d.connect();
    c.send(&req_with("ns", "one two three", json!({"stream": false})));
    let r = c.read_reply();
    assert!(r.tokens.is_empty(), "stream:false sent tokens: {:?}", r.tokens);
    assert_eq!(r.done().0, "one two three");
    assert_eq!(r.id(), "ns");
    // And max_tokens 0 ends at once with `length`.
    c.send(&req_with("z", "one two", json!({"max_tokens": 0})));
    let r = c.read_reply();
    assert!(r.tokens.is_empty());
    assert_eq!(r.done().1, StopReason::Length);
    assert_eq!(r.done().2.completion_tokens, 0);
}

/// Several requests one after the other on one connection, then five pipelined in one
/// write: every one is answered, in order.
fn several_requests_and_pipelining(shell: Shell) {
    let d = shell.daemon().start();
    let mut c = d.connect();
    for i in 0..3 {
        let prompt = format!("request number {i}");
        c.send(&req(&format!("seq{i}"), &prompt));
        let r = c.read_reply();
        assert_eq!(r.id(), format!("seq{i}"));
        assert_eq!(r.done().0, prompt);
    }
    let mut burst = String::new();
    for i in 0..5 {
        burst.push_str(&req(&format!("p{i}"), &format!("pipelined {i}")).to_string());
        burst.push('\n');
        if i == 2 {
            // A blank line between requests is skipped.
            burst.push_str("  \r\n");
        }
    }
    c.send_raw(burst.as_bytes());
    for i in 0..5 {
        let r = c.read_reply();
        assert_eq!(r.id(), format!("p{i}"), "replies out of order");
        assert_eq!(r.done().0, format!("pipelined {i}"));
        assert!(r.tokens.iter().all(|(id, _)| *id == format!("p{i}")));
    }
}

fn invalid_request_decodable_keeps_connection_open(shell: Shell) {
    let d = shell.daemon().start();
    let mut c = d.connect();
    let bad = [
        json!({"id": "e1", "messages": []}),
        req_with("e2", "hi", json!({"temperature": -1})),
        req_with("e3", "hi", json!({"top_p": 0})),
        req_with("e4", "hi", json!({"image_token_budget": 100})),
    ];
    for b in &bad {
        c.send(b);
        let r = c.read_reply();
        assert!(r.tokens.is_empty());
        assert_eq!(r.error(), ErrorCode::InvalidRequest, "for {b}");
        assert_eq!(r.id(), b["id"].as_str().unwrap());
    }
    // The connection is still open: a valid request on it is answered.
    c.send(&req("ok", "still here"));
    assert_eq!(c.read_reply().done().0, "still here");
}

fn invalid_request_undecodable_closes_with_salvaged_id(shell: Shell) {
    let d = shell.daemon().start();
    let cases: [(&[u8], &str); 5] = [
        (br#"{"id":"u1","messages":"not an array"}"#, "u1"),
        (br#"{"id":"u2","messages":[{"role":"wizard","content":"x"}]}"#, "u2"),
        (br#"{"id":"u3"}"#, "u3"),
        (b"this is not json", ""),
        (br#"["an","array"]"#, ""),
    ];
    for (line, id) in cases {
        let mut c = d.connect();
        let mut bytes = line.to_vec();
        bytes.push(b'\n');
        // Bytes after the bad line must not be answered: the connection closes.
        bytes.extend_from_slice(format!("{}\n", req("after", "x")).as_bytes());
        c.send_raw(&bytes);
        let r = c.read_reply();
        assert_eq!(r.error(), ErrorCode::InvalidRequest, "for {}", String::from_utf8_lossy(line));
        assert_eq!(r.id(), id, "salvaged id for {}", String::from_utf8_lossy(line));
        c.expect_closed();
    }
}

fn frame_too_large_closes(shell: Shell) {
    let d = shell.daemon().config("max_frame_bytes", json!(4096)).start();
    // Just under the cap is served.
    let mut c = d.connect();
    let fits = req("fits", &"y".repeat(3900)).to_string();
    assert!(fits.len() <= 4096);
    c.send_raw(format!("{fits}\n").as_bytes());
    assert_eq!(c.read_reply().done().0.len(), 3900);
    // Over the cap: error with id "", then the daemon closes.
    let line = req("big", &"x".repeat(5000)).to_string();
    c.send_raw(format!("{line}\n").as_bytes());
    let r = c.read_reply();
    assert_eq!(r.error(), ErrorCode::FrameTooLarge);
    assert_eq!(r.id(), "");
    c.expect_closed();
    // The daemon still serves others.
    assert_eq!(d.ask(&req("next", "fine")).done().0, "fine");
}

/// With one permit and no queue, a second request while one generates gets
/// `queue_full`, and its connection stays usable.
fn queue_full_keeps_connection_open(shell: Shell) {
    let d = shell
        .daemon()
        .args(["--active-permits", "1", "--queue-depth", "0"])
        .args(["--mock-tokens", "20", "--mock-token-delay-ms", "50"])
        .start();
    let mut a = d.connect();
    a.send(&req("A", "slow words here"));
    // A's first token: A holds the only permit.
    assert!(matches!(a.next_frame(), Ok(Frame::Token { .. })));
    let mut b = d.connect();
    b.send(&req("B", "rejected"));
    let r = b.read_reply();
    assert_eq!(r.error(), ErrorCode::QueueFull);
    assert_eq!(r.id(), "B");
    // Let A finish, then B's connection is still usable.
    let ra = a.read_reply();
    assert_eq!(ra.done().2.completion_tokens, 20);
    b.send(&req_with("B2", "served now", json!({"max_tokens": 2})));
    let r = b.read_reply();
    assert_eq!(r.id(), "B2");
    assert_eq!(r.done().0, "served now");
}

fn backend_unavailable_keeps_connection_open(shell: Shell) {
    let d = shell.daemon().args(["--mock-fail", "before"]).start();
    let mut c = d.connect();
    for i in 0..4 {
        // The fourth one meets an open breaker: still `backend_unavailable`.
        let id = format!("f{i}");
        c.send(&req(&id, "will fail"));
        let r = c.read_reply();
        assert!(r.tokens.is_empty());
        assert_eq!(r.error(), ErrorCode::BackendUnavailable);
        assert_eq!(r.id(), id);
    }
}

/// `--mock-fail after:2`: two tokens, then an `error` terminal frame.
fn mid_stream_failure_ends_with_error(shell: Shell) {
    let d = shell.daemon().args(["--mock-fail", "after:2"]).start();
    let mut c = d.connect();
    c.send(&req("m", "a b c d e"));
    let r = c.read_reply();
    assert_eq!(r.streamed(), "a b");
    assert_eq!(r.error(), ErrorCode::BackendUnavailable);
    assert_eq!(r.id(), "m");
    // The connection stays open.
    c.send(&req("m2", "x"));
    let r = c.read_reply();
    assert_eq!(r.id(), "m2");
}

/// A half-close does not cancel: the whole reply arrives, then EOF.
fn half_close_still_gets_the_reply(shell: Shell) {
    let d = shell.daemon().args(["--mock-tokens", "8", "--mock-token-delay-ms", "50"]).start();
    let mut c = d.connect();
    c.send(&req("h", "half closed client"));
    c.shutdown_write();
    let r = c.read_reply();
    assert_eq!(r.id(), "h");
    let (content, stop, usage) = r.done();
    assert_eq!(usage.completion_tokens, 8);
    assert_eq!(stop, StopReason::End);
    assert_eq!(content, r.streamed());
    assert_eq!(c.next_line(), Err(Closed::Eof));
    // Two pipelined requests then a half-close: both answered, then EOF.
    let mut c = d.connect();
    c.send_raw(format!("{}\n{}\n", req("h1", "x y"), req("h2", "z")).as_bytes());
    c.shutdown_write();
    assert_eq!(c.read_reply().id(), "h1");
    assert_eq!(c.read_reply().id(), "h2");
    assert_eq!(c.next_line(), Err(Closed::Eof));
}

/// `--read-timeout-secs 1`: a connection holding an unfinished request line is closed;
/// one opened at the same time that sent nothing stays usable.
fn slow_sender_is_closed_but_idle_is_not(shell: Shell) {
    let d = shell.daemon().args(["--read-timeout-secs", "1"]).start();
    let mut idle = d.connect();
    let mut partial = d.connect();
    partial.send_raw(br#"{"id":"p","messages":[{"role":"user","#);
    // The daemon closes it without a frame.
    partial.expect_closed();
    // The idle one, open at least as long, is still served.
    idle.send(&req("i", "idle is fine"));
    assert_eq!(idle.read_reply().done().0, "idle is fine");
}

/// `--max-connections 2`: a third connection is accepted and closed at once; when one
/// of the two leaves, new connections are served again.
fn max_connections_closes_extra_connections(shell: Shell) {
    let d = shell.daemon().args(["--max-connections", "2"]).start();
    // The readiness probe's connection may still count until the daemon notices it
    // left, so retry until two connections are served; they hold both places.
    let served = |id: &str| {
        let mut found = None;
        wait_until("a connection is served", std::time::Duration::from_secs(20), || {
            let mut c = d.connect();
            let ok = c.try_send(&req(id, "hello")).is_ok() && c.try_read_reply().is_ok();
            if ok {
                found = Some(c);
            }
            ok
        });
        found.unwrap()
    };
    let mut a = served("a");
    let b = served("b");
    let mut extra = d.connect();
    // The write may already fail (EPIPE) if the daemon closed it first.
    let _ = extra.try_send(&req("x", "three"));
    match extra.next_line() {
        Err(_) => {}
        Ok(line) => {
            panic!("a connection past the limit was served: {}", String::from_utf8_lossy(&line))
        }
    }
    drop(b);
    // Once the daemon has noticed b left, a new connection is served.
    wait_until(
        "a new connection is served after one left",
        std::time::Duration::from_secs(20),
        || {
            let mut c = d.connect();
            c.send(&req("y", "four"));
            c.try_read_reply().is_ok()
        },
    );
    // a is unaffected.
    a.send(&req("a2", "still"));
    assert_eq!(a.read_reply().done().0, "still");
}
