//! An owned `llama_batch`: tokens of several sequences for one `llama_decode`.

use inferd_core::engine::EngineError;
use llama_cpp_sys_2 as sys;

/// A batch with room for `capacity` tokens, each in one sequence; freed on drop.
pub(crate) struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
}

impl Batch {
    /// An empty batch for up to `capacity` tokens.
    pub(crate) fn new(capacity: usize) -> Result<Batch, EngineError> {
        let n = i32::try_from(capacity.max(1))
            .map_err(|_| EngineError::unavailable("llamacpp: batch size too large"))?;
        // SAFETY: allocates arrays for `n` tokens with one sequence id each; freed on drop.
        let raw = unsafe { sys::llama_batch_init(n, 0, 1) };
        if raw.token.is_null()
            || raw.pos.is_null()
            || raw.n_seq_id.is_null()
            || raw.seq_id.is_null()
            || raw.logits.is_null()
        {
            return Err(EngineError::unavailable("llamacpp: cannot allocate a batch"));
        }
        Ok(Batch { raw: sys::llama_batch { n_tokens: 0, ..raw }, capacity: capacity.max(1) })
    }

    /// Empties the batch.
    pub(crate) fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    /// Tokens in the batch.
    pub(crate) fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    /// Appends `token` at `pos` of sequence `seq`, asking for its logits when `logits`.
    /// Returns false (and adds nothing) when the batch is full.
    pub(crate) fn push(
        &mut self,
        token: sys::llama_token,
        pos: sys::llama_pos,
        seq: sys::llama_seq_id,
        logits: bool,
    ) -> bool {
        let i = self.len();
        if i >= self.capacity {
            return false;
        }
        // SAFETY: `llama_batch_init` allocated `capacity` entries in each array and one
        // sequence id in each `seq_id[i]`; `i < capacity`.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = i8::from(logits);
        }
        self.raw.n_tokens += 1;
        true
    }

    /// Moves every token one position on, so that llama.cpp refuses the batch of a
    /// sequence that has cells already (a test hook: a real failure of `llama_decode`).
    pub(crate) fn skip_a_position(&mut self) {
        for i in 0..self.len() {
            // SAFETY: `i < len() <= capacity`, entries `llama_batch_init` allocated.
            unsafe { *self.raw.pos.add(i) += 1 };
        }
    }

    /// The batch as llama.cpp takes it (by value; the arrays stay owned here).
    pub(crate) fn raw(&self) -> sys::llama_batch {
        self.raw
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: the arrays came from `llama_batch_init` and are freed once; `n_tokens`
        // does not matter to the free.
        unsafe { sys::llama_batch_free(self.raw) };
    }
}
