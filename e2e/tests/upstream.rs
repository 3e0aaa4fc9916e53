//! The `openai-compat` upstream backend over real sockets, against both shells:
//! daemon B relays to daemon A (the tiny llama model behind its HTTP API) and falls back
//! to a mock when A goes away; a scripted HTTP server plays the failures a real server
//! will not produce on demand, each checked for its error code and for whether the
//! circuit breaker counts it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use inferd_e2e::*;

both_shells!(
    relays_a_real_model_falls_back_and_returns,
    status_429_with_retry_after_holds_the_breaker_open,
    status_400_is_the_clients_fault,
    status_401_is_counted_and_told_to_the_operator,
    status_500_is_counted,
    redirect_is_not_followed,
    stalled_stream_times_out,
    stream_cut_mid_event_is_counted,
    garbage_events_are_counted,
    slow_head_times_out,
    client_leaving_closes_the_upstream_request,
    a_stalled_request_does_not_hold_up_another,
    llama_server_upstream,
);

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a probe listener");
    l.local_addr().expect("local_addr").port()
}

/// The request every test sends: greedy, so the sentence is the model's own (the tiny
/// model's scripted one).
fn ask(d: &Daemon, id: &str) -> Reply {
    d.ask(&req_with(id, "Tell me a story", json!({"temperature": 0})))
}

fn served_by(r: &Reply) -> Option<&str> {
    match &r.terminal {
        Frame::Done { backend, .. } => Some(backend),
        _ => None,
    }
}

/// Daemon B: `[openai-compat "upstream" -> base_url, mock "fallback"]`, the breaker
/// opening at `threshold` failures for `cooldown` seconds.
fn relay_daemon(
    shell: Shell,
    base_url: &str,
    timeout_secs: u64,
    threshold: u32,
    cooldown: u64,
) -> DaemonBuilder {
    shell
        .daemon()
        .no_backend()
        .fast_stats()
        .config(
            "backends",
            json!([
                {"kind": "openai-compat", "name": "upstream", "base_url": base_url,
                 "model": "tiny", "timeout_secs": timeout_secs, "max_concurrency": 2},
                // A little delay so that polling through the fallback is not a hot loop.
                {"kind": "mock", "name": "fallback", "token_count": 3, "token_delay_ms": 10},
            ]),
        )
        .config("failure_threshold", json!(threshold))
        .config("failure_window_secs", json!(60))
        .config("cooldown_secs", json!(cooldown))
}

fn llama_daemon(shell: Shell, addr: &str) -> Daemon {
    shell
        .daemon()
        .backend("llamacpp")
        .arg("--model-path")
        .arg(tiny_model())
        .args(["--n-threads", "1", "--n-ctx", "512", "--n-parallel", "1", "--http", addr])
        .start()
}

fn breaker(stats: &Value) -> &str {
    stats["breakers"]["upstream"].as_str().unwrap_or("?")
}

fn relays_a_real_model_falls_back_and_returns(shell: Shell) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut a = llama_daemon(shell, &addr);
    let direct = ask(&a, "direct");
    let (sentence, _, _) = direct.done();
    assert!(!sentence.is_empty());

    let b = relay_daemon(shell, &format!("http://{addr}"), 10, 2, 1).start();
    let mut admin = b.admin();
    let relayed = ask(&b, "relayed");
    assert_eq!(served_by(&relayed), Some("upstream"), "{:?}", relayed.terminal);
    assert_eq!(relayed.done().0, sentence, "B's client gets A's exact sentence");
    assert_eq!(relayed.streamed(), sentence);

    // A goes away: each request fails (counted) until the breaker opens, then the
    // mock serves.
    a.terminate();
    for i in 0..2 {
        let r = ask(&b, &format!("down-{i}"));
        assert_eq!(r.error(), ErrorCode::BackendUnavailable, "{:?}", r.terminal);
    }
    admin.wait_stats("the upstream breaker opens", READ_TIMEOUT, |s| breaker(s) == "open");
    let r = ask(&b, "fallback");
    assert_eq!(served_by(&r), Some("fallback"), "{:?}", r.terminal);

    // A comes back on the same address: after the cooldown one trial goes to it, and
    // traffic returns.
    let _a2 = llama_daemon(shell, &addr);
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut n = 0;
    loop {
        let r = ask(&b, &format!("poll-{n}"));
        n += 1;
        if served_by(&r) == Some("upstream") {
            assert_eq!(r.done().0, sentence);
            break;
        }
        assert_eq!(served_by(&r), Some("fallback"), "{:?}", r.terminal);
        assert!(Instant::now() < deadline, "traffic never returned to the upstream");
    }
    admin.wait_stats("the breaker closes", READ_TIMEOUT, |s| breaker(s) == "closed");
    assert_eq!(served_by(&ask(&b, "back")), Some("upstream"));

    let records = b.log_records();
    let rejected = records
        .iter()
        .filter(|r| r["msg"] == "request_rejected" && r["backend"] == "upstream")
        .count();
    assert_eq!(rejected, 2, "the activity log shows both failures");
    assert!(
        records.iter().any(|r| r["msg"] == "request_done" && r["backend"] == "fallback"),
        "the activity log shows the fallback serving"
    );
}

// ---- a scripted upstream ------------------------------------------------------------

/// What the scripted server does with the first request; later ones get a good stream.
#[derive(Clone, Debug)]
enum Script {
    Status(u16, Option<u64>),
    Stall,
    CutMidEvent,
    Garbage,
    SlowHead,
    /// This status for every request, not only the first.
    Always(u16),
    /// A 303 (which clients follow with a GET) to this base URL.
    Redirect(String),
    /// A stream that never ends: an event every 20 ms until a write fails, then a
    /// message on the channel.
    Endless(mpsc::Sender<()>),
}

const GOOD_TEXT: &str = "Hello from upstream";

fn good_stream() -> Vec<u8> {
    let mut body = String::new();
    for piece in ["Hello", " from", " upstream"] {
        let chunk =
            json!({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]});
        body.push_str(&format!("data: {chunk}\n\n"));
    }
    body.push_str(r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#);
    body.push_str("\n\n");
    body.push_str(r#"data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}"#);
    body.push_str("\n\ndata: [DONE]\n\n");
    body.into_bytes()
}

/// Reads one request (head and Content-Length body); `None` at EOF.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut head = String::new();
    let mut len = 0;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(head + &String::from_utf8_lossy(&body))
}

const STREAM_HEAD: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";

/// How long the stalling behaviours hold a connection: well past the relay's
/// one-second timeout, and ended early when the relay hangs up.
const HOLD: Duration = Duration::from_secs(20);

fn hold(mut s: TcpStream) {
    s.set_read_timeout(Some(HOLD)).expect("set_read_timeout");
    let mut buf = [0u8; 64];
    let _ = s.read(&mut buf);
}

fn serve(stream: TcpStream, script: Script, first: bool) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut s = stream;
    let Some(_request) = read_request(&mut reader) else { return };
    let script = match script {
        Script::Always(status) => Script::Status(status, None),
        _ if !first => {
            let _ = s.write_all(STREAM_HEAD.as_bytes());
            let _ = s.write_all(&good_stream());
            return;
        }
        other => other,
    };
    match script {
        Script::Always(_) => unreachable!("mapped to a status above"),
        Script::Status(status, retry_after) => {
            let body = r#"{"error":{"message":"scripted refusal","type":"invalid_request_error"}}"#;
            let retry = retry_after.map(|s| format!("Retry-After: {s}\r\n")).unwrap_or_default();
            let _ = write!(
                s,
                "HTTP/1.1 {status} Scripted\r\nContent-Type: application/json\r\n{retry}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        Script::Stall => {
            let _ = s.write_all(STREAM_HEAD.as_bytes());
            let _ = s.write_all(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n");
            let _ = s.flush();
            hold(s);
        }
        Script::CutMidEvent => {
            let _ = s.write_all(STREAM_HEAD.as_bytes());
            let _ = s.write_all(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n");
            let _ = s.write_all(b"data: {\"choices\":[{\"delta\":{\"con");
        }
        Script::Garbage => {
            let _ = s.write_all(STREAM_HEAD.as_bytes());
            let _ = s.write_all(b"data: this is not json\n\n");
        }
        Script::SlowHead => hold(s),
        Script::Redirect(to) => {
            let _ = write!(
                s,
                "HTTP/1.1 303 See Other\r\nLocation: {to}/v1/chat/completions\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
        Script::Endless(closed) => {
            let _ = s.write_all(STREAM_HEAD.as_bytes());
            let event = b"data: {\"choices\":[{\"delta\":{\"content\":\" more\"}}]}\n\n";
            while s.write_all(event).and_then(|()| s.flush()).is_ok() {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = closed.send(());
        }
    }
}

/// A scripted upstream on a loopback port; its first request gets `script`.
fn scripted(script: Script) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the scripted upstream");
    let url = format!("http://{}", listener.local_addr().expect("local_addr"));
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
            let script = script.clone();
            thread::spawn(move || serve(conn, script, first));
        }
    });
    (url, count)
}

/// Sends one request through a relay to a scripted upstream and returns its reply and
/// the next request's: served by the fallback when the failure was counted (the
/// breaker opens at one failure), by the upstream when it was not.
fn scripted_case(shell: Shell, script: Script) -> (Reply, Reply, Daemon) {
    let (url, count) = scripted(script);
    let b = relay_daemon(shell, &url, 1, 1, 60).start();
    let first = ask(&b, "first");
    assert_eq!(count.load(Ordering::SeqCst), 1, "the request reached the scripted upstream");
    let second = ask(&b, "second");
    (first, second, b)
}

fn assert_counted(shell: Shell, script: Script) -> Daemon {
    let (first, second, b) = scripted_case(shell, script.clone());
    assert_eq!(first.error(), ErrorCode::BackendUnavailable, "{script:?}: {:?}", first.terminal);
    assert_eq!(served_by(&second), Some("fallback"), "{script:?}: the breaker counted it");
    b
}

fn status_429_with_retry_after_holds_the_breaker_open(shell: Shell) {
    let (url, _) = scripted(Script::Status(429, Some(30)));
    // The cooldown alone (1 s) would let a trial through long before the 30 s hint.
    let b = relay_daemon(shell, &url, 1, 1, 1).start();
    assert_eq!(ask(&b, "limited").error(), ErrorCode::BackendUnavailable);
    let opened = Instant::now();
    let mut admin = b.admin();
    admin.wait_stats("open", READ_TIMEOUT, |s| breaker(s) == "open");
    // Let the configured cooldown pass, then ask: the hint still holds the breaker.
    thread::sleep(Duration::from_millis(1500).saturating_sub(opened.elapsed()));
    let r = ask(&b, "after-cooldown");
    assert_eq!(served_by(&r), Some("fallback"), "{:?}", r.terminal);
    let s = admin.wait_stats("still open", READ_TIMEOUT, |_| true);
    assert_eq!(breaker(&s), "open", "{s}");
}

fn status_400_is_the_clients_fault(shell: Shell) {
    let (first, second, _b) = scripted_case(shell, Script::Status(400, None));
    assert_eq!(first.error(), ErrorCode::InvalidRequest, "{:?}", first.terminal);
    match &first.terminal {
        Frame::Error { message, .. } => assert!(message.contains("scripted refusal"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(served_by(&second), Some("upstream"), "a client error is not counted");
    assert_eq!(second.done().0, GOOD_TEXT);
}

fn status_401_is_counted_and_told_to_the_operator(shell: Shell) {
    let b = assert_counted(shell, Script::Status(401, None));
    let stderr = b.stderr();
    assert_eq!(stderr.matches("refused the API key").count(), 1, "{stderr}");
    assert!(stderr.contains("OPENAI_API_KEY"), "the message names the variable: {stderr}");
    drop(b);
    // A key refused again and again is told once, not once per request.
    let (url, count) = scripted(Script::Always(403));
    let b = relay_daemon(shell, &url, 1, 5, 60).start();
    for i in 0..3 {
        assert_eq!(ask(&b, &format!("r{i}")).error(), ErrorCode::BackendUnavailable);
    }
    assert_eq!(count.load(Ordering::SeqCst), 3);
    let stderr = b.stderr();
    assert_eq!(stderr.matches("refused the API key").count(), 1, "{stderr}");
    assert!(stderr.contains("OPENAI_API_KEY"), "the message names the variable: {stderr}");
}

fn status_500_is_counted(shell: Shell) {
    assert_counted(shell, Script::Status(500, None));
}

/// A redirect is a misconfigured `base_url`: counted, and not followed (the key is
/// not carried to wherever it points).
fn redirect_is_not_followed(shell: Shell) {
    let (elsewhere, reached) = scripted(Script::Status(500, None));
    assert_counted(shell, Script::Redirect(elsewhere));
    assert_eq!(reached.load(Ordering::SeqCst), 0, "the redirect was followed");
}

fn stalled_stream_times_out(shell: Shell) {
    let (first, second, _b) = scripted_case(shell, Script::Stall);
    // Text was sent before the stall: the error comes mid-stream.
    assert_eq!(first.streamed(), "Hel");
    assert_eq!(first.error(), ErrorCode::BackendUnavailable);
    assert_eq!(served_by(&second), Some("fallback"));
}

fn stream_cut_mid_event_is_counted(shell: Shell) {
    assert_counted(shell, Script::CutMidEvent);
}

fn garbage_events_are_counted(shell: Shell) {
    assert_counted(shell, Script::Garbage);
}

fn slow_head_times_out(shell: Shell) {
    assert_counted(shell, Script::SlowHead);
}

/// A client that goes away mid-stream: the relay stops reading and closes the
/// upstream connection (the endless upstream sees its writes fail), and the place is
/// free for the next request.
fn client_leaving_closes_the_upstream_request(shell: Shell) {
    let (tx, closed) = mpsc::channel();
    let (url, _) = scripted(Script::Endless(tx));
    let b = relay_daemon(shell, &url, 5, 3, 60).config("active_permits", json!(1)).start();
    let mut c = b.connect();
    c.send(&req_with("endless", "go", json!({"max_tokens": 100000})));
    match c.next_frame() {
        Ok(Frame::Token { content, .. }) => assert_eq!(content, " more"),
        other => panic!("expected a token, got {other:?}"),
    }
    drop(c);
    closed.recv_timeout(READ_TIMEOUT).expect("the upstream connection was closed");
    // The one permit is free again: the next request is served (by the upstream's
    // second, good answer).
    let r = ask(&b, "next");
    assert_eq!(r.done().0, GOOD_TEXT);
}

/// Two upstream requests run at once (`max_concurrency` 2): while the first one's
/// upstream stalls, inside its 15 s chunk timeout, the second is served in full.
fn a_stalled_request_does_not_hold_up_another(shell: Shell) {
    let (url, _) = scripted(Script::Stall);
    let b = relay_daemon(shell, &url, 15, 3, 60).start();
    let mut c = b.connect();
    c.send(&req_with("stalled", "go", json!({})));
    match c.next_frame() {
        Ok(Frame::Token { content, .. }) => assert_eq!(content, "Hel"),
        other => panic!("expected a token, got {other:?}"),
    }
    let started = Instant::now();
    let r = ask(&b, "other");
    assert_eq!(served_by(&r), Some("upstream"), "{:?}", r.terminal);
    assert_eq!(r.done().0, GOOD_TEXT);
    // Had it waited for the stalled one, it would have taken the whole timeout.
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
}

/// Opt-in: `INFERD_LLAMA_SERVER_URL=http://127.0.0.1:8080` pointing at a running
/// llama.cpp `llama-server` (see `../shared/tools/build-llama-server.sh`).
fn llama_server_upstream(shell: Shell) {
    let Ok(url) = std::env::var("INFERD_LLAMA_SERVER_URL") else {
        eprintln!("{shell}: llama_server_upstream skipped: INFERD_LLAMA_SERVER_URL is not set");
        return;
    };
    let b = relay_daemon(shell, url.trim_end_matches('/'), 60, 3, 30)
        .config(
            "backends",
            json!([{"kind": "openai-compat", "name": "upstream", "base_url": url,
                    "model": "any", "timeout_secs": 60}]),
        )
        .start();
    let r = ask(&b, "ls");
    let (content, _, usage) = r.done();
    assert!(!content.is_empty());
    assert!(usage.completion_tokens > 0, "{usage:?}");
    assert_eq!(r.streamed(), content);
}
