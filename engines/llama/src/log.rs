//! llama.cpp's log, captured instead of printed.
//!
//! llama.cpp and ggml report why something failed only through their log callback, and
//! by default print everything (hundreds of lines per model load) on stderr. The callback
//! installed here drops debug and info lines and keeps the recent warnings and errors in
//! a small global ring, tagged with the thread that logged them, so that a failure can be
//! turned into an [`EngineError`](inferd_core::engine::EngineError) that carries
//! llama.cpp's own reason.

use std::collections::VecDeque;
use std::ffi::{CStr, c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::thread::{self, ThreadId};

use llama_cpp_sys_2 as sys;

/// How many warning and error lines the ring keeps.
const RING_CAPACITY: usize = 64;

/// How many captured lines an error message quotes at most.
const QUOTED_LINES: usize = 8;

/// The environment variable that, when set, also echoes every llama.cpp log line to stderr.
pub(crate) const ECHO_ENV: &str = "INFERD_LLAMA_LOG";

/// One captured line.
struct Line {
    seq: u64,
    thread: ThreadId,
    text: String,
}

/// The recent warnings and errors.
struct Ring {
    next_seq: u64,
    lines: VecDeque<Line>,
    /// Whether the last line llama.cpp logged was kept, so a `CONT` line belongs to it.
    last_kept: bool,
}

static RING: Mutex<Ring> =
    Mutex::new(Ring { next_seq: 0, lines: VecDeque::new(), last_kept: false });

static ECHO: AtomicBool = AtomicBool::new(false);

static INIT: Once = Once::new();

fn ring() -> MutexGuard<'static, Ring> {
    // A poisoned ring only means a panic elsewhere while holding it; the data is still usable.
    RING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Installs the log callback and initialises the llama.cpp backend, once per process.
pub(crate) fn init() {
    INIT.call_once(|| {
        ECHO.store(std::env::var_os(ECHO_ENV).is_some(), Ordering::Relaxed);
        // SAFETY: `capture` matches `ggml_log_callback`, never unwinds, and ignores its user
        // data, so a null pointer is fine. `llama_log_set` is not thread safe; the `Once`
        // makes this the only call in the process, before any other llama.cpp call of ours.
        unsafe { sys::llama_log_set(Some(capture), std::ptr::null_mut()) };
        // SAFETY: called once, from inside the `Once`, as llama.cpp asks.
        unsafe { sys::llama_backend_init() };
    });
}

/// The log callback: keeps warnings and errors, drops the rest.
///
/// # Safety
///
/// `text` must be null or a NUL-terminated string valid for the call, as llama.cpp and
/// ggml guarantee. The function never unwinds.
unsafe extern "C" fn capture(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string that lives for the duration of the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    if ECHO.load(Ordering::Relaxed) {
        // Even the opt-in debug echo may carry what a client sent (a grammar, a prompt
        // piece): it goes through the same redaction as everything else on stderr.
        eprint!("{}", inferd_core::redact::redact(&text));
    }
    let mut ring = ring();
    let this = thread::current().id();
    match level {
        sys::GGML_LOG_LEVEL_WARN | sys::GGML_LOG_LEVEL_ERROR => {
            let seq = ring.next_seq;
            ring.next_seq += 1;
            if ring.lines.len() == RING_CAPACITY {
                ring.lines.pop_front();
            }
            ring.lines.push_back(Line { seq, thread: this, text: text.trim_end().to_owned() });
            ring.last_kept = true;
        }
        sys::GGML_LOG_LEVEL_CONT => {
            if ring.last_kept
                && let Some(last) = ring.lines.back_mut()
                && last.thread == this
            {
                last.text.push_str(text.trim_end());
            }
        }
        _ => ring.last_kept = false,
    }
}

/// A point in the log: lines captured after it can be collected.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogMark(u64);

impl LogMark {
    /// Marks the present.
    pub(crate) fn now() -> LogMark {
        LogMark(ring().next_seq)
    }

    /// The warnings and errors this thread logged since the mark (the last few of them).
    /// When this thread logged none, those of any thread (llama.cpp may log from its
    /// worker threads).
    pub(crate) fn lines(self) -> Vec<String> {
        let ring = ring();
        let this = thread::current().id();
        let recent = || ring.lines.iter().filter(|l| l.seq >= self.0 && !l.text.is_empty());
        let mut lines: Vec<String> =
            recent().filter(|l| l.thread == this).map(|l| l.text.clone()).collect();
        if lines.is_empty() {
            lines = recent().map(|l| l.text.clone()).collect();
        }
        let skip = lines.len().saturating_sub(QUOTED_LINES);
        lines.drain(..skip);
        lines
    }

    /// `what`, followed by the reason llama.cpp logged since the mark.
    pub(crate) fn explain(self, what: &str) -> String {
        let lines = self.lines();
        if lines.is_empty() {
            format!("{what} (llama.cpp logged no reason)")
        } else {
            format!("{what}: llama.cpp: {}", lines.join(" | "))
        }
    }
}
