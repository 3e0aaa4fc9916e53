//! The engine interface: what a backend implements, free of any async runtime.
//!
//! An engine is synchronous. The shell calls [`Engine::load`] once on a thread of its
//! own, then [`Engine::generate`] on threads it owns, one call per generation. The
//! engine blocks that thread while it works, pushes raw token bytes into the sink (the
//! core holds back split UTF-8), checks the [`CancelFlag`] between tokens, and returns
//! how the generation ended.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

pub use crate::wire::{GenerateRequest, Message, Role, StopReason, Usage};

/// A flag the shell raises to stop a generation; engines check it between tokens.
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    /// A lowered flag.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the generation to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether a stop was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A step of loading a model, published on the admin socket as a `loading_model` phase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum LoadPhase {
    /// Looking for the model file.
    CheckingLocal {
        /// Where.
        path: String,
    },
    /// Fetching the model.
    Download {
        /// Bytes so far.
        downloaded_bytes: u64,
        /// Total size; `null` on the wire when unknown.
        total_bytes: Option<u64>,
        /// Where from.
        source_url: String,
    },
    /// Checking the model's hash.
    Verify {
        /// Which file.
        path: String,
    },
    /// A file failed its check and was moved aside.
    Quarantine {
        /// The file.
        path: String,
        /// What it should hash to.
        expected_sha256: String,
        /// What it hashed to.
        actual_sha256: String,
        /// Where it went.
        quarantine_path: String,
    },
    /// Mapping the weights.
    Mmap {
        /// Which file.
        path: String,
    },
    /// Allocating the KV cache.
    KvCache {
        /// Context length.
        n_ctx: u32,
    },
}

/// What a loaded backend can do, published as a `capabilities` status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// The backend's name as the daemon knows it (filled in by the daemon).
    pub backend: String,
    /// Speaks the v2 protocol.
    pub v2: bool,
    /// Accepts images.
    pub vision: bool,
    /// Accepts audio.
    pub audio: bool,
    /// Supports tool calls.
    pub tools: bool,
    /// Has a thinking mode.
    pub thinking: bool,
    /// Computes embeddings.
    pub embed: bool,
    /// Where it computes: `cpu`, `cuda`, …
    pub accelerator: String,
    /// Layers offloaded to the accelerator.
    pub gpu_layers: u32,
    /// Generations the backend runs at once, when it says [ours, additive].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_parallel: Option<u32>,
    /// Context length of one generation, in tokens, when the backend has one [ours, additive].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_ctx: Option<u32>,
}

impl Capabilities {
    /// A text-only CPU backend.
    pub fn text_cpu() -> Self {
        Capabilities {
            backend: String::new(),
            v2: false,
            vision: false,
            audio: false,
            tools: false,
            thinking: false,
            embed: false,
            accelerator: "cpu".into(),
            gpu_layers: 0,
            n_parallel: None,
            n_ctx: None,
        }
    }
}

/// How a generation that did not fail ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Token counts.
    pub usage: Usage,
    /// `end`, `length` or `cancelled`.
    pub stop_reason: StopReason,
    /// Prompt tokens the engine did not compute again because it still held them from an
    /// earlier request (prompt-prefix reuse); 0 for engines without a cache. Reported in
    /// the activity log and the admin stats, never on the inference socket.
    pub prompt_cached_tokens: u32,
}

impl Completion {
    /// A completion that reused no cached prompt tokens.
    pub fn new(usage: Usage, stop_reason: StopReason) -> Self {
        Completion { usage, stop_reason, prompt_cached_tokens: 0 }
    }
}

/// Which kind of failure an engine reports; decides the error code before the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineErrorKind {
    /// The backend cannot serve now (not loaded, crashed, overloaded): `backend_unavailable`.
    Unavailable,
    /// The backend hit an internal error: `internal` before the stream.
    Internal,
    /// The request itself was at fault, in a way only the engine could judge (a grammar
    /// that does not parse, a prompt longer than the context): `invalid_request`, the
    /// connection stays open, and the circuit breaker does not count it (spec §2, §4).
    InvalidRequest,
}

/// A backend failure, with the reason for the operator and the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    /// Which kind.
    pub kind: EngineErrorKind,
    /// Why, in words.
    pub message: String,
    /// How long the backend asked not to be sent requests (an upstream's `Retry-After`
    /// on a 429 or 503): the circuit breaker, once open, stays open at least this long.
    pub retry_after: Option<Duration>,
    /// Names one failure of the backend that several requests share (a decode that failed
    /// every sequence of a batch): the circuit breaker counts an incident once, however
    /// many requests it failed.
    pub incident: Option<u64>,
}

impl EngineError {
    /// An `Unavailable` failure.
    pub fn unavailable(message: impl Into<String>) -> Self {
        EngineError {
            kind: EngineErrorKind::Unavailable,
            message: message.into(),
            retry_after: None,
            incident: None,
        }
    }

    /// An `Internal` failure.
    pub fn internal(message: impl Into<String>) -> Self {
        EngineError {
            kind: EngineErrorKind::Internal,
            message: message.into(),
            retry_after: None,
            incident: None,
        }
    }
    /// An `InvalidRequest` failure: the client's fault, not the backend's.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        EngineError {
            kind: EngineErrorKind::InvalidRequest,
            message: message.into(),
            retry_after: None,
            incident: None,
        }
    }

    /// The same failure, carrying the backend's `Retry-After` hint.
    pub fn with_retry_after(self, retry_after: Duration) -> Self {
        EngineError { retry_after: Some(retry_after), ..self }
    }

    /// The same failure, as part of the shared failure `incident`.
    pub fn in_incident(self, incident: u64) -> Self {
        EngineError { incident: Some(incident), ..self }
    }
}

/// What an engine reports about a generation, carried back to the core by the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    /// Raw bytes of one token; may end inside a UTF-8 character.
    Token(Vec<u8>),
    /// The generation finished.
    Done(Completion),
    /// The generation failed.
    Failed(EngineError),
}

/// A backend that generates text. Implementations block the calling thread.
pub trait Engine: Send + Sync + 'static {
    /// The kind of engine, for messages (`mock`, `llamacpp`).
    fn kind(&self) -> &str;

    /// Loads the model, reporting phases as it goes; returns what it can do once ready.
    /// An error here means the backend can never serve.
    fn load(&self, progress: &mut dyn FnMut(LoadPhase)) -> Result<Capabilities, EngineError>;

    /// Whether this generation finishes in microseconds without blocking (no sleep, no
    /// IO, no device), so that a shell may run it on its event-loop thread instead of
    /// handing it to an engine thread: the hand-off costs more than such a generation.
    /// Real engines keep the default, `false`; the mock says `true` when it has no delay
    /// and only a few tokens to produce.
    fn runs_inline(&self, request: &GenerateRequest) -> bool {
        let _ = request;
        false
    }
    /// How many generations this engine runs at once (its other `generate` calls wait
    /// inside it). The daemon's default `active_permits` follows it. Default 1.
    fn parallelism(&self) -> u32 {
        1
    }

    /// Runs one generation: pushes token bytes into `on_token` as they come, stops early
    /// when `cancel` is raised (then returns `stop_reason: cancelled`).
    fn generate(
        &self,
        request: &GenerateRequest,
        cancel: &CancelFlag,
        on_token: &mut dyn FnMut(&[u8]),
    ) -> Result<Completion, EngineError>;
}

/// How a JSON value's type reads in an error message about an engine's options ("expected
/// a string, got an integer"), so that every engine words it the same way.
pub fn json_type_name(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_u64() => "an integer",
        Value::Number(n) if n.is_i64() => "a negative integer",
        Value::Number(_) => "a fractional number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_types_read_as_words() {
        use serde_json::json;
        let got: Vec<&str> = [json!(null), json!(3), json!(-3), json!(0.5), json!("x"), json!([])]
            .iter()
            .map(json_type_name)
            .collect();
        assert_eq!(
            got,
            [
                "null",
                "an integer",
                "a negative integer",
                "a fractional number",
                "a string",
                "an array"
            ]
        );
    }

    #[test]
    fn cancel_flag_is_shared() {
        let a = CancelFlag::new();
        let b = a.clone();
        assert!(!b.is_cancelled());
        a.cancel();
        assert!(b.is_cancelled());
    }

    /// An engine that keeps every default: it must be handed to an engine thread, never
    /// run on the event loop (a blocking engine there would stall every client).
    #[test]
    fn engines_run_on_threads_unless_they_say_otherwise() {
        struct Blocking;
        impl Engine for Blocking {
            fn kind(&self) -> &str {
                "blocking"
            }
            fn load(&self, _: &mut dyn FnMut(LoadPhase)) -> Result<Capabilities, EngineError> {
                Ok(Capabilities::text_cpu())
            }
            fn generate(
                &self,
                _: &GenerateRequest,
                _: &CancelFlag,
                _: &mut dyn FnMut(&[u8]),
            ) -> Result<Completion, EngineError> {
                Err(EngineError::internal("not used"))
            }
        }
        let request =
            crate::wire::decode_request(br#"{"messages":[{"role":"user","content":"x"}]}"#)
                .unwrap()
                .params;
        assert!(!Blocking.runs_inline(&request));
    }

    #[test]
    fn phases_serialize_flat() {
        let v = serde_json::to_value(LoadPhase::KvCache { n_ctx: 512 }).unwrap();
        assert_eq!(v, serde_json::json!({"phase":"kv_cache","n_ctx":512}));
        let v = serde_json::to_value(LoadPhase::Download {
            downloaded_bytes: 1,
            total_bytes: None,
            source_url: "u".into(),
        })
        .unwrap();
        assert_eq!(v["total_bytes"], serde_json::Value::Null);
    }
}
