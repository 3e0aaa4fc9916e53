//! The llama.cpp engine of inferd: GGUF models run in process through the raw C API of
//! [`llama_cpp_sys_2`], no subprocess.
//!
//! # Threads and batching
//!
//! llama.cpp's model and context are not thread safe, so [`LlamaEngine::load`] starts one
//! worker thread that loads them and owns the context until the engine is dropped. Each
//! [`Engine::generate`] call templates and tokenizes its prompt on its own thread (the
//! model is read-only by then), sends it to the worker, and calls `on_token` on its own
//! thread as pieces arrive.
//!
//! The context holds `n_parallel` sequences (default 4) of `n_ctx` tokens each: the KV
//! cache holds `n_parallel x n_ctx`. The worker runs one decode loop: each step is one
//! `llama_decode` of a batch with the next token of every generating sequence and
//! chunks of the prompts of starting ones (at most `n_batch` tokens in all, the prompt
//! room shared round robin), so a long prompt is read between other streams' tokens.
//! Every sequence samples with its own chain. Requests beyond `n_parallel` wait at the
//! worker in arrival order. [`Engine::parallelism`] is `n_parallel`.
//!
//! # Prefix reuse
//!
//! Each sequence slot remembers the tokens in its KV cache after its last request. A
//! new request takes the free slot whose tokens share the longest prefix with its
//! prompt (else the least recently used one), drops the KV cells past that prefix and
//! reads only the rest; at least the last prompt token is always read again, so the
//! first sample has fresh logits. [`Completion::prompt_cached_tokens`] says how many
//! were reused. Where the memory cannot drop part of a sequence, the slot is cleared
//! and the whole prompt read.
//!
//! # Cancellation
//!
//! The cancel flag is checked by the worker before every step: a cancelled request
//! leaves the batch at the next step (also while its prompt is being read) and its slot
//! is free at once. A decode under way is interrupted through llama.cpp's abort callback as
//! soon as one of its sequences is cancelled (a long prompt chunk does not hold the
//! cancel up); the other sequences of that batch are decoded again, untouched. A token that arrives after the flag was raised is not
//! passed to `on_token` and not counted.
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
//! Temperature 0 samples greedily (without a grammar, straight from the row of logits:
//! the first largest logit, as llama.cpp's greedy sampler picks). Otherwise the chain is
//! top-k (when `top_k > 0`), top-p (when `top_p < 1`), temperature, then a seeded draw.
//! The seed is the request's
//! `seed`, or else `0xC0FFEE ^ n` where `n` counts the requests this engine's worker
//! started before (starting at 0), so runs are reproducible without any randomness. llama.cpp
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
//! A templated prompt longer than the context fails before the stream.
//!
//! # Failures
//!
//! When llama.cpp has no KV room for a whole batch, the batch is split in halves and
//! each decoded on its own; a single sequence that still does not fit ends with
//! `length` (while generating) or an error (while reading its prompt), alone. A decode
//! that fails outright fails every request of its batch with `backend_unavailable`, all
//! tagged with one [`EngineError::incident`], so the circuit breaker counts the failure
//! once.
//!
//! # Errors and logging
//!
//! llama.cpp reports failures through its log. The engine installs a log callback that
//! drops debug and info lines and keeps recent warnings and errors in a small ring; an
//! [`EngineError`] from a llama.cpp failure quotes them. Nothing is printed, unless the
//! environment variable `INFERD_LLAMA_LOG` is set, in which case every llama.cpp log
//! line is echoed to stderr, redacted like every other line the daemon writes.
//!
//! # Benchmarks
//!
//! [`raw_generate`] drives the same loading, template and sampling code on the calling
//! thread with no channels, as the baseline for the daemon's overhead.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod batch;
mod gbnf;
mod log;
mod model;
mod sampling;
mod scheduler;
mod session;
mod slots;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use inferd_core::engine::{
    CancelFlag, Capabilities, Completion, Engine, EngineError, GenerateRequest, LoadPhase, Message,
    StopReason, Usage, json_type_name,
};
use serde_json::{Map, Value};

use crate::model::Model;
use crate::scheduler::{Event, Job, Msg, Scheduler};
use crate::session::Session;

/// The engine kind, as [`Engine::kind`] reports it.
pub const KIND: &str = "llamacpp";

/// The default context length of one sequence, in tokens.
pub const DEFAULT_N_CTX: u32 = 4096;

/// The default number of sequences decoded together.
pub const DEFAULT_N_PARALLEL: u32 = 4;

/// The default most tokens one decode step takes (prompt chunks included).
pub const DEFAULT_N_BATCH: u32 = 512;

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
    /// Context length of one sequence in tokens; 0 takes the model's training context.
    /// Default 4096. The KV cache holds `n_parallel` times this.
    pub n_ctx: u32,
    /// Sequences generated together in one context (continuous batching); default 4.
    pub n_parallel: u32,
    /// The most tokens one decode step takes: every generating sequence's next token
    /// plus prompt chunks of starting ones. Default 512; at least `n_parallel`.
    pub n_batch: u32,
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
            n_parallel: DEFAULT_N_PARALLEL,
            n_batch: DEFAULT_N_BATCH,
            n_gpu_layers: 0,
            n_threads: default_threads(),
        }
    }

    /// Reads a backend's options: `model_path` (required), `model_sha256`, `n_ctx`,
    /// `n_parallel`, `n_batch`, `n_gpu_layers`, `n_threads`. `kind` and `name` are ignored; any other key is an
    /// error naming it.
    pub fn from_options(options: &Map<String, Value>) -> Result<LlamaConfig, ConfigError> {
        let mut config = LlamaConfig::new(PathBuf::new());
        let mut have_path = false;
        for (key, value) in options {
            match key.as_str() {
                "kind" | "name" => {}
                "model_path" => {
                    let path = value.as_str().ok_or_else(|| ConfigError::WrongType {
                        key: key.clone(),
                        expected: "a string",
                        got: json_type_name(value),
                    })?;
                    if path.is_empty() {
                        return Err(ConfigError::Empty { key: key.clone() });
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
                                return Err(ConfigError::BadSha256 { got: hash.to_owned() });
                            }
                            Some(hash.to_ascii_lowercase())
                        }
                        other => {
                            return Err(ConfigError::WrongType {
                                key: key.clone(),
                                expected: "a string of 64 hex digits",
                                got: json_type_name(other),
                            });
                        }
                    }
                }
                "n_ctx" => config.n_ctx = unsigned32(key, value)?,
                "n_parallel" | "n_batch" => {
                    let n = unsigned32(key, value)?;
                    if n == 0 {
                        return Err(ConfigError::Zero { key: key.clone() });
                    }
                    if key == "n_parallel" {
                        config.n_parallel = n;
                    } else {
                        config.n_batch = n;
                    }
                }
                "n_gpu_layers" => config.n_gpu_layers = unsigned32(key, value)?,
                "n_threads" => {
                    config.n_threads = unsigned32(key, value)?;
                    if config.n_threads == 0 {
                        return Err(ConfigError::Zero { key: key.clone() });
                    }
                }
                other => return Err(ConfigError::UnknownOption { key: other.to_owned() }),
            }
        }
        if !have_path {
            return Err(ConfigError::Missing { key: "model_path" });
        }
        Ok(config)
    }
}

/// Why a llamacpp backend's options were refused; each message names the option.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A key llamacpp does not know.
    #[error(
        "unknown llamacpp option `{key}` (known: model_path, model_sha256, n_ctx, n_parallel, n_batch, n_gpu_layers, n_threads)"
    )]
    UnknownOption {
        /// The key as written.
        key: String,
    },
    /// The value has the wrong JSON type.
    #[error("llamacpp option `{key}`: expected {expected}, got {got}")]
    WrongType {
        /// The option.
        key: String,
        /// What it takes.
        expected: &'static str,
        /// What it was given (a JSON type).
        got: &'static str,
    },
    /// A string option that must not be empty is.
    #[error("llamacpp option `{key}`: must not be empty")]
    Empty {
        /// The option.
        key: String,
    },
    /// `model_sha256` is a string but not 64 hex digits.
    #[error("llamacpp option `model_sha256`: expected 64 hex digits, got `{got}`")]
    BadSha256 {
        /// The value as given (trimmed).
        got: String,
    },
    /// An integer option outside 0..=u32::MAX, or not an integer.
    #[error("llamacpp option `{key}`: expected an integer from 0 to {max}, got {got}", max = u32::MAX)]
    OutOfRange {
        /// The option.
        key: String,
        /// The number, or the JSON type when it is not one.
        got: String,
    },
    /// A count that must be at least 1 is 0.
    #[error("llamacpp option `{key}`: must be at least 1")]
    Zero {
        /// The option.
        key: String,
    },
    /// A required option is absent.
    #[error("llamacpp option `{key}` is required")]
    Missing {
        /// The option.
        key: &'static str,
    },
}

/// min(4, available cores).
fn default_threads() -> u32 {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(cores).unwrap_or(u32::MAX).clamp(1, MAX_DEFAULT_THREADS)
}

/// `key`'s value as an integer in 0..=u32::MAX, or an error naming the key.
fn unsigned32(key: &str, value: &Value) -> Result<u32, ConfigError> {
    value.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| ConfigError::OutOfRange {
        key: key.to_owned(),
        got: match value {
            Value::Number(n) => n.to_string(),
            other => json_type_name(other).to_owned(),
        },
    })
}

/// What the worker reports while loading.
enum LoadEvent {
    Phase(LoadPhase),
    Ready(Result<Loaded, EngineError>),
}

/// What a successful load hands back to the engine.
struct Loaded {
    capabilities: Capabilities,
    model: Arc<Model>,
    n_ctx: u32,
}

/// The running worker.
struct Worker {
    msgs: Sender<Msg>,
    model: Arc<Model>,
    n_ctx: u32,
    thread: Option<JoinHandle<()>>,
}

/// One decode step, as [`LlamaEngine::set_step_hook`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Sequences in the batch.
    pub sequences: usize,
    /// Of them, those that decoded their last sampled token.
    pub generating: usize,
    /// Of them, those that decoded a chunk of their prompt.
    pub prefilling: usize,
    /// Tokens in the batch.
    pub tokens: usize,
}

/// A function the worker calls after every successful decode step (for tests and
/// diagnostics: it runs on the decode thread, so it sees each step in order).
pub type StepHook = Box<dyn FnMut(&Step) + Send>;

/// Holds new requests back from the decode loop (see [`LlamaEngine::hold`]).
#[derive(Default)]
struct Gate {
    /// (held, requests waiting at the worker)
    state: Mutex<(bool, usize)>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn held(&self) -> bool {
        self.lock().0
    }

    fn set_held(&self, held: bool) {
        self.lock().0 = held;
    }

    fn set_waiting(&self, n: usize) {
        let mut state = self.lock();
        if state.1 != n {
            state.1 = n;
            self.changed.notify_all();
        }
    }

    fn wait_for(&self, n: usize) {
        let mut state = self.lock();
        while state.1 < n {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What the engine and its worker share.
#[derive(Default)]
struct Shared {
    /// The most sequences one decode has held.
    largest_batch: AtomicUsize,
    /// Test hook: act as if the memory could not drop a partial range.
    full_prefill: AtomicBool,
    /// Test hook: one more than the count of successful decodes after which llama.cpp
    /// is made to refuse one; 0 means never (see [`LlamaEngine::fail_decode_after`]).
    fail_decode_after: AtomicU64,
    gate: Gate,
    hook: Mutex<Option<StepHook>>,
}

/// While alive, the engine's decode loop starts no new request: they wait at the worker
/// in arrival order, and all start together (as far as slots allow) when it is dropped.
/// Made by [`LlamaEngine::hold`]; lets tests start concurrent requests in one step
/// without timing assumptions.
pub struct Hold<'a> {
    engine: &'a LlamaEngine,
}

impl Hold<'_> {
    /// Blocks until `n` requests are waiting at the worker.
    pub fn wait_for(&self, n: usize) {
        self.engine.shared.gate.wait_for(n);
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.engine.shared.gate.set_held(false);
        if let Some(worker) = self.engine.worker.get() {
            let _ = worker.msgs.send(Msg::Wake);
        }
    }
}

/// The llama.cpp engine. Cheap to make; [`Engine::load`] loads the model on a worker
/// thread that then serves every generation.
pub struct LlamaEngine {
    config: LlamaConfig,
    worker: OnceLock<Worker>,
    /// Held while loading, so two loads do not race.
    loading: Mutex<()>,
    shared: Arc<Shared>,
}

impl LlamaEngine {
    /// An engine for `config`; nothing is loaded yet.
    pub fn new(config: LlamaConfig) -> LlamaEngine {
        LlamaEngine {
            config,
            worker: OnceLock::new(),
            loading: Mutex::new(()),
            shared: Arc::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The most sequences one decode step has held so far: above 1 when requests were
    /// decoded together.
    pub fn largest_batch(&self) -> usize {
        self.shared.largest_batch.load(Ordering::Relaxed)
    }

    /// Holds new requests back from the decode loop until the returned guard is dropped.
    pub fn hold(&self) -> Hold<'_> {
        self.shared.gate.set_held(true);
        Hold { engine: self }
    }

    /// Installs (or with `None` removes) a function called after every decode step.
    pub fn set_step_hook(&self, hook: Option<StepHook>) {
        *self.shared.hook.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// Makes the engine behave as if the model's memory could not drop part of a
    /// sequence (as with recurrent or sliding-window models): every request then
    /// prefills its whole prompt. For testing that fallback on models that can.
    pub fn force_full_prefill(&self, on: bool) {
        self.shared.full_prefill.store(on, Ordering::Relaxed);
    }

    /// Makes llama.cpp refuse the decode that follows the `n`-th successful one (counted
    /// from the engine's start), once: that batch's positions are made inconsistent, so
    /// `llama_decode` fails as it would on a real error. For testing how a failed batch
    /// ends its requests.
    pub fn fail_decode_after(&self, n: u64) {
        self.shared.fail_decode_after.store(n.saturating_add(1), Ordering::Relaxed);
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

/// The worker: loads the session, reports, then runs the decode loop until the engine goes.
fn worker_main(
    config: LlamaConfig,
    shared: Arc<Shared>,
    load_events: Sender<LoadEvent>,
    msgs: Receiver<Msg>,
) {
    let loaded = Session::load(&config, &mut |phase| {
        let _ = load_events.send(LoadEvent::Phase(phase));
    });
    let session = match loaded {
        Ok(session) => session,
        Err(e) => {
            let _ = load_events.send(LoadEvent::Ready(Err(e)));
            return;
        }
    };
    let ready = Loaded {
        capabilities: session.capabilities(),
        model: Arc::clone(session.model()),
        n_ctx: session.n_ctx(),
    };
    let scheduler = match Scheduler::new(session, shared) {
        Ok(scheduler) => scheduler,
        Err(e) => {
            let _ = load_events.send(LoadEvent::Ready(Err(e)));
            return;
        }
    };
    let _ = load_events.send(LoadEvent::Ready(Ok(ready)));
    drop(load_events);
    scheduler.run(msgs);
}

impl Engine for LlamaEngine {
    fn kind(&self) -> &str {
        KIND
    }

    fn parallelism(&self) -> u32 {
        self.config.n_parallel.max(1)
    }

    fn load(&self, progress: &mut dyn FnMut(LoadPhase)) -> Result<Capabilities, EngineError> {
        let _loading = self.loading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.worker.get().is_some() {
            return Err(EngineError::internal("llamacpp: the model is already loaded"));
        }
        let (load_tx, load_rx) = mpsc::channel();
        let (job_tx, job_rx) = mpsc::channel();
        let config = self.config.clone();
        let shared = Arc::clone(&self.shared);
        let thread = thread::Builder::new()
            .name("inferd-llama".into())
            .stack_size(WORKER_STACK)
            .spawn(move || worker_main(config, shared, load_tx, job_rx))
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
            Ok(Loaded { capabilities, model, n_ctx }) => {
                // Cannot fail: `loading` is held and the cell was empty.
                let _ =
                    self.worker.set(Worker { msgs: job_tx, model, n_ctx, thread: Some(thread) });
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
        // Templating and tokenizing happen here, on the caller's thread, so a long prompt
        // delays only its own request, never the decode loop.
        let Some(prompt) = worker.model.prompt(&request.messages, worker.n_ctx, cancel)? else {
            return Ok(Completion::new(Usage::default(), StopReason::Cancelled));
        };
        let (events_tx, events) = mpsc::channel();
        let job = Job {
            tokens: prompt.tokens,
            request: request.clone(),
            cancel: cancel.clone(),
            events: events_tx,
        };
        if worker.msgs.send(Msg::Job(job)).is_err() {
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
        if let Some(Worker { msgs, thread, .. }) = self.worker.take() {
            // Closing the channel ends the worker's loop; it frees llama.cpp's objects.
            drop(msgs);
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
            let e = LlamaConfig::from_options(&options(opts.clone())).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{opts}: {e}");
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(session::to_hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(sampling::fold_seed(7), 7);
        assert_eq!(sampling::fold_seed(u64::from(u32::MAX)), u32::MAX - 1);
        assert_eq!(sampling::fold_seed(1 << 32 | 1), 0);
        let m = |content: &str| Message {
            role: inferd_core::engine::Role::User,
            content: content.into(),
        };
        assert_eq!(model::plain_prompt(&[m("a"), m("b c")]), "a\nb c");
    }

    #[test]
    fn engine_is_send_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<LlamaEngine>();
    }
}
