//! The HTTP connection kind, driven like the NDJSON tests: scripted bytes in, a fake
//! clock, and the HTTP answers parsed back out of what the daemon sent.

use super::*;

/// One HTTP response as the daemon wrote it, its body de-chunked.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    chunked: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// The `data:` payloads of an event stream, in order.
    fn events(&self) -> Vec<String> {
        String::from_utf8(self.body.clone())
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").expect("data event").to_owned())
            .collect()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses every complete response in `bytes`; panics on anything malformed, and on a
/// trailing incomplete one unless `partial_ok`.
fn parse_responses(mut bytes: &[u8], partial_ok: bool) -> Vec<Resp> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let Some(end) = find(bytes, b"\r\n\r\n") else {
            assert!(partial_ok, "incomplete head: {:?}", String::from_utf8_lossy(bytes));
            break;
        };
        let head = std::str::from_utf8(&bytes[..end]).unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status: u16 = status_line[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (k, v) = l.split_once(": ").unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        bytes = &bytes[end + 4..];
        let mut resp = Resp { status, headers, body: Vec::new(), chunked: false };
        if status == 100 {
            continue;
        }
        if let Some(len) = resp.header("Content-Length") {
            let len: usize = len.parse().unwrap();
            assert!(bytes.len() >= len || partial_ok);
            let take = len.min(bytes.len());
            resp.body = bytes[..take].to_vec();
            bytes = &bytes[take..];
        } else {
            assert_eq!(resp.header("Transfer-Encoding"), Some("chunked"));
            resp.chunked = true;
            loop {
                let Some(eol) = find(bytes, b"\r\n") else {
                    assert!(partial_ok, "unterminated chunked body");
                    bytes = &[];
                    break;
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&bytes[..eol]).unwrap(), 16).unwrap();
                bytes = &bytes[eol + 2..];
                if size == 0 {
                    assert!(bytes.starts_with(b"\r\n"));
                    bytes = &bytes[2..];
                    break;
                }
                resp.body.extend_from_slice(&bytes[..size]);
                assert_eq!(&bytes[size..size + 2], b"\r\n");
                bytes = &bytes[size + 2..];
            }
        }
        out.push(resp);
    }
    out
}

fn chat_body(extra: &str) -> String {
    format!(r#"{{"model":"x","messages":[{{"role":"user","content":"hello"}}]{extra}}}"#)
}

fn post(body: &str, extra_headers: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
}

impl H {
    fn connect_http(&mut self) -> ConnId {
        self.connect_kind(ListenerKind::Http, Transport::Tcp)
    }

    fn responses(&self, conn: ConnId) -> Vec<Resp> {
        parse_responses(self.out.get(&conn).map_or(&[][..], |v| v), false)
    }
}

#[test]
fn non_streaming_completion_is_one_json_object_with_content_length() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect_http();
    h.send(c, &post(&chat_body(""), ""));
    let g = h.last_start();
    assert_eq!(h.starts[0].2.messages[0].content, "hello");
    h.token(g, b"Hel");
    h.token(g, b"lo");
    assert!(h.out.get(&c).is_none_or(Vec::is_empty), "nothing before the end");
    h.done(g, StopReason::End, 2);
    let r = h.responses(c);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].status, 200);
    assert!(!r[0].chunked);
    let v = r[0].json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "mock");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["content"], "Hello");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 2);
    assert_eq!(v["usage"]["total_tokens"], 7);
    // Keep-alive: the connection is read again.
    assert!(h.is_open(c) && h.credits.contains(&c));
    let done = h.activity_of("request_done");
    assert_eq!(done[0]["transport"], "http");
    let accepted = h.activity_of("connection_accepted");
    assert_eq!(accepted[0]["transport"], "http");
}

#[test]
fn streaming_completion_is_an_event_stream_ending_with_done() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect_http();
    h.send(c, &post(&chat_body(r#","stream":true,"stream_options":{"include_usage":true}"#), ""));
    let g = h.last_start();
    h.token(g, b"Hel");
    // The stream has started: its head and first deltas are out before the end.
    let partial = parse_responses(&h.out[&c], true);
    assert_eq!(partial[0].status, 200);
    assert_eq!(partial[0].header("Content-Type"), Some("text/event-stream"));
    h.token(g, b"lo");
    h.done(g, StopReason::Length, 2);
    let r = h.responses(c);
    assert_eq!(r.len(), 1);
    let events = r[0].events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Hello");
    let finish: Vec<&serde_json::Value> =
        chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| &c["finish_reason"]).collect();
    assert_eq!(finish.last().unwrap().as_str(), Some("length"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    assert!(h.is_open(c) && h.credits.contains(&c));
}

#[test]
fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect_http();
    // Two requests in one read: the second waits behind the generation of the first.
    let both = format!("{}{}", post(&chat_body(""), ""), get("/health"));
    h.send(c, &both);
    assert_eq!(h.starts.len(), 1);
    assert!(!h.credits.contains(&c), "not read while a request is in progress");
    let g = h.last_start();
    h.token(g, b"ok");
    h.done(g, StopReason::End, 1);
    let r = h.responses(c);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].json()["choices"][0]["message"]["content"], "ok");
    assert_eq!((r[1].status, r[1].json()["status"].as_str()), (200, Some("ready")));
    // And a third, later, on the same connection.
    h.send(c, &get("/v1/models"));
    let r = h.responses(c);
    assert_eq!(r[2].json()["data"][0]["id"], "mock");
    assert!(h.is_open(c));
}

#[test]
fn client_gone_mid_stream_cancels_and_frees_the_place() {
    let mut h = H::ready(cfg(&["mock"]));
    let a = h.connect_http();
    h.send(a, &post(&chat_body(r#","stream":true"#), ""));
    let b = h.connect_http();
    h.send(b, &post(&chat_body(""), ""));
    assert_eq!(h.starts.len(), 1, "b waits for the one place");
    let g = h.last_start();
    h.token(g, b"x");
    h.input(Input::HungUp { conn: a });
    assert_eq!(h.cancels, vec![g]);
    assert!(h.closed.contains(&a));
    assert_eq!(h.starts.len(), 2, "b took the freed place");
    h.done(g, StopReason::Cancelled, 1);
    let rec = h.activity_of("request_done");
    assert_eq!(rec[0]["stop_reason"], "cancelled");
}

#[test]
fn queued_client_gone_leaves_the_queue() {
    let mut h = H::ready(cfg(&["mock"]));
    let a = h.connect_http();
    h.send(a, &post(&chat_body(""), ""));
    let b = h.connect_http();
    h.send(b, &post(&chat_body(""), ""));
    assert_eq!(h.d.stats().queued, 1);
    h.input(Input::HungUp { conn: b });
    assert_eq!(h.d.stats().queued, 0);
    assert!(h.cancels.is_empty());
}

#[test]
fn queue_full_is_429_with_retry_after() {
    let mut h = H::ready(DaemonConfig { queue_depth: 0, ..cfg(&["mock"]) });
    let a = h.connect_http();
    h.send(a, &post(&chat_body(""), ""));
    let b = h.connect_http();
    h.send(b, &post(&chat_body(""), ""));
    let r = h.responses(b);
    assert_eq!(r[0].status, 429);
    assert_eq!(r[0].header("Retry-After"), Some("1"));
    assert_eq!(r[0].json()["error"]["code"], "queue_full");
    assert!(h.is_open(b) && h.credits.contains(&b), "the connection stays usable");
}

#[test]
fn before_ready_health_and_inference_are_503() {
    let mut h = H::new(cfg(&["mock"]));
    let c = h.connect_http();
    assert!(h.is_open(c), "the HTTP listener serves before readiness");
    h.send(c, &get("/health"));
    h.send(c, &post(&chat_body(""), ""));
    let r = h.responses(c);
    assert_eq!((r[0].status, r[0].json()["status"].as_str()), (503, Some("loading")));
    assert_eq!(r[1].status, 503);
    assert_eq!(r[1].json()["error"]["code"], "backend_unavailable");
    assert!(h.starts.is_empty());
    h.input(Input::BackendLoaded { backend: BackendId(0), capabilities: Capabilities::text_cpu() });
    h.send(c, &get("/health"));
    assert_eq!(h.responses(c)[2].status, 200);
}

#[test]
fn api_key_is_required_as_bearer_token() {
    let mut h = H::ready(DaemonConfig { api_key: Some("sekrit".into()), ..cfg(&["mock"]) });
    let c = h.connect_http();
    h.send(c, &get("/v1/models"));
    h.send(c, "GET /v1/models HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n");
    h.send(c, "GET /v1/models HTTP/1.1\r\nAuthorization: Bearer sekrit\r\n\r\n");
    let r = h.responses(c);
    assert_eq!((r[0].status, r[1].status, r[2].status), (401, 401, 200));
    assert_eq!(r[0].json()["error"]["type"], "authentication_error");
    assert!(h.activity.iter().all(|l| !l.contains("sekrit") && !l.contains("wrong")));
}

#[test]
fn stop_sequence_cancels_and_ends_with_finish_reason_stop() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect_http();
    h.send(c, &post(&chat_body(r#","stream":true,"stop":["fox"]"#), ""));
    let g = h.last_start();
    for t in [&b" the"[..], b" quick", b" brown", b" fo"] {
        h.token(g, t);
    }
    assert!(h.cancels.is_empty());
    h.token(g, b"x jumps");
    assert_eq!(h.cancels, vec![g], "the match cancels the generation");
    h.token(g, b" over");
    h.done(g, StopReason::Cancelled, 6);
    let r = h.responses(c);
    let events = r[0].events();
    let body = events.join("\n");
    assert!(!body.contains("fox") && !body.contains("jumps") && !body.contains("over"), "{body}");
    assert!(body.contains(r#""finish_reason":"stop""#));
    assert_eq!(events.last().unwrap(), "[DONE]");
    let rec = h.activity_of("request_done");
    assert_eq!(rec[0]["stop_reason"], "end", "our own cancellation is not the client's");
    assert_eq!(h.d.stats().served, 1);
}

#[test]
fn errors_have_openai_shape_and_statuses() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect_http();
    h.send(c, &get("/nope"));
    h.send(c, &get("/v1/chat/completions"));
    h.send(c, &post(r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#, ""));
    h.send(c, &post("{not json", ""));
    let r = h.responses(c);
    assert_eq!(r.iter().map(|r| r.status).collect::<Vec<_>>(), [404, 405, 400, 400]);
    assert_eq!(r[1].header("Allow"), Some("POST"));
    assert_eq!(r[2].json()["error"]["param"], "n");
    assert!(h.starts.is_empty());
    // A framing error is answered, then the connection closes.
    h.send(c, "POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    let r = h.responses(c);
    assert_eq!(r[4].status, 411);
    assert_eq!(r[4].header("Connection"), Some("close"));
    assert!(h.closed.contains(&c));
}

#[test]
fn http_10_closes_after_the_answer() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect_http();
    h.send(c, "GET /health HTTP/1.0\r\n\r\n");
    let r = h.responses(c);
    assert_eq!(r[0].status, 200);
    assert_eq!(r[0].header("Connection"), Some("close"));
    assert!(h.closed.contains(&c));
}

#[test]
fn drain_lets_the_stream_finish_then_closes() {
    let mut h = H::ready(cfg(&["mock"]));
    let a = h.connect_http();
    h.send(a, &post(&chat_body(r#","stream":true"#), ""));
    let idle = h.connect_http();
    let g = h.last_start();
    h.token(g, b"one");
    h.input(Input::Shutdown);
    assert!(h.stop_accepting);
    assert!(h.closed.contains(&idle), "idle connections close at once");
    assert!(!h.closed.contains(&a), "in-flight streams finish");
    h.token(g, b" two");
    h.done(g, StopReason::End, 2);
    let r = h.responses(a);
    let events = r[0].events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events.join("").contains(" two"));
    assert!(h.closed.contains(&a));
    assert_eq!(h.exit, Some((0, String::new())));
}

#[test]
fn failure_after_the_stream_started_is_one_error_event() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect_http();
    h.send(c, &post(&chat_body(r#","stream":true"#), ""));
    let g = h.last_start();
    h.token(g, b"par");
    h.fail(g, EngineError::internal("boom"));
    let r = h.responses(c);
    assert_eq!(r[0].status, 200);
    let events = r[0].events();
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "backend_unavailable");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    assert!(h.is_open(c), "the stream ended cleanly; the connection is reusable");
}

#[test]
fn metrics_count_outcomes_and_tokens() {
    let mut h = H::ready(DaemonConfig { queue_depth: 0, ..cfg(&["mock"]) });
    let a = h.connect_http();
    h.send(a, &post(&chat_body(""), ""));
    let b = h.connect_http();
    h.send(b, &post(&chat_body(""), ""));
    let g = h.last_start();
    h.token(g, b"x");
    h.done(g, StopReason::End, 1);
    h.send(b, &get("/metrics"));
    let r = h.responses(b);
    let text = String::from_utf8(r[1].body.clone()).unwrap();
    assert!(text.contains("inferd_requests_total{outcome=\"done\"} 1"), "{text}");
    assert!(text.contains("inferd_requests_total{outcome=\"queue_full\"} 1"), "{text}");
    assert!(text.contains("inferd_completion_tokens_total 1"), "{text}");
    assert!(text.contains("inferd_breaker_state{backend=\"mock\",state=\"closed\"} 1"), "{text}");
}

/// The value of one series line of `/metrics` text.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn latency_histograms_count_both_transports_by_the_injected_clock() {
    let mut h = H::ready(cfg(&["mock"]));
    // HTTP: first token after 30 ms, done after 700 ms.
    h.now = Time::from_secs(10);
    let a = h.connect_http();
    h.send(a, &post(&chat_body(r#","stream":true"#), ""));
    let g = h.last_start();
    h.now = Time::from_millis(10_030);
    h.token(g, b"x");
    h.now = Time::from_millis(10_700);
    h.done(g, StopReason::End, 1);
    // NDJSON: first token after 3 ms, done after 4 s.
    let n = h.connect();
    h.line(n, HI);
    let g = h.last_start();
    h.now = Time::from_millis(10_703);
    h.token(g, b"y");
    h.now = Time::from_millis(14_700);
    h.done(g, StopReason::End, 1);
    // A request that fails before any token counts in the duration only.
    h.line(n, HI);
    let g = h.last_start();
    h.now = Time::from_millis(14_720);
    h.fail(g, EngineError::internal("boom"));
    h.send(a, &get("/metrics"));
    let r = h.responses(a);
    let text = String::from_utf8(r[1].body.clone()).unwrap();
    assert!(text.contains("# TYPE inferd_time_to_first_token_seconds histogram"), "{text}");
    let ttft = "inferd_time_to_first_token_seconds";
    assert_eq!(series(&text, &format!("{ttft}_bucket{{le=\"0.005\"}}")), 1.0);
    assert_eq!(series(&text, &format!("{ttft}_bucket{{le=\"0.025\"}}")), 1.0);
    assert_eq!(series(&text, &format!("{ttft}_bucket{{le=\"0.05\"}}")), 2.0);
    assert_eq!(series(&text, &format!("{ttft}_bucket{{le=\"+Inf\"}}")), 2.0);
    assert_eq!(series(&text, &format!("{ttft}_count")), 2.0);
    assert!((series(&text, &format!("{ttft}_sum")) - 0.033).abs() < 1e-9);
    let dur = "inferd_request_duration_seconds";
    assert_eq!(series(&text, &format!("{dur}_bucket{{le=\"0.025\"}}")), 1.0, "{text}");
    assert_eq!(series(&text, &format!("{dur}_bucket{{le=\"0.5\"}}")), 1.0);
    assert_eq!(series(&text, &format!("{dur}_bucket{{le=\"1\"}}")), 2.0);
    assert_eq!(series(&text, &format!("{dur}_bucket{{le=\"2.5\"}}")), 2.0);
    assert_eq!(series(&text, &format!("{dur}_bucket{{le=\"5\"}}")), 3.0);
    assert_eq!(series(&text, &format!("{dur}_count")), 3.0);
    assert!((series(&text, &format!("{dur}_sum")) - 4.72).abs() < 1e-9);
    // The other required series are there too.
    for name in [
        "inferd_requests_total{outcome=\"done\"}",
        "inferd_queued_requests",
        "inferd_active_requests",
        "inferd_prompt_tokens_total",
        "inferd_completion_tokens_total",
        "inferd_breaker_state{backend=\"mock\",state=\"closed\"}",
    ] {
        series(&text, name);
    }
    assert_eq!(series(&text, "inferd_requests_total{outcome=\"done\"}"), 2.0);
}

#[test]
fn slow_heads_time_out_but_idle_keep_alive_connections_do_not() {
    let mut h = H::ready(DaemonConfig { read_timeout: Duration::from_secs(5), ..cfg(&["mock"]) });
    let idle = h.connect_http();
    h.send(idle, &get("/health"));
    let slow = h.connect_http();
    h.send(slow, "GET /health HTTP/1.1\r\nHost:");
    h.advance(Duration::from_secs(6));
    assert!(h.closed.contains(&slow), "a head unfinished after read_timeout is dropped");
    assert!(h.is_open(idle), "between requests a connection may idle");
}

#[test]
fn http_connections_count_against_max_connections() {
    let mut h = H::ready(DaemonConfig { max_connections: 2, ..cfg(&["mock"]) });
    let a = h.connect();
    let b = h.connect_http();
    let c = h.connect_http();
    assert!(h.is_open(a) && h.is_open(b));
    assert!(h.closed.contains(&c));
    assert_eq!(h.d.stats().connections, 2);
}

#[test]
fn expect_continue_gets_an_interim_answer_before_the_body() {
    let mut h = H::ready(cfg(&["mock"]));
    let c = h.connect_http();
    let body = chat_body("");
    h.send(
        c,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ),
    );
    assert_eq!(h.out[&c], b"HTTP/1.1 100 Continue\r\n\r\n");
    h.send(c, &body);
    assert_eq!(h.starts.len(), 1);
}
