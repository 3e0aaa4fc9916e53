//! The OpenAI-compatible HTTP API over real loopback sockets, against both shells:
//! raw-socket tests for the protocol edges, and the real `openai` Python client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use inferd_e2e::*;

both_shells!(
    keep_alive_and_pipelined_requests,
    streaming_is_an_event_stream,
    client_closing_mid_stream_frees_its_place,
    protocol_edges_are_answered_then_closed,
    http_10_gets_one_answer_then_close,
    health_is_served_before_readiness,
    api_key_is_required,
    openai_python_client,
    openai_python_client_on_llama,
);

const KEY: &str = "e2e-http-key";

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a probe listener");
    l.local_addr().expect("local_addr").port()
}

/// A daemon builder serving HTTP on a fresh loopback port, and that address.
fn http_daemon(shell: Shell) -> (DaemonBuilder, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    (shell.daemon().args(["--http", addr.as_str()]), addr)
}

/// Connects, retrying while the listener is not there yet (it is bound at startup,
/// right after the admin socket).
fn connect(addr: &str) -> TcpStream {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => {
                s.set_read_timeout(Some(READ_TIMEOUT)).expect("set_read_timeout");
                return s;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "connect {addr}: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// One response read off the wire, its body de-chunked.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn events(&self) -> Vec<String> {
        String::from_utf8(self.body.clone())
            .expect("UTF-8 event stream")
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").expect("a data event").to_owned())
            .collect()
    }

    /// The streamed text: the content deltas of the `chat.completion.chunk` events.
    fn streamed_text(&self) -> String {
        self.events()
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| {
                let v: Value = serde_json::from_str(e).expect("a JSON event");
                v["choices"].get(0)?["delta"]["content"].as_str().map(str::to_owned)
            })
            .collect()
    }
}

fn read_crlf_line(r: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_owned()),
    }
}

/// Reads one response; `None` when the daemon closed the connection first.
fn read_response(r: &mut BufReader<TcpStream>) -> Option<Resp> {
    let status_line = read_crlf_line(r)?;
    let status: u16 = status_line.get(9..12)?.parse().expect("a status code");
    let mut headers = Vec::new();
    loop {
        let line = read_crlf_line(r).expect("a complete head");
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(": ").expect("a header field");
        headers.push((k.to_owned(), v.to_owned()));
    }
    let mut resp = Resp { status, headers, body: Vec::new() };
    if let Some(len) = resp.header("Content-Length") {
        let mut body = vec![0; len.parse().expect("a length")];
        r.read_exact(&mut body).expect("the whole body");
        resp.body = body;
    } else if resp.header("Transfer-Encoding") == Some("chunked") {
        loop {
            let size = read_crlf_line(r).expect("a chunk size");
            let size = usize::from_str_radix(&size, 16).expect("hex chunk size");
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).expect("a whole chunk");
            assert_eq!(&chunk[size..], b"\r\n");
            if size == 0 {
                break;
            }
            resp.body.extend_from_slice(&chunk[..size]);
        }
    }
    Some(resp)
}

fn post(body: &str, extra_headers: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: e2e\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: e2e\r\n\r\n")
}

fn chat(prompt: &str, extra: &str) -> String {
    format!(r#"{{"model":"any","messages":[{{"role":"user","content":"{prompt}"}}]{extra}}}"#)
}

/// Whether the daemon closed the connection (EOF, or a reset).
fn closed(r: &mut BufReader<TcpStream>) -> bool {
    let mut b = [0u8; 1];
    matches!(r.read(&mut b), Ok(0) | Err(_))
}

/// Two requests in one write, answered in order; a third on the same connection later.
fn keep_alive_and_pipelined_requests(shell: Shell) {
    let (b, addr) = http_daemon(shell);
    let mut d = b.start();
    let mut s = connect(&addr);
    let both = format!("{}{}", post(&chat("hello big world", ""), ""), get("/health"));
    s.write_all(both.as_bytes()).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let first = read_response(&mut r).expect("first answer");
    assert_eq!(first.status, 200);
    let v = first.json();
    assert_eq!(v["object"], "chat.completion");
    // The mock echoes the prompt's words.
    assert_eq!(v["choices"][0]["message"]["content"], "hello big world");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let second = read_response(&mut r).expect("second answer");
    assert_eq!((second.status, second.json()["status"].as_str()), (200, Some("ready")));
    s.write_all(get("/v1/models").as_bytes()).unwrap();
    let third = read_response(&mut r).expect("third answer");
    assert_eq!(third.json()["data"][0]["id"], "mock");
    // One NDJSON request too: the latency histograms count both transports.
    let mut c = d.connect();
    c.send(&json!({"id": "n1", "messages": [{"role": "user", "content": "a b"}]}));
    let _ = c.read_reply();
    for series in [
        "inferd_time_to_first_token_seconds_count",
        "inferd_time_to_first_token_seconds_bucket{le=\"+Inf\"}",
        "inferd_request_duration_seconds_count",
        "inferd_request_duration_seconds_bucket{le=\"+Inf\"}",
        "inferd_requests_total{outcome=\"done\"}",
    ] {
        assert_eq!(metric(&addr, series), 2, "{series}");
    }
    for series in ["inferd_queued_requests", "inferd_active_requests"] {
        assert_eq!(metric(&addr, series), 0, "{series}");
    }
    assert!(metric(&addr, "inferd_completion_tokens_total") >= 5);
    assert!(metric(&addr, "inferd_prompt_tokens_total") > 0);
    assert_eq!(metric(&addr, "inferd_breaker_state{backend=\"mock\",state=\"closed\"}"), 1);
    // The log is written when the daemon idles; its exit flushes it for sure.
    assert!(d.terminate().success(), "stderr:\n{}", d.stderr());
    let done: Vec<Value> =
        d.log_records().into_iter().filter(|r| r["msg"] == "request_done").collect();
    assert_eq!(done.len(), 2);
    assert_eq!(done[0]["transport"], "http");
    assert!(!d.log_text().contains("hello big world"), "prompts are never logged");
}

fn streaming_is_an_event_stream(shell: Shell) {
    let (b, addr) = http_daemon(shell);
    let _d = b.start();
    let mut s = connect(&addr);
    let body = chat(
        "one two three four",
        r#","stream":true,"stream_options":{"include_usage":true},"stop":" three""#,
    );
    s.write_all(post(&body, "").as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let resp = read_response(&mut r).expect("an answer");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Content-Type"), Some("text/event-stream"));
    assert_eq!(resp.streamed_text(), "one two", "the stop sequence and what follows are cut");
    let events = resp.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events.iter().any(|e| e.contains(r#""finish_reason":"stop""#)));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(usage["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
}

/// The value of a gauge or counter in `/metrics`.
fn metric(addr: &str, name: &str) -> u64 {
    let mut s = connect(addr);
    s.write_all(get("/metrics").as_bytes()).unwrap();
    let resp = read_response(&mut BufReader::new(s)).expect("metrics");
    let text = String::from_utf8(resp.body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

fn client_closing_mid_stream_frees_its_place(shell: Shell) {
    let (b, addr) = http_daemon(shell);
    let _d = b
        .args(["--active-permits", "1", "--queue-depth", "0"])
        .config("mock_token_delay_ms", json!(20))
        .config("mock_tokens", json!(100_000))
        .start();
    let mut a = connect(&addr);
    a.write_all(post(&chat("go", r#","stream":true"#), "").as_bytes()).unwrap();
    let mut ra = BufReader::new(a.try_clone().unwrap());
    assert_eq!(read_crlf_line(&mut ra).as_deref(), Some("HTTP/1.1 200 OK"));
    // The one place is taken: another request is refused.
    let mut b = connect(&addr);
    b.write_all(post(&chat("x", ""), "").as_bytes()).unwrap();
    let mut rb = BufReader::new(b.try_clone().unwrap());
    let refused = read_response(&mut rb).expect("an answer");
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("Retry-After"), Some("1"));
    assert_eq!(metric(&addr, "inferd_active_requests"), 1);
    drop(ra);
    drop(a);
    // The daemon notices the hang-up and cancels; the place comes back.
    let deadline = Instant::now() + READ_TIMEOUT;
    while metric(&addr, "inferd_active_requests") != 0 {
        assert!(Instant::now() < deadline, "the place was not freed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(metric(&addr, "inferd_requests_total{outcome=\"cancelled\"}"), 1);
    b.write_all(post(&chat("x", r#","max_tokens":2"#), "").as_bytes()).unwrap();
    let served = read_response(&mut rb).expect("an answer");
    assert_eq!(served.status, 200, "{:?}", String::from_utf8_lossy(&served.body));
}

fn protocol_edges_are_answered_then_closed(shell: Shell) {
    let (b, addr) = http_daemon(shell);
    let _d = b.config("max_frame_bytes", json!(4096)).start();
    let cases: Vec<(String, u16)> = vec![
        // A head over 16 KiB.
        (format!("GET /health HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(20_000)), 431),
        // A body over max_frame_bytes, refused on its declared length.
        ("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5000\r\n\r\n".into(), 413),
        ("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 12x\r\n\r\n".into(), 400),
        (
            "POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .into(),
            411,
        ),
        ("NOT HTTP AT ALL\r\n\r\n".into(), 400),
    ];
    for (request, status) in cases {
        let mut s = connect(&addr);
        // The daemon may answer and close before it has read everything: ignore EPIPE.
        let _ = s.write_all(request.as_bytes());
        let mut r = BufReader::new(s);
        let resp = read_response(&mut r).unwrap_or_else(|| panic!("no answer for {status}"));
        assert_eq!(resp.status, status, "{:?}", String::from_utf8_lossy(&resp.body));
        assert_eq!(resp.header("Connection"), Some("close"));
        assert!(resp.json()["error"]["message"].is_string());
        assert!(closed(&mut r), "closed after a framing error");
    }
    // The daemon still serves.
    let mut s = connect(&addr);
    s.write_all(get("/health").as_bytes()).unwrap();
    assert_eq!(read_response(&mut BufReader::new(s)).unwrap().status, 200);
}

fn http_10_gets_one_answer_then_close(shell: Shell) {
    let (b, addr) = http_daemon(shell);
    let _d = b.start();
    let mut s = connect(&addr);
    let body = chat("old client", "");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let resp = read_response(&mut r).expect("an answer");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Connection"), Some("close"));
    assert_eq!(resp.json()["choices"][0]["message"]["content"], "old client");
    assert!(closed(&mut r));
}

fn health_is_served_before_readiness(shell: Shell) {
    let (b, addr) = http_daemon(shell);
    let mut d =
        b.no_backend().config("backends", json!([{"kind":"mock","never_ready":true}])).spawn();
    let mut s = connect(&addr);
    s.write_all(format!("{}{}", get("/health"), post(&chat("hi", ""), "")).as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let health = read_response(&mut r).expect("health");
    assert_eq!((health.status, health.json()["status"].as_str()), (503, Some("loading")));
    let chat = read_response(&mut r).expect("chat");
    assert_eq!(chat.status, 503);
    assert_eq!(chat.json()["error"]["code"], "backend_unavailable");
    assert!(d.exit_status().is_none());
}

fn api_key_is_required(shell: Shell) {
    let (b, addr) = http_daemon(shell);
    let mut d = b.args(["--api-key", KEY]).start();
    let mut s = connect(&addr);
    let mut r = BufReader::new(s.try_clone().unwrap());
    s.write_all(get("/v1/models").as_bytes()).unwrap();
    let resp = read_response(&mut r).unwrap();
    assert_eq!(resp.status, 401);
    assert_eq!(resp.json()["error"]["type"], "authentication_error");
    let authed = format!("GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\r\n");
    s.write_all(authed.as_bytes()).unwrap();
    assert_eq!(read_response(&mut r).unwrap().status, 200);
    assert!(d.terminate().success(), "stderr:\n{}", d.stderr());
    let log = d.log_text();
    assert!(log.contains("http_auth_rejected"), "{log}");
    assert!(!log.contains(KEY), "the key is never logged");
}

/// The venv's python with the pinned `openai` package, made by `.ci/run`.
fn openai_python() -> Option<PathBuf> {
    let py = workspace_root().join("target/openai-venv/bin/python");
    let ok =
        Command::new(&py).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must provide {} with the openai package (see .ci/run)",
        py.display()
    );
    eprintln!(
        "SKIPPED: no {} with the openai package; run .ci/run (or create the venv) to run this test",
        py.display()
    );
    None
}

/// Runs `e2e/py/openai_client.py SCENARIO` against `base_url`; returns its stdout.
fn run_client(py: &PathBuf, scenario: &str, base_url: &str, key: &str) -> String {
    let script = workspace_root().join("e2e/py/openai_client.py");
    let out =
        run(Command::new(py).arg(script).args([scenario, base_url, key]), Duration::from_secs(120));
    assert!(
        out.code() == 0,
        "openai client scenario {scenario} failed:\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    out.stdout
}

fn openai_python_client(shell: Shell) {
    let Some(py) = openai_python() else { return };
    let (b, addr) = http_daemon(shell);
    let _d = b
        .args(["--api-key", KEY, "--queue-depth", "0"])
        .config("mock_token_delay_ms", json!(5))
        .start();
    let url = format!("http://{addr}/v1");
    let out = run_client(&py, "mock", &url, KEY);
    assert!(out.contains("ALL OK"), "{out}");

    let (b, addr) = http_daemon(shell);
    let _d = b.no_backend().config("backends", json!([{"kind":"mock","never_ready":true}])).spawn();
    connect(&addr);
    let out = run_client(&py, "notready", &format!("http://{addr}/v1"), "none");
    assert!(out.contains("ALL OK"), "{out}");
}

fn openai_python_client_on_llama(shell: Shell) {
    let Some(py) = openai_python() else { return };
    let (b, addr) = http_daemon(shell);
    let model = tiny_model();
    let _d = b
        .backend("llamacpp")
        .arg("--model-path")
        .arg(&model)
        .args(["--n-threads", "1", "--n-ctx", "1024"])
        .start();
    let url = format!("http://{addr}/v1");
    let out = run_client(&py, "llama", &url, "unused");
    assert!(out.contains("ALL OK"), "{out}");
}
