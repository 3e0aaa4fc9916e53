//! OpenAI's chat-completions API mapped onto the core: request bodies into
//! [`GenerateRequest`]s, results into `chat.completion` objects and
//! `chat.completion.chunk` event streams, failures into OpenAI-shaped error bodies.
//!
//! Validation ranges are protocol v1's: the typed fields are judged by
//! [`SamplingFields::validate`], the helper v1's decoder uses too, so the two APIs can
//! never disagree about what is in range. What this module checks itself is only what
//! v1 has no notion of: OpenAI's field types and its unsupported features (each refused
//! naming the field, as `param`).

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::request::RequestError;
use super::response::{self, JSON, ResponseHead, Status};
use crate::stop::{MAX_STOP_SEQUENCES, StopMatcher};
use crate::wire::{
    ErrorCode, GenerateRequest, Int, Key, Message, Role, SamplingFields, StopReason, Usage,
    write_json_str, write_u64,
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
///
/// The body is read straight into typed fields (no intermediate JSON tree); the
/// ranges are then judged by [`SamplingFields::validate`], protocol v1's own rules.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    // Checked once up front, so the parser can skip its per-string checks.
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::invalid(None, "the body is not valid UTF-8"))?;
    let mut ctx = Ctx::default();
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = Body { ctx: &mut ctx }.deserialize(&mut de).and_then(|raw| de.end().map(|()| raw));
    let raw = parsed.map_err(|e| ctx.error(&e))?;
    let Some(messages) = raw.messages else {
        return Err(ApiError::invalid(Some("messages"), "`messages` is required"));
    };
    // The newer name wins when both are sent.
    let max_tokens_name =
        if raw.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
    let fields = SamplingFields {
        messages,
        temperature: raw.temperature,
        top_p: raw.top_p,
        top_k: raw.top_k,
        max_tokens: raw.max_completion_tokens.or(raw.max_tokens),
        image_token_budget: None,
        grammar: raw.grammar.map(str::to_owned),
        seed: raw.seed,
        stop: raw.stop,
    };
    let (params, stop) = fields.validate().map_err(|e| {
        // Name the client's own field.
        let param = match e.field {
            "max_tokens" => max_tokens_name,
            f => f,
        };
        ApiError::invalid(Some(param), e.message)
    })?;
    let stop =
        StopMatcher::new(&stop).map_err(|e| ApiError::invalid(Some("stop"), e.to_string()))?;
    Ok(ChatRequest {
        params,
        model: raw.model,
        stream: raw.stream.unwrap_or(false),
        include_usage: raw.include_usage,
        stop,
    })
}

/// A request field, rendered into its path only when an error names it.
#[derive(Clone, Copy, Debug)]
enum Param {
    /// A top-level field (or a dotted path under one).
    Top(&'static str),
    /// A field of `messages[i]`; empty for the message itself.
    Message(usize, &'static str),
    /// A field of `messages[i].content[j]`; empty for the part itself.
    Part(usize, usize, &'static str),
}

impl Param {
    fn render(self) -> String {
        match self {
            Param::Top(f) => f.to_owned(),
            Param::Message(i, "") => format!("messages[{i}]"),
            Param::Message(i, f) => format!("messages[{i}].{f}"),
            Param::Part(i, j, "") => format!("messages[{i}].content[{j}]"),
            Param::Part(i, j, f) => format!("messages[{i}].content[{j}].{f}"),
        }
    }
}

/// Where the typed parse is, so that a failure can name the client's field.
#[derive(Debug, Default)]
struct Ctx {
    /// The field being read.
    param: Option<Param>,
    /// What that field must be, for a type error's message.
    expect: &'static str,
    /// A refusal decided while reading (unsupported feature, unknown role).
    refusal: Option<String>,
}

impl Ctx {
    fn at(&mut self, param: Param, expect: &'static str) {
        self.param = Some(param);
        self.expect = expect;
    }

    /// Stops the parse with `message` about `param`.
    fn refuse<E: de::Error>(&mut self, param: Param, message: String) -> E {
        self.param = Some(param);
        let e = E::custom(&message);
        self.refusal = Some(message);
        e
    }

    /// The answer to a failed parse.
    fn error(&self, e: &serde_json::Error) -> ApiError {
        if let Some(message) = &self.refusal {
            return ApiError::invalid(self.param.map(Param::render).as_deref(), message.clone());
        }
        // A type error belongs to the field being read; broken JSON to nobody.
        match (e.classify(), self.param) {
            (serde_json::error::Category::Data, Some(p)) => {
                let p = p.render();
                let message = format!("`{p}` must be {}", self.expect);
                ApiError::invalid(Some(&p), message)
            }
            (serde_json::error::Category::Data, None) => {
                ApiError::invalid(None, format!("the body must be a JSON object: {e}"))
            }
            _ => ApiError::invalid(None, format!("the body is not valid JSON: {e}")),
        }
    }
}

/// The body's fields as typed, before the ranges are judged.
#[derive(Default)]
struct RawChat<'de> {
    messages: Option<Vec<Message>>,
    model: Option<String>,
    stream: Option<bool>,
    include_usage: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i128>,
    max_tokens: Option<i128>,
    max_completion_tokens: Option<i128>,
    seed: Option<u64>,
    stop: Vec<String>,
    grammar: Option<&'de str>,
}

/// Reads the top-level object.
struct Body<'c> {
    ctx: &'c mut Ctx,
}

impl<'de> DeserializeSeed<'de> for Body<'_> {
    type Value = RawChat<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

fn int(i: Option<Int>) -> Option<i128> {
    i.map(|Int(n)| n)
}

impl<'de> Visitor<'de> for Body<'_> {
    type Value = RawChat<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a chat completion request object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawChat<'de>, A::Error> {
        let ctx = self.ctx;
        let mut r = RawChat::default();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "messages" => {
                    ctx.at(Param::Top("messages"), "an array of messages");
                    r.messages = Some(map.next_value_seed(Messages { ctx: &mut *ctx })?);
                }
                "model" => {
                    ctx.at(Param::Top("model"), "a string");
                    r.model = map.next_value()?;
                }
                "stream" => {
                    ctx.at(Param::Top("stream"), "a boolean");
                    r.stream = map.next_value()?;
                }
                "stream_options" => {
                    ctx.at(Param::Top("stream_options"), "an object");
                    r.include_usage = map.next_value_seed(StreamOptions { ctx: &mut *ctx })?;
                }
                "temperature" => {
                    ctx.at(Param::Top("temperature"), "a number");
                    r.temperature = map.next_value()?;
                }
                "top_p" => {
                    ctx.at(Param::Top("top_p"), "a number");
                    r.top_p = map.next_value()?;
                }
                "top_k" => {
                    ctx.at(Param::Top("top_k"), "an integer");
                    r.top_k = int(map.next_value()?);
                }
                "max_tokens" => {
                    ctx.at(Param::Top("max_tokens"), "an integer");
                    r.max_tokens = int(map.next_value()?);
                }
                "max_completion_tokens" => {
                    ctx.at(Param::Top("max_completion_tokens"), "an integer");
                    r.max_completion_tokens = int(map.next_value()?);
                }
                "seed" => {
                    ctx.at(Param::Top("seed"), "an integer");
                    r.seed = map.next_value::<Option<Seed>>()?.map(|Seed(s)| s);
                }
                "stop" => {
                    ctx.at(Param::Top("stop"), "a string or an array of up to 4 strings");
                    r.stop = map.next_value_seed(StopSeq)?;
                }
                "response_format" => {
                    ctx.at(Param::Top("response_format"), "an object with a string `type`");
                    r.grammar = map.next_value_seed(ResponseFormat { ctx: &mut *ctx })?;
                }
                "n" => {
                    ctx.at(Param::Top("n"), "1");
                    if !map.next_value::<Option<One>>()?.is_none_or(|One(one)| one) {
                        return Err(ctx.refuse(Param::Top("n"), "only `n` = 1 is supported".into()));
                    }
                }
                field @ ("tools" | "functions" | "logprobs" | "top_logprobs" | "audio") => {
                    let field = match field {
                        "tools" => "tools",
                        "functions" => "functions",
                        "logprobs" => "logprobs",
                        "top_logprobs" => "top_logprobs",
                        _ => "audio",
                    };
                    if map.next_value::<Asks>()?.0 {
                        let message = format!("`{field}` is not supported");
                        return Err(ctx.refuse(Param::Top(field), message));
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(r)
    }
}

/// A seed: OpenAI's are signed 64-bit; a negative one keeps its bits, so it still picks
/// one reproducible stream.
struct Seed(u64);

impl<'de> Deserialize<'de> for Seed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Seed;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seed, E> {
                Ok(Seed(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seed, E> {
                Ok(Seed(v as u64))
            }
        }
        d.deserialize_any(V)
    }
}

/// `n`: whether it is exactly the integer 1 (any other value is refused).
struct One(bool);

impl<'de> Deserialize<'de> for One {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = One;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("1")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<One, E> {
                Ok(One(v == 1))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<One, E> {
                Ok(One(false))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<One, E> {
                Ok(One(false))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<One, E> {
                Ok(One(false))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<One, E> {
                Ok(One(false))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<One, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(One(false))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<One, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(One(false))
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether an unsupported feature's field asks for something: absent, null, false and
/// empty arrays ask for nothing.
struct Asks(bool);

impl<'de> Deserialize<'de> for Asks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Asks;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Asks, E> {
                Ok(Asks(false))
            }
            fn visit_none<E: de::Error>(self) -> Result<Asks, E> {
                Ok(Asks(false))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Asks, E> {
                Ok(Asks(v))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Asks, E> {
                Ok(Asks(true))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Asks, E> {
                Ok(Asks(true))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Asks, E> {
                Ok(Asks(true))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Asks, E> {
                Ok(Asks(true))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Asks, A::Error> {
                let mut any = false;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    any = true;
                }
                Ok(Asks(any))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Asks, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Asks(true))
            }
        }
        d.deserialize_any(V)
    }
}

/// `stream_options`: null or an object; yields `include_usage`.
struct StreamOptions<'c> {
    ctx: &'c mut Ctx,
}

impl<'de> DeserializeSeed<'de> for StreamOptions<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StreamOptions<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut include = false;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key == "include_usage" {
                self.ctx.at(Param::Top("stream_options.include_usage"), "a boolean");
                include = map.next_value::<Option<bool>>()?.unwrap_or(false);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(include)
    }
}

/// `stop`: null, one string, or an array of strings (their count and sizes are
/// judged with the other ranges).
struct StopSeq;

impl<'de> DeserializeSeed<'de> for StopSeq {
    type Value = Vec<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StopSeq {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or an array of strings")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Vec<String>, E> {
        Ok(Vec::new())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<String>, E> {
        Ok(vec![v.to_owned()])
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut v = Vec::new();
        while let Some(s) = seq.next_element::<String>()? {
            // More than the cap is refused by the range check; stop collecting early.
            if v.len() <= MAX_STOP_SEQUENCES {
                v.push(s);
            }
        }
        Ok(v)
    }
}

/// `response_format`: the grammar it asks for, if any.
struct ResponseFormat<'c> {
    ctx: &'c mut Ctx,
}

impl<'de> DeserializeSeed<'de> for ResponseFormat<'_> {
    type Value = Option<&'static str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ResponseFormat<'_> {
    type Value = Option<&'static str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with a string `type`")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kind: Option<Key<'de>> = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if key == "type" {
                kind = map.next_value()?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        let top = Param::Top("response_format");
        match kind.as_ref().map(|Key(k)| k.as_ref()) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(JSON_OBJECT_GRAMMAR)),
            Some("json_schema") => Err(self.ctx.refuse(
                top,
                "`response_format` type `json_schema` is not supported; use `json_object`".into(),
            )),
            Some(other) => Err(self.ctx.refuse(
                Param::Top("response_format.type"),
                format!("unknown `response_format` type `{other}`"),
            )),
            None => Err(self
                .ctx
                .refuse(top, "`response_format` must be an object with a string `type`".into())),
        }
    }
}

/// `messages`: an array of message objects.
struct Messages<'c> {
    ctx: &'c mut Ctx,
}

impl<'de> DeserializeSeed<'de> for Messages<'_> {
    type Value = Vec<Message>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Message>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Messages<'_> {
    type Value = Vec<Message>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of messages")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Message>, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(64));
        loop {
            let i = v.len();
            self.ctx.at(Param::Message(i, ""), "an object");
            match seq.next_element_seed(MessageSeed { ctx: &mut *self.ctx, i })? {
                Some(m) => v.push(m),
                None => return Ok(v),
            }
        }
    }
}

/// One message: OpenAI's roles onto v1's, its content parts joined into one text.
struct MessageSeed<'c> {
    ctx: &'c mut Ctx,
    i: usize,
}

impl<'de> DeserializeSeed<'de> for MessageSeed<'_> {
    type Value = Message;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Message, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MessageSeed<'_> {
    type Value = Message;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
        let (ctx, i) = (self.ctx, self.i);
        let mut role = None;
        // Outer None: absent; inner None: null.
        let mut content: Option<Option<String>> = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "role" => {
                    let param = Param::Message(i, "role");
                    ctx.at(param, "a string");
                    let Key(r) = map.next_value::<Key<'de>>()?;
                    role = Some(match r.as_ref() {
                        "system" | "developer" => Role::System,
                        "user" => Role::User,
                        "assistant" => Role::Assistant,
                        r @ ("tool" | "function") => {
                            return Err(ctx.refuse(param, format!("role `{r}` is not supported")));
                        }
                        r => return Err(ctx.refuse(param, format!("unknown role `{r}`"))),
                    });
                }
                "content" => {
                    ctx.at(Param::Message(i, "content"), "a string or an array of text parts");
                    content = Some(map.next_value_seed(Content { ctx: &mut *ctx, i })?);
                }
                "tool_calls" => {
                    ctx.at(Param::Message(i, "tool_calls"), "an array");
                    if map.next_value::<Asks>()?.0 {
                        let param = Param::Message(i, "tool_calls");
                        return Err(ctx.refuse(param, "tool calls are not supported".into()));
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let Some(role) = role else {
            return Err(ctx.refuse(Param::Message(i, "role"), "`role` must be a string".into()));
        };
        let content = match content {
            Some(Some(text)) => text,
            // An assistant turn may carry no text.
            Some(None) if role == Role::Assistant => String::new(),
            _ => {
                return Err(ctx.refuse(
                    Param::Message(i, "content"),
                    "`content` must be a string or an array of text parts".into(),
                ));
            }
        };
        Ok(Message { role, content })
    }
}

/// A message's `content`: a string, null, or an array of text parts (joined by line
/// breaks: parts are separate paragraphs of one message).
struct Content<'c> {
    ctx: &'c mut Ctx,
    i: usize,
}

impl<'de> DeserializeSeed<'de> for Content<'_> {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Content<'_> {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or an array of text parts")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (ctx, i) = (self.ctx, self.i);
        let mut text = String::new();
        for j in 0.. {
            ctx.at(Param::Part(i, j, ""), "an object");
            let Some(part) = seq.next_element_seed(Part { ctx: &mut *ctx, i, j })? else {
                break;
            };
            if j > 0 {
                text.push('\n');
            }
            text.push_str(&part);
        }
        Ok(Some(text))
    }
}

/// One content part; only `{"type":"text","text":…}` is supported.
struct Part<'c> {
    ctx: &'c mut Ctx,
    i: usize,
    j: usize,
}

impl<'de> DeserializeSeed<'de> for Part<'_> {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Part<'_> {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a content part object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (ctx, i, j) = (self.ctx, self.i, self.j);
        let mut kind: Option<Key<'de>> = None;
        let mut text: Option<Key<'de>> = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "type" => {
                    ctx.at(Param::Part(i, j, "type"), "a string");
                    kind = map.next_value()?;
                }
                "text" => {
                    ctx.at(Param::Part(i, j, "text"), "a string");
                    text = map.next_value()?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match (kind.as_ref().map(|Key(k)| k.as_ref()), text) {
            (Some("text"), Some(Key(t))) => Ok(t),
            (Some("text"), None) => {
                Err(ctx.refuse(Param::Part(i, j, "text"), "a text part needs `text`".into()))
            }
            (Some(other), _) => Err(ctx.refuse(
                Param::Part(i, j, "type"),
                format!("content parts of type `{other}` are not supported"),
            )),
            (None, _) => {
                Err(ctx.refuse(Param::Part(i, j, "type"), "a content part needs `type`".into()))
            }
        }
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

/// The bytes every content event of one stream starts with (everything up to the
/// delta's text), built once per stream so each token costs only its own text.
pub fn content_chunk_prefix(meta: &CompletionMeta<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + meta.id.len() + meta.model.len());
    write_meta(&mut out, meta, "chat.completion.chunk");
    out.extend_from_slice(b",\"choices\":[{\"index\":0,\"delta\":{\"content\":");
    out
}

/// What follows a content event's text.
const CONTENT_CHUNK_SUFFIX: &[u8] = b"},\"logprobs\":null,\"finish_reason\":null}]}";

/// Appends a content delta. Empty text writes nothing (a held-back piece is not news).
pub fn write_content_chunk(out: &mut Vec<u8>, meta: &CompletionMeta<'_>, text: &str) {
    write_content_chunk_prefixed(out, &content_chunk_prefix(meta), text);
}

/// [`write_content_chunk`] with the stream's [`content_chunk_prefix`] at hand.
pub fn write_content_chunk_prefixed(out: &mut Vec<u8>, prefix: &[u8], text: &str) {
    if text.is_empty() {
        return;
    }
    response::write_sse_chunk(out, |o| {
        o.extend_from_slice(prefix);
        write_json_str(o, text);
        o.extend_from_slice(CONTENT_CHUNK_SUFFIX);
    });
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
