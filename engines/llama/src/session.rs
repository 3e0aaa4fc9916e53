//! A loaded model and its context, driven on one thread: the code both the engine's worker
//! and [`raw_generate`](crate::raw_generate) run.

use std::ffi::{CStr, CString, c_char};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::ptr::NonNull;

use inferd_core::engine::{
    CancelFlag, Capabilities, Completion, EngineError, GenerateRequest, LoadPhase, Message, Role,
    StopReason, Usage,
};
use inferd_core::wire::constant_time_eq;
use llama_cpp_sys_2 as sys;
use sha2::{Digest, Sha256};

use crate::LlamaConfig;
use crate::log::{self, LogMark};

/// The seed of requests that name none, xor-ed with the session's request counter.
pub(crate) const DEFAULT_SEED: u64 = 0xC0FFEE;

/// What [`Session::generate`]'s sink answers: go on, or stop as if cancelled.
pub(crate) type Sink<'a> = dyn FnMut(&[u8]) -> bool + 'a;

/// A loaded model with its context. Not `Send`: it lives and dies on one thread.
pub(crate) struct Session {
    model: NonNull<sys::llama_model>,
    ctx: NonNull<sys::llama_context>,
    /// Owned by `model`.
    vocab: NonNull<sys::llama_vocab>,
    /// The most tokens a request may occupy: the configured context length (llama.cpp may
    /// allocate a little more, padded).
    n_ctx: u32,
    /// The most tokens one `llama_decode` call takes.
    n_batch: u32,
    /// What `load` reports.
    capabilities: Capabilities,
    /// Requests served, for default seeds.
    requests: u64,
    /// Scratch: the candidates of one sampling step.
    candidates: Vec<sys::llama_token_data>,
    /// Scratch: the candidates a grammar allows.
    allowed: Vec<sys::llama_token_data>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: both pointers came from llama.cpp's constructors, are owned by this session
        // alone and are freed exactly once, the context before the model it was made from.
        unsafe {
            sys::llama_free(self.ctx.as_ptr());
            sys::llama_model_free(self.model.as_ptr());
        }
    }
}

/// Frees a model unless disarmed (for the failure paths of `load`).
struct ModelGuard(Option<NonNull<sys::llama_model>>);

impl Drop for ModelGuard {
    fn drop(&mut self) {
        if let Some(model) = self.0.take() {
            // SAFETY: the model came from `llama_model_load_from_file` and nothing else owns it.
            unsafe { sys::llama_model_free(model.as_ptr()) };
        }
    }
}

/// An owned llama.cpp sampler, freed on drop.
struct Sampler(NonNull<sys::llama_sampler>);

impl Sampler {
    /// Wraps a sampler constructor's result; `None` when it returned null.
    fn new(raw: *mut sys::llama_sampler) -> Option<Sampler> {
        NonNull::new(raw).map(Sampler)
    }

    /// Adds `sampler` to this chain, which takes ownership of it.
    fn add(&mut self, what: &str, raw: *mut sys::llama_sampler) -> Result<(), EngineError> {
        if raw.is_null() {
            return Err(EngineError::internal(format!(
                "llama.cpp could not create the {what} sampler"
            )));
        }
        // SAFETY: `self` is a chain made by `llama_sampler_chain_init`, `raw` a fresh sampler
        // owned by nobody; the chain takes ownership and frees it with itself.
        unsafe { sys::llama_sampler_chain_add(self.0.as_ptr(), raw) };
        Ok(())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: the sampler is owned by this wrapper (not added to a chain) and freed once.
        unsafe { sys::llama_sampler_free(self.0.as_ptr()) };
    }
}

/// The hex sha256 of a file, read in chunks.
pub(crate) fn sha256_file(path: &Path) -> Result<String, std::io::Error> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(to_hex(&hasher.finalize()))
}

/// Lower-case hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// A path as the C string llama.cpp wants.
fn path_cstring(path: &Path) -> Result<CString, EngineError> {
    #[cfg(unix)]
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    #[cfg(not(unix))]
    let bytes = path
        .to_str()
        .ok_or_else(|| {
            EngineError::unavailable(format!("model path {} is not valid UTF-8", path.display()))
        })?
        .as_bytes()
        .to_vec();
    CString::new(bytes).map_err(|_| {
        EngineError::unavailable(format!("model path {} contains a NUL byte", path.display()))
    })
}

/// Folds a 64-bit seed into the 32 bits llama.cpp takes. `u32::MAX` means "random" to
/// llama.cpp (`LLAMA_DEFAULT_SEED`), so it becomes `u32::MAX - 1`: sampling stays
/// reproducible for every seed.
pub(crate) fn fold_seed(seed: u64) -> u32 {
    // Truncation is the point: the high half is folded into the low one first.
    let folded = (seed ^ (seed >> 32)) as u32;
    if folded == u32::MAX { u32::MAX - 1 } else { folded }
}

/// The prompt for models without a chat template (or with one llama.cpp does not know):
/// the messages' texts joined by newlines, as plain text to continue.
pub(crate) fn plain_prompt(messages: &[Message]) -> String {
    let mut out = String::new();
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&m.content);
    }
    out
}

/// A role's name as a C string.
fn role_cstr(role: Role) -> &'static CStr {
    match role {
        Role::System => c"system",
        Role::User => c"user",
        Role::Assistant => c"assistant",
    }
}

fn clamp_i32(n: usize) -> Result<i32, EngineError> {
    i32::try_from(n).map_err(|_| {
        EngineError::invalid_request(format!(
            "input of {n} bytes or tokens is too long for llama.cpp"
        ))
    })
}

impl Session {
    /// Checks the file, verifies its hash if configured, loads the model and makes a
    /// context, reporting each phase.
    pub(crate) fn load(
        cfg: &LlamaConfig,
        progress: &mut dyn FnMut(LoadPhase),
    ) -> Result<Session, EngineError> {
        log::init();
        let path = cfg.model_path.as_path();
        let shown = path.display().to_string();
        progress(LoadPhase::CheckingLocal { path: shown.clone() });
        let meta = std::fs::metadata(path)
            .map_err(|e| EngineError::unavailable(format!("model file {shown}: {e}")))?;
        if !meta.is_file() {
            return Err(EngineError::unavailable(format!(
                "model path {shown} is not a regular file"
            )));
        }
        if let Some(expected) = &cfg.model_sha256 {
            progress(LoadPhase::Verify { path: shown.clone() });
            let expected = expected.trim().to_ascii_lowercase();
            let actual = sha256_file(path).map_err(|e| {
                EngineError::unavailable(format!("model file {shown}: reading it to verify: {e}"))
            })?;
            if !constant_time_eq(expected.as_bytes(), actual.as_bytes()) {
                return Err(EngineError::unavailable(format!(
                    "model file {shown} failed verification: expected sha256 {expected}, actual sha256 {actual}"
                )));
            }
        }

        progress(LoadPhase::Mmap { path: shown.clone() });
        let c_path = path_cstring(path)?;
        // SAFETY: plain constructor of a parameter struct.
        let mut mparams = unsafe { sys::llama_model_default_params() };
        mparams.n_gpu_layers = i32::try_from(cfg.n_gpu_layers).unwrap_or(i32::MAX);
        let mark = LogMark::now();
        // SAFETY: `c_path` is a valid NUL-terminated path that outlives the call; llama.cpp
        // catches its own exceptions and returns null on failure.
        let model = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mparams) };
        let Some(model) = NonNull::new(model) else {
            return Err(EngineError::unavailable(
                mark.explain(&format!("cannot load model {shown}")),
            ));
        };
        let mut guard = ModelGuard(Some(model));

        // SAFETY: `model` is a live model.
        let train_ctx = unsafe { sys::llama_model_n_ctx_train(model.as_ptr()) };
        let n_ctx = if cfg.n_ctx == 0 { u32::try_from(train_ctx).unwrap_or(0) } else { cfg.n_ctx };
        if n_ctx == 0 {
            return Err(EngineError::unavailable(format!(
                "model {shown} declares no training context length; set n_ctx"
            )));
        }
        progress(LoadPhase::KvCache { n_ctx });
        // SAFETY: plain constructor of a parameter struct.
        let mut cparams = unsafe { sys::llama_context_default_params() };
        cparams.n_ctx = n_ctx;
        let threads = i32::try_from(cfg.n_threads.max(1)).unwrap_or(i32::MAX);
        cparams.n_threads = threads;
        cparams.n_threads_batch = threads;
        cparams.no_perf = true;
        let mark = LogMark::now();
        // SAFETY: `model` is live and outlives the context (the session frees the context first).
        let ctx = unsafe { sys::llama_init_from_model(model.as_ptr(), cparams) };
        let Some(ctx) = NonNull::new(ctx) else {
            return Err(EngineError::unavailable(mark.explain(&format!(
                "cannot create a context of {n_ctx} tokens for model {shown}"
            ))));
        };
        guard.0 = None;

        // SAFETY: `model` is live; the vocabulary it returns lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(model.as_ptr()) };
        // SAFETY: `ctx` is live.
        let (real_ctx, n_batch) =
            unsafe { (sys::llama_n_ctx(ctx.as_ptr()), sys::llama_n_batch(ctx.as_ptr())) };
        // SAFETY: no arguments; reports how llama.cpp was built.
        let gpu = unsafe { sys::llama_supports_gpu_offload() };
        let mut capabilities = Capabilities::text_cpu();
        capabilities.gpu_layers = if gpu { cfg.n_gpu_layers } else { 0 };
        let session = Session {
            model,
            ctx,
            vocab: NonNull::new(vocab.cast_mut()).ok_or_else(|| {
                EngineError::unavailable(format!("model {shown} has no vocabulary"))
            })?,
            n_ctx: n_ctx.min(real_ctx),
            n_batch: n_batch.max(1),
            capabilities,
            requests: 0,
            candidates: Vec::new(),
            allowed: Vec::new(),
        };
        Ok(session)
    }

    /// What the loaded backend can do.
    pub(crate) fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    /// Renders the conversation: with the model's chat template when llama.cpp knows it,
    /// else as plain text. Returns the prompt and whether it holds special tokens to parse.
    fn render(&self, messages: &[Message]) -> Result<(Vec<u8>, bool), EngineError> {
        // SAFETY: the model is live; a null name asks for the default template. The returned
        // string (or null) is owned by the model's metadata and lives as long as the model.
        let tmpl = unsafe { sys::llama_model_chat_template(self.model.as_ptr(), std::ptr::null()) };
        if tmpl.is_null() {
            return Ok((plain_prompt(messages).into_bytes(), false));
        }
        let mut texts = Vec::with_capacity(messages.len());
        for m in messages {
            let content = CString::new(m.content.as_bytes()).map_err(|_| {
                EngineError::invalid_request(
                    "a message contains a NUL character, which the chat template cannot carry",
                )
            })?;
            texts.push(content);
        }
        let chat: Vec<sys::llama_chat_message> = messages
            .iter()
            .zip(&texts)
            .map(|(m, content)| sys::llama_chat_message {
                role: role_cstr(m.role).as_ptr(),
                content: content.as_ptr(),
            })
            .collect();
        // SAFETY: `tmpl` is a live NUL-terminated string, `chat` points at `chat.len()` messages
        // whose strings (`texts`, static roles) outlive the call; a null buffer of length 0
        // only asks for the size.
        let needed = unsafe {
            sys::llama_chat_apply_template(
                tmpl,
                chat.as_ptr(),
                chat.len(),
                true,
                std::ptr::null_mut(),
                0,
            )
        };
        let Ok(needed) = usize::try_from(needed) else {
            // llama.cpp does not know this template: fall back to plain text.
            return Ok((plain_prompt(messages).into_bytes(), false));
        };
        let mut buf = vec![0u8; needed + 1];
        let len = clamp_i32(buf.len())?;
        // SAFETY: as above, with a buffer of `len` writable bytes.
        let written = unsafe {
            sys::llama_chat_apply_template(
                tmpl,
                chat.as_ptr(),
                chat.len(),
                true,
                buf.as_mut_ptr().cast::<c_char>(),
                len,
            )
        };
        if usize::try_from(written).ok() != Some(needed) {
            return Err(EngineError::internal(
                "llama.cpp's chat template gave inconsistent lengths",
            ));
        }
        buf.truncate(needed);
        Ok((buf, true))
    }

    /// Tokenizes a prompt, with the model's BOS when it wants one.
    fn tokenize(
        &self,
        text: &[u8],
        parse_special: bool,
    ) -> Result<Vec<sys::llama_token>, EngineError> {
        let len = clamp_i32(text.len())?;
        // SAFETY: `text` is `len` readable bytes (no NUL terminator needed: the length is
        // given); a null output of capacity 0 only asks for the count, returned negated.
        let n = unsafe {
            sys::llama_tokenize(
                self.vocab.as_ptr(),
                text.as_ptr().cast::<c_char>(),
                len,
                std::ptr::null_mut(),
                0,
                true,
                parse_special,
            )
        };
        if n == i32::MIN {
            return Err(EngineError::invalid_request(
                "the prompt has too many tokens for llama.cpp",
            ));
        }
        let count = n.unsigned_abs() as usize;
        let mut tokens = vec![0 as sys::llama_token; count];
        if count == 0 {
            return Ok(tokens);
        }
        // SAFETY: as above, with room for `count` tokens.
        let got = unsafe {
            sys::llama_tokenize(
                self.vocab.as_ptr(),
                text.as_ptr().cast::<c_char>(),
                len,
                tokens.as_mut_ptr(),
                clamp_i32(count)?,
                true,
                parse_special,
            )
        };
        match usize::try_from(got) {
            Ok(got) if got <= count => {
                tokens.truncate(got);
                Ok(tokens)
            }
            _ => Err(EngineError::internal("llama.cpp's tokenizer gave inconsistent counts")),
        }
    }

    /// The raw bytes of a token's text.
    fn piece(&self, token: sys::llama_token, buf: &mut Vec<u8>) -> Result<(), EngineError> {
        buf.resize(buf.capacity().max(32), 0);
        for _ in 0..2 {
            let cap = clamp_i32(buf.len())?;
            // SAFETY: `buf` has `cap` writable bytes; `token` came from sampling this vocabulary.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab.as_ptr(),
                    token,
                    buf.as_mut_ptr().cast::<c_char>(),
                    cap,
                    0,
                    false,
                )
            };
            if n >= 0 {
                buf.truncate(n.unsigned_abs() as usize);
                return Ok(());
            }
            buf.resize(n.unsigned_abs() as usize, 0);
        }
        Err(EngineError::internal(format!("llama.cpp could not render token {token}")))
    }

    /// Runs `llama_decode` on `tokens`; `Ok(false)` when the context has no room.
    fn decode(&mut self, tokens: &mut [sys::llama_token]) -> Result<bool, EngineError> {
        let n = clamp_i32(tokens.len())?;
        let mark = LogMark::now();
        // SAFETY: `tokens` outlives the call; the batch only borrows it and `llama_decode`
        // copies what it needs. The context is live and used by this thread only.
        let rc = unsafe {
            let batch = sys::llama_batch_get_one(tokens.as_mut_ptr(), n);
            sys::llama_decode(self.ctx.as_ptr(), batch)
        };
        match rc {
            0 => Ok(true),
            1 => Ok(false),
            rc => Err(EngineError::internal(
                mark.explain(&format!("llama_decode failed with code {rc}")),
            )),
        }
    }

    /// Builds the sampler chain of a request (without the grammar).
    fn chain(req: &GenerateRequest, default_seed: u64) -> Result<Sampler, EngineError> {
        // SAFETY: plain constructors; ownership of the result passes to `Sampler`.
        let mut chain = Sampler::new(unsafe {
            let mut params = sys::llama_sampler_chain_default_params();
            params.no_perf = true;
            sys::llama_sampler_chain_init(params)
        })
        .ok_or_else(|| EngineError::internal("llama.cpp could not create a sampler chain"))?;
        if req.temperature <= 0.0 {
            // SAFETY: plain constructor.
            chain.add("greedy", unsafe { sys::llama_sampler_init_greedy() })?;
            return Ok(chain);
        }
        if req.top_k > 0 {
            let k = i32::try_from(req.top_k).unwrap_or(i32::MAX);
            // SAFETY: plain constructor.
            chain.add("top-k", unsafe { sys::llama_sampler_init_top_k(k) })?;
        }
        if req.top_p < 1.0 {
            // SAFETY: plain constructor.
            chain.add("top-p", unsafe { sys::llama_sampler_init_top_p(req.top_p, 1) })?;
        }
        // SAFETY: plain constructor.
        chain.add("temperature", unsafe { sys::llama_sampler_init_temp(req.temperature) })?;
        let seed = req.seed.unwrap_or(default_seed);
        // SAFETY: plain constructor.
        chain.add("dist", unsafe { sys::llama_sampler_init_dist(fold_seed(seed)) })?;
        Ok(chain)
    }

    /// Builds the grammar sampler of a request, if it has a grammar.
    fn grammar(&self, req: &GenerateRequest) -> Result<Option<Sampler>, EngineError> {
        if req.grammar.is_empty() {
            return Ok(None);
        }
        let grammar = CString::new(req.grammar.as_bytes())
            .map_err(|_| EngineError::invalid_request("the grammar contains a NUL character"))?;
        let mark = LogMark::now();
        // SAFETY: the vocabulary is live; both strings are NUL-terminated and outlive the call.
        // llama.cpp catches its parser's exceptions and returns null for a bad grammar.
        let raw = unsafe {
            sys::llama_sampler_init_grammar(self.vocab.as_ptr(), grammar.as_ptr(), c"root".as_ptr())
        };
        Sampler::new(raw)
            .map(Some)
            .ok_or_else(|| EngineError::invalid_request(mark.explain("invalid grammar")))
    }

    /// Samples the next token from the last decoded position.
    fn sample(
        &mut self,
        chain: &Sampler,
        grammar: Option<&Sampler>,
    ) -> Result<sys::llama_token, EngineError> {
        // SAFETY: the vocabulary is live.
        let n_vocab = unsafe { sys::llama_vocab_n_tokens(self.vocab.as_ptr()) };
        let n_vocab = usize::try_from(n_vocab).unwrap_or(0);
        // SAFETY: the context is live and its last decode asked for logits of its last token;
        // -1 names that one. The result is null or `n_vocab` floats owned by the context.
        let logits = unsafe { sys::llama_get_logits_ith(self.ctx.as_ptr(), -1) };
        if logits.is_null() || n_vocab == 0 {
            return Err(EngineError::internal("llama.cpp returned no logits"));
        }
        // SAFETY: see above; the slice is dropped before the context is used again.
        let logits = unsafe { std::slice::from_raw_parts(logits, n_vocab) };
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().map(|(id, &logit)| {
            sys::llama_token_data {
                // `n_vocab` came from an i32, so every index fits.
                id: id as sys::llama_token,
                logit,
                p: 0.0,
            }
        }));
        let mut pool = &mut self.candidates;
        if let Some(grammar) = grammar {
            let mut arr = sys::llama_token_data_array {
                data: pool.as_mut_ptr(),
                size: pool.len(),
                selected: -1,
                sorted: false,
            };
            // SAFETY: `arr` describes `pool`'s initialised elements, which outlive the call;
            // the grammar sampler only rewrites their logits.
            unsafe { sys::llama_sampler_apply(grammar.0.as_ptr(), &mut arr) };
            // SAFETY: samplers keep `data`/`size` pointing at valid candidates.
            let after = unsafe { std::slice::from_raw_parts(arr.data, arr.size) };
            self.allowed.clear();
            self.allowed.extend(after.iter().filter(|c| c.logit > f32::NEG_INFINITY));
            if self.allowed.is_empty() {
                return Err(EngineError::internal("the grammar allows no token here"));
            }
            pool = &mut self.allowed;
        }
        let mut arr = sys::llama_token_data_array {
            data: pool.as_mut_ptr(),
            size: pool.len(),
            selected: -1,
            sorted: false,
        };
        // SAFETY: as above; the chain may sort, truncate and rewrite the candidates, and
        // sets `selected` to an index into `data`.
        unsafe { sys::llama_sampler_apply(chain.0.as_ptr(), &mut arr) };
        let picked = usize::try_from(arr.selected).ok().filter(|&i| i < arr.size);
        let Some(picked) = picked else {
            return Err(EngineError::internal("llama.cpp's sampler selected no token"));
        };
        // SAFETY: `picked < arr.size`, and `data` points at `size` valid candidates.
        let choice = unsafe { *arr.data.add(picked) };
        if grammar.is_some() && choice.logit == f32::NEG_INFINITY {
            return Err(EngineError::internal("the sampler picked a token the grammar forbids"));
        }
        // SAFETY: the vocabulary is live.
        let eog = unsafe { sys::llama_vocab_is_eog(self.vocab.as_ptr(), choice.id) };
        if !eog {
            // The grammar allowed this token, so accepting it cannot fail inside llama.cpp.
            if let Some(grammar) = grammar {
                // SAFETY: live sampler; `choice.id` is a token of this vocabulary.
                unsafe { sys::llama_sampler_accept(grammar.0.as_ptr(), choice.id) };
            }
            // SAFETY: live sampler; `choice.id` is a token of this vocabulary.
            unsafe { sys::llama_sampler_accept(chain.0.as_ptr(), choice.id) };
        }
        Ok(choice.id)
    }

    /// Runs one generation, pushing each token's bytes into `sink` (which answers whether
    /// to go on).
    pub(crate) fn generate(
        &mut self,
        req: &GenerateRequest,
        cancel: &CancelFlag,
        sink: &mut Sink<'_>,
    ) -> Result<Completion, EngineError> {
        let request_no = self.requests;
        self.requests = self.requests.wrapping_add(1);
        let (prompt, special) = self.render(&req.messages)?;
        let mut tokens = self.tokenize(&prompt, special)?;
        let prompt_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        let done = |completion_tokens: u32, stop_reason| {
            Ok(Completion::new(Usage { prompt_tokens, completion_tokens }, stop_reason))
        };
        if tokens.is_empty() {
            return Err(EngineError::invalid_request("the prompt has no tokens"));
        }
        if prompt_tokens > self.n_ctx {
            return Err(EngineError::invalid_request(format!(
                "prompt is {prompt_tokens} tokens, context is {}",
                self.n_ctx
            )));
        }
        if req.max_tokens == 0 {
            return done(0, StopReason::Length);
        }
        let grammar = self.grammar(req)?;
        let chain = Session::chain(req, DEFAULT_SEED ^ request_no)?;

        // SAFETY: the context is live; its memory lives as long as it does. Clearing drops
        // the previous request's KV cells so positions restart at 0.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true) };
        let batch = self.n_batch as usize;
        for chunk in tokens.chunks_mut(batch) {
            if cancel.is_cancelled() {
                return done(0, StopReason::Cancelled);
            }
            if !self.decode(chunk)? {
                return Err(EngineError::internal(format!(
                    "context full while reading a prompt of {prompt_tokens} tokens (context {})",
                    self.n_ctx
                )));
            }
        }

        let mut n_past = prompt_tokens;
        let mut generated = 0u32;
        let mut piece = Vec::with_capacity(32);
        loop {
            if cancel.is_cancelled() {
                return done(generated, StopReason::Cancelled);
            }
            let token = self.sample(&chain, grammar.as_ref())?;
            // SAFETY: the vocabulary is live.
            if unsafe { sys::llama_vocab_is_eog(self.vocab.as_ptr(), token) } {
                return done(generated, StopReason::End);
            }
            self.piece(token, &mut piece)?;
            if !piece.is_empty() && !sink(&piece) {
                // The sink refused the token: it was not delivered.
                return done(generated, StopReason::Cancelled);
            }
            generated += 1;
            if generated >= req.max_tokens || n_past >= self.n_ctx {
                return done(generated, StopReason::Length);
            }
            if !self.decode(&mut [token])? {
                return done(generated, StopReason::Length);
            }
            n_past += 1;
        }
    }
}
