//! Per-request sampler chains and grammars, and picking a token from a row of logits.

use std::ffi::CString;
use std::ptr::NonNull;

use inferd_core::engine::{EngineError, GenerateRequest};
use llama_cpp_sys_2 as sys;

use crate::log::LogMark;
use crate::model::Model;

/// The seed of requests that name none, xor-ed with the engine's request counter.
pub(crate) const DEFAULT_SEED: u64 = 0xC0FFEE;

/// Folds a 64-bit seed into the 32 bits llama.cpp takes. `u32::MAX` means "random" to
/// llama.cpp (`LLAMA_DEFAULT_SEED`), so it becomes `u32::MAX - 1`: sampling stays
/// reproducible for every seed.
pub(crate) fn fold_seed(seed: u64) -> u32 {
    // Truncation is the point: the high half is folded into the low one first.
    let folded = (seed ^ (seed >> 32)) as u32;
    if folded == u32::MAX { u32::MAX - 1 } else { folded }
}

/// An owned llama.cpp sampler, freed on drop.
pub(crate) struct Sampler(NonNull<sys::llama_sampler>);

// SAFETY: a sampler is a self-contained heap object (its state and, for grammars, its own
// copy of the rules); it is used by one thread at a time and has no thread affinity.
unsafe impl Send for Sampler {}

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

/// How one request samples: its chain and its grammar, if any.
pub(crate) struct Sampling {
    chain: Sampler,
    grammar: Option<Sampler>,
    /// Greedy with no grammar: the pick is the row's first largest logit, which
    /// [`Scratch::sample`] finds without copying the row for the chain.
    argmax: bool,
}

impl Sampling {
    /// Builds a request's chain (seeded with its seed, else `default_seed`) and grammar.
    /// An invalid grammar is an `invalid_request`. Parsing a grammar recurses, so this
    /// runs on the worker's large stack.
    pub(crate) fn new(
        model: &Model,
        req: &GenerateRequest,
        default_seed: u64,
    ) -> Result<Sampling, EngineError> {
        let grammar = grammar(model, req)?;
        let argmax = req.temperature <= 0.0 && grammar.is_none();
        Ok(Sampling { chain: chain(req, default_seed)?, grammar, argmax })
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

/// Builds the grammar sampler of a request, if it has a grammar. The grammar is checked
/// by [`crate::gbnf`] first: llama.cpp prints a grammar it cannot parse straight to
/// stderr, past every log sink, so such a grammar never reaches it.
fn grammar(model: &Model, req: &GenerateRequest) -> Result<Option<Sampler>, EngineError> {
    if req.grammar.is_empty() {
        return Ok(None);
    }
    crate::gbnf::check(&req.grammar, &|text| model.is_one_token(text))
        .map_err(|e| EngineError::invalid_request(format!("invalid grammar: {e}")))?;
    let grammar = CString::new(req.grammar.as_bytes())
        .map_err(|_| EngineError::invalid_request("the grammar contains a NUL character"))?;
    let mark = LogMark::now();
    // SAFETY: the vocabulary is live; both strings are NUL-terminated and outlive the call.
    // llama.cpp catches its parser's exceptions and returns null for a bad grammar.
    let raw = unsafe {
        sys::llama_sampler_init_grammar(model.vocab(), grammar.as_ptr(), c"root".as_ptr())
    };
    Sampler::new(raw)
        .map(Some)
        .ok_or_else(|| EngineError::invalid_request(mark.explain("invalid grammar")))
}

/// The token of the largest logit in `row`, the first of equals (as llama.cpp's greedy
/// sampler picks); `None` for an empty row.
pub(crate) fn argmax(row: &[f32]) -> Option<sys::llama_token> {
    let (first, rest) = row.split_first()?;
    let mut best = (0usize, *first);
    for (i, &logit) in rest.iter().enumerate() {
        if logit > best.1 {
            best = (i + 1, logit);
        }
    }
    // The row has `n_vocab` entries, an i32, so every index fits.
    Some(best.0 as sys::llama_token)
}

/// Scratch space for sampling, reused between tokens.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The candidates of one sampling step.
    candidates: Vec<sys::llama_token_data>,
    /// The candidates a grammar allows.
    allowed: Vec<sys::llama_token_data>,
}

impl Scratch {
    /// Picks the next token from `logits` (one row, `n_vocab` long) with `sampling`, and
    /// advances the samplers' state unless the token ends the generation.
    pub(crate) fn sample(
        &mut self,
        model: &Model,
        logits: &[f32],
        sampling: &Sampling,
    ) -> Result<sys::llama_token, EngineError> {
        if sampling.argmax {
            // llama.cpp's greedy sampler keeps no state, so skipping it changes nothing.
            return argmax(logits)
                .ok_or_else(|| EngineError::internal("llama.cpp returned an empty row of logits"));
        }
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().map(|(id, &logit)| {
            sys::llama_token_data {
                // The row has `n_vocab` entries, an i32, so every index fits.
                id: id as sys::llama_token,
                logit,
                p: 0.0,
            }
        }));
        let mut pool = &mut self.candidates;
        if let Some(grammar) = &sampling.grammar {
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
        unsafe { sys::llama_sampler_apply(sampling.chain.0.as_ptr(), &mut arr) };
        let picked = usize::try_from(arr.selected).ok().filter(|&i| i < arr.size);
        let Some(picked) = picked else {
            return Err(EngineError::internal("llama.cpp's sampler selected no token"));
        };
        // SAFETY: `picked < arr.size`, and `data` points at `size` valid candidates.
        let choice = unsafe { *arr.data.add(picked) };
        if sampling.grammar.is_some() && choice.logit == f32::NEG_INFINITY {
            return Err(EngineError::internal("the sampler picked a token the grammar forbids"));
        }
        if !model.is_eog(choice.id) {
            // The grammar allowed this token, so accepting it cannot fail inside llama.cpp.
            if let Some(grammar) = &sampling.grammar {
                // SAFETY: live sampler; `choice.id` is a token of this vocabulary.
                unsafe { sys::llama_sampler_accept(grammar.0.as_ptr(), choice.id) };
            }
            // SAFETY: live sampler; `choice.id` is a token of this vocabulary.
            unsafe { sys::llama_sampler_accept(sampling.chain.0.as_ptr(), choice.id) };
        }
        Ok(choice.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest_logit() {
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[-1.0]), Some(0));
        assert_eq!(argmax(&[0.5, 2.0, -3.0, 2.0, 1.9]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0]), Some(2));
        assert_eq!(argmax(&[3.0, 3.0]), Some(0));
    }
}
