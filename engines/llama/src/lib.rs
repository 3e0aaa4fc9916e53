//! The llama.cpp engine of inferd: GGUF models run in process through the raw C API of
//! [`llama_cpp_sys_2`], no subprocess.
//!
//! # Threads
//!
//! llama.cpp's model and context are not thread safe, so [`LlamaEngine::load`] starts one
//! worker thread that loads them and owns them until the engine is dropped. Each
//! [`Engine::generate`] call sends its request to that worker over a channel and blocks
//! on a second channel, calling `on_token` on its own thread as pieces arrive. Requests
//! are served one at a time, in the order they reach the worker. The cancel flag is
//! checked by the worker between tokens (and between prompt batches); a token that
//! arrives after the flag was raised is not passed to `on_token` and not counted.
//!
//! # Prompt
//!
//! The messages go through the model's own chat template (`tokenizer.chat_template`)
//! with `llama_chat_apply_template`, ending with the assistant's turn; special tokens in
//! the result are parsed. llama.cpp only knows a fixed list of templates, recognised by
//! their text. **Fallback:** when the model has no template, or one llama.cpp does not
//! recognise, the model is treated as a plain completion model: the prompt is the
//! messages' texts joined by `"\n"`, without role markers, and special-token syntax in
//! it stays plain text. The model then continues the last message. Either way the
//! tokenizer adds the model's BOS token if the model asks for one, and
//! `prompt_tokens` counts the tokens of this templated prompt.
//!
//! # Sampling
//!
//! Temperature 0 samples greedily. Otherwise the chain is top-k (when `top_k > 0`),
//! top-p (when `top_p < 1`), temperature, then a seeded draw. The seed is the request's
//! `seed`, or else `0xC0FFEE ^ n` where `n` counts the requests this engine has served
//! before (starting at 0), so runs are reproducible without any randomness. llama.cpp
//! takes a 32-bit seed: a 64-bit seed is folded as `low ^ high`, and the one 32-bit
//! value llama.cpp reads as "random" (`0xFFFFFFFF`) is replaced by `0xFFFFFFFE`.
//! A non-empty `grammar` (GBNF, start symbol `root`) constrains sampling: it is applied
//! first, tokens it forbids are removed, and the chain picks among the rest; an
//! invalid grammar fails the request before the stream.
//!
//! # Stopping
//!
//! `end` when the model samples an end-of-generation token (not counted, not
//! streamed); `length` when `max_tokens` tokens were generated (at once for
//! `max_tokens: 0`) or when the context is full; `cancelled` when the flag was raised.
//! A templated prompt longer than the context fails before the stream. The KV cache is
//! cleared before every request: requests share nothing.
//!
//! # Errors and logging
//!
//! llama.cpp reports failures through its log. The engine installs a log callback that
//! drops debug and info lines and keeps recent warnings and errors in a small ring; an
//! [`EngineError`] from a llama.cpp failure quotes them. Nothing is printed, unless the
//! environment variable `INFERD_LLAMA_LOG` is set, in which case every llama.cpp log
//! line is echoed to stderr.
//!
//! # Benchmarks
//!
//! [`raw_generate`] drives the same loading, template and sampling code on the calling
//! thread with no channels, as the baseline for the daemon's overhead.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod log;
mod session;

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use inferd_core::engine::{
    CancelFlag, Capabilities, Completion, Engine, EngineError, GenerateRequest, LoadPhase, Message,
    StopReason,
};
use serde_json::{Map, Value};

use crate::session::Session;

/// The engine kind, as [`Engine::kind`] reports it.
pub const KIND: &str = "llamacpp";

/// The default context length, in tokens.
pub const DEFAULT_N_CTX: u32 = 4096;

/// The most threads the default [`LlamaConfig::n_threads`] uses.
pub const MAX_DEFAULT_THREADS: u32 = 4;

/// The stack of the worker thread: llama.cpp's grammar parser recurses.
const WORKER_STACK: usize = 16 << 20;

/// How a llama.cpp engine is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlamaConfig {
    /// The GGUF file.
    pub model_path: PathBuf,
    /// The file's expected sha256 (hex, either case); checked at load when set.
    pub model_sha256: Option<String>,
    /// Context length in tokens; 0 takes the model's training context. Default 4096.
    pub n_ctx: u32,
    /// Layers to offload to a GPU; default 0. This build of llama.cpp is CPU-only, so
    /// the value only matters to GPU-enabled builds.
    pub n_gpu_layers: u32,
    /// Threads for decoding; default min(4, available cores).
    pub n_threads: u32,
}

impl LlamaConfig {
    /// The defaults for a model file.
    pub fn new(model_path: impl Into<PathBuf>) -> LlamaConfig {
        LlamaConfig {
            model_path: model_path.into(),
            model_sha256: None,
            n_ctx: DEFAULT_N_CTX,
            n_gpu_layers: 0,
            n_threads: default_threads(),
        }
    }

    /// Reads a backend's options: `model_path` (required), `model_sha256`, `n_ctx`,
    /// `n_gpu_layers`, `n_threads`. `kind` and `name` are ignored; any other key is an
    /// error naming it.
    pub fn from_options(options: &Map<String, Value>) -> Result<LlamaConfig, String> {
        let mut config = LlamaConfig::new(PathBuf::new());
        let mut have_path = false;
        for (key, value) in options {
            match key.as_str() {
                "kind" | "name" => {}
                "model_path" => {
                    let path = value.as_str().ok_or_else(|| {
                        format!(
                            "llamacpp option `model_path`: expected a string, got {}",
                            type_name(value)
                        )
                    })?;
                    if path.is_empty() {
                        return Err("llamacpp option `model_path`: must not be empty".into());
                    }
                    config.model_path = PathBuf::from(path);
                    have_path = true;
                }
                "model_sha256" => {
                    config.model_sha256 = match value {
                        Value::Null => None,
                        Value::String(hash) => {
                            let hash = hash.trim();
                            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                                return Err(format!(
                                    "llamacpp option `model_sha256`: expected 64 hex digits, got `{hash}`"
                                ));
                            }
                            Some(hash.to_ascii_lowercase())
                        }
                        other => {
                            return Err(format!(
                                "llamacpp option `model_sha256`: expected a string of 64 hex digits, got {}",
                                type_name(other)
                            ));
                        }
                    }
                }
                "n_ctx" => config.n_ctx = unsigned32(key, value)?,
                "n_gpu_layers" => config.n_gpu_layers = unsigned32(key, value)?,
                "n_threads" => {
                    config.n_threads = unsigned32(key, value)?;
                    if config.n_threads == 0 {
                        return Err("llamacpp option `n_threads`: must be at least 1".into());
                    }
                }
                other => {
                    return Err(format!(
                        "unknown llamacpp option `{other}` (known: model_path, model_sha256, n_ctx, n_gpu_layers, n_threads)"
                    ));
                }
            }
        }
        if !have_path {
            return Err("llamacpp option `model_path` is required".into());
        }
        Ok(config)
    }
}

/// min(4, available cores).
fn default_threads() -> u32 {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(cores).unwrap_or(u32::MAX).clamp(1, MAX_DEFAULT_THREADS)
}

/// `key`'s value as an integer in 0..=u32::MAX, or an error naming the key.
fn unsigned32(key: &str, value: &Value) -> Result<u32, String> {
    value.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
        format!(
            "llamacpp option `{key}`: expected an integer from 0 to {}, got {}",
            u32::MAX,
            match value {
                Value::Number(n) => n.to_string(),
                other => type_name(other).to_owned(),
            }
        )
    })
}

/// A JSON value's type, for messages.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A generation for the worker.
struct Job {
    request: GenerateRequest,
    cancel: CancelFlag,
    events: Sender<Event>,
}

/// What the worker reports about a generation.
enum Event {
    Token(Vec<u8>),
    Done(Result<Completion, EngineError>),
}

/// What the worker reports while loading.
enum LoadEvent {
    Phase(LoadPhase),
    Ready(Result<Capabilities, EngineError>),
}

/// The running worker.
struct Worker {
    jobs: Sender<Job>,
    thread: Option<JoinHandle<()>>,
}

/// The llama.cpp engine. Cheap to make; [`Engine::load`] loads the model on a worker
/// thread that then serves every generation.
pub struct LlamaEngine {
    config: LlamaConfig,
    worker: OnceLock<Worker>,
    /// Held while loading, so two loads do not race.
    loading: Mutex<()>,
}

impl LlamaEngine {
    /// An engine for `config`; nothing is loaded yet.
    pub fn new(config: LlamaConfig) -> LlamaEngine {
        LlamaEngine { config, worker: OnceLock::new(), loading: Mutex::new(()) }
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
}

impl std::fmt::Debug for LlamaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaEngine")
            .field("config", &self.config)
            .field("loaded", &self.worker.get().is_some())
            .finish()
    }
}

/// The worker: loads the session, reports, then serves jobs until the engine goes.
fn worker_main(config: LlamaConfig, load_events: Sender<LoadEvent>, jobs: Receiver<Job>) {
    let loaded = Session::load(&config, &mut |phase| {
        let _ = load_events.send(LoadEvent::Phase(phase));
    });
    let mut session = match loaded {
        Ok(session) => session,
        Err(e) => {
            let _ = load_events.send(LoadEvent::Ready(Err(e)));
            return;
        }
    };
    let _ = load_events.send(LoadEvent::Ready(Ok(session.capabilities())));
    drop(load_events);
    while let Ok(Job { request, cancel, events }) = jobs.recv() {
        let result = session.generate(&request, &cancel, &mut |bytes| {
            events.send(Event::Token(bytes.to_vec())).is_ok()
        });
        let _ = events.send(Event::Done(result));
    }
}

impl Engine for LlamaEngine {
    fn kind(&self) -> &str {
        KIND
    }

    fn load(&self, progress: &mut dyn FnMut(LoadPhase)) -> Result<Capabilities, EngineError> {
        let _loading = self.loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.worker.get().is_some() {
            return Err(EngineError::internal("llamacpp: the model is already loaded"));
        }
        let (load_tx, load_rx) = mpsc::channel();
        let (job_tx, job_rx) = mpsc::channel();
        let config = self.config.clone();
        let thread = thread::Builder::new()
            .name("inferd-llama".into())
            .stack_size(WORKER_STACK)
            .spawn(move || worker_main(config, load_tx, job_rx))
            .map_err(|e| {
                EngineError::unavailable(format!("llamacpp: cannot start the worker thread: {e}"))
            })?;
        let result = loop {
            match load_rx.recv() {
                Ok(LoadEvent::Phase(phase)) => progress(phase),
                Ok(LoadEvent::Ready(result)) => break result,
                Err(_) => {
                    break Err(EngineError::unavailable(
                        "llamacpp: the worker thread stopped while loading",
                    ));
                }
            }
        };
        match result {
            Ok(capabilities) => {
                // Cannot fail: `loading` is held and the cell was empty.
                let _ = self.worker.set(Worker { jobs: job_tx, thread: Some(thread) });
                Ok(capabilities)
            }
            Err(e) => {
                drop(job_tx);
                let _ = thread.join();
                Err(e)
            }
        }
    }

    fn generate(
        &self,
        request: &GenerateRequest,
        cancel: &CancelFlag,
        on_token: &mut dyn FnMut(&[u8]),
    ) -> Result<Completion, EngineError> {
        let Some(worker) = self.worker.get() else {
            return Err(EngineError::unavailable("llamacpp: the model is not loaded"));
        };
        let (events_tx, events) = mpsc::channel();
        let job = Job { request: request.clone(), cancel: cancel.clone(), events: events_tx };
        if worker.jobs.send(job).is_err() {
            return Err(EngineError::unavailable("llamacpp: the worker thread has stopped"));
        }
        // Tokens that arrive after a cancel are dropped, so the caller sees exactly what
        // came before it.
        let mut dropped = 0u32;
        for event in events {
            match event {
                Event::Token(bytes) => {
                    if cancel.is_cancelled() {
                        dropped += 1;
                    } else {
                        on_token(&bytes);
                    }
                }
                Event::Done(Ok(mut completion)) => {
                    if dropped > 0 {
                        completion.stop_reason = StopReason::Cancelled;
                        completion.usage.completion_tokens =
                            completion.usage.completion_tokens.saturating_sub(dropped);
                    }
                    return Ok(completion);
                }
                Event::Done(Err(e)) => return Err(e),
            }
        }
        Err(EngineError::unavailable("llamacpp: the worker thread stopped during a generation"))
    }
}

impl Drop for LlamaEngine {
    fn drop(&mut self) {
        if let Some(Worker { jobs, thread }) = self.worker.take() {
            // Closing the job channel ends the worker's loop; it frees llama.cpp's objects.
            drop(jobs);
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        }
    }
}

/// What [`raw_generate`] produced, with where the time went.
#[derive(Clone, Debug, PartialEq)]
pub struct RawOutput {
    /// The generated bytes (all pieces, concatenated).
    pub bytes: Vec<u8>,
    /// Tokens generated (the end-of-generation token not counted).
    pub n_tokens: u32,
    /// Tokens of the templated prompt.
    pub prompt_tokens: u32,
    /// Why generation stopped.
    pub stop_reason: StopReason,
    /// Checking (and verifying, when a hash is set) and loading the model, making the context.
    pub load_time: Duration,
    /// From the start of generation to the first token's bytes; `None` without tokens.
    pub first_token: Option<Duration>,
    /// The whole generation: template, tokenizing, prompt and every token.
    pub generate_time: Duration,
}

/// Loads `config`'s model and runs one generation on the calling thread, with the same
/// template and sampling code as [`LlamaEngine`] but no worker or channels: the baseline
/// for measuring the daemon's overhead. `top_p` and `top_k` are the protocol's defaults
/// ([`GenerateRequest::default`]); `seed` `None` means the engine's first default seed.
pub fn raw_generate(
    config: &LlamaConfig,
    messages: &[Message],
    max_tokens: u32,
    temperature: f32,
    seed: Option<u64>,
) -> Result<RawOutput, EngineError> {
    let request = GenerateRequest {
        messages: messages.to_vec(),
        temperature,
        max_tokens,
        seed,
        ..GenerateRequest::default()
    };
    let start = Instant::now();
    let mut session = Session::load(config, &mut |_| {})?;
    let load_time = start.elapsed();
    let start = Instant::now();
    let mut bytes = Vec::new();
    let mut first_token = None;
    let completion = session.generate(&request, &CancelFlag::new(), &mut |piece| {
        first_token.get_or_insert_with(|| start.elapsed());
        bytes.extend_from_slice(piece);
        true
    })?;
    let generate_time = start.elapsed();
    Ok(RawOutput {
        bytes,
        n_tokens: completion.usage.completion_tokens,
        prompt_tokens: completion.usage.prompt_tokens,
        stop_reason: completion.stop_reason,
        load_time,
        first_token,
        generate_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test options are objects"),
        }
    }

    #[test]
    fn options_parse() {
        let hash = "A22FA22A53EFCC1626C6B8C1C3438747F5A7EDA4A0C95C8E6FDC25A8DE9B190B";
        let c = LlamaConfig::from_options(&options(json!({
            "kind": "llamacpp", "name": "x", "model_path": "/m.gguf", "model_sha256": hash,
            "n_ctx": 0, "n_gpu_layers": 3, "n_threads": 2,
        })))
        .unwrap();
        assert_eq!(c.model_path, PathBuf::from("/m.gguf"));
        assert_eq!(c.model_sha256.as_deref(), Some(hash.to_ascii_lowercase().as_str()));
        assert_eq!((c.n_ctx, c.n_gpu_layers, c.n_threads), (0, 3, 2));

        let c = LlamaConfig::from_options(&options(json!({"model_path": "m"}))).unwrap();
        assert_eq!(c.n_ctx, DEFAULT_N_CTX);
        assert_eq!(c.model_sha256, None);
        assert!((1..=MAX_DEFAULT_THREADS).contains(&c.n_threads));
    }

    #[test]
    fn option_errors_name_the_key() {
        for (opts, key) in [
            (json!({}), "model_path"),
            (json!({"model_path": 5}), "model_path"),
            (json!({"model_path": ""}), "model_path"),
            (json!({"model_path": "m", "model_sha256": "abc"}), "model_sha256"),
            (json!({"model_path": "m", "model_sha256": 1}), "model_sha256"),
            (json!({"model_path": "m", "n_ctx": -1}), "n_ctx"),
            (json!({"model_path": "m", "n_ctx": 5_000_000_000u64}), "n_ctx"),
            (json!({"model_path": "m", "n_gpu_layers": "9"}), "n_gpu_layers"),
            (json!({"model_path": "m", "n_threads": 0}), "n_threads"),
            (json!({"model_path": "m", "n_thread": 1}), "n_thread"),
        ] {
            let e = LlamaConfig::from_options(&options(opts.clone())).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "{opts}: {e}");
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(session::to_hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(session::fold_seed(7), 7);
        assert_eq!(session::fold_seed(u64::from(u32::MAX)), u32::MAX - 1);
        assert_eq!(session::fold_seed(1 << 32 | 1), 0);
        let m = |content: &str| Message {
            role: inferd_core::engine::Role::User,
            content: content.into(),
        };
        assert_eq!(session::plain_prompt(&[m("a"), m("b c")]), "a\nb c");
    }

    #[test]
    fn engine_is_send_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<LlamaEngine>();
    }
}
