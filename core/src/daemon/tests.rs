//! The daemon driven by scripted inputs and a fake clock.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::conn::SEND_CHUNK;
use super::*;
use crate::engine::Completion;
use crate::wire::{Frame, Usage};

struct H {
    d: Daemon,
    now: Time,
    out: HashMap<ConnId, Vec<u8>>,
    closed: HashSet<ConnId>,
    credits: HashSet<ConnId>,
    /// Connections whose writes never complete.
    stalled: HashSet<ConnId>,
    starts: Vec<(GenId, BackendId, GenerateRequest)>,
    cancels: Vec<GenId>,
    activity: Vec<String>,
    bound: u32,
    stop_accepting: bool,
    exit: Option<(i32, String)>,
    next_conn: u64,
    /// Size of every `Send`, per connection.
    send_sizes: HashMap<ConnId, Vec<usize>>,
}

fn cfg(backends: &[&str]) -> DaemonConfig {
    DaemonConfig {
        backends: backends.iter().map(|s| s.to_string()).collect(),
        ..DaemonConfig::default()
    }
}

const HI: &str = r#"{"id":"r1","messages":[{"role":"user","content":"hi"}]}"#;

fn req(id: &str) -> String {
    format!(r#"{{"id":"{id}","messages":[{{"role":"user","content":"hello"}}]}}"#)
}

impl H {
    fn new(cfg: DaemonConfig) -> H {
        H {
            d: Daemon::new(cfg, Time::ZERO, 1_795_781_093_000),
            now: Time::ZERO,
            out: HashMap::new(),
            closed: HashSet::new(),
            credits: HashSet::new(),
            stalled: HashSet::new(),
            starts: Vec::new(),
            cancels: Vec::new(),
            activity: Vec::new(),
            bound: 0,
            stop_accepting: false,
            exit: None,
            next_conn: 1,
            send_sizes: HashMap::new(),
        }
    }

    /// A daemon with its backends loaded and the inference listener bound.
    fn ready(cfg: DaemonConfig) -> H {
        let n = cfg.backends.len();
        let mut h = H::new(cfg);
        for b in 0..n {
            h.input(Input::BackendLoaded {
                backend: BackendId(b),
                capabilities: Capabilities::text_cpu(),
            });
        }
        assert_eq!(h.bound, 1);
        h
    }

    fn input(&mut self, i: Input) {
        self.d.handle(self.now, i);
        self.pump();
    }

    fn pump(&mut self) {
        let mut flushed = Vec::new();
        loop {
            while let Some(o) = self.d.poll_output() {
                match o {
                    Output::Send { conn, bytes } => {
                        assert!(!self.closed.contains(&conn), "send after close");
                        self.send_sizes.entry(conn).or_default().push(bytes.len());
                        if !self.stalled.contains(&conn) {
                            self.out.entry(conn).or_default().extend_from_slice(&bytes);
                            flushed.push(conn);
                        }
                    }
                    Output::Read { conn } => {
                        assert!(self.credits.insert(conn), "two read credits for {conn:?}");
                    }
                    Output::Close { conn } => {
                        assert!(self.closed.insert(conn), "closed twice: {conn:?}");
                        self.credits.remove(&conn);
                    }
                    Output::Start { generation, backend, request } => {
                        self.starts.push((generation, backend, request))
                    }
                    Output::Cancel { generation } => self.cancels.push(generation),
                    Output::Activity(line) => {
                        let v: serde_json::Value =
                            serde_json::from_str(&line).expect("activity is JSON");
                        assert!(v["t"].is_string());
                        self.activity.push(line);
                    }
                    Output::BindInference => self.bound += 1,
                    Output::StopAccepting => self.stop_accepting = true,
                    // Kept as (status, text) as the shells report it, 0 and "" when orderly.
                    Output::Exit { reason } if reason.is_orderly() => {
                        self.exit = Some((0, String::new()))
                    }
                    Output::Exit { reason } => self.exit = Some((1, reason.to_string())),
                }
            }
            if flushed.is_empty() {
                break;
            }
            for conn in flushed.drain(..) {
                self.d.handle(self.now, Input::Flushed { conn });
            }
        }
    }

    fn connect(&mut self) -> ConnId {
        self.connect_kind(ListenerKind::Inference, Transport::Unix)
    }

    fn connect_kind(&mut self, listener: ListenerKind, transport: Transport) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let peer = Peer { transport, addr: "peer".into(), uid: Some(1000), pid: Some(42) };
        self.input(Input::Accepted { conn, listener, peer });
        conn
    }

    fn send(&mut self, conn: ConnId, text: &str) {
        assert!(self.credits.remove(&conn), "the core did not ask to read {conn:?}");
        self.input(Input::Received { conn, bytes: text.as_bytes().to_vec() });
    }

    fn line(&mut self, conn: ConnId, line: &str) {
        self.send(conn, &format!("{line}\n"));
    }

    fn frames(&self, conn: ConnId) -> Vec<Frame> {
        self.out
            .get(&conn)
            .map(|b| {
                b.split(|&c| c == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| Frame::parse(l).expect("frame parses"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The contents of the token frames sent to `conn`, in order.
    fn token_contents(&self, conn: ConnId) -> Vec<String> {
        self.frames(conn)
            .into_iter()
            .filter_map(|f| match f {
                Frame::Token { content, .. } => Some(content),
                _ => None,
            })
            .collect()
    }

    fn raw_lines(&self, conn: ConnId) -> Vec<serde_json::Value> {
        self.out
            .get(&conn)
            .map(|b| {
                b.split(|&c| c == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| serde_json::from_slice(l).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn last_start(&self) -> GenId {
        self.starts.last().expect("a generation started").0
    }

    fn token(&mut self, g: GenId, text: &[u8]) {
        self.input(Input::Engine { generation: g, event: EngineEvent::Token(text.to_vec()) });
    }

    fn done(&mut self, g: GenId, stop: StopReason, tokens: u32) {
        let c = Completion::new(Usage { prompt_tokens: 5, completion_tokens: tokens }, stop);
        self.input(Input::Engine { generation: g, event: EngineEvent::Done(c) });
    }

    fn fail(&mut self, g: GenId, e: EngineError) {
        self.input(Input::Engine { generation: g, event: EngineEvent::Failed(e) });
    }

    fn advance(&mut self, d: Duration) {
        self.now = self.now + d;
        while let Some(t) = self.d.poll_timeout() {
            if t > self.now {
                break;
            }
            self.input(Input::Timeout);
        }
    }

    fn error_code(&self, conn: ConnId) -> Option<ErrorCode> {
        self.frames(conn).iter().rev().find_map(|f| match f {
            Frame::Error { code, .. } => Some(*code),
            _ => None,
        })
    }

    fn is_open(&self, conn: ConnId) -> bool {
        !self.closed.contains(&conn)
    }

    fn activity_of(&self, msg: &str) -> Vec<serde_json::Value> {
        self.activity
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["msg"] == msg)
            .collect()
    }
}

#[test]
fn streams_tokens_then_done_with_concatenated_content() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect();
    h.line(c, HI);
    let g = h.last_start();
    assert_eq!(h.starts[0].2.messages[0].content, "hi");
    h.now = Time::from_millis(5);
    h.token(g, b"Hel");
    h.token(g, b"lo");
    h.now = Time::from_millis(9);
    h.done(g, StopReason::End, 2);
    let f = h.frames(c);
    assert_eq!(f.len(), 3);
    assert_eq!(f[0], Frame::Token { id: "r1".into(), content: "Hel".into() });
    match &f[2] {
        Frame::Done { id, content, usage, stop_reason, backend, timings } => {
            assert_eq!(id, "r1");
            assert_eq!(content, "Hello");
            assert_eq!(usage.completion_tokens, 2);
            assert_eq!(*stop_reason, StopReason::End);
            assert_eq!(backend, "mock");
            assert_eq!(timings.unwrap(), Timings { queued_ms: 0, ttft_ms: 5, total_ms: 9 });
        }
        other => panic!("{other:?}"),
    }
    // The connection is read again for the next request.
    assert!(h.credits.contains(&c));
    assert_eq!(h.d.stats().served, 1);
}

#[test]
fn utf8_split_across_tokens_is_held_back() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect();
    h.line(c, HI);
    let g = h.last_start();
    let e = "é".as_bytes();
    h.token(g, &[b'a', e[0]]);
    h.token(g, &[e[1]]);
    h.token(g, &"🦀".as_bytes()[..3]);
    h.token(g, &"🦀".as_bytes()[3..]);
    h.done(g, StopReason::End, 4);
    let f = h.frames(c);
    let tokens: Vec<String> = f
        .iter()
        .filter_map(|f| match f {
            Frame::Token { content, .. } => Some(content.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(tokens, vec!["a", "é", "🦀"]);
    match f.last().unwrap() {
        Frame::Done { content, .. } => assert_eq!(content, &tokens.concat()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn stream_false_sends_only_the_terminal_frame() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect();
    h.line(c, r#"{"id":"q","stream":false,"messages":[{"role":"user","content":"x"}]}"#);
    let g = h.last_start();
    h.token(g, b"a");
    h.token(g, b"b");
    h.done(g, StopReason::Length, 2);
    let f = h.frames(c);
    assert_eq!(f.len(), 1);
    assert!(
        matches!(&f[0], Frame::Done { content, stop_reason: StopReason::Length, .. } if content == "ab")
    );
}

#[test]
fn invalid_request_classes() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect();
    h.line(c, r#"{"id":"v","messages":[]}"#);
    assert_eq!(h.error_code(c), Some(ErrorCode::InvalidRequest));
    assert!(h.is_open(c), "decodable but invalid keeps the connection");
    assert!(h.credits.contains(&c));
    h.line(c, r#"{"id":"w","messages":"nope"}"#);
    assert!(!h.is_open(c), "undecodable closes");
    match h.frames(c).last().unwrap() {
        Frame::Error { id, code: ErrorCode::InvalidRequest, .. } => assert_eq!(id, "w"),
        other => panic!("{other:?}"),
    }
    assert!(h.starts.is_empty());
}

#[test]
fn frame_too_large_closes() {
    let mut c = cfg(&["mock"]);
    c.max_frame_bytes = 1024;
    let mut h = H::ready(c);
    let conn = h.connect();
    h.send(conn, &"x".repeat(2000));
    assert_eq!(h.error_code(conn), Some(ErrorCode::FrameTooLarge));
    assert!(!h.is_open(conn));
    assert_eq!(h.activity_of("request_oversized").len(), 1);
}

#[test]
fn queue_full_is_immediate_and_fifo_holds() {
    let mut c = cfg(&["mock"]);
    c.queue_depth = 2;
    let mut h = H::ready(c);
    let conns: Vec<ConnId> = (0..4).map(|_| h.connect()).collect();
    for (i, &c) in conns.iter().enumerate() {
        h.line(c, &req(&format!("q{i}")));
    }
    assert_eq!(h.starts.len(), 1);
    assert_eq!(h.error_code(conns[3]), Some(ErrorCode::QueueFull));
    assert!(h.is_open(conns[3]), "queue_full keeps the connection");
    assert_eq!(h.d.stats().queued, 2);
    // Finishing the first starts the second, then the third: arrival order.
    let g = h.last_start();
    h.done(g, StopReason::End, 0);
    assert_eq!(h.starts.len(), 2);
    let g2 = h.last_start();
    h.done(g2, StopReason::End, 0);
    assert_eq!(h.starts.len(), 3);
    assert!(matches!(h.frames(conns[1]).last(), Some(Frame::Done { id, .. }) if id == "q1"));
    assert!(matches!(h.frames(conns[2]).last(), Some(Frame::Done { .. })).not());
    let g3 = h.last_start();
    h.done(g3, StopReason::End, 0);
    assert!(matches!(h.frames(conns[2]).last(), Some(Frame::Done { id, .. }) if id == "q2"));
    assert_eq!(h.d.stats().active, 0);
    assert_eq!(h.d.stats().rejected, 1);
}

trait Not {
    fn not(self) -> bool;
}
impl Not for bool {
    fn not(self) -> bool {
        !self
    }
}

#[test]
fn cancellation_while_queued_frees_the_place() {
    let mut c = cfg(&["mock"]);
    c.queue_depth = 1;
    let mut h = H::ready(c);
    let a = h.connect();
    let b = h.connect();
    let x = h.connect();
    h.line(a, &req("a"));
    h.line(b, &req("b"));
    h.input(Input::HungUp { conn: b });
    assert!(!h.is_open(b));
    assert_eq!(h.d.stats().queued, 0);
    h.line(x, &req("x"));
    assert_eq!(h.error_code(x), None, "the freed place was taken");
    let cancelled = h.activity_of("request_done");
    assert_eq!(cancelled[0]["stop_reason"], "cancelled");
    assert_eq!(cancelled[0]["req_id"], "b");
}

#[test]
fn cancellation_while_streaming_cancels_and_frees() {
    let mut h = H::ready(cfg(&["mock"]));
    let a = h.connect();
    let b = h.connect();
    h.line(a, &req("a"));
    h.line(b, &req("b"));
    let ga = h.last_start();
    h.token(ga, b"x");
    h.advance(Duration::from_millis(40));
    h.input(Input::HungUp { conn: a });
    assert_eq!(h.cancels, vec![ga]);
    assert_eq!(h.starts.len(), 2, "b starts at once");
    assert!(h.activity_of("request_done").is_empty(), "waits for the engine's account");
    // The cancelled engine reports its end later; nothing is sent anywhere, and the
    // record (issue 15#12) has the prompt's size and is timed to the hang-up.
    h.advance(Duration::from_millis(500));
    h.done(ga, StopReason::Cancelled, 1);
    assert_eq!(h.d.generations_running(), 1);
    let rec = h.activity_of("request_done");
    assert_eq!(rec[0]["stop_reason"], "cancelled");
    assert_eq!(rec[0]["prompt_tokens"], 5, "{}", rec[0]);
    assert_eq!(rec[0]["completion_tokens"], 1, "{}", rec[0]);
    assert_eq!(rec[0]["ttft_ms"], 0, "{}", rec[0]);
    assert_eq!(rec[0]["total_ms"], 40, "{}", rec[0]);
}

/// An engine that never reports after a cancel still gets its request a record when the
/// daemon stops waiting for it, without the prompt's size it never told.
#[test]
fn a_hung_cancelled_generation_is_recorded_at_exit() {
    let mut c = cfg(&["mock"]);
    c.drain_timeout = Duration::from_secs(1);
    let mut h = H::ready(c);
    let a = h.connect();
    h.line(a, &req("hung"));
    h.input(Input::HungUp { conn: a });
    assert!(h.activity_of("request_done").is_empty());
    h.input(Input::Shutdown);
    h.advance(Duration::from_secs(5));
    assert_eq!(h.exit.clone().unwrap().0, 0);
    let rec = h.activity_of("request_done");
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0]["stop_reason"], "cancelled");
    assert!(rec[0].get("prompt_tokens").is_none(), "{}", rec[0]);
}

#[test]
fn half_close_still_gets_the_reply() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect();
    h.line(c, HI);
    h.input(Input::ReadClosed { conn: c });
    assert!(h.cancels.is_empty());
    let g = h.last_start();
    h.token(g, b"ok");
    h.done(g, StopReason::End, 1);
    assert!(matches!(h.frames(c).last(), Some(Frame::Done { content, .. }) if content == "ok"));
    assert!(!h.is_open(c), "closed after the reply since the peer sent EOF");
}

#[test]
fn pipelined_requests_are_kept_and_served_in_order() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect();
    h.send(c, &format!("{}\n\n{}\n{}", req("p1"), req("p2"), &req("p3")[..10]));
    assert_eq!(h.starts.len(), 1);
    assert!(!h.credits.contains(&c), "no read while a request is in progress");
    let g = h.last_start();
    h.done(g, StopReason::End, 0);
    assert_eq!(h.starts.len(), 2, "p2 read from the buffer");
    let g = h.last_start();
    h.done(g, StopReason::End, 0);
    assert!(h.credits.contains(&c), "p3 incomplete: read more");
    h.line(c, &req("p3")[10..]);
    let g = h.last_start();
    h.done(g, StopReason::End, 0);
    let ids: Vec<String> = h
        .frames(c)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Done { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, ["p1", "p2", "p3"]);
}

#[test]
fn eof_mid_line_drops_it_and_closes() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect();
    h.send(c, r#"{"id":"half"#);
    h.input(Input::ReadClosed { conn: c });
    assert!(!h.is_open(c));
    assert!(h.frames(c).is_empty());
}

#[test]
fn write_stall_drops_the_connection_and_frees_the_place() {
    let mut c = cfg(&["mock"]);
    c.write_timeout = Duration::from_secs(10);
    let mut h = H::ready(c);
    let slow = h.connect();
    let other = h.connect();
    h.stalled.insert(slow);
    h.line(slow, &req("s"));
    h.line(other, &req("o"));
    let g = h.last_start();
    h.token(g, b"never read");
    h.advance(Duration::from_secs(9));
    assert!(h.is_open(slow));
    h.advance(Duration::from_secs(1));
    assert!(!h.is_open(slow), "dropped after the write timeout");
    assert_eq!(h.cancels, vec![g]);
    assert_eq!(h.starts.len(), 2, "the other client is served");
}

#[test]
fn read_timeout_closes_slow_senders_but_not_idle_ones() {
    let mut c = cfg(&["mock"]);
    c.read_timeout = Duration::from_secs(5);
    let mut h = H::ready(c);
    let idle = h.connect();
    let slow = h.connect();
    h.send(slow, "{\"id\":");
    h.advance(Duration::from_secs(4));
    assert!(h.is_open(slow));
    h.advance(Duration::from_secs(1));
    assert!(!h.is_open(slow));
    h.advance(Duration::from_secs(60));
    assert!(h.is_open(idle));
}

#[test]
fn max_connections_closes_newcomers() {
    let mut c = cfg(&["mock"]);
    c.max_connections = 2;
    let mut h = H::ready(c);
    let a = h.connect();
    let _b = h.connect();
    let x = h.connect();
    assert!(!h.is_open(x));
    h.input(Input::HungUp { conn: a });
    let y = h.connect();
    assert!(h.is_open(y));
}

#[test]
fn readiness_gating_binds_only_when_all_backends_loaded() {
    let mut h = H::new(cfg(&["a", "b"]));
    let admin = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    h.input(Input::BackendPhase {
        backend: BackendId(0),
        phase: LoadPhase::Mmap { path: "/m".into() },
    });
    h.input(Input::BackendLoaded { backend: BackendId(0), capabilities: Capabilities::text_cpu() });
    assert_eq!(h.bound, 0);
    h.input(Input::BackendLoaded { backend: BackendId(1), capabilities: Capabilities::text_cpu() });
    assert_eq!(h.bound, 1);
    let statuses: Vec<String> =
        h.raw_lines(admin).iter().map(|v| v["status"].as_str().unwrap().to_owned()).collect();
    assert_eq!(statuses, ["starting", "loading_model", "capabilities", "capabilities", "ready"]);
    // A late subscriber gets the capabilities so far, then the snapshot.
    let late = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    let v = h.raw_lines(late);
    assert_eq!(v.len(), 3);
    assert_eq!(v[0]["backend"], "a");
    assert_eq!(v[1]["backend"], "b");
    assert_eq!(v[2]["status"], "ready");
}

#[test]
fn inference_connections_before_ready_are_refused() {
    let mut h = H::new(cfg(&["a"]));
    let c = h.connect();
    assert!(!h.is_open(c));
}

#[test]
fn backend_load_failure_exits_non_zero() {
    let mut h = H::new(cfg(&["llama"]));
    h.input(Input::BackendFailed {
        backend: BackendId(0),
        error: EngineError::internal("bad magic"),
    });
    let (code, msg) = h.exit.clone().unwrap();
    assert_eq!(code, 1);
    assert!(msg.contains("llama") && msg.contains("bad magic"), "{msg}");
}

#[test]
fn ready_timeout_exits_non_zero() {
    let mut c = cfg(&["slow"]);
    c.ready_timeout = Duration::from_secs(30);
    let mut h = H::new(c);
    h.advance(Duration::from_secs(29));
    assert!(h.exit.is_none());
    h.advance(Duration::from_secs(1));
    assert_eq!(h.exit.clone().unwrap().0, 1);
}

#[test]
fn backend_errors_before_and_during_the_stream() {
    let mut h = H::ready(cfg(&["m"]));
    let c = h.connect();
    h.line(c, &req("a"));
    let g = h.last_start();
    h.fail(g, EngineError::internal("boom"));
    assert_eq!(h.error_code(c), Some(ErrorCode::Internal));
    assert!(h.is_open(c));
    h.line(c, &req("b"));
    let g = h.last_start();
    h.fail(g, EngineError::unavailable("gone"));
    assert_eq!(h.error_code(c), Some(ErrorCode::BackendUnavailable));
    h.line(c, &req("c"));
    let g = h.last_start();
    h.token(g, b"x");
    h.fail(g, EngineError::internal("mid"));
    assert_eq!(h.error_code(c), Some(ErrorCode::BackendUnavailable), "mid-stream failure");
    assert!(h.is_open(c));
    assert_eq!(h.activity_of("request_error_mid_stream").len(), 1);
}

#[test]
fn breaker_opens_half_opens_and_closes_with_the_clock() {
    let mut h = H::ready(cfg(&["m"]));
    let c = h.connect();
    for i in 0..3 {
        h.line(c, &req(&format!("f{i}")));
        let g = h.last_start();
        h.fail(g, EngineError::unavailable("down"));
    }
    h.line(c, &req("blocked"));
    assert_eq!(h.starts.len(), 3, "breaker open: not started");
    match h.frames(c).last().unwrap() {
        Frame::Error { code: ErrorCode::BackendUnavailable, message, .. } => {
            assert!(message.contains("breaker"))
        }
        other => panic!("{other:?}"),
    }
    h.advance(Duration::from_secs(30));
    h.line(c, &req("trial"));
    assert_eq!(h.starts.len(), 4, "half-open trial");
    let other = h.connect();
    h.line(other, &req("second"));
    assert_eq!(h.error_code(other), None, "waits for the trial's place");
    let g = h.last_start();
    h.done(g, StopReason::End, 1);
    assert_eq!(h.starts.len(), 5, "closed again: the queued request starts");
}

#[test]
fn failed_trial_reopens() {
    let mut c = cfg(&["m"]);
    c.active_permits = 2;
    let mut h = H::ready(c);
    let c1 = h.connect();
    for i in 0..3 {
        h.line(c1, &req(&format!("f{i}")));
        let g = h.last_start();
        h.fail(g, EngineError::unavailable("down"));
    }
    h.advance(Duration::from_secs(30));
    h.line(c1, &req("trial"));
    let c2 = h.connect();
    h.line(c2, &req("during-trial"));
    assert_eq!(h.error_code(c2), Some(ErrorCode::BackendUnavailable), "only one trial");
    let g = h.last_start();
    h.fail(g, EngineError::unavailable("still down"));
    h.line(c2, &req("after"));
    assert_eq!(h.starts.len(), 4);
}

#[test]
fn client_errors_found_by_the_engine_never_move_the_breaker() {
    let mut h = H::ready(cfg(&["m"]));
    let c = h.connect();
    // More invalid requests than the failure threshold: the breaker stays closed.
    for i in 0..5 {
        h.line(c, &req(&format!("bad{i}")));
        let g = h.last_start();
        h.fail(g, EngineError::invalid_request("invalid grammar"));
        assert_eq!(h.error_code(c), Some(ErrorCode::InvalidRequest));
        assert!(h.is_open(c), "a client error keeps the connection open");
    }
    h.line(c, &req("good"));
    assert_eq!(h.starts.len(), 6, "the breaker did not open");
    let g = h.last_start();
    h.done(g, StopReason::End, 1);
    assert_eq!(h.activity_of("request_rejected").len(), 5);

    // Open it for real, then spend the half-open trial on a client error: the trial
    // decides nothing, and the next request is the trial.
    for i in 0..3 {
        h.line(c, &req(&format!("f{i}")));
        let g = h.last_start();
        h.fail(g, EngineError::unavailable("down"));
    }
    h.advance(Duration::from_secs(30));
    h.line(c, &req("trial-bad"));
    assert_eq!(h.starts.len(), 10, "half-open trial started");
    let g = h.last_start();
    h.fail(g, EngineError::invalid_request("prompt is 900 tokens, context is 512"));
    assert_eq!(h.error_code(c), Some(ErrorCode::InvalidRequest));
    h.line(c, &req("trial-good"));
    assert_eq!(h.starts.len(), 11, "still half-open: a new trial starts at once");
    let g = h.last_start();
    h.done(g, StopReason::End, 1);
    let other = h.connect();
    h.line(other, &req("a"));
    assert_eq!(h.starts.len(), 12, "closed again: no trial to wait for");
    assert_eq!(h.error_code(other), None);
}

#[test]
fn fallback_to_second_backend_when_first_is_broken() {
    let mut h = H::ready(cfg(&["primary", "secondary"]));
    let c = h.connect();
    for i in 0..3 {
        h.line(c, &req(&format!("f{i}")));
        let (g, b, _) = h.starts.last().cloned().unwrap();
        assert_eq!(b, BackendId(0));
        h.fail(g, EngineError::unavailable("down"));
    }
    h.line(c, &req("next"));
    assert_eq!(h.starts.last().unwrap().1, BackendId(1));
    h.input(Input::BackendReadiness { backend: BackendId(1), ready: false });
    let g = h.last_start();
    h.done(g, StopReason::End, 0);
    h.line(c, &req("none"));
    assert_eq!(h.error_code(c), Some(ErrorCode::BackendUnavailable));
}

#[test]
fn shutdown_drains_in_flight_and_rejects_queued() {
    let mut c = cfg(&["m"]);
    c.drain_timeout = Duration::from_secs(10);
    let mut h = H::ready(c);
    let admin = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    let running = h.connect();
    let queued = h.connect();
    let idle = h.connect();
    h.line(running, &req("run"));
    h.line(queued, &req("wait"));
    h.input(Input::Shutdown);
    assert!(h.stop_accepting);
    assert!(!h.is_open(idle));
    assert!(!h.is_open(queued));
    match h.frames(queued).last().unwrap() {
        Frame::Error { code: ErrorCode::BackendUnavailable, message, .. } => {
            assert!(message.contains("draining"))
        }
        other => panic!("{other:?}"),
    }
    assert!(h.exit.is_none(), "in-flight generation still running");
    let g = h.last_start();
    h.token(g, b"fin");
    h.done(g, StopReason::End, 1);
    assert!(matches!(h.frames(running).last(), Some(Frame::Done { .. })));
    assert_eq!(h.exit.clone().unwrap().0, 0);
    assert!(!h.is_open(admin));
    assert!(h.raw_lines(admin).iter().any(|v| v["status"] == "draining"));
}

#[test]
fn drain_deadline_cancels_with_an_error_frame() {
    let mut c = cfg(&["m"]);
    c.drain_timeout = Duration::from_secs(10);
    let mut h = H::ready(c);
    let running = h.connect();
    h.line(running, &req("run"));
    let g = h.last_start();
    h.input(Input::Shutdown);
    h.advance(Duration::from_secs(10));
    assert_eq!(h.cancels, vec![g]);
    assert_eq!(h.error_code(running), Some(ErrorCode::BackendUnavailable));
    assert!(!h.is_open(running));
    assert!(h.exit.is_none(), "waits for the engine to stop");
    h.done(g, StopReason::Cancelled, 0);
    assert_eq!(h.exit.clone().unwrap().0, 0);
}

#[test]
fn hung_engine_does_not_block_exit_forever() {
    let mut c = cfg(&["m"]);
    c.drain_timeout = Duration::from_secs(1);
    let mut h = H::ready(c);
    let running = h.connect();
    h.line(running, &req("run"));
    h.input(Input::Shutdown);
    h.advance(Duration::from_secs(5));
    assert_eq!(h.exit.clone().unwrap().0, 0);
}

#[test]
fn admin_lag_limit_disconnects_slow_subscribers() {
    let mut c = cfg(&["m"]);
    c.admin_lag_limit = 4;
    let mut h = H::new(c);
    let admin = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    h.stalled.insert(admin);
    for i in 0..4 {
        h.input(Input::BackendPhase {
            backend: BackendId(0),
            phase: LoadPhase::KvCache { n_ctx: i },
        });
    }
    assert!(h.is_open(admin));
    h.input(Input::BackendPhase { backend: BackendId(0), phase: LoadPhase::KvCache { n_ctx: 9 } });
    assert!(!h.is_open(admin));
}

#[test]
fn stats_events_only_while_something_changed() {
    let mut h = H::ready(cfg(&["m"]));
    let admin = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    let c = h.connect();
    h.line(c, &req("a"));
    h.advance(Duration::from_secs(1));
    let stats: Vec<_> = h.raw_lines(admin).into_iter().filter(|v| v["status"] == "stats").collect();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0]["active"], 1);
    assert_eq!(stats[0]["connections"], 1);
    assert_eq!(stats[0]["breakers"]["m"], "closed");
    h.advance(Duration::from_secs(5));
    let n = h.raw_lines(admin).iter().filter(|v| v["status"] == "stats").count();
    assert_eq!(n, 1, "nothing changed: no more stats");
}

#[test]
fn tcp_auth_required_when_key_set() {
    let mut c = cfg(&["m"]);
    c.api_key = Some("s3cret-key".into());
    let mut h = H::ready(c);
    let good = h.connect_kind(ListenerKind::Inference, Transport::Tcp);
    h.send(good, &format!("{}\n{}\n", r#"{"type":"auth","key":"s3cret-key"}"#, req("t")));
    assert_eq!(h.starts.len(), 1);
    assert!(h.frames(good).is_empty(), "no reply on success");
    let bad = h.connect_kind(ListenerKind::Inference, Transport::Tcp);
    h.line(bad, r#"{"type":"auth","key":"wrong"}"#);
    assert!(!h.is_open(bad));
    assert!(h.frames(bad).is_empty(), "silent close");
    let skip = h.connect_kind(ListenerKind::Inference, Transport::Tcp);
    h.line(skip, &req("no-auth"));
    assert!(!h.is_open(skip));
    let big = h.connect_kind(ListenerKind::Inference, Transport::Tcp);
    h.send(big, &"a".repeat(5000));
    assert!(!h.is_open(big));
    assert_eq!(h.activity_of("tcp_auth_rejected").len(), 3);
    // Unix peers need no key.
    let unix = h.connect();
    h.line(unix, &req("u"));
    assert_eq!(h.error_code(unix), None);
    assert_eq!(h.d.stats().queued, 1);
}

#[test]
fn activity_never_holds_prompt_text_and_scrubs_secrets() {
    let mut h = H::ready(cfg(&["m"]));
    let c = h.connect();
    let prompt = r#"my prompt text {\"password\":\"hunter2\"} sk-proj-abcdefghijklmnopqrstuv"#;
    h.line(
        c,
        &format!(
            r#"{{"id":"password=topsecret","messages":[{{"role":"user","content":"{prompt}"}}]}}"#
        ),
    );
    let g = h.last_start();
    h.token(g, b"generated output text");
    h.done(g, StopReason::End, 1);
    h.line(c, r#"{"id":"{\"password\":\"jsonsecret\"}","messages":[]}"#);
    let all = h.activity.concat();
    for needle in
        ["my prompt text", "hunter2", "sk-proj", "generated output", "topsecret", "jsonsecret"]
    {
        assert!(!all.contains(needle), "{needle} leaked: {all}");
    }
    let done = h.activity_of("request_done");
    assert_eq!(done[0]["req_id"], "password=[REDACTED]");
    assert_eq!(done[0]["prompt_tokens"], 5);
    for k in ["queued_ms", "ttft_ms", "total_ms", "completion_tokens", "backend", "stop_reason"] {
        assert!(done[0].get(k).is_some(), "{k}");
    }
    let acc = h.activity_of("connection_accepted");
    assert_eq!(acc[0]["peer_uid"], 1000);
    assert_eq!(acc[0]["transport"], "unix");
}

#[test]
fn max_tokens_zero_is_passed_to_the_engine() {
    let mut h = H::ready(cfg(&["m"]));
    let c = h.connect();
    h.line(c, r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#);
    assert_eq!(h.starts[0].2.max_tokens, 0);
}

#[test]
fn done_over_the_frame_cap_becomes_an_error() {
    let mut c = cfg(&["m"]);
    c.max_frame_bytes = 1024;
    let mut h = H::ready(c);
    let conn = h.connect();
    h.line(conn, r#"{"id":"big","stream":false,"messages":[{"role":"user","content":"x"}]}"#);
    let g = h.last_start();
    h.token(g, "y".repeat(2000).as_bytes());
    h.done(g, StopReason::End, 1);
    assert_eq!(h.error_code(conn), Some(ErrorCode::BackendUnavailable));
    assert!(h.out[&conn].split(|&b| b == b'\n').all(|l| l.len() <= 1024));
}

#[test]
fn large_backlogs_go_out_in_chunks() {
    let mut h = H::ready(cfg(&["m"]));
    let c = h.connect();
    h.stalled.insert(c);
    h.line(c, &req("big"));
    let g = h.last_start();
    let piece = "x".repeat(4096);
    for _ in 0..200 {
        h.token(g, piece.as_bytes());
    }
    h.done(g, StopReason::End, 200);
    // The first token's write is stuck; the backlog behind it waits in chunks.
    assert_eq!(h.send_sizes[&c].len(), 1);
    h.stalled.remove(&c);
    h.input(Input::Flushed { conn: c });
    let sizes = &h.send_sizes[&c][1..];
    assert!(sizes.len() >= 3, "{sizes:?}");
    assert!(sizes.iter().all(|&n| n < 2 * SEND_CHUNK), "{sizes:?}");
    // Chunks are full except the last: the backlog is not cut into frame-sized writes.
    assert!(sizes[..sizes.len() - 1].iter().all(|&n| n >= SEND_CHUNK), "{sizes:?}");
    assert!(matches!(h.frames(c).last(), Some(Frame::Done { .. })));
}

#[test]
fn request_after_the_auth_line_in_one_read_is_judged_by_the_frame_cap() {
    let mut c = cfg(&["m"]);
    c.api_key = Some("k".into());
    let mut h = H::ready(c);
    let conn = h.connect_kind(ListenerKind::Inference, Transport::Tcp);
    let big = format!(
        r#"{{"id":"big","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(6000)
    );
    h.send(conn, &format!("{}\n{big}\n", r#"{"type":"auth","key":"k"}"#));
    assert!(h.is_open(conn));
    assert_eq!(h.starts.len(), 1, "the request behind the auth line was admitted");
}

#[test]
fn frames_stay_under_the_cap_whatever_the_id_and_tokens() {
    let mut c = cfg(&["m"]);
    c.max_frame_bytes = 1024;
    let mut h = H::ready(c);
    let conn = h.connect();
    let long_id = "i".repeat(600);
    h.line(conn, &format!(r#"{{"id":"{long_id}","messages":[{{"role":"user","content":"x"}}]}}"#));
    match h.frames(conn).last() {
        Some(Frame::Error { id, code: ErrorCode::InvalidRequest, .. }) => assert_eq!(id, ""),
        other => panic!("{other:?}"),
    }
    assert!(h.is_open(conn));
    h.line(conn, &req("ok"));
    let g = h.last_start();
    let piece = "\u{1}é".repeat(400);
    h.token(g, piece.as_bytes());
    h.token(g, "a🦀".as_bytes());
    h.done(g, StopReason::End, 2);
    let raw = &h.out[&conn];
    assert!(raw.split(|&b| b == b'\n').all(|l| l.len() <= 1024));
    let tokens: String = h.token_contents(conn).concat();
    assert_eq!(tokens, format!("{piece}a🦀"));
}

#[test]
fn long_ids_on_refused_lines_are_not_echoed() {
    let mut c = cfg(&["m"]);
    c.max_frame_bytes = 1024;
    let mut h = H::ready(c);
    let conn = h.connect();
    let max = "i".repeat(256);
    let over = "i".repeat(257);
    // Decodable but invalid: the id at the limit is echoed, one byte more is not.
    h.line(conn, &format!(r#"{{"id":"{max}","messages":[]}}"#));
    assert!(matches!(h.frames(conn).last(), Some(Frame::Error { id, .. }) if id == &max));
    h.line(conn, &format!(r#"{{"id":"{over}","messages":[]}}"#));
    assert!(matches!(h.frames(conn).last(), Some(Frame::Error { id, .. }) if id.is_empty()));
    assert!(h.is_open(conn));
    // A valid request with the longest id is served.
    h.line(conn, &format!(r#"{{"id":"{max}","messages":[{{"role":"user","content":"x"}}]}}"#));
    assert_eq!(h.starts.len(), 1);
    let g = h.last_start();
    h.done(g, StopReason::End, 0);
    // Undecodable: the salvaged id is dropped when too long, and the connection closes.
    h.line(conn, &format!(r#"{{"id":"{over}","messages":"x"}}"#));
    assert!(matches!(h.frames(conn).last(), Some(Frame::Error { id, .. }) if id.is_empty()));
    assert!(!h.is_open(conn));
    // ... and kept at exactly the limit.
    let conn = h.connect();
    h.line(conn, &format!(r#"{{"id":"{max}","messages":"x"}}"#));
    assert!(matches!(h.frames(conn).last(), Some(Frame::Error { id, .. }) if id == &max));
    assert!(!h.is_open(conn));
}

#[test]
fn bytes_from_an_admin_subscriber_are_ignored() {
    let mut h = H::ready(cfg(&["m"]));
    let admin = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    let before = h.frames(admin).len();
    // The admin socket only publishes; whatever a subscriber writes is not a request.
    h.input(Input::Received { conn: admin, bytes: format!("{HI}\n").into_bytes() });
    assert!(h.starts.is_empty());
    assert_eq!(h.frames(admin).len(), before, "no error frame either");
    assert!(h.is_open(admin));
}

#[test]
fn a_zero_read_timeout_never_closes_a_slow_sender() {
    let mut c = cfg(&["m"]);
    c.read_timeout = Duration::ZERO;
    let mut h = H::ready(c);
    let slow = h.connect();
    h.send(slow, "{\"id\":");
    h.advance(Duration::from_secs(3600));
    assert!(h.is_open(slow));
    assert!(h.d.poll_timeout().is_none_or(|t| t > h.now + Duration::from_secs(60)));
}

/// The write-stall timer is armed at the first write and not moved by later ones; when
/// it fires while a newer write is in flight, that write gets its full timeout.
#[test]
fn write_stall_counts_from_the_write_in_flight() {
    let mut c = cfg(&["m"]);
    c.write_timeout = Duration::from_secs(10);
    let mut h = H::ready(c);
    let conn = h.connect();
    h.line(conn, &req("w"));
    let g = h.last_start();
    h.token(g, b"read at once");
    h.advance(Duration::from_secs(9));
    // From here on the client stops reading: this write starts at 9 s.
    h.stalled.insert(conn);
    h.token(g, b"stuck");
    h.advance(Duration::from_secs(2));
    assert!(h.is_open(conn), "dropped 2 s into a write, by the timer of an earlier one");
    h.advance(Duration::from_secs(8));
    assert!(!h.is_open(conn), "dropped 10 s into the stuck write");
    assert_eq!(h.cancels, vec![g]);
}

/// Likewise the read timer: armed for one partial line, it must not close the
/// connection for a later partial line that has not had its full timeout yet.
#[test]
fn read_timeout_counts_from_the_current_partial_line() {
    let mut c = cfg(&["m"]);
    c.read_timeout = Duration::from_secs(5);
    let mut h = H::ready(c);
    let conn = h.connect();
    h.send(conn, "{\"id\":\"a\",");
    h.advance(Duration::from_secs(3));
    // The line completes (an invalid request: an error frame, the connection stays
    // open); a new partial line starts at 4 s.
    h.send(conn, "\"messages\":[]}\n");
    assert_eq!(h.error_code(conn), Some(ErrorCode::InvalidRequest));
    h.advance(Duration::from_secs(1));
    h.send(conn, "{\"id\":");
    h.advance(Duration::from_secs(2));
    assert!(h.is_open(conn), "closed 2 s into a partial line");
    h.advance(Duration::from_secs(3));
    assert!(!h.is_open(conn), "closed 5 s into the partial line");
}

#[test]
fn accessors_follow_the_lifecycle() {
    let mut h = H::new(cfg(&["m"]));
    assert!(!h.d.is_ready());
    h.input(Input::BackendLoaded { backend: BackendId(0), capabilities: Capabilities::text_cpu() });
    assert!(h.d.is_ready());
    let admin = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    let c = h.connect();
    assert_eq!(h.d.connections_open(), 2);
    h.line(c, &req("a"));
    assert_eq!(h.d.generations_running(), 1);
    let g = h.last_start();
    h.done(g, StopReason::End, 0);
    assert_eq!(h.d.generations_running(), 0);
    assert!(!h.d.has_exited());
    h.input(Input::Shutdown);
    assert!(h.d.has_exited());
    assert_eq!(h.d.connections_open(), 0);
    assert!(!h.is_open(admin));
}

/// A piece that fits the cap leaves as one token frame, even behind a backlog and even
/// when its frame is exactly the cap; one that does not is cut in halves, not in
/// single characters.
#[test]
fn token_pieces_are_split_only_when_needed_and_in_halves() {
    let cap = 1024;
    let mut c = cfg(&["m"]);
    c.max_frame_bytes = cap;
    let mut h = H::ready(c);
    let conn = h.connect();
    h.line(conn, &req("t"));
    let g = h.last_start();
    // The first write sticks (the harness drops a stalled write's bytes); the frames
    // behind it pile up in the connection's backlog.
    h.stalled.insert(conn);
    h.token(g, b"in flight");
    // A piece whose frame (without its LF) is exactly `cap` bytes.
    let overhead = {
        let mut f = Vec::new();
        wire::encode_token(&mut f, "t", "");
        f.len() - 1
    };
    let exact = "e".repeat(cap - overhead);
    for piece in ["a".repeat(500), "b".repeat(500), exact.clone(), "c".repeat(500)] {
        h.token(g, piece.as_bytes());
    }
    h.token(g, "z".repeat(3000).as_bytes());
    // Two-byte characters, 3002 bytes: each half is moved back to a character boundary.
    h.token(g, "é".repeat(1501).as_bytes());
    h.done(g, StopReason::End, 7);
    h.stalled.remove(&conn);
    h.input(Input::Flushed { conn });
    let tokens = h.token_contents(conn);
    assert!(h.out[&conn].split(|&b| b == b'\n').all(|l| l.len() <= cap));
    let sizes: Vec<usize> = tokens.iter().map(String::len).collect();
    assert_eq!(sizes, [500, 500, exact.len(), 500, 750, 750, 750, 750, 750, 750, 750, 752]);
}

/// A `done` frame of exactly the cap goes out, even behind a backlog; one byte more
/// becomes an error.
#[test]
fn done_at_exactly_the_cap_is_sent() {
    let cap = 1024;
    // The frames of one non-streamed request whose content is `len` bytes, answered
    // behind two error frames waiting on a stuck write.
    let run = |len: usize| {
        let mut c = cfg(&["m"]);
        c.max_frame_bytes = cap;
        let mut h = H::ready(c);
        let conn = h.connect();
        h.stalled.insert(conn);
        h.line(conn, r#"{"id":"x","messages":[]}"#);
        h.line(conn, r#"{"id":"y","messages":[]}"#);
        h.line(conn, r#"{"id":"d","stream":false,"messages":[{"role":"user","content":"x"}]}"#);
        let g = h.last_start();
        h.token(g, "c".repeat(len).as_bytes());
        h.done(g, StopReason::End, 1);
        h.stalled.remove(&conn);
        h.input(Input::Flushed { conn });
        let last = h.out[&conn].split(|&b| b == b'\n').rfind(|l| !l.is_empty()).map(<[u8]>::len);
        (h.frames(conn).pop(), last)
    };
    let overhead = match run(0) {
        (Some(Frame::Done { .. }), Some(n)) => n,
        other => panic!("{other:?}"),
    };
    match run(cap - overhead) {
        (Some(Frame::Done { content, .. }), Some(n)) => {
            assert_eq!(n, cap);
            assert_eq!(content.len(), cap - overhead);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        run(cap - overhead + 1).0,
        Some(Frame::Error { code: ErrorCode::BackendUnavailable, .. })
    ));
}

#[test]
fn ready_timeout_names_the_backends_still_loading() {
    let mut c = cfg(&["quick", "slow"]);
    c.ready_timeout = Duration::from_secs(30);
    let mut h = H::new(c);
    h.input(Input::BackendLoaded { backend: BackendId(0), capabilities: Capabilities::text_cpu() });
    h.advance(Duration::from_secs(30));
    let (code, message) = h.exit.clone().expect("exited");
    assert_eq!(code, 1);
    assert!(message.contains("slow") && !message.contains("quick"), "{message}");
}

/// A subscriber that shuts down its write side still wants events.
#[test]
fn half_closed_admin_subscribers_keep_their_events() {
    let mut h = H::ready(cfg(&["m"]));
    let admin = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    h.input(Input::ReadClosed { conn: admin });
    assert!(h.is_open(admin));
    let c = h.connect();
    h.line(c, &req("a"));
    h.advance(Duration::from_secs(1));
    assert!(h.raw_lines(admin).iter().any(|v| v["status"] == "stats"));
}

/// A connection closing after an error frame is not read any more while the frame
/// is still being written.
#[test]
fn a_closing_connection_is_not_read() {
    let mut c = cfg(&["m"]);
    c.max_frame_bytes = 1024;
    let mut h = H::ready(c);
    let conn = h.connect();
    h.stalled.insert(conn);
    h.send(conn, &"x".repeat(2000));
    assert!(h.is_open(conn), "the error frame is still in flight");
    assert!(!h.credits.contains(&conn), "asked to read a connection it is closing");
}

/// The stats timer runs only while a subscriber listens, and at most once per
/// interval however often things change.
#[test]
fn stats_are_timed_only_for_subscribers_and_once_per_interval() {
    let mut h = H::ready(cfg(&["m"]));
    let c = h.connect();
    for i in 0..3 {
        h.line(c, &req(&format!("r{i}")));
        let g = h.last_start();
        h.done(g, StopReason::End, 0);
    }
    // No subscriber: nothing to wake up for within the stats interval.
    assert!(h.d.poll_timeout().is_none_or(|t| t > h.now + Duration::from_secs(2)));
    let admin = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    for i in 0..40 {
        h.line(c, &req(&format!("s{i}")));
        let g = h.last_start();
        h.done(g, StopReason::End, 0);
        h.advance(Duration::from_millis(250));
    }
    let n = h.raw_lines(admin).iter().filter(|v| v["status"] == "stats").count();
    assert!((9..=11).contains(&n), "{n} stats events in 10 s at a 1 s interval");
}

#[test]
fn a_zero_write_timeout_never_drops_a_slow_reader() {
    let mut c = cfg(&["m"]);
    c.write_timeout = Duration::ZERO;
    let mut h = H::ready(c);
    let conn = h.connect();
    h.stalled.insert(conn);
    h.line(conn, &req("z"));
    let g = h.last_start();
    h.token(g, b"never read");
    h.advance(Duration::from_secs(3600));
    assert!(h.is_open(conn));
    assert!(h.cancels.is_empty());
}

/// Spec §4-§5: admin subscribers hear `draining` before their connection closes, also
/// when the daemon had nothing in flight; one that never reads does not hold the exit.
#[test]
fn admin_subscribers_hear_draining_before_an_idle_exit() {
    let mut h = H::ready(cfg(&["m"]));
    let admin = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    let stuck = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    h.stalled.insert(stuck);
    h.input(Input::Shutdown);
    let last = h.raw_lines(admin).pop().unwrap();
    assert_eq!(last["status"], "draining", "{last}");
    assert!(!h.is_open(admin), "closed once its frames are out");
    assert!(h.exit.is_none(), "waits for the subscriber still writing");
    h.advance(DRAIN_FLUSH_GRACE - Duration::from_millis(1));
    assert!(h.exit.is_none());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.exit.clone().unwrap().0, 0);
    assert!(!h.is_open(stuck));
}

const AUTH: &str = r#"{"type":"auth","key":"s3cret-key"}"#;

fn keyed() -> DaemonConfig {
    let mut c = cfg(&["m"]);
    c.api_key = Some("s3cret-key".into());
    c
}

/// Bytes a protocol v1 connection holds back until its key line is judged.
fn held_before_auth(n: &Ndjson) -> usize {
    match &n.auth {
        Auth::Pending { held, .. } => held.len(),
        Auth::Done => 0,
    }
}

/// Issue 15#2: before authentication the daemon holds the auth line and one read at
/// most, and blank lines before the key line are skipped, not taken for it.
#[test]
fn before_authentication_memory_is_bounded_and_blank_lines_are_skipped() {
    let mut h = H::ready(keyed());
    let c = h.connect_kind(ListenerKind::Inference, Transport::Tcp);
    let lfs = "\n".repeat(64 * 1024);
    for _ in 0..16 {
        h.send(c, &lfs);
        let n = h.d.conns[&c].ndjson().expect("a protocol v1 connection");
        let held = held_before_auth(n);
        assert!(held == 0, "{held} bytes held before auth");
        assert!(n.decoder.buffered() <= 1, "{} bytes buffered", n.decoder.buffered());
    }
    assert!(h.is_open(c));
    // A blank line, the key line and a request in one read: the request is served.
    h.send(c, &format!(" \r\n\n{AUTH}\n{}\n", req("after-blanks")));
    assert_eq!(h.starts.len(), 1, "the request behind the key line started");
    assert_eq!(h.d.conns[&c].ndjson().map(held_before_auth), Some(0));
    // The key line split across reads after blank ones.
    let d = h.connect_kind(ListenerKind::Inference, Transport::Tcp);
    h.send(d, "\n\n{\"type\":\"au");
    h.send(d, &format!("th\",\"key\":\"s3cret-key\"}}\n{}\n", req("split")));
    assert_eq!(h.error_code(d), None);
    assert!(h.is_open(d));
}

/// Issue 15#4: the key line is due within `auth_timeout`; strangers without a key hold a
/// quarter of `max_connections` at most, so Unix-socket clients always get in.
#[test]
fn unauthenticated_tcp_clients_have_a_deadline_and_a_budget() {
    let mut cfg = keyed();
    cfg.max_connections = 8;
    cfg.auth_timeout = Duration::from_secs(10);
    let mut h = H::ready(cfg);
    let a = h.connect_kind(ListenerKind::Inference, Transport::Tcp);
    let b = h.connect_kind(ListenerKind::Inference, Transport::Tcp);
    let third = h.connect_kind(ListenerKind::Inference, Transport::Tcp);
    assert!(h.is_open(a) && h.is_open(b));
    assert!(!h.is_open(third), "past the budget of 8 / 4");
    assert_eq!(h.activity_of("tcp_unauthenticated_limit").len(), 1);
    let unix: Vec<ConnId> = (0..6).map(|_| h.connect()).collect();
    assert!(unix.iter().all(|u| h.is_open(*u)), "Unix clients still fit");
    // b authenticates; a never does.
    h.line(b, AUTH);
    h.advance(Duration::from_secs(9));
    assert!(h.is_open(a));
    h.advance(Duration::from_secs(1));
    assert!(!h.is_open(a), "no key within 10 s");
    assert!(h.is_open(b), "an authenticated client is not timed out");
    assert_eq!(h.activity_of("tcp_auth_timeout").len(), 1);
}

/// Issue 15#9: admin subscribers are capped; a newcomer takes the place of the oldest
/// subscriber that lags, or is refused when all keep up.
#[test]
fn admin_subscribers_are_capped_and_laggards_go_first() {
    let mut cfg = cfg(&["m"]);
    cfg.max_admin_subscribers = 2;
    let mut h = H::ready(cfg);
    let a = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    let b = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    let refused = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    assert!(h.is_open(a) && h.is_open(b));
    assert!(!h.is_open(refused), "all subscribers keep up: the newcomer is refused");
    h.stalled.insert(b);
    let c = h.connect();
    h.line(c, &req("x"));
    h.advance(Duration::from_secs(1));
    let newcomer = h.connect_kind(ListenerKind::Admin, Transport::Unix);
    assert!(h.is_open(newcomer));
    assert!(!h.is_open(b), "the lagging subscriber made way");
    assert!(h.is_open(a));
    assert_eq!(h.activity_of("admin_subscriber_replaced").len(), 1);
}

/// Issue 15#12: a finished request whose frames the client never took is not left with
/// `request_done` as the last word: the write-stall drop names it as undelivered.
#[test]
fn output_dropped_at_the_write_timeout_is_logged_as_undelivered() {
    let mut c = cfg(&["mock"]);
    c.write_timeout = Duration::from_secs(10);
    let mut h = H::ready(c);
    let slow = h.connect();
    h.stalled.insert(slow);
    h.line(slow, &req("never-read"));
    let g = h.last_start();
    h.token(g, b"text");
    h.done(g, StopReason::End, 1);
    assert_eq!(h.activity_of("request_done").len(), 1);
    h.advance(Duration::from_secs(10));
    assert!(!h.is_open(slow));
    let rec = h.activity_of("write_timeout");
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0]["undelivered_req_id"], "never-read", "{}", rec[0]);
    // What never left includes at least the whole `done` frame.
    let unsent = rec[0]["unsent_bytes"].as_u64().unwrap_or(0) as usize;
    assert!(unsent > r#"{"type":"done","id":"never-read"}"#.len(), "{}", rec[0]);
    // A reader that took everything is not reported.
    let ok = h.connect();
    h.line(ok, &req("read"));
    let g = h.last_start();
    h.done(g, StopReason::End, 1);
    h.advance(Duration::from_secs(20));
    assert_eq!(h.activity_of("write_timeout").len(), 1);
}

// --- Framing and decoding at the edges (issues 10 and 15) ---

#[test]
fn a_slow_sender_of_spaces_is_closed_at_the_read_timeout() {
    let mut c = cfg(&["mock"]);
    c.read_timeout = Duration::from_secs(5);
    let mut h = H::ready(c);
    let idle = h.connect();
    let spaces = h.connect();
    // A blank line between requests is fine and leaves nothing pending.
    h.send(idle, "  \r\n");
    for _ in 0..4 {
        h.send(spaces, " ");
        h.advance(Duration::from_secs(1));
        assert!(h.is_open(spaces), "closed before the read timeout");
    }
    h.send(spaces, " ");
    h.advance(Duration::from_secs(1));
    assert!(!h.is_open(spaces), "an unfinished line of spaces is still unfinished");
    assert!(h.frames(spaces).is_empty(), "closed without a frame, like any slow sender");
    h.advance(Duration::from_secs(60));
    assert!(h.is_open(idle), "an idle connection with nothing pending stays");
}

#[test]
fn cap_plus_one_bytes_without_an_lf_are_answered_at_once() {
    let mut c = cfg(&["mock"]);
    c.max_frame_bytes = 1024;
    let mut h = H::ready(c);
    let conn = h.connect();
    h.send(conn, &"x".repeat(1024));
    assert!(h.is_open(conn), "exactly the cap is fine");
    assert!(h.frames(conn).is_empty());
    h.send(conn, " ");
    assert_eq!(h.error_code(conn), Some(ErrorCode::FrameTooLarge));
    match &h.frames(conn)[..] {
        [Frame::Error { id, .. }] => assert_eq!(id, ""),
        other => panic!("{other:?}"),
    }
    assert!(!h.is_open(conn), "closed without waiting for an LF");
    assert!(!h.credits.contains(&conn), "nothing more is read");
}

#[test]
fn cap_plus_one_bytes_ending_in_cr_wait_for_the_lf() {
    let mut c = cfg(&["mock"]);
    c.max_frame_bytes = 1024;
    let mut h = H::ready(c);
    let conn = h.connect();
    let mut line = req("cr");
    line.push_str(&" ".repeat(1024 - line.len()));
    line.push('\r');
    h.send(conn, &line);
    assert!(h.is_open(conn), "the CR may be the one an LF strips");
    assert!(h.frames(conn).is_empty());
    h.send(conn, "\n");
    assert_eq!(h.starts.len(), 1, "a line of exactly the cap is served");
    // The same bytes followed by anything but an LF are over.
    let other = h.connect();
    h.send(other, &line);
    assert!(h.is_open(other));
    h.send(other, "x");
    assert_eq!(h.error_code(other), Some(ErrorCode::FrameTooLarge));
    assert!(!h.is_open(other));
}

#[test]
fn invalid_utf8_in_an_unknown_field_is_undecodable_and_closes() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect();
    let mut line = br#"{"id":"u","messages":[{"role":"user","content":"hi"}],"x":""#.to_vec();
    line.extend_from_slice(b"\xff\"}\n");
    assert!(h.credits.remove(&c));
    h.input(Input::Received { conn: c, bytes: line.clone() });
    match &h.frames(c)[..] {
        [Frame::Error { id, code: ErrorCode::InvalidRequest, .. }] => assert_eq!(id, ""),
        other => panic!("{other:?}"),
    }
    assert!(!h.is_open(c), "an undecodable line closes the connection");
    assert!(h.starts.is_empty(), "nothing is generated for it");
}

mod http;

#[test]
fn v1_stop_sequence_ends_the_text_with_stop_reason_end() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect();
    h.line(c, r#"{"id":"s","messages":[{"role":"user","content":"x"}],"stop":["fox"]}"#);
    let g = h.last_start();
    h.token(g, b" quick f");
    h.token(g, b"ox jumps");
    assert_eq!(h.cancels, vec![g], "the match cancels the generation");
    h.token(g, b" more");
    h.done(g, StopReason::Cancelled, 3);
    assert_eq!(h.token_contents(c).concat(), " quick ");
    match h.frames(c).last() {
        Some(Frame::Done { content, stop_reason, .. }) => {
            assert_eq!(content, " quick ");
            assert_eq!(*stop_reason, StopReason::End, "v1 clients know no `stop` reason");
        }
        other => panic!("{other:?}"),
    }
    assert!(h.is_open(c) && h.credits.contains(&c));
}

#[test]
fn unfinished_lines_count_as_input_held() {
    // The simulator bounds `max_input_held`; this pins down what it counts.
    let mut h = H::ready(cfg(&["mock"]));
    let a = h.connect();
    let b = h.connect();
    assert_eq!(h.d.max_input_held(), 0);
    h.send(a, r#"{"type":"gen"#);
    h.send(b, r#"{"type""#);
    assert_eq!(h.d.max_input_held(), r#"{"type":"gen"#.len());
}
