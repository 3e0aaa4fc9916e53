//! A loaded model with one context for several sequences, driven on one thread: the
//! engine's worker runs its decode loop on it, and [`raw_generate`](crate::raw_generate)
//! its single-sequence baseline.

use std::ffi::{CString, c_void};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use inferd_core::engine::{
    CancelFlag, Capabilities, Completion, EngineError, GenerateRequest, LoadPhase, StopReason,
    Usage,
};
use inferd_core::wire::constant_time_eq;
use llama_cpp_sys_2 as sys;
use sha2::{Digest, Sha256};

use crate::LlamaConfig;
use crate::batch::Batch;
use crate::log::{self, LogMark};
use crate::model::{Model, clamp_i32};
use crate::sampling::{DEFAULT_SEED, Sampling, Scratch};

/// What [`Session::generate`]'s sink answers: go on, or stop as if cancelled.
pub(crate) type Sink<'a> = dyn FnMut(&[u8]) -> bool + 'a;

/// The cancel flags of the sequences in the decode under way. llama.cpp's abort callback
/// stops a decode as soon as one of them is raised, so a cancelled request does not wait
/// for a long prompt chunk; the scheduler decodes the others again.
#[derive(Default)]
pub(crate) struct AbortFlags(Mutex<Vec<CancelFlag>>);

impl AbortFlags {
    /// Names the flags of the next decode's sequences.
    pub(crate) fn set(&self, flags: impl IntoIterator<Item = CancelFlag>) {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.clear();
        held.extend(flags);
    }

    /// Whether a sequence of the decode under way was cancelled.
    fn any_raised(&self) -> bool {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.iter().any(CancelFlag::is_cancelled)
    }
}

/// llama.cpp's abort callback: true stops the decode under way.
///
/// # Safety
///
/// `data` must point at the `AbortFlags` the session installed, alive for the call.
unsafe extern "C" fn abort_when_one_cancelled(data: *mut c_void) -> bool {
    // SAFETY: the session installs a pointer to its boxed `AbortFlags`, which outlives the
    // context (the session frees the context first).
    let flags = unsafe { &*data.cast::<AbortFlags>() };
    flags.any_raised()
}

/// A loaded model with its context. Not `Send`: it lives and dies on one thread.
pub(crate) struct Session {
    ctx: NonNull<sys::llama_context>,
    model: Arc<Model>,
    /// The most tokens one sequence may occupy: the configured context length (llama.cpp
    /// may allocate a little more per sequence, padded).
    n_ctx: u32,
    /// The most tokens one `llama_decode` call takes.
    n_batch: u32,
    /// Sequences the context holds.
    n_parallel: u32,
    /// What `load` reports.
    capabilities: Capabilities,
    /// Entries per row of logits.
    n_vocab: usize,
    /// Read by llama.cpp's abort callback during decodes; boxed so its address is stable.
    abort: Box<AbortFlags>,
    /// Sampling scratch space.
    scratch: Scratch,
    /// ggml's worker threads for this context's decodes, kept between decodes (without
    /// one, ggml starts and joins its threads on every decode, as llama-server does not).
    threadpool: Option<NonNull<sys::ggml_threadpool>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: the context came from `llama_init_from_model`, is owned by this session
        // alone and freed once; the model it was made from outlives it (`self.model`, an
        // `Arc`, drops after this).
        unsafe { sys::llama_free(self.ctx.as_ptr()) };
        if let Some(pool) = self.threadpool.take() {
            // SAFETY: the pool came from `ggml_threadpool_new`, is freed once, and the only
            // context using it was freed just above.
            unsafe { sys::ggml_threadpool_free(pool.as_ptr()) };
        }
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

impl Session {
    /// Checks the file, verifies its hash if configured, loads the model and makes a
    /// context holding `n_parallel` sequences of `n_ctx` tokens each, reporting each phase.
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
        let model = Arc::new(Model::new(model)?);

        // SAFETY: `model` is a live model.
        let train_ctx = unsafe { sys::llama_model_n_ctx_train(model.raw()) };
        let n_ctx = if cfg.n_ctx == 0 { u32::try_from(train_ctx).unwrap_or(0) } else { cfg.n_ctx };
        if n_ctx == 0 {
            return Err(EngineError::unavailable(format!(
                "model {shown} declares no training context length; set n_ctx"
            )));
        }
        let n_parallel = cfg.n_parallel.max(1);
        progress(LoadPhase::KvCache { n_ctx });
        // SAFETY: plain constructor of a parameter struct.
        let mut cparams = unsafe { sys::llama_context_default_params() };
        // Not unified: each sequence gets a KV stream of its own of `n_ctx` cells (llama.cpp
        // gives each `n_ctx / n_seq_max`, padded), so one long conversation cannot take
        // another's room.
        cparams.n_ctx = n_ctx.saturating_mul(n_parallel);
        cparams.n_seq_max = n_parallel;
        cparams.kv_unified = false;
        let n_batch = cfg.n_batch.max(n_parallel).max(1);
        cparams.n_batch = n_batch;
        cparams.n_ubatch = n_batch;
        let threads = i32::try_from(cfg.n_threads.max(1)).unwrap_or(i32::MAX);
        cparams.n_threads = threads;
        cparams.n_threads_batch = threads;
        cparams.no_perf = true;
        let mark = LogMark::now();
        // SAFETY: `model` is live and outlives the context (the session holds an `Arc` of it
        // and frees the context first).
        let ctx = unsafe { sys::llama_init_from_model(model.raw(), cparams) };
        let Some(ctx) = NonNull::new(ctx) else {
            return Err(EngineError::unavailable(mark.explain(&format!(
                "cannot create a context of {n_parallel} x {n_ctx} tokens for model {shown}"
            ))));
        };
        // SAFETY: `ctx` is live.
        let (seq_ctx, real_batch, real_seqs) = unsafe {
            (
                sys::llama_n_ctx_seq(ctx.as_ptr()),
                sys::llama_n_batch(ctx.as_ptr()),
                sys::llama_n_seq_max(ctx.as_ptr()),
            )
        };
        // SAFETY: the vocabulary is live.
        let n_vocab = unsafe { sys::llama_vocab_n_tokens(model.vocab()) };
        // SAFETY: no arguments; reports how llama.cpp was built.
        let gpu = unsafe { sys::llama_supports_gpu_offload() };
        let n_ctx = n_ctx.min(seq_ctx);
        let n_parallel = n_parallel.min(real_seqs).max(1);
        let mut capabilities = Capabilities::text_cpu();
        capabilities.gpu_layers = if gpu { cfg.n_gpu_layers } else { 0 };
        capabilities.n_parallel = Some(n_parallel);
        capabilities.n_ctx = Some(n_ctx);
        // SAFETY: plain constructor of a parameter struct.
        let mut pool_params = unsafe { sys::ggml_threadpool_params_default(threads) };
        // SAFETY: the parameters are initialised; a null result means no pool (ggml then
        // makes threads per decode, as before).
        let threadpool = NonNull::new(unsafe { sys::ggml_threadpool_new(&mut pool_params) });
        if let Some(pool) = threadpool {
            // SAFETY: the context is live; the pool outlives it (freed after it in `Drop`).
            unsafe { sys::llama_attach_threadpool(ctx.as_ptr(), pool.as_ptr(), pool.as_ptr()) };
        }
        let abort = Box::new(AbortFlags::default());
        // SAFETY: the context is live; the callback matches `ggml_abort_callback` and reads
        // the boxed flags, whose address is stable and which outlive the context.
        unsafe {
            sys::llama_set_abort_callback(
                ctx.as_ptr(),
                Some(abort_when_one_cancelled),
                std::ptr::from_ref::<AbortFlags>(&abort).cast_mut().cast::<c_void>(),
            );
        }
        Ok(Session {
            ctx,
            model,
            n_ctx,
            n_batch: real_batch.clamp(1, n_batch),
            n_parallel,
            capabilities,
            n_vocab: usize::try_from(n_vocab).unwrap_or(0),
            abort,
            scratch: Scratch::default(),
            threadpool,
        })
    }

    /// What the loaded backend can do.
    pub(crate) fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    /// The model, shared with request threads.
    pub(crate) fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The most tokens one sequence may hold.
    pub(crate) fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    /// The most tokens one decode takes.
    pub(crate) fn n_batch(&self) -> u32 {
        self.n_batch
    }

    /// Sequences the context holds.
    pub(crate) fn n_parallel(&self) -> u32 {
        self.n_parallel
    }

    /// The flags llama.cpp's abort callback reads.
    pub(crate) fn abort_flags(&self) -> &AbortFlags {
        &self.abort
    }

    /// Runs `llama_decode` on `batch` and returns its code (0 done, 1 no KV room, 2
    /// aborted, negative failed), with llama.cpp's logged reason for codes other than 0-2.
    pub(crate) fn decode(&mut self, batch: &Batch) -> (i32, Option<String>) {
        let mark = LogMark::now();
        // SAFETY: the batch's arrays hold `len()` valid entries and outlive the call; the
        // context is live and used by this thread only.
        let rc = unsafe { sys::llama_decode(self.ctx.as_ptr(), batch.raw()) };
        let why = (!(0..=2).contains(&rc))
            .then(|| mark.explain(&format!("llama_decode failed with code {rc}")));
        (rc, why)
    }

    /// Samples the next token of a sequence from the logits of entry `i` of the last
    /// decode (which asked for them).
    pub(crate) fn sample_at(&mut self, i: usize, sampling: &Sampling) -> Result<i32, EngineError> {
        let i = clamp_i32(i)?;
        // SAFETY: the context is live; `i` names an entry of the last batch. The result is
        // null (bad index) or `n_vocab` floats owned by the context, valid until the next
        // decode, which cannot happen while this method runs.
        let logits = unsafe { sys::llama_get_logits_ith(self.ctx.as_ptr(), i) };
        if logits.is_null() || self.n_vocab == 0 {
            return Err(EngineError::internal("llama.cpp returned no logits"));
        }
        // SAFETY: see above.
        let row = unsafe { std::slice::from_raw_parts(logits, self.n_vocab) };
        self.scratch.sample(&self.model, row, sampling)
    }

    /// Drops sequence `seq`'s KV cells from position `from` on; false when the memory
    /// cannot drop a partial range (then nothing was dropped).
    pub(crate) fn truncate(&mut self, seq: i32, from: usize) -> bool {
        let Ok(from) = i32::try_from(from) else { return true };
        // SAFETY: the context is live; its memory lives as long as it does.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.ctx.as_ptr()), seq, from, -1) }
    }

    /// Drops all of sequence `seq`'s KV cells (which never fails).
    pub(crate) fn forget(&mut self, seq: i32) {
        // SAFETY: the context is live; removing a whole sequence always succeeds.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.ctx.as_ptr()), seq, -1, -1) };
    }

    /// Runs one generation alone in sequence 0, pushing each token's bytes into `sink`
    /// (which answers whether to go on): the single-stream baseline of `raw_generate`.
    pub(crate) fn generate(
        &mut self,
        req: &GenerateRequest,
        cancel: &CancelFlag,
        sink: &mut Sink<'_>,
    ) -> Result<Completion, EngineError> {
        let model = Arc::clone(&self.model);
        let Some(prompt) = model.prompt(&req.messages, self.n_ctx, cancel)? else {
            return Ok(Completion::new(Usage::default(), StopReason::Cancelled));
        };
        let mut tokens = prompt.tokens;
        let prompt_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        let done = |completion_tokens: u32, stop_reason| {
            Ok(Completion::new(Usage { prompt_tokens, completion_tokens }, stop_reason))
        };
        if req.max_tokens == 0 {
            return done(0, StopReason::Length);
        }
        let sampling = Sampling::new(&model, req, DEFAULT_SEED)?;
        self.forget(0);
        let mut batch = Batch::new(self.n_batch as usize)?;
        let mut n_past = 0usize;
        let mut last = 0;
        for chunk in tokens.chunks_mut(self.n_batch as usize) {
            if cancel.is_cancelled() {
                return done(0, StopReason::Cancelled);
            }
            batch.clear();
            for (i, &t) in chunk.iter().enumerate() {
                let pos = i32::try_from(n_past + i).unwrap_or(i32::MAX);
                batch.push(t, pos, 0, n_past + i + 1 == prompt_tokens as usize);
            }
            self.decode_or_fail(&batch)?;
            n_past += chunk.len();
            last = chunk.len() - 1;
        }
        let mut generated = 0u32;
        let mut piece = Vec::with_capacity(32);
        loop {
            if cancel.is_cancelled() {
                return done(generated, StopReason::Cancelled);
            }
            let token = self.sample_at(last, &sampling)?;
            if model.is_eog(token) {
                return done(generated, StopReason::End);
            }
            model.piece(token, &mut piece)?;
            if !piece.is_empty() && !sink(&piece) {
                // The sink refused the token: it was not delivered.
                return done(generated, StopReason::Cancelled);
            }
            generated += 1;
            if generated >= req.max_tokens || n_past >= self.n_ctx as usize {
                return done(generated, StopReason::Length);
            }
            batch.clear();
            batch.push(token, i32::try_from(n_past).unwrap_or(i32::MAX), 0, true);
            if !self.decode_or_fail(&batch)? {
                return done(generated, StopReason::Length);
            }
            n_past += 1;
            last = 0;
        }
    }

    /// Decodes; `Ok(false)` when the sequence has no KV room, an error for a failure.
    fn decode_or_fail(&mut self, batch: &Batch) -> Result<bool, EngineError> {
        match self.decode(batch) {
            (0, _) => Ok(true),
            (1, _) => Ok(false),
            (rc, why) => Err(EngineError::internal(
                why.unwrap_or_else(|| format!("llama_decode stopped with code {rc}")),
            )),
        }
    }
}
