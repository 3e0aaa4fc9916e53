use super::*;
use inferd_core::engine::EngineErrorKind;
use inferd_core::sse::{SseEvent, decode_all};

fn options(json: Value) -> Map<String, Value> {
    json.as_object().cloned().unwrap_or_default()
}

fn env_with_key(name: &str) -> Option<String> {
    (name == "MY_KEY").then(|| "sk-secret-123".to_owned())
}

#[test]
fn config_reads_keys_and_defaults() {
    let o =
        options(json!({"kind": "openai-compat", "base_url": "http://127.0.0.1:9/", "model": "m"}));
    let c = OpenAiConfig::from_options_with(&o, |_| None).unwrap();
    assert_eq!(c.endpoint(), "http://127.0.0.1:9/v1/chat/completions");
    assert_eq!((c.timeout, c.max_concurrency), (Duration::from_secs(60), 8));
    assert_eq!(c.api_key_env, DEFAULT_API_KEY_ENV);
    assert_eq!(c.api_key, None, "no key: none sent");

    let o = options(json!({"base_url": "https://h", "model": "m", "api_key_env": "MY_KEY",
                           "timeout_secs": 5, "max_concurrency": 3}));
    let c = OpenAiConfig::from_options_with(&o, env_with_key).unwrap();
    assert_eq!((c.timeout, c.max_concurrency), (Duration::from_secs(5), 3));
    assert!(c.api_key.is_some());
    let shown = format!("{c:?} {:?}", OpenAiEngine::new(c.clone()));
    assert!(!shown.contains("sk-secret"), "the key leaked into Debug: {shown}");
}

#[test]
fn config_errors_name_the_key_and_never_the_secret() {
    let bad = [
        (json!({"model": "m"}), "base_url"),
        (json!({"base_url": "ftp://h", "model": "m"}), "base_url"),
        (json!({"base_url": "https://h"}), "model"),
        (json!({"base_url": "https://h", "model": "m", "timeout_secs": 0}), "timeout_secs"),
        (json!({"base_url": "https://h", "model": "m", "max_concurrency": "8"}), "max_concurrency"),
        (json!({"base_url": "https://h", "model": "m", "api_key_env": "UNSET"}), "UNSET"),
        (json!({"base_url": "https://h", "model": "m", "api_key": "sk-secret-123"}), "api_key_env"),
        (json!({"base_url": "https://h", "model": "m", "colour": 1}), "colour"),
    ];
    for (o, word) in bad {
        let e = OpenAiConfig::from_options_with(&options(o.clone()), env_with_key)
            .unwrap_err()
            .to_string();
        assert!(e.contains(word), "{o}: {e}");
        assert!(!e.contains("sk-secret"), "{o}: {e}");
    }
}

#[test]
fn statuses_are_classified_as_the_breaker_needs() {
    for (status, counted) in [
        (400, false),
        (404, false),
        (422, false),
        (401, true),
        (403, true),
        (429, true),
        (500, true),
        (502, true),
        (503, true),
        (302, true),
    ] {
        let f = classify_status(status, "");
        assert_eq!(f.counted(), counted, "{status}");
        let e = f.into_engine_error(Some(Duration::from_secs(7)));
        let kind =
            if counted { EngineErrorKind::Unavailable } else { EngineErrorKind::InvalidRequest };
        assert_eq!(e.kind, kind, "{status}");
        assert_eq!(e.retry_after.is_some(), counted, "a refused request holds no breaker open");
    }
    let f = classify_status(400, r#"{"error":{"message":"max_tokens too large"}}"#);
    assert_eq!(f.to_string(), "the upstream rejected the request (HTTP 400): max_tokens too large");
    let long = "x".repeat(1000);
    assert!(classify_status(422, &long).to_string().len() < 300);
}

#[test]
fn retry_after_seconds_or_date_capped() {
    // 2015-10-21 07:28:00 UTC.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
    assert_eq!(parse_retry_after(" 12 ", now), Some(Duration::from_secs(12)));
    assert_eq!(parse_retry_after("99999999", now), Some(MAX_RETRY_AFTER));
    assert_eq!(
        parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
        Some(Duration::from_secs(90)),
        "an HTTP date 90 s ahead"
    );
    assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now), Some(Duration::ZERO));
    assert_eq!(parse_retry_after("Tue, 20 Oct 2015 07:28:00 GMT", now), Some(Duration::ZERO));
    assert_eq!(parse_retry_after("Fri, 21 Oct 2016 07:28:00 GMT", now), Some(MAX_RETRY_AFTER));
    assert_eq!(parse_retry_after("-1", now), None);
    assert_eq!(parse_retry_after("soon", now), None);
}

#[test]
fn request_maps_sampling_and_streams_with_usage() {
    let mut r = GenerateRequest {
        messages: vec![inferd_core::engine::Message {
            role: inferd_core::engine::Role::User,
            content: "hi".into(),
        }],
        temperature: 0.0,
        max_tokens: 12,
        ..GenerateRequest::default()
    };
    let b = request_body("gpt", &r);
    assert_eq!(b["model"], "gpt");
    assert_eq!(b["messages"], json!([{"role": "user", "content": "hi"}]));
    assert_eq!(
        (b["stream"].clone(), b["stream_options"]["include_usage"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!((b["temperature"].as_f64(), b["max_tokens"].as_u64()), (Some(0.0), Some(12)));
    assert!(b.get("seed").is_none());
    r.seed = Some(42);
    assert_eq!(request_body("gpt", &r)["seed"], 42);
}

#[test]
fn grammar_is_refused_before_any_connection() {
    // Port 9 on loopback: nothing listens; a connection attempt would be Unavailable.
    let o = options(json!({"base_url": "http://127.0.0.1:9", "model": "m"}));
    let engine = OpenAiEngine::new(OpenAiConfig::from_options_with(&o, |_| None).unwrap());
    let r = GenerateRequest { grammar: "root ::= \"a\"".into(), ..GenerateRequest::default() };
    let e = engine.generate(&r, &CancelFlag::new(), &mut |_| {}).unwrap_err();
    assert_eq!(e.kind, EngineErrorKind::InvalidRequest);
    let caps = engine.load(&mut |_| {}).unwrap();
    assert_eq!((caps.accelerator.as_str(), caps.n_parallel), ("remote", Some(8)));
    assert_eq!(engine.parallelism(), 8);
}

fn relay(stream: &[u8]) -> (String, Result<StreamEnd, RelayError>) {
    let (events, err) = decode_all(stream, 1 << 16);
    assert_eq!(err, None);
    let mut text = Vec::new();
    let mut r = Relay::new();
    for e in events {
        match r.on_event(e, &mut |b| text.extend_from_slice(b)) {
            Ok(Some(end)) => return (String::from_utf8_lossy(&text).into(), Ok(end)),
            Ok(None) => {}
            Err(e) => return (String::from_utf8_lossy(&text).into(), Err(e)),
        }
    }
    let mut d = SseDecoder::default();
    d.push(stream, &mut Vec::new()).unwrap();
    (String::from_utf8_lossy(&text).into(), r.end_of_body(d.is_mid_event()))
}

const CHUNK_A: &str =
    r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
const CHUNK_B: &str = r#"data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#;
const CHUNK_C: &str =
    r#"data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}"#;
const FINISH: &str = r#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#;
const USAGE: &str =
    r#"data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;

fn stream(lines: &[&str]) -> Vec<u8> {
    lines.iter().flat_map(|l| format!("{l}\n\n").into_bytes()).collect()
}

#[test]
fn a_complete_stream_gives_text_reason_and_usage() {
    let (text, end) = relay(&stream(&[CHUNK_A, CHUNK_B, CHUNK_C, FINISH, USAGE, "data: [DONE]"]));
    assert_eq!(text, "Hello");
    let end = end.unwrap();
    assert_eq!(end.stop_reason, StopReason::Length);
    assert_eq!(end.usage, Usage { prompt_tokens: 9, completion_tokens: 2 });
}

#[test]
fn without_usage_the_deltas_are_counted() {
    let (_, end) = relay(&stream(&[CHUNK_A, CHUNK_B, CHUNK_C, FINISH, "data: [DONE]"]));
    assert_eq!(end.unwrap().usage, Usage { prompt_tokens: 0, completion_tokens: 2 });
    // No [DONE], but a finish reason and a clean end: complete.
    let (_, end) = relay(&stream(&[CHUNK_B, FINISH]));
    assert_eq!(end.unwrap().stop_reason, StopReason::Length);
}

#[test]
fn bad_streams_are_failures() {
    let (text, end) = relay(&stream(&[CHUNK_B, CHUNK_C]));
    assert_eq!((text.as_str(), end), ("Hello", Err(RelayError::Truncated)), "no finish, no [DONE]");
    let mut cut = stream(&[CHUNK_B, FINISH]);
    cut.truncate(cut.len() - 10);
    assert_eq!(relay(&cut).1, Err(RelayError::Truncated), "cut mid-event");
    assert!(matches!(relay(&stream(&["data: {nope"])).1, Err(RelayError::Malformed(_))));
    assert!(matches!(relay(&stream(&["data: [1,2]"])).1, Err(RelayError::Malformed(_))));
    assert!(matches!(relay(&stream(&["data: {}"])).1, Err(RelayError::Malformed(_))));
    assert!(matches!(
        relay(&stream(&[r#"data: {"choices":[{"delta":{"content":5}}]}"#])).1,
        Err(RelayError::Malformed(_))
    ));
    let (_, end) = relay(&stream(&[CHUNK_B, r#"data: {"error":{"message":"overloaded"}}"#]));
    assert_eq!(end, Err(RelayError::Upstream("overloaded".into())));
    let (_, end) = relay(b"event: error\ndata: boom\n\n");
    assert_eq!(end, Err(RelayError::Upstream("boom".into())));
    // Every one of them counts toward the breaker.
    for e in
        [RelayError::Truncated, RelayError::Malformed("x".into()), RelayError::Upstream("y".into())]
    {
        assert!(Failure::from(e).counted());
    }
    let _ = SseEvent::Done;
}
