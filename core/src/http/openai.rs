//! OpenAI's chat-completions API mapped onto the core: request bodies into
//! [`GenerateRequest`]s, results into `chat.completion` objects and
//! `chat.completion.chunk` event streams, failures into OpenAI-shaped error bodies.
//!
//! Validation ranges are protocol v1's: the mapped request is handed to
//! [`wire::decode_request`], so the two APIs can never disagree about what is in range.
//! What this module checks itself is only what v1 has no notion of: OpenAI's field
//! types, its unsupported features (each refused naming the field, as `param`), and
//! the stop sequences.

use serde_json::{Map, Value};

use super::request::RequestError;
use super::response::{self, JSON, ResponseHead, Status};
use crate::stop::{MAX_STOP_SEQUENCES, StopMatcher};
use crate::wire::{
    self, ErrorCode, GenerateRequest, Message, Role, StopReason, Usage, write_json_str, write_u64,
};

/// A GBNF grammar for one JSON object: what `response_format: {"type":"json_object"}`
/// constrains the output to. Whitespace runs are bounded so a model cannot pad forever.
pub const JSON_OBJECT_GRAMMAR: &str = r#"root ::= object
object ::= "{" ws ( member ( "," ws member )* )? "}"
member ::= string ws ":" ws value ws
array ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
value ::= object | array | string | number | "true" | "false" | "null"
string ::= "\"" char* "\""
char ::= [^"\\\x00-\x1F\x7F] | "\\" ( ["\\/bfnrt] | "u" hex hex hex hex )
hex ::= [0-9a-fA-F]
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws ::= [ \t\n]{0,16}
"#;

/// A failure in OpenAI's shape: `{"error":{"message","type","param","code"}}` with the
/// HTTP status it is sent with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: Status,
    /// OpenAI's error `type`, e.g. `invalid_request_error`.
    pub kind: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code (protocol v1's error code where one applies).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about the request body, naming the field at fault when there is one.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: Status::BadRequest,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.map(str::to_owned),
            code: Some(ErrorCode::InvalidRequest.as_str()),
        }
    }

    /// The answer to one of protocol v1's error codes, with its HTTP status.
    pub fn from_code(code: ErrorCode, message: impl Into<String>) -> ApiError {
        let (status, kind) = match code {
            ErrorCode::QueueFull => (Status::TooManyRequests, "rate_limit_error"),
            ErrorCode::BackendUnavailable => (Status::ServiceUnavailable, "service_unavailable"),
            ErrorCode::InvalidRequest => (Status::BadRequest, "invalid_request_error"),
            ErrorCode::FrameTooLarge => (Status::PayloadTooLarge, "invalid_request_error"),
            ErrorCode::Internal => (Status::InternalServerError, "server_error"),
        };
        ApiError { status, kind, message: message.into(), param: None, code: Some(code.as_str()) }
    }

    /// The answer to a request the HTTP reader refused.
    pub fn from_request_error(e: &RequestError) -> ApiError {
        let code = match e {
            RequestError::BodyTooLarge { .. } => Some(ErrorCode::FrameTooLarge.as_str()),
            _ => None,
        };
        ApiError {
            status: e.status(),
            kind: "invalid_request_error",
            message: e.to_string(),
            param: None,
            code,
        }
    }

    /// 401: the API key is missing or wrong.
    pub fn unauthorized() -> ApiError {
        ApiError {
            status: Status::Unauthorized,
            kind: "authentication_error",
            message: "missing or invalid API key (send Authorization: Bearer <key>)".into(),
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 404: no such path.
    pub fn not_found(path: &str) -> ApiError {
        ApiError {
            status: Status::NotFound,
            kind: "invalid_request_error",
            message: format!("no such endpoint: {path}"),
            param: None,
            code: Some("not_found"),
        }
    }

    /// 405: the path exists but not with this method.
    pub fn method_not_allowed(method: &str, path: &str) -> ApiError {
        ApiError {
            status: Status::MethodNotAllowed,
            kind: "invalid_request_error",
            message: format!("{method} is not allowed on {path}"),
            param: None,
            code: Some("method_not_allowed"),
        }
    }

    /// Appends the JSON body `{"error":{…}}`.
    pub fn write_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"error\":{\"message\":");
        write_json_str(out, &self.message);
        out.extend_from_slice(b",\"type\":");
        write_json_str(out, self.kind);
        out.extend_from_slice(b",\"param\":");
        write_opt_str(out, self.param.as_deref());
        out.extend_from_slice(b",\"code\":");
        write_opt_str(out, self.code);
        out.extend_from_slice(b"}}");
    }

    /// Appends a whole HTTP response carrying this error. `head` supplies what only the
    /// caller knows (whether the connection closes, `Retry-After`, `Allow`); its status
    /// and content type are replaced by the error's.
    pub fn write_response(&self, out: &mut Vec<u8>, head: ResponseHead<'_>) {
        let mut body = Vec::with_capacity(128 + self.message.len());
        self.write_body(&mut body);
        let head = ResponseHead { status: self.status, content_type: JSON, ..head };
        response::write_response(out, &head, &body);
    }
}

fn write_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => write_json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// A chat-completions request, mapped and validated.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    /// What the engine is given; validated by protocol v1's rules.
    pub params: GenerateRequest,
    /// The `model` the client named, if any (accepted, not used for routing).
    pub model: Option<String>,
    /// Answer as an event stream rather than one object.
    pub stream: bool,
    /// Send a usage chunk at the end of the stream (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The `stop` sequences, ready to filter the output.
    pub stop: StopMatcher,
}

/// Parses and validates a `POST /v1/chat/completions` body.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid(None, "the body must be a JSON object"));
    };
    refuse_unsupported(&obj)?;
    let messages = match obj.get("messages") {
        Some(Value::Array(items)) => {
            items.iter().enumerate().map(|(i, m)| message(i, m)).collect::<Result<Vec<_>, _>>()?
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(Some("messages"), "`messages` is required"));
        }
        Some(_) => return Err(ApiError::invalid(Some("messages"), "`messages` must be an array")),
    };
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid(Some("model"), "`model` must be a string")),
    };
    let stream = opt_bool(&obj, "stream", "stream")?.unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            opt_bool(o, "include_usage", "stream_options.include_usage")?.unwrap_or(false)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stream_options"),
                "`stream_options` must be an object",
            ));
        }
    };
    let stop = stop_sequences(obj.get("stop"))?;
    let stop =
        StopMatcher::new(&stop).map_err(|e| ApiError::invalid(Some("stop"), e.to_string()))?;
    let grammar = response_format(obj.get("response_format"))?;

    // The v1 request carrying the same values, so v1's validation judges the ranges.
    let mut v1 = Map::new();
    let messages = serde_json::to_value(&messages)
        .map_err(|e| ApiError::from_code(ErrorCode::Internal, e.to_string()))?;
    v1.insert("messages".into(), messages);
    // The newer name wins when both are sent.
    let max_tokens_name = match obj.get("max_completion_tokens") {
        None | Some(Value::Null) => "max_tokens",
        Some(_) => "max_completion_tokens",
    };
    for (name, v1_name) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        (max_tokens_name, "max_tokens"),
    ] {
        match obj.get(name) {
            None | Some(Value::Null) => {}
            Some(n @ Value::Number(_)) => {
                v1.insert(v1_name.into(), n.clone());
            }
            Some(_) => {
                return Err(ApiError::invalid(Some(name), format!("`{name}` must be a number")));
            }
        }
    }
    match obj.get("seed") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) => {
            // OpenAI seeds are signed 64-bit; a negative one keeps its bits, so it
            // still picks one reproducible stream.
            let seed = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => u,
                (None, Some(i)) => i as u64,
                _ => return Err(ApiError::invalid(Some("seed"), "`seed` must be an integer")),
            };
            v1.insert("seed".into(), seed.into());
        }
        Some(_) => return Err(ApiError::invalid(Some("seed"), "`seed` must be an integer")),
    }
    if let Some(g) = grammar {
        v1.insert("grammar".into(), g.into());
    }
    let line = serde_json::to_vec(&Value::Object(v1))
        .map_err(|e| ApiError::from_code(ErrorCode::Internal, e.to_string()))?;
    let request = wire::decode_request(&line).map_err(|e| {
        // v1 names the field in backticks; name the client's own field.
        let param = e.message().split('`').nth(1).map(|p| match p {
            "max_tokens" => max_tokens_name,
            p => p,
        });
        ApiError::invalid(param, e.message())
    })?;
    Ok(ChatRequest { params: request.params, model, stream, include_usage, stop })
}

/// Refuses the features we cannot honour, naming the field; absent, null, false and
/// empty values ask for nothing and pass.
fn refuse_unsupported(obj: &Map<String, Value>) -> Result<(), ApiError> {
    match obj.get("n") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_u64() == Some(1) => {}
        Some(_) => return Err(ApiError::invalid(Some("n"), "only `n` = 1 is supported")),
    }
    for field in ["tools", "functions", "logprobs", "top_logprobs", "audio"] {
        let asks = match obj.get(field) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if asks {
            return Err(ApiError::invalid(Some(field), format!("`{field}` is not supported")));
        }
    }
    Ok(())
}

fn opt_bool(obj: &Map<String, Value>, key: &str, param: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(Some(param), format!("`{param}` must be a boolean"))),
    }
}

/// One message: OpenAI's roles onto v1's, its content parts joined into one text.
fn message(i: usize, m: &Value) -> Result<Message, ApiError> {
    let Value::Object(m) = m else {
        return Err(ApiError::invalid(
            Some(&format!("messages[{i}]")),
            "a message must be an object",
        ));
    };
    let role_param = format!("messages[{i}].role");
    let role = match m.get("role").and_then(Value::as_str) {
        Some("system" | "developer") => Role::System,
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        Some(r @ ("tool" | "function")) => {
            return Err(ApiError::invalid(
                Some(&role_param),
                format!("role `{r}` is not supported"),
            ));
        }
        Some(r) => {
            return Err(ApiError::invalid(Some(&role_param), format!("unknown role `{r}`")));
        }
        None => return Err(ApiError::invalid(Some(&role_param), "`role` must be a string")),
    };
    match m.get("tool_calls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => {
            let param = format!("messages[{i}].tool_calls");
            return Err(ApiError::invalid(Some(&param), "tool calls are not supported"));
        }
    }
    let content_param = format!("messages[{i}].content");
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        // An assistant turn may carry no text.
        Some(Value::Null) if role == Role::Assistant => String::new(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let param = format!("{content_param}[{j}]");
                let kind = part.get("type").and_then(Value::as_str);
                match (kind, part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => {
                        // Parts are separate paragraphs of one message.
                        if j > 0 {
                            text.push('\n');
                        }
                        text.push_str(t);
                    }
                    (Some("text"), _) => {
                        let param = format!("{param}.text");
                        return Err(ApiError::invalid(Some(&param), "a text part needs `text`"));
                    }
                    (Some(other), _) => {
                        let param = format!("{param}.type");
                        return Err(ApiError::invalid(
                            Some(&param),
                            format!("content parts of type `{other}` are not supported"),
                        ));
                    }
                    (None, _) => {
                        let param = format!("{param}.type");
                        return Err(ApiError::invalid(Some(&param), "a content part needs `type`"));
                    }
                }
            }
            text
        }
        _ => {
            return Err(ApiError::invalid(
                Some(&content_param),
                "`content` must be a string or an array of text parts",
            ));
        }
    };
    Ok(Message { role, content })
}

fn stop_sequences(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid(
            Some("stop"),
            format!("`stop` must be a string or an array of up to {MAX_STOP_SEQUENCES} strings"),
        )
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => {
            a.iter().map(|s| s.as_str().map(str::to_owned).ok_or_else(bad)).collect()
        }
        Some(_) => Err(bad()),
    }
}

/// The grammar `response_format` asks for, if any.
fn response_format(v: Option<&Value>) -> Result<Option<&'static str>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(None) };
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(JSON_OBJECT_GRAMMAR)),
        Some("json_schema") => Err(ApiError::invalid(
            Some("response_format"),
            "`response_format` type `json_schema` is not supported; use `json_object`",
        )),
        Some(other) => Err(ApiError::invalid(
            Some("response_format.type"),
            format!("unknown `response_format` type `{other}`"),
        )),
        None => Err(ApiError::invalid(
            Some("response_format"),
            "`response_format` must be an object with a string `type`",
        )),
    }
}

/// Why a completion ended, in OpenAI's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model finished, or a stop sequence matched.
    Stop,
    /// `max_tokens` or the context ran out.
    Length,
}

impl FinishReason {
    /// The finish reason of a generation that ended with `reason`; `stopped` says a stop
    /// sequence matched (the daemon then cancelled the generation itself). `None` when it
    /// did not finish: cancelled by others, or failed.
    pub fn from_stop_reason(reason: StopReason, stopped: bool) -> Option<FinishReason> {
        match reason {
            _ if stopped => Some(FinishReason::Stop),
            StopReason::End => Some(FinishReason::Stop),
            StopReason::Length => Some(FinishReason::Length),
            StopReason::Cancelled | StopReason::Error => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What every object of one completion repeats.
#[derive(Clone, Copy, Debug)]
pub struct CompletionMeta<'a> {
    /// The caller's id for the request; sent as `chatcmpl-<id>`.
    pub id: &'a str,
    /// Unix time in seconds, from the caller's clock.
    pub created: u64,
    /// The served model's name.
    pub model: &'a str,
}

fn write_meta(out: &mut Vec<u8>, meta: &CompletionMeta<'_>, object: &str) {
    out.extend_from_slice(b"{\"id\":\"chatcmpl-");
    // The caller's id inside the literal: write it escaped, without its quotes.
    let start = out.len();
    write_json_str(out, meta.id);
    out.remove(start);
    out.extend_from_slice(b",\"object\":\"");
    out.extend_from_slice(object.as_bytes());
    out.extend_from_slice(b"\",\"created\":");
    write_u64(out, meta.created);
    out.extend_from_slice(b",\"model\":");
    write_json_str(out, meta.model);
}

fn write_usage(out: &mut Vec<u8>, usage: Usage) {
    out.extend_from_slice(b"\"usage\":{\"prompt_tokens\":");
    write_u64(out, usage.prompt_tokens.into());
    out.extend_from_slice(b",\"completion_tokens\":");
    write_u64(out, usage.completion_tokens.into());
    out.extend_from_slice(b",\"total_tokens\":");
    write_u64(out, u64::from(usage.prompt_tokens) + u64::from(usage.completion_tokens));
    out.push(b'}');
}

/// Appends the JSON body of a non-streaming answer: a `chat.completion` object.
pub fn write_completion(
    out: &mut Vec<u8>,
    meta: &CompletionMeta<'_>,
    content: &str,
    finish: FinishReason,
    usage: Usage,
) {
    write_meta(out, meta, "chat.completion");
    out.extend_from_slice(
        b",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":",
    );
    write_json_str(out, content);
    out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":\"");
    out.extend_from_slice(finish.as_str().as_bytes());
    out.extend_from_slice(b"\"}],");
    write_usage(out, usage);
    out.push(b'}');
}

/// Appends one `chat.completion.chunk` event holding `delta` (a JSON object's members)
/// and `finish`, as an SSE event inside an HTTP chunk.
fn write_delta_chunk(
    out: &mut Vec<u8>,
    meta: &CompletionMeta<'_>,
    delta: impl FnOnce(&mut Vec<u8>),
    finish: Option<FinishReason>,
) {
    response::write_sse_chunk(out, |out| {
        write_meta(out, meta, "chat.completion.chunk");
        out.extend_from_slice(b",\"choices\":[{\"index\":0,\"delta\":{");
        delta(out);
        out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":");
        match finish {
            Some(f) => {
                out.push(b'"');
                out.extend_from_slice(f.as_str().as_bytes());
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}]}");
    });
}

/// Appends the first event of a stream: the delta carrying the assistant role.
pub fn write_role_chunk(out: &mut Vec<u8>, meta: &CompletionMeta<'_>) {
    write_delta_chunk(
        out,
        meta,
        |o| o.extend_from_slice(b"\"role\":\"assistant\",\"content\":\"\""),
        None,
    );
}

/// Appends a content delta. Empty text writes nothing (a held-back piece is not news).
pub fn write_content_chunk(out: &mut Vec<u8>, meta: &CompletionMeta<'_>, text: &str) {
    if text.is_empty() {
        return;
    }
    write_delta_chunk(
        out,
        meta,
        |o| {
            o.extend_from_slice(b"\"content\":");
            write_json_str(o, text);
        },
        None,
    );
}

/// Appends the event carrying the finish reason (an empty delta).
pub fn write_finish_chunk(out: &mut Vec<u8>, meta: &CompletionMeta<'_>, finish: FinishReason) {
    write_delta_chunk(out, meta, |_| {}, Some(finish));
}

/// Appends the usage event sent after the finish when `include_usage` was asked for:
/// no choices, only `usage`.
pub fn write_usage_chunk(out: &mut Vec<u8>, meta: &CompletionMeta<'_>, usage: Usage) {
    response::write_sse_chunk(out, |out| {
        write_meta(out, meta, "chat.completion.chunk");
        out.extend_from_slice(b",\"choices\":[],");
        write_usage(out, usage);
        out.push(b'}');
    });
}

/// Appends the end of a successful stream: `data: [DONE]`, then the last HTTP chunk.
pub fn write_stream_end(out: &mut Vec<u8>) {
    response::write_sse_chunk(out, |o| o.extend_from_slice(b"[DONE]"));
    response::write_last_chunk(out);
}

/// Appends the end of a stream that failed after it started: one `data: {"error":…}`
/// event, then the last HTTP chunk (the status line has long been sent).
pub fn write_stream_error(out: &mut Vec<u8>, error: &ApiError) {
    response::write_sse_chunk(out, |o| error.write_body(o));
    response::write_last_chunk(out);
}

/// Appends the JSON body of `GET /v1/models`: the served models in OpenAI's list shape.
/// `created` is the Unix time each model was loaded, from the caller's clock.
pub fn write_models(out: &mut Vec<u8>, models: &[(&str, u64)]) {
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    for (i, (id, created)) in models.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":");
        write_json_str(out, id);
        out.extend_from_slice(b",\"object\":\"model\",\"created\":");
        write_u64(out, *created);
        out.extend_from_slice(b",\"owned_by\":\"inferd\"}");
    }
    out.extend_from_slice(b"]}");
}

#[cfg(test)]
mod tests;
