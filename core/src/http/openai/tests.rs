use serde_json::{Value, json};

use crate::wire;

use super::*;

fn parse(v: Value) -> Result<ChatRequest, ApiError> {
    parse_chat_request(&serde_json::to_vec(&v).unwrap())
}

fn ok(v: Value) -> ChatRequest {
    parse(v).unwrap()
}

/// The request with `extra` merged into a minimal valid one.
fn with(extra: Value) -> Value {
    let mut base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
        b.extend(e);
    }
    base
}

fn refused(v: Value) -> ApiError {
    let e = parse(v).unwrap_err();
    assert_eq!(e.status, Status::BadRequest);
    assert_eq!(e.kind, "invalid_request_error");
    e
}

fn body_json(f: impl FnOnce(&mut Vec<u8>)) -> Value {
    let mut out = Vec::new();
    f(&mut out);
    serde_json::from_slice(&out).unwrap()
}

/// The `data:` payloads of a chunked SSE body, and whether the last chunk ended it.
fn sse_events(mut b: &[u8]) -> (Vec<String>, bool) {
    let mut data = Vec::new();
    let mut ended = false;
    while !b.is_empty() {
        let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap(), 16).unwrap();
        b = &b[eol + 2..];
        if n == 0 {
            assert_eq!(b, b"\r\n");
            ended = true;
            break;
        }
        data.extend_from_slice(&b[..n]);
        assert_eq!(&b[n..n + 2], b"\r\n");
        b = &b[n + 2..];
    }
    let text = String::from_utf8(data).unwrap();
    let events = text
        .split_terminator("\n\n")
        .map(|e| e.strip_prefix("data: ").unwrap().to_owned())
        .collect();
    (events, ended)
}

#[test]
fn minimal_request_gets_v1_defaults_and_openai_stream_default() {
    let r = ok(with(json!({})));
    let d = GenerateRequest::default();
    assert_eq!(r.params.messages, vec![Message { role: Role::User, content: "hi".into() }]);
    assert_eq!(
        (r.params.temperature, r.params.top_p, r.params.top_k, r.params.max_tokens),
        (d.temperature, d.top_p, d.top_k, d.max_tokens)
    );
    assert_eq!(r.params.grammar, "");
    assert_eq!(r.model.as_deref(), Some("m"));
    assert!(!r.stream && !r.include_usage);
    assert!(r.stop.is_empty());
}

#[test]
fn full_request_maps_every_field() {
    let r = ok(json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
            {"role": "assistant", "content": null},
            {"role": "user", "content": "go"}
        ],
        "max_completion_tokens": 7, "max_tokens": 99,
        "temperature": 0, "top_p": 0.5, "seed": 42,
        "stream": true, "stream_options": {"include_usage": true},
        "stop": ["END", "\n\n"],
        "response_format": {"type": "json_object"},
        "n": 1, "tools": [], "logprobs": false,
        "frequency_penalty": 0.5, "user": "u", "some_future_field": {"x": [1]}
    }));
    let roles: Vec<Role> = r.params.messages.iter().map(|m| m.role).collect();
    assert_eq!(roles, [Role::System, Role::System, Role::User, Role::Assistant, Role::User]);
    assert_eq!(r.params.messages[2].content, "a\nb");
    assert_eq!(r.params.messages[3].content, "");
    assert_eq!(r.params.max_tokens, 7, "max_completion_tokens wins");
    assert_eq!(r.params.temperature, 0.0);
    assert_eq!(r.params.top_p, 0.5);
    assert_eq!(r.params.seed, Some(42));
    assert_eq!(r.params.grammar, JSON_OBJECT_GRAMMAR);
    assert!(r.stream && r.include_usage);
    let mut out = String::new();
    let mut stop = r.stop.clone();
    assert!(stop.push("x\n\ny", &mut out));
    assert_eq!(out, "x");
}

#[test]
fn max_tokens_and_text_format() {
    let r = ok(with(json!({"max_tokens": 3, "response_format": {"type": "text"}, "stop": "x"})));
    assert_eq!(r.params.max_tokens, 3);
    assert_eq!(r.params.grammar, "");
    assert!(!r.stop.is_empty());
    let r = ok(with(json!({"seed": -1})));
    assert_eq!(r.params.seed, Some(u64::MAX));
}

#[test]
fn v1_ranges_apply_and_name_the_field() {
    for (extra, param) in [
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"max_tokens": -1}), "max_tokens"),
        (json!({"max_completion_tokens": -1}), "max_completion_tokens"),
        (json!({"temperature": 1e300}), "temperature"),
    ] {
        let e = refused(with(extra.clone()));
        assert_eq!(e.param.as_deref(), Some(param), "{extra}: {e:?}");
        assert_eq!(e.code, Some("invalid_request"));
    }
    let e = refused(json!({"messages": []}));
    assert_eq!(e.param.as_deref(), Some("messages"));
}

#[test]
fn wrong_types_name_the_field() {
    for (v, param) in [
        (with(json!({"temperature": "hot"})), "temperature"),
        (with(json!({"max_tokens": "5"})), "max_tokens"),
        (with(json!({"seed": 1.5})), "seed"),
        (with(json!({"seed": "1"})), "seed"),
        (with(json!({"stream": "yes"})), "stream"),
        (with(json!({"stream_options": {"include_usage": 1}})), "stream_options.include_usage"),
        (with(json!({"stream_options": true})), "stream_options"),
        (with(json!({"model": 5})), "model"),
        (with(json!({"stop": 5})), "stop"),
        (with(json!({"stop": ["a", 1]})), "stop"),
        (with(json!({"stop": ["a", "b", "c", "d", "e"]})), "stop"),
        (with(json!({"stop": ""})), "stop"),
        (with(json!({"response_format": {"type": "yaml"}})), "response_format.type"),
        (with(json!({"response_format": "json"})), "response_format"),
        (json!({"model": "m"}), "messages"),
        (json!({"messages": "hi"}), "messages"),
        (json!({"messages": ["hi"]}), "messages[0]"),
        (json!({"messages": [{"role": "robot", "content": "x"}]}), "messages[0].role"),
        (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
        (json!({"messages": [{"role": "user"}]}), "messages[0].content"),
        (json!({"messages": [{"role": "user", "content": null}]}), "messages[0].content"),
        (json!({"messages": [{"role": "user", "content": 5}]}), "messages[0].content"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
            "messages[0].content[0].text",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"text": "x"}]}]}),
            "messages[0].content[0].type",
        ),
    ] {
        let e = refused(v.clone());
        assert_eq!(e.param.as_deref(), Some(param), "{v}: {e:?}");
    }
}

#[test]
fn unsupported_features_are_refused_by_name() {
    for (v, param) in [
        (with(json!({"n": 2})), "n"),
        (with(json!({"n": 0})), "n"),
        (with(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})), "tools"),
        (with(json!({"functions": [{"name": "f"}]})), "functions"),
        (with(json!({"logprobs": true})), "logprobs"),
        (with(json!({"top_logprobs": 2})), "top_logprobs"),
        (with(json!({"audio": {"voice": "x"}})), "audio"),
        (
            with(json!({"response_format": {"type": "json_schema", "json_schema": {}}})),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content[0].type",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]}]}),
            "messages[0].content[1].type",
        ),
        (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages[0].role"),
        (
            json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c"}]}]}),
            "messages[0].tool_calls",
        ),
    ] {
        let e = refused(v.clone());
        assert_eq!(e.param.as_deref(), Some(param), "{v}: {e:?}");
    }
}

#[test]
fn bodies_that_are_not_objects() {
    for body in [
        &b"not json"[..],
        b"[1]",
        b"",
        b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}",
    ] {
        let e = parse_chat_request(body).unwrap_err();
        assert_eq!(e.status, Status::BadRequest);
        assert_eq!(e.param, None);
    }
}

#[test]
fn error_codes_map_to_statuses() {
    for (code, status, kind) in [
        (ErrorCode::QueueFull, 429, "rate_limit_error"),
        (ErrorCode::BackendUnavailable, 503, "service_unavailable"),
        (ErrorCode::InvalidRequest, 400, "invalid_request_error"),
        (ErrorCode::FrameTooLarge, 413, "invalid_request_error"),
        (ErrorCode::Internal, 500, "server_error"),
    ] {
        let e = ApiError::from_code(code, "why \"quoted\"");
        assert_eq!((e.status.code(), e.kind), (status, kind));
        let v = body_json(|o| e.write_body(o));
        assert_eq!(
            v,
            json!({"error": {"message": "why \"quoted\"", "type": kind, "param": null, "code": code.as_str()}})
        );
    }
    assert_eq!(ApiError::unauthorized().status, Status::Unauthorized);
    assert_eq!(ApiError::not_found("/x").status, Status::NotFound);
    assert_eq!(ApiError::method_not_allowed("PUT", "/x").status, Status::MethodNotAllowed);
    let e = ApiError::from_request_error(&RequestError::LengthRequired);
    assert_eq!(e.status, Status::LengthRequired);
    let e = ApiError::from_request_error(&RequestError::BodyTooLarge { length: 9, limit: 8 });
    assert_eq!((e.status, e.code), (Status::PayloadTooLarge, Some("frame_too_large")));
    let v = body_json(|o| ApiError::invalid(Some("n"), "no").write_body(o));
    assert_eq!(v["error"]["param"], "n");
}

#[test]
fn error_response_is_whole_http() {
    let mut out = Vec::new();
    let mut head = ResponseHead::new(Status::Ok, "ignored");
    head.retry_after = Some(1);
    ApiError::from_code(ErrorCode::QueueFull, "full").write_response(&mut out, head);
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{text}");
    assert!(text.contains("Content-Type: application/json\r\n"));
    assert!(text.contains("Retry-After: 1\r\n"));
    let body = text.split_once("\r\n\r\n").unwrap().1;
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["code"], "queue_full");
}

const META: CompletionMeta<'static> =
    CompletionMeta { id: "r\"1", created: 1_700_000_000, model: "tiny" };

#[test]
fn completion_object() {
    let usage = Usage { prompt_tokens: 5, completion_tokens: 3 };
    let v = body_json(|o| write_completion(o, &META, "hé\n\"", FinishReason::Length, usage));
    assert_eq!(
        v,
        json!({
            "id": "chatcmpl-r\"1", "object": "chat.completion", "created": 1_700_000_000u64, "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hé\n\""},
                         "logprobs": null, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        })
    );
    let big = Usage { prompt_tokens: u32::MAX, completion_tokens: u32::MAX };
    let v = body_json(|o| write_completion(o, &META, "", FinishReason::Stop, big));
    assert_eq!(v["usage"]["total_tokens"], 2 * u64::from(u32::MAX));
}

#[test]
fn stream_of_chunks() {
    let mut out = Vec::new();
    write_role_chunk(&mut out, &META);
    write_content_chunk(&mut out, &META, "Hel");
    write_content_chunk(&mut out, &META, "");
    write_content_chunk(&mut out, &META, "lo 🦀");
    write_finish_chunk(&mut out, &META, FinishReason::Stop);
    write_usage_chunk(&mut out, &META, Usage { prompt_tokens: 2, completion_tokens: 3 });
    write_stream_end(&mut out);
    let (events, ended) = sse_events(&out);
    assert!(ended);
    assert_eq!(events.len(), 6, "{events:?}");
    assert_eq!(events[5], "[DONE]");
    let chunks: Vec<Value> = events[..5].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], "chatcmpl-r\"1");
        assert_eq!(c["created"], 1_700_000_000u64);
        assert_eq!(c["model"], "tiny");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
    let text: String = chunks[1..3]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello 🦀");
    assert_eq!(chunks[3]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(chunks[4]["usage"]["total_tokens"], 5);
}

#[test]
fn stream_error_ends_the_stream() {
    let mut out = Vec::new();
    write_role_chunk(&mut out, &META);
    write_stream_error(&mut out, &ApiError::from_code(ErrorCode::BackendUnavailable, "gone"));
    let (events, ended) = sse_events(&out);
    assert!(ended);
    assert_eq!(events.len(), 2);
    let e: Value = serde_json::from_str(&events[1]).unwrap();
    assert_eq!(e["error"]["code"], "backend_unavailable");
    assert_eq!(e["error"]["message"], "gone");
}

#[test]
fn models_list() {
    let v = body_json(|o| write_models(o, &[("tiny", 5), ("other\"", 6)]));
    assert_eq!(
        v,
        json!({"object": "list", "data": [
            {"id": "tiny", "object": "model", "created": 5, "owned_by": "inferd"},
            {"id": "other\"", "object": "model", "created": 6, "owned_by": "inferd"}
        ]})
    );
    assert_eq!(body_json(|o| write_models(o, &[])), json!({"object": "list", "data": []}));
}

#[test]
fn finish_reasons() {
    use FinishReason::*;
    assert_eq!(FinishReason::from_stop_reason(StopReason::End, false), Some(Stop));
    assert_eq!(FinishReason::from_stop_reason(StopReason::Length, false), Some(Length));
    assert_eq!(FinishReason::from_stop_reason(StopReason::Cancelled, true), Some(Stop));
    assert_eq!(FinishReason::from_stop_reason(StopReason::Cancelled, false), None);
    assert_eq!(FinishReason::from_stop_reason(StopReason::Error, false), None);
}

/// The grammar is well-formed GBNF as far as a sans-IO check can tell: every rule
/// referenced is defined, and `root` exists. llama.cpp itself runs it in the llama
/// engine's tests.
#[test]
fn json_grammar_rules_are_defined() {
    let mut defined = Vec::new();
    let mut bodies = String::new();
    for line in JSON_OBJECT_GRAMMAR.lines().filter(|l| !l.trim().is_empty()) {
        let (name, body) = line.split_once("::=").unwrap();
        defined.push(name.trim().to_owned());
        // Drop literals and character classes; what is left are rule names.
        let mut rest = String::new();
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' | '[' => {
                    let close = if c == '"' { '"' } else { ']' };
                    while let Some(d) = chars.next() {
                        if d == '\\' {
                            chars.next();
                        } else if d == close {
                            break;
                        }
                    }
                    rest.push(' ');
                }
                '{' => {
                    for d in chars.by_ref() {
                        if d == '}' {
                            break;
                        }
                    }
                }
                c => rest.push(c),
            }
        }
        bodies.push_str(&rest);
        bodies.push(' ');
    }
    assert!(defined.iter().any(|d| d == "root"));
    for word in
        bodies.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).filter(|w| !w.is_empty())
    {
        assert!(defined.iter().any(|d| d == word), "rule `{word}` is not defined");
    }
    assert!(JSON_OBJECT_GRAMMAR.len() <= wire::MAX_GRAMMAR_BYTES);
}

#[test]
fn fractional_integers_and_nested_type_errors_name_the_field() {
    for (v, param) in [
        (with(json!({"max_tokens": 5.5})), "max_tokens"),
        (with(json!({"top_k": -1})), "top_k"),
        (with(json!({"stop": ["a", "b", "c", "d", "e", "f", "g"]})), "stop"),
        (json!({"messages": [{"role": 5, "content": "x"}]}), "messages[0].role"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}),
            "messages[0].content[0].text",
        ),
        (json!({"messages": [{"role": "user", "content": ["x"]}]}), "messages[0].content[0]"),
    ] {
        let e = refused(v.clone());
        assert_eq!(e.param.as_deref(), Some(param), "{v}: {e:?}");
    }
}

#[test]
fn ranges_agree_with_protocol_v1() {
    // The same out-of-range values are refused by both decoders, with the same message.
    for extra in [
        json!({"temperature": -1}),
        json!({"top_p": 2}),
        json!({"max_tokens": -3}),
        json!({"top_k": -2}),
        json!({"stop": ""}),
    ] {
        let e = refused(with(extra.clone()));
        let mut v1 = with(extra.clone());
        v1.as_object_mut().unwrap().remove("model");
        let line = serde_json::to_vec(&v1).unwrap();
        let v1_err = wire::decode_request(&line).unwrap_err();
        assert!(!v1_err.closes_connection(), "{extra}");
        assert_eq!(e.message, v1_err.message(), "{extra}");
    }
}

#[test]
fn trailing_garbage_and_escaped_keys() {
    assert_eq!(parse_chat_request(b"{\"messages\":[]} x").unwrap_err().param, None);
    let r = parse_chat_request(
        br#"{"mess\u0061ges":[{"role":"user","content":"hi"}],"max_tok\u0065ns":2}"#,
    )
    .unwrap();
    assert_eq!(r.params.max_tokens, 2);
}
