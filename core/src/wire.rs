//! Protocol v1 on the wire: the request, its validation, and the response frames.
//!
//! Decoding sorts bad input into the spec's two classes (§2): a line that is not a
//! well-typed request object ([`DecodeError::Undecodable`], the connection closes) and
//! a well-typed request with a value out of range ([`DecodeError::Invalid`], the
//! connection stays open). Encoding writes compact JSON straight into a caller's buffer.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Largest grammar accepted, in bytes (spec §2).
pub const MAX_GRAMMAR_BYTES: usize = 65_536;
/// Largest number of `|` alternatives accepted in a grammar (spec §2).
pub const MAX_GRAMMAR_ALTERNATIVES: usize = 4_096;
/// The image token budgets a request may name (spec §2).
pub const IMAGE_TOKEN_BUDGETS: [u32; 5] = [70, 140, 280, 560, 1120];

/// Who wrote a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person asking.
    User,
    /// The model's earlier turns.
    Assistant,
}

impl Role {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat message of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    pub content: String,
}

/// A validated request with every default filled in: what an engine is given.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GenerateRequest {
    /// The conversation, non-empty.
    pub messages: Vec<Message>,
    /// Sampling temperature, finite and ≥ 0; 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: f32,
    /// Top-k cut-off; 0 disables it.
    pub top_k: u32,
    /// Most tokens to generate; 0 ends at once with `length`. Engines clamp to their context.
    pub max_tokens: u32,
    /// Image token budget, if the client named one; text backends ignore it.
    pub image_token_budget: Option<u32>,
    /// A GBNF grammar constraining the output; empty means none.
    pub grammar: String,
    /// Sampling seed [ours, additive]; engines pick one when absent.
    pub seed: Option<u64>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            messages: Vec::new(),
            temperature: 1.0,
            top_p: 0.95,
            top_k: 64,
            max_tokens: 1000,
            image_token_budget: None,
            grammar: String::new(),
            seed: None,
        }
    }
}

/// A decoded and validated request line.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Opaque id echoed on every response frame.
    pub id: String,
    /// `false` sends only the terminal frame.
    pub stream: bool,
    /// What the engine needs.
    pub params: GenerateRequest,
    /// Stop sequences [ours, additive]: the text ends before the first match, which is
    /// not returned, and `done.stop_reason` is `end`. Validated by
    /// [`StopMatcher::new`](crate::stop::StopMatcher::new); empty when absent.
    pub stop: Vec<String>,
}

/// Why a request line was refused. Both classes answer `invalid_request`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a well-typed request object: answer, then close the connection.
    #[error("{message}")]
    Undecodable {
        /// The request's `id` when it could be salvaged, else empty.
        id: String,
        /// What was wrong, for the client.
        message: String,
    },
    /// Well-typed but out of range: answer and keep the connection open.
    #[error("{message}")]
    Invalid {
        /// The request's `id`.
        id: String,
        /// What was wrong, for the client.
        message: String,
    },
}

impl DecodeError {
    /// The id to echo on the error frame.
    pub fn id(&self) -> &str {
        match self {
            DecodeError::Undecodable { id, .. } | DecodeError::Invalid { id, .. } => id,
        }
    }

    /// The message to put on the error frame.
    pub fn message(&self) -> &str {
        match self {
            DecodeError::Undecodable { message, .. } | DecodeError::Invalid { message, .. } => {
                message
            }
        }
    }

    /// Whether the connection must be closed after the error frame.
    pub fn closes_connection(&self) -> bool {
        matches!(self, DecodeError::Undecodable { .. })
    }
}

/// Decodes and validates one request line (without its LF).
pub fn decode_request(line: &[u8]) -> Result<Request, DecodeError> {
    // The whole line is checked up front: parsing bytes checks only the strings it
    // keeps, so invalid UTF-8 in an ignored value or a key used to pass (spec §2: the
    // line is undecodable). Parsing the checked text then skips the per-string checks.
    let Ok(text) = std::str::from_utf8(line) else {
        return Err(DecodeError::Undecodable {
            id: salvage_id(line),
            message: "request line is not valid UTF-8".into(),
        });
    };
    let raw: RawRequest = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            return Err(DecodeError::Undecodable { id: salvage_id(line), message: e.to_string() });
        }
    };
    raw.validate()
}

/// The `id` of a line that failed to decode, when it is a JSON object with a string `id`.
pub fn salvage_id(line: &[u8]) -> String {
    // Only an object has an `id` (serde would read a struct from an array too).
    match serde_json::from_slice::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(mut m)) => match m.remove("id") {
            Some(serde_json::Value::String(s)) => s,
            _ => String::new(),
        },
        _ => String::new(),
    }
}

/// An integer field that tolerates any JSON integer, so range errors can be told apart
/// from type errors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Int(pub(crate) i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Int, E> {
                // Integers beyond 64 bits arrive as floats; whole values still count.
                if v.is_finite() && v.fract() == 0.0 {
                    Ok(Int(v as i128))
                } else {
                    Err(E::invalid_type(de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The request as typed on the wire, before range checks and defaults.
#[derive(Default)]
struct RawRequest {
    id: Option<String>,
    messages: Option<Vec<Message>>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<Int>,
    max_tokens: Option<Int>,
    stream: Option<bool>,
    image_token_budget: Option<Int>,
    grammar: Option<String>,
    seed: Option<u64>,
    stop: Option<StopField>,
}

/// The `stop` field as sent: one string or a list of them (`null` is no stop).
#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Tracks which keys an object has shown, to reject duplicates (spec §2).
struct SeenKeys {
    known: u32,
    unknown: Vec<String>,
}

impl SeenKeys {
    fn new() -> Self {
        SeenKeys { known: 0, unknown: Vec::new() }
    }

    fn known<E: de::Error>(&mut self, bit: u32, name: &str) -> Result<(), E> {
        if self.known & (1 << bit) != 0 {
            return Err(E::custom(format_args!("duplicate key `{name}`")));
        }
        self.known |= 1 << bit;
        Ok(())
    }

    fn unknown<E: de::Error>(&mut self, name: &str) -> Result<(), E> {
        if self.unknown.iter().any(|k| k == name) {
            return Err(E::custom(format_args!("duplicate key `{name}`")));
        }
        self.unknown.push(name.to_owned());
        Ok(())
    }
}

/// A map key borrowed from the input when it has no escapes.
pub(crate) struct Key<'a>(pub(crate) std::borrow::Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(v.into()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(v.to_owned().into()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(v.into()))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for RawRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawRequest;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a request object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawRequest, A::Error> {
                let mut r = RawRequest::default();
                let mut seen = SeenKeys::new();
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    match key.as_ref() {
                        "id" => {
                            seen.known(0, "id")?;
                            r.id = map.next_value()?;
                        }
                        "messages" => {
                            seen.known(1, "messages")?;
                            r.messages = Some(map.next_value::<Messages>()?.0);
                        }
                        "temperature" => {
                            seen.known(2, "temperature")?;
                            r.temperature = map.next_value()?;
                        }
                        "top_p" => {
                            seen.known(3, "top_p")?;
                            r.top_p = map.next_value()?;
                        }
                        "top_k" => {
                            seen.known(4, "top_k")?;
                            r.top_k = map.next_value()?;
                        }
                        "max_tokens" => {
                            seen.known(5, "max_tokens")?;
                            r.max_tokens = map.next_value()?;
                        }
                        "stream" => {
                            seen.known(6, "stream")?;
                            r.stream = map.next_value()?;
                        }
                        "image_token_budget" => {
                            seen.known(7, "image_token_budget")?;
                            r.image_token_budget = map.next_value()?;
                        }
                        "grammar" => {
                            seen.known(8, "grammar")?;
                            r.grammar = map.next_value()?;
                        }
                        "seed" => {
                            seen.known(9, "seed")?;
                            r.seed = map.next_value()?;
                        }
                        "stop" => {
                            seen.known(10, "stop")?;
                            r.stop = map.next_value::<Option<StopField>>().map_err(|_| {
                                de::Error::custom("`stop` must be a string or an array of strings")
                            })?;
                        }
                        other => {
                            seen.unknown(other)?;
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(r)
            }
        }
        d.deserialize_map(V)
    }
}

/// The `messages` array, each element checked for duplicate keys.
struct Messages(Vec<Message>);

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(64));
                while let Some(m) = seq.next_element::<Message>()? {
                    v.push(m);
                }
                Ok(Messages(v))
            }
        }
        d.deserialize_seq(V)
    }
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object with `role` and `content`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
                let mut role = None;
                let mut content = None;
                let mut seen = SeenKeys::new();
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    match key.as_ref() {
                        "role" => {
                            seen.known(0, "role")?;
                            role = Some(map.next_value::<Role>()?);
                        }
                        "content" => {
                            seen.known(1, "content")?;
                            content = Some(map.next_value::<String>()?);
                        }
                        other => {
                            seen.unknown(other)?;
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                let role = role.ok_or_else(|| de::Error::missing_field("role"))?;
                let content = content.ok_or_else(|| de::Error::missing_field("content"))?;
                Ok(Message { role, content })
            }
        }
        d.deserialize_map(V)
    }
}

impl RawRequest {
    fn validate(self) -> Result<Request, DecodeError> {
        let id = self.id.unwrap_or_default();
        let Some(messages) = self.messages else {
            return Err(DecodeError::Undecodable {
                id,
                message: "missing field `messages`".into(),
            });
        };
        let int = |i: Option<Int>| i.map(|Int(n)| n);
        let fields = SamplingFields {
            messages,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: int(self.top_k),
            max_tokens: int(self.max_tokens),
            image_token_budget: int(self.image_token_budget),
            grammar: self.grammar,
            seed: self.seed,
            stop: match self.stop {
                None => Vec::new(),
                Some(StopField::One(s)) => vec![s],
                Some(StopField::Many(v)) => v,
            },
        };
        match fields.validate() {
            Ok((params, stop)) => {
                Ok(Request { id, stop, stream: self.stream.unwrap_or(true), params })
            }
            Err(e) => Err(DecodeError::Invalid { id, message: e.message }),
        }
    }
}

/// The generation fields of a request as sent, well-typed but not yet range-checked:
/// what protocol v1 and the HTTP API both decode into, so [`SamplingFields::validate`]
/// is the one place their rules live.
#[derive(Clone, Debug, Default)]
pub struct SamplingFields {
    /// The conversation; must not be empty.
    pub messages: Vec<Message>,
    /// Sampling temperature as sent.
    pub temperature: Option<f64>,
    /// Nucleus mass as sent.
    pub top_p: Option<f64>,
    /// Top-k as sent (any JSON integer, so a negative one is a range error).
    pub top_k: Option<i128>,
    /// Most tokens as sent.
    pub max_tokens: Option<i128>,
    /// Image token budget as sent.
    pub image_token_budget: Option<i128>,
    /// GBNF grammar as sent.
    pub grammar: Option<String>,
    /// Sampling seed.
    pub seed: Option<u64>,
    /// Stop sequences; empty for none.
    pub stop: Vec<String>,
}

/// A well-typed field out of its range: which field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RangeError {
    /// The field at fault, by its protocol v1 name.
    pub field: &'static str,
    /// What was wrong, for the client (names the field in backticks).
    pub message: String,
}

impl SamplingFields {
    /// Checks every range (spec §2) and fills in the defaults: the engine's request and
    /// the stop sequences, or the first field out of range.
    pub fn validate(self) -> Result<(GenerateRequest, Vec<String>), RangeError> {
        let err = |field: &'static str, message: String| Err(RangeError { field, message });
        if self.messages.is_empty() {
            return err("messages", "`messages` must not be empty".into());
        }
        let defaults = GenerateRequest::default();
        // Ranges are checked on the numbers as sent and again on the f32 values engines
        // get, so nothing slips through the narrowing (1e300 → inf, 1e-300 → 0).
        let temperature_wide = self.temperature.unwrap_or(defaults.temperature.into());
        let temperature = temperature_wide as f32;
        if !temperature.is_finite() || temperature_wide < 0.0 {
            return err(
                "temperature",
                format!("`temperature` must be finite and >= 0, got {temperature_wide}"),
            );
        }
        let top_p_wide = self.top_p.unwrap_or(defaults.top_p.into());
        let top_p = top_p_wide as f32;
        if !(top_p_wide > 0.0 && top_p_wide <= 1.0 && top_p > 0.0) {
            return err("top_p", format!("`top_p` must be in (0, 1], got {top_p_wide}"));
        }
        let top_k = match self.top_k {
            None => defaults.top_k,
            Some(k) if k < 0 => return err("top_k", format!("`top_k` must be >= 0, got {k}")),
            Some(k) => u32::try_from(k).unwrap_or(u32::MAX),
        };
        let max_tokens = match self.max_tokens {
            None => defaults.max_tokens,
            Some(n) if n < 0 => {
                return err("max_tokens", format!("`max_tokens` must be >= 0, got {n}"));
            }
            // Above the backend's context it is clamped anyway; u32 is plenty.
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
        };
        let image_token_budget = match self.image_token_budget {
            None => None,
            Some(b) => match u32::try_from(b) {
                Ok(b) if IMAGE_TOKEN_BUDGETS.contains(&b) => Some(b),
                _ => {
                    return err(
                        "image_token_budget",
                        format!(
                            "`image_token_budget` must be one of 70, 140, 280, 560, 1120, got {b}"
                        ),
                    );
                }
            },
        };
        let grammar = self.grammar.unwrap_or_default();
        if grammar.len() > MAX_GRAMMAR_BYTES {
            return err(
                "grammar",
                format!("`grammar` is {} bytes, more than {MAX_GRAMMAR_BYTES}", grammar.len()),
            );
        }
        let alternatives = grammar.bytes().filter(|&b| b == b'|').count();
        if alternatives > MAX_GRAMMAR_ALTERNATIVES {
            return err(
                "grammar",
                format!("`grammar` has {alternatives} `|`, more than {MAX_GRAMMAR_ALTERNATIVES}"),
            );
        }
        if let Err(e) = crate::stop::StopMatcher::new(&self.stop) {
            return err("stop", format!("`stop`: {e}"));
        }
        let params = GenerateRequest {
            messages: self.messages,
            temperature,
            top_p,
            top_k,
            max_tokens,
            image_token_budget,
            grammar,
            seed: self.seed,
        };
        Ok((params, self.stop))
    }
}

/// The closed set of error codes (spec §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Admission has no room.
    QueueFull,
    /// No usable backend, a backend failure, or the daemon is draining.
    BackendUnavailable,
    /// The request was refused (spec §2).
    InvalidRequest,
    /// The request line was over the cap.
    FrameTooLarge,
    /// A backend's internal error before the stream.
    Internal,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::BackendUnavailable => "backend_unavailable",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Why a generation ended (spec §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced its end-of-generation token.
    End,
    /// `max_tokens` or the context was reached.
    Length,
    /// The client went away or the drain deadline passed.
    Cancelled,
    /// The backend failed.
    Error,
}

impl StopReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::End => "end",
            StopReason::Length => "length",
            StopReason::Cancelled => "cancelled",
            StopReason::Error => "error",
        }
    }
}

/// Token counts of a finished generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the templated prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// Where the time of a request went [ours, additive on `done`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// From admission to the start of generation.
    pub queued_ms: u64,
    /// From admission to the first token (to the end when there was none).
    pub ttft_ms: u64,
    /// From admission to the terminal frame.
    pub total_ms: u64,
}

/// Appends `s` as a JSON string literal (with quotes) to `out`.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends `n` in decimal.
pub fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends a `token` frame with its LF.
pub fn encode_token(out: &mut Vec<u8>, id: &str, content: &str) {
    out.extend_from_slice(b"{\"type\":\"token\",\"id\":");
    write_json_str(out, id);
    out.extend_from_slice(b",\"content\":");
    write_json_str(out, content);
    out.extend_from_slice(b"}\n");
}

/// The fields of a `done` frame.
#[derive(Clone, Copy, Debug)]
pub struct DoneFrame<'a> {
    /// The request's id.
    pub id: &'a str,
    /// The whole generated text.
    pub content: &'a str,
    /// Token counts.
    pub usage: Usage,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// The backend that served it.
    pub backend: &'a str,
    /// Where the time went.
    pub timings: Option<Timings>,
}

/// Appends a `done` frame with its LF.
pub fn encode_done(out: &mut Vec<u8>, f: &DoneFrame<'_>) {
    out.extend_from_slice(b"{\"type\":\"done\",\"id\":");
    write_json_str(out, f.id);
    out.extend_from_slice(b",\"content\":");
    write_json_str(out, f.content);
    out.extend_from_slice(b",\"usage\":{\"prompt_tokens\":");
    write_u64(out, f.usage.prompt_tokens.into());
    out.extend_from_slice(b",\"completion_tokens\":");
    write_u64(out, f.usage.completion_tokens.into());
    out.extend_from_slice(b"},\"stop_reason\":\"");
    out.extend_from_slice(f.stop_reason.as_str().as_bytes());
    out.extend_from_slice(b"\",\"backend\":");
    write_json_str(out, f.backend);
    if let Some(t) = f.timings {
        out.extend_from_slice(b",\"timings\":{\"queued_ms\":");
        write_u64(out, t.queued_ms);
        out.extend_from_slice(b",\"ttft_ms\":");
        write_u64(out, t.ttft_ms);
        out.extend_from_slice(b",\"total_ms\":");
        write_u64(out, t.total_ms);
        out.push(b'}');
    }
    out.extend_from_slice(b"}\n");
}

/// Appends an `error` frame with its LF.
pub fn encode_error(out: &mut Vec<u8>, id: &str, code: ErrorCode, message: &str) {
    out.extend_from_slice(b"{\"type\":\"error\",\"id\":");
    write_json_str(out, id);
    out.extend_from_slice(b",\"code\":\"");
    out.extend_from_slice(code.as_str().as_bytes());
    out.extend_from_slice(b"\",\"message\":");
    write_json_str(out, message);
    out.extend_from_slice(b"}\n");
}

/// A response frame as a client reads it. Unknown types decode as [`Frame::Unknown`].
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// A piece of generated text.
    Token {
        /// The request's id.
        id: String,
        /// The piece.
        content: String,
    },
    /// The generation finished.
    Done {
        /// The request's id.
        id: String,
        /// The whole text.
        content: String,
        /// Token counts.
        usage: Usage,
        /// Why it ended.
        stop_reason: StopReason,
        /// Which backend served it.
        backend: String,
        /// Where the time went, when the daemon reports it.
        #[serde(default)]
        timings: Option<Timings>,
    },
    /// The request failed.
    Error {
        /// The request's id.
        id: String,
        /// Which failure.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// A frame type this client does not know; clients ignore it.
    #[serde(other)]
    Unknown,
}

impl Frame {
    /// Parses one response line.
    pub fn parse(line: &[u8]) -> Result<Frame, serde_json::Error> {
        serde_json::from_slice(line)
    }

    /// Whether this frame ends its request.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Frame::Done { .. } | Frame::Error { .. })
    }
}

/// The TCP authentication line (spec §6), first on a TCP connection when a key is set.
#[derive(Debug, Deserialize)]
pub struct AuthLine {
    /// Must be `auth`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The presented key.
    pub key: String,
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // Keep the compiler from short-circuiting the loop.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_use_the_short_escapes() {
        let mut out = Vec::new();
        write_json_str(&mut out, "\"\\\n\r\t\u{8}\u{c}\u{1}\u{1f}é");
        assert_eq!(String::from_utf8(out).unwrap(), r#""\"\\\n\r\t\b\f\u0001\u001fé""#);
    }

    #[test]
    fn roles_and_terminal_frames() {
        let names = [Role::System, Role::User, Role::Assistant].map(Role::as_str);
        assert_eq!(names, ["system", "user", "assistant"]);
        let token = Frame::Token { id: "a".into(), content: "x".into() };
        let error = Frame::Error { id: "a".into(), code: ErrorCode::Internal, message: "m".into() };
        assert!(!token.is_terminal() && error.is_terminal());
    }

    #[test]
    fn grammar_alternatives_up_to_the_limit() {
        let line = |n: usize| {
            let g = "a|".repeat(n);
            format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"grammar":"{g}"}}"#)
        };
        assert!(decode_request(line(MAX_GRAMMAR_ALTERNATIVES).as_bytes()).is_ok());
        assert!(matches!(
            decode_request(line(MAX_GRAMMAR_ALTERNATIVES + 1).as_bytes()),
            Err(DecodeError::Invalid { .. })
        ));
    }

    #[test]
    fn stop_is_an_optional_string_or_list() {
        let with = |stop: &str| {
            format!(r#"{{"id":"s","messages":[{{"role":"user","content":"x"}}],"stop":{stop}}}"#)
        };
        assert!(ok(r#"{"messages":[{"role":"user","content":"x"}]}"#).stop.is_empty());
        assert!(ok(&with("null")).stop.is_empty());
        assert_eq!(ok(&with(r#""END""#)).stop, ["END"]);
        assert_eq!(ok(&with(r#"["a","b"]"#)).stop, ["a", "b"]);
        // Wrong types are undecodable; bad values are invalid and keep the connection.
        for bad in ["3", r#"{"a":1}"#, r#"["a",1]"#] {
            assert!(matches!(err(&with(bad)), DecodeError::Undecodable { .. }), "{bad}");
        }
        for bad in [r#"["a","b","c","d","e"]"#, r#"[""]"#] {
            match err(&with(bad)) {
                DecodeError::Invalid { id, message } => {
                    assert_eq!(id, "s");
                    assert!(message.contains("stop"), "{message}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(err(&with(r#""a","stop":"b""#)), DecodeError::Undecodable { .. }));
    }

    fn ok(line: &str) -> Request {
        decode_request(line.as_bytes()).unwrap()
    }
    fn err(line: &str) -> DecodeError {
        decode_request(line.as_bytes()).unwrap_err()
    }

    #[test]
    fn defaults_fill_in() {
        let r = ok(r#"{"messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(r.id, "");
        assert!(r.stream);
        assert_eq!(r.params.temperature, 1.0);
        assert_eq!(r.params.top_p, 0.95);
        assert_eq!(r.params.top_k, 64);
        assert_eq!(r.params.max_tokens, 1000);
        assert_eq!(r.params.image_token_budget, None);
        assert_eq!(r.params.grammar, "");
    }

    #[test]
    fn full_request_and_unknown_fields() {
        let r = ok(
            r#"{"id":"r1","messages":[{"role":"system","content":"s","x":1},{"role":"user","content":"hi"}],
            "temperature":0,"top_p":1,"top_k":0,"max_tokens":5,"stream":false,"image_token_budget":280,
            "grammar":"root ::= \"a\"","future":{"a":[1,2]},"seed":7}"#,
        );
        assert_eq!(r.id, "r1");
        assert!(!r.stream);
        assert_eq!(r.params.messages.len(), 2);
        assert_eq!(r.params.messages[0].role, Role::System);
        assert_eq!(r.params.temperature, 0.0);
        assert_eq!(r.params.top_k, 0);
        assert_eq!(r.params.max_tokens, 5);
        assert_eq!(r.params.image_token_budget, Some(280));
        assert_eq!(r.params.seed, Some(7));
    }

    #[test]
    fn undecodable_lines_close_and_salvage_id() {
        for (line, id) in [
            ("not json", ""),
            ("[1,2]", ""),
            ("\"str\"", ""),
            (r#"{"id":"a"}"#, "a"),
            (r#"{"id":"b","messages":"hi"}"#, "b"),
            (r#"{"id":"c","messages":[{"role":"robot","content":"x"}]}"#, "c"),
            (r#"{"id":"d","messages":[{"role":"user","content":5}]}"#, "d"),
            (r#"{"id":"e","messages":[{"role":"user"}]}"#, "e"),
            (r#"{"id":"f","messages":[],"temperature":"hot"}"#, "f"),
            (r#"{"id":"g","messages":[],"top_k":1.5}"#, "g"),
            (r#"{"id":7,"messages":[]}"#, ""),
            (r#"{"id":"h","messages":[],"stream":"yes"}"#, "h"),
            (r#"["user"]"#, ""),
        ] {
            let e = err(line);
            assert!(e.closes_connection(), "{line}: {e:?}");
            assert_eq!(e.id(), id, "{line}");
        }
        let e = decode_request(
            b"{\"id\":\"x\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}",
        )
        .unwrap_err();
        assert!(e.closes_connection());
    }

    /// Invalid UTF-8 anywhere makes the line undecodable, also where nothing reads it:
    /// an unknown field's value, a key, a nested ignored value, the id itself.
    #[test]
    fn invalid_utf8_anywhere_is_undecodable() {
        let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
        let cases: Vec<Vec<u8>> = vec![
            format!("{{\"id\":\"u\",{msgs},\"x\":\"y\"}}").into_bytes(),
            [b"{\"id\":\"u\",".as_slice(), msgs.as_bytes(), b",\"x\":\"\xff\"}"].concat(),
            [b"{\"id\":\"u\",".as_slice(), msgs.as_bytes(), b",\"\xc3\":1}"].concat(),
            [b"{\"id\":\"u\",".as_slice(), msgs.as_bytes(), b",\"f\":{\"a\":[\"\xed\xa0\x80\"]}}"]
                .concat(),
            [b"{\"id\":\"u\xe2\x82\",".as_slice(), msgs.as_bytes(), b"}"].concat(),
            [b"{\"id\":\"u\",".as_slice(), msgs.as_bytes(), b"}\xf0\x9f"].concat(),
        ];
        // The first case is the control: the same shape in valid UTF-8 is served.
        assert!(decode_request(&cases[0]).is_ok());
        for line in &cases[1..] {
            let e = decode_request(line).unwrap_err();
            assert!(e.closes_connection(), "{}: {e:?}", String::from_utf8_lossy(line));
            assert_eq!(e.id(), "", "not JSON, so no id: {}", String::from_utf8_lossy(line));
        }
        // Valid multi-byte text anywhere is fine.
        let ok_line = format!("{{\"id\":\"é\",{msgs},\"ü🦀\":\"🦀\"}}");
        assert_eq!(ok(&ok_line).id, "é");
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        for line in [
            r#"{"id":"a","id":"b","messages":[{"role":"user","content":"x"}]}"#,
            r#"{"id":"a","messages":[{"role":"user","content":"x"}],"messages":[]}"#,
            r#"{"id":"a","x":1,"x":2,"messages":[{"role":"user","content":"x"}]}"#,
            r#"{"id":"a","messages":[{"role":"user","role":"user","content":"x"}]}"#,
            r#"{"id":"a","temperature":null,"temperature":1,"messages":[{"role":"user","content":"x"}]}"#,
        ] {
            let e = err(line);
            assert!(e.closes_connection(), "{line}");
            assert!(e.message().contains("duplicate"), "{line}: {e}");
        }
    }

    #[test]
    fn out_of_range_values_keep_connection() {
        for line in [
            r#"{"id":"a","messages":[]}"#,
            r#"{"id":"a","messages":[{"role":"user","content":"x"}],"temperature":-0.1}"#,
            r#"{"id":"a","messages":[{"role":"user","content":"x"}],"top_p":0}"#,
            r#"{"id":"a","messages":[{"role":"user","content":"x"}],"top_p":1.01}"#,
            r#"{"id":"a","messages":[{"role":"user","content":"x"}],"top_k":-1}"#,
            r#"{"id":"a","messages":[{"role":"user","content":"x"}],"max_tokens":-5}"#,
            r#"{"id":"a","messages":[{"role":"user","content":"x"}],"image_token_budget":100}"#,
            r#"{"id":"a","messages":[{"role":"user","content":"x"}],"temperature":1e300}"#,
            r#"{"id":"a","messages":[{"role":"user","content":"x"}],"top_p":1e-300}"#,
        ] {
            let e = err(line);
            assert!(!e.closes_connection(), "{line}: {e:?}");
            assert_eq!(e.id(), "a");
        }
    }

    #[test]
    fn grammar_limits() {
        let big = "a".repeat(MAX_GRAMMAR_BYTES + 1);
        let line = format!(
            r#"{{"id":"g","messages":[{{"role":"user","content":"x"}}],"grammar":"{big}"}}"#
        );
        assert!(!err(&line).closes_connection());
        let exact = "a".repeat(MAX_GRAMMAR_BYTES);
        let line =
            format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"grammar":"{exact}"}}"#);
        assert_eq!(ok(&line).params.grammar.len(), MAX_GRAMMAR_BYTES);
        let pipes = "|".repeat(MAX_GRAMMAR_ALTERNATIVES + 1);
        let line =
            format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"grammar":"{pipes}"}}"#);
        assert!(!err(&line).closes_connection());
    }

    #[test]
    fn huge_integers_saturate() {
        let r = ok(
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":99999999999999999999,"top_k":5000000000}"#,
        );
        assert_eq!(r.params.max_tokens, u32::MAX);
        assert_eq!(r.params.top_k, u32::MAX);
    }

    #[test]
    fn frames_encode_and_parse_back() {
        let mut out = Vec::new();
        encode_token(&mut out, "i\"d", "a\nb\u{1}c é");
        encode_done(
            &mut out,
            &DoneFrame {
                id: "x",
                content: "hello",
                usage: Usage { prompt_tokens: 3, completion_tokens: 2 },
                stop_reason: StopReason::End,
                backend: "mock",
                timings: Some(Timings { queued_ms: 1, ttft_ms: 2, total_ms: 3 }),
            },
        );
        encode_error(&mut out, "", ErrorCode::QueueFull, "full");
        let lines: Vec<&[u8]> = out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            Frame::parse(lines[0]).unwrap(),
            Frame::Token { id: "i\"d".into(), content: "a\nb\u{1}c é".into() }
        );
        match Frame::parse(lines[1]).unwrap() {
            Frame::Done { content, usage, stop_reason, backend, timings, .. } => {
                assert_eq!(content, "hello");
                assert_eq!(usage.completion_tokens, 2);
                assert_eq!(stop_reason, StopReason::End);
                assert_eq!(backend, "mock");
                assert_eq!(timings.unwrap().total_ms, 3);
            }
            f => panic!("{f:?}"),
        }
        assert_eq!(
            Frame::parse(lines[2]).unwrap(),
            Frame::Error { id: "".into(), code: ErrorCode::QueueFull, message: "full".into() }
        );
        assert_eq!(Frame::parse(br#"{"type":"status","id":"admin"}"#).unwrap(), Frame::Unknown);
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
