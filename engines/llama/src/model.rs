//! A loaded GGUF model: its vocabulary, chat template and tokenizer. Read-only once
//! loaded, so request threads render and tokenize their own prompts while the worker
//! decodes.

use std::ffi::{CStr, CString, c_char};
use std::ptr::NonNull;

use inferd_core::engine::{CancelFlag, EngineError, Message, Role};
use llama_cpp_sys_2 as sys;

/// A prompt ready for the decode loop.
pub(crate) struct Prompt {
    /// The templated prompt's tokens (never empty).
    pub tokens: Vec<sys::llama_token>,
}

/// A loaded model, freed on drop (after every context made from it: contexts hold an
/// `Arc` of it).
pub(crate) struct Model {
    raw: NonNull<sys::llama_model>,
    /// Owned by `raw`.
    vocab: NonNull<sys::llama_vocab>,
    /// The longest text, in bytes, of any one token: a prompt of more than
    /// `n_ctx * max_piece` bytes cannot fit in `n_ctx` tokens, so it is refused before
    /// the tokenizer runs.
    max_piece: usize,
}

// SAFETY: after loading, llama.cpp only reads a model and its vocabulary (tokenizing,
// templating and rendering pieces are `const` operations with no shared scratch state;
// llama.cpp's own server tokenizes on its HTTP threads while decoding on another). The
// pointers are freed once, on drop, by whoever holds the last `Arc`.
unsafe impl Send for Model {}
// SAFETY: see `Send`: every method takes `&self` and only reads the model.
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the model came from `llama_model_load_from_file`, is owned by this value
        // alone, and every context made from it is gone (they hold an `Arc` of it).
        unsafe { sys::llama_model_free(self.raw.as_ptr()) };
    }
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

/// `n` as the `i32` llama.cpp takes for lengths, or an invalid-request error.
pub(crate) fn clamp_i32(n: usize) -> Result<i32, EngineError> {
    i32::try_from(n).map_err(|_| {
        EngineError::invalid_request(format!(
            "input of {n} bytes or tokens is too long for llama.cpp"
        ))
    })
}

impl Model {
    /// Takes ownership of a freshly loaded model.
    pub(crate) fn new(raw: NonNull<sys::llama_model>) -> Result<Model, EngineError> {
        // SAFETY: `raw` is a live model; the vocabulary it returns lives as long as it.
        let vocab = unsafe { sys::llama_model_get_vocab(raw.as_ptr()) };
        let Some(vocab) = NonNull::new(vocab.cast_mut()) else {
            // SAFETY: nothing else owns the model yet.
            unsafe { sys::llama_model_free(raw.as_ptr()) };
            return Err(EngineError::unavailable("the model has no vocabulary"));
        };
        let mut model = Model { raw, vocab, max_piece: 1 };
        model.max_piece = model.longest_piece();
        Ok(model)
    }

    /// The raw model.
    pub(crate) fn raw(&self) -> *mut sys::llama_model {
        self.raw.as_ptr()
    }

    /// The raw vocabulary.
    pub(crate) fn vocab(&self) -> *const sys::llama_vocab {
        self.vocab.as_ptr()
    }

    /// The longest text of any token (special tokens as their text), at least 1.
    fn longest_piece(&self) -> usize {
        // SAFETY: the vocabulary is live.
        let n_vocab = unsafe { sys::llama_vocab_n_tokens(self.vocab()) };
        let mut buf = vec![0u8; 256];
        let mut longest = 1;
        for token in 0..n_vocab.max(0) {
            // SAFETY: `buf` has `buf.len()` (256) writable bytes; `token` is in the
            // vocabulary's range.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    token,
                    buf.as_mut_ptr().cast::<c_char>(),
                    256,
                    0,
                    true,
                )
            };
            // A negative count is a piece longer than the buffer: its length, negated.
            longest = longest.max(n.unsigned_abs() as usize);
        }
        longest
    }

    /// Whether `token` ends a generation.
    pub(crate) fn is_eog(&self, token: sys::llama_token) -> bool {
        // SAFETY: the vocabulary is live.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// Renders, bounds and tokenizes a conversation. Fails with `invalid_request` when
    /// the prompt cannot fit in `n_ctx` tokens (judged from its byte length before
    /// tokenizing when possible); returns `None` when `cancel` was raised on the way.
    pub(crate) fn prompt(
        &self,
        messages: &[Message],
        n_ctx: u32,
        cancel: &CancelFlag,
    ) -> Result<Option<Prompt>, EngineError> {
        let (text, special) = self.render(messages)?;
        // Every token covers at most `max_piece` bytes of the text, plus the BOS the
        // tokenizer adds, so a longer text has more tokens than the context holds.
        let most_bytes = (n_ctx as usize).saturating_mul(self.max_piece).saturating_add(1);
        if text.len() > most_bytes {
            return Err(EngineError::invalid_request(format!(
                "prompt is {} bytes, more than a context of {n_ctx} tokens can hold",
                text.len()
            )));
        }
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let tokens = self.tokenize(&text, special)?;
        if tokens.is_empty() {
            return Err(EngineError::invalid_request("the prompt has no tokens"));
        }
        let n = tokens.len();
        if n > n_ctx as usize {
            return Err(EngineError::invalid_request(format!(
                "prompt is {n} tokens, context is {n_ctx}"
            )));
        }
        Ok(Some(Prompt { tokens }))
    }

    /// Renders the conversation: with the model's chat template when llama.cpp knows it,
    /// else as plain text. Returns the prompt and whether it holds special tokens to parse.
    pub(crate) fn render(&self, messages: &[Message]) -> Result<(Vec<u8>, bool), EngineError> {
        // SAFETY: the model is live; a null name asks for the default template. The returned
        // string (or null) is owned by the model's metadata and lives as long as the model.
        let tmpl = unsafe { sys::llama_model_chat_template(self.raw(), std::ptr::null()) };
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
    pub(crate) fn tokenize(
        &self,
        text: &[u8],
        parse_special: bool,
    ) -> Result<Vec<sys::llama_token>, EngineError> {
        let len = clamp_i32(text.len())?;
        // SAFETY: `text` is `len` readable bytes (no NUL terminator needed: the length is
        // given); a null output of capacity 0 only asks for the count, returned negated.
        let n = unsafe {
            sys::llama_tokenize(
                self.vocab(),
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
                self.vocab(),
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

    /// Whether `text`, special tokens parsed, is exactly one token (what a grammar's
    /// `<text>` must be).
    pub(crate) fn is_one_token(&self, text: &[u8]) -> bool {
        let Ok(len) = i32::try_from(text.len()) else { return false };
        let mut tokens = [0 as sys::llama_token; 2];
        // SAFETY: `text` is `len` readable bytes; `tokens` has room for the 2 tokens the
        // call may write (it returns a negative count when more would be needed).
        let n = unsafe {
            sys::llama_tokenize(
                self.vocab(),
                text.as_ptr().cast::<c_char>(),
                len,
                tokens.as_mut_ptr(),
                2,
                false,
                true,
            )
        };
        n == 1
    }

    /// The raw bytes of a token's text.
    pub(crate) fn piece(
        &self,
        token: sys::llama_token,
        buf: &mut Vec<u8>,
    ) -> Result<(), EngineError> {
        buf.resize(buf.capacity().max(32), 0);
        for _ in 0..2 {
            let cap = clamp_i32(buf.len())?;
            // SAFETY: `buf` has `cap` writable bytes; `token` came from sampling this vocabulary.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
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
}
