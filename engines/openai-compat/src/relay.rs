//! The completion stream as a state machine: decoded server-sent events in, token
//! bytes and the end of the completion out. No IO, so every upstream quirk can be
//! tested without a server.

use inferd_core::engine::{StopReason, Usage};
use inferd_core::redact::redact;
use inferd_core::sse::SseEvent;
use serde_json::Value;

use crate::Failure;

/// How a completion stream ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamEnd {
    /// The server's counts, or ours when it sent none.
    pub usage: Usage,
    /// `end` or `length`, from the server's `finish_reason`.
    pub stop_reason: StopReason,
}

/// Why a stream is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// Not the chat-completion chunk format.
    #[error("{0}")]
    Malformed(String),
    /// The body ended before the completion.
    #[error("the stream ended before the completion")]
    Truncated,
    /// The server sent an error event.
    #[error("{0}")]
    Upstream(String),
}

impl From<RelayError> for Failure {
    fn from(e: RelayError) -> Failure {
        match e {
            RelayError::Malformed(why) => Failure::Malformed(why),
            RelayError::Truncated => Failure::Truncated,
            RelayError::Upstream(why) => Failure::UpstreamError(why),
        }
    }
}

/// Follows one completion stream.
#[derive(Debug, Default)]
pub struct Relay {
    /// Content deltas seen: the completion's token count when the server sends none.
    pieces: u32,
    finish: Option<StopReason>,
    usage: Option<Usage>,
}

fn stop_reason(finish_reason: &str) -> StopReason {
    match finish_reason {
        "length" => StopReason::Length,
        // `stop`, `tool_calls`, `content_filter`, and anything newer: the model is done.
        _ => StopReason::End,
    }
}

/// The most characters of an upstream's own error text passed on.
const QUOTE: usize = 200;

fn quote(text: &str) -> String {
    let cut = &text[..text.floor_char_boundary(QUOTE)];
    redact(&cut.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>())
        .into_owned()
}

impl Relay {
    /// A stream not yet started.
    pub fn new() -> Self {
        Relay::default()
    }

    /// The token counts so far: the server's when it sent them, else the number of
    /// content deltas (one per token on the servers we know) and no prompt count.
    pub fn usage(&self) -> Usage {
        self.usage.unwrap_or(Usage { prompt_tokens: 0, completion_tokens: self.pieces })
    }

    /// Takes one event: content goes to `on_token`; `Some` when the stream is complete.
    pub fn on_event(
        &mut self,
        event: SseEvent,
        on_token: &mut dyn FnMut(&[u8]),
    ) -> Result<Option<StreamEnd>, RelayError> {
        let (event, data) = match event {
            SseEvent::Done => return Ok(Some(self.end())),
            SseEvent::Message { event, data } => (event, data),
        };
        if event.as_deref() == Some("error") {
            return Err(RelayError::Upstream(quote(&data)));
        }
        let chunk: Value = serde_json::from_str(&data)
            .map_err(|_| RelayError::Malformed(format!("a chunk is not JSON: {}", quote(&data))))?;
        let Some(obj) = chunk.as_object() else {
            return Err(RelayError::Malformed("a chunk is not a JSON object".into()));
        };
        if let Some(err) = obj.get("error") {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| quote(&err.to_string()), quote);
            return Err(RelayError::Upstream(msg));
        }
        if let Some(u) = obj.get("usage").filter(|u| !u.is_null()) {
            let count = |k: &str| {
                u.get(k).and_then(Value::as_u64).map(|n| u32::try_from(n).unwrap_or(u32::MAX))
            };
            match (count("prompt_tokens"), count("completion_tokens")) {
                (Some(prompt_tokens), Some(completion_tokens)) => {
                    self.usage = Some(Usage { prompt_tokens, completion_tokens })
                }
                _ => return Err(RelayError::Malformed("usage without token counts".into())),
            }
        }
        let choices = match obj.get("choices") {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(c)) => c.as_slice(),
            Some(_) => return Err(RelayError::Malformed("`choices` is not an array".into())),
        };
        if choices.is_empty() && !obj.contains_key("usage") {
            return Err(RelayError::Malformed("a chunk with neither choices nor usage".into()));
        }
        // One completion was asked for (no `n`): only the first choice is ours.
        if let Some(choice) = choices.first() {
            match choice.pointer("/delta/content") {
                Some(Value::String(s)) if !s.is_empty() => {
                    self.pieces = self.pieces.saturating_add(1);
                    on_token(s.as_bytes());
                }
                None | Some(Value::Null) | Some(Value::String(_)) => {}
                Some(_) => {
                    return Err(RelayError::Malformed("`delta.content` is not a string".into()));
                }
            }
            match choice.get("finish_reason") {
                Some(Value::String(r)) => self.finish = Some(stop_reason(r)),
                None | Some(Value::Null) => {}
                Some(_) => {
                    return Err(RelayError::Malformed("`finish_reason` is not a string".into()));
                }
            }
        }
        Ok(None)
    }

    /// The body ended: complete when the server said how the completion finished and no
    /// event was cut, truncated otherwise. (`[DONE]` ends it earlier, in `on_event`.)
    pub fn end_of_body(&self, mid_event: bool) -> Result<StreamEnd, RelayError> {
        if mid_event || self.finish.is_none() {
            return Err(RelayError::Truncated);
        }
        Ok(self.end())
    }

    fn end(&self) -> StreamEnd {
        StreamEnd { usage: self.usage(), stop_reason: self.finish.unwrap_or(StopReason::End) }
    }
}
