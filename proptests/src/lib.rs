//! Property tests, the deterministic simulator and the fuzz entry points of inferd.
//!
//! - [`model`]: reference models (line splitting, admission, router and breaker) that
//!   the real state machines are checked against.
//! - [`sim`]: the deterministic simulator running the real `Daemon` in a simulated
//!   world driven by one seed (see `src/bin/sim.rs` for the runner).
//! - `fuzz_*`: one function per cargo-fuzz target; each target in `fuzz/` is one line
//!   calling it, and `tests/corpus_replay.rs` replays the saved corpora through the
//!   same functions on the stable toolchain.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod http;
pub mod model;
pub mod rng;
pub mod sim;
pub mod sse;

use inferd_core::Settings;
use inferd_core::admin::{self, AdminState, StatsEvent};
use inferd_core::engine::{Capabilities, LoadPhase};
use inferd_core::framing::{Line, LineDecoder};
use inferd_core::redact::{MASK, redact};
use inferd_core::wire::{self, DecodeError, DoneFrame, Frame, Request};
use serde_json::{Map, Value, json};

use crate::model::{RefLine, overflow_known_at, partial_at, split_lines};
use crate::rng::Rng;

/// Takes every complete line out of `dec`; true when it stopped at `TooLarge`.
fn drain_lines(dec: &mut LineDecoder, out: &mut Vec<RefLine>) -> bool {
    while let Some(l) = dec.next_line() {
        match l {
            Line::Complete(l) => out.push(RefLine::Line(l.to_vec())),
            Line::TooLarge => {
                out.push(RefLine::TooLarge);
                return true;
            }
        }
    }
    false
}

/// Most work the decoder may do per byte pushed (see `LineDecoder::work`).
pub const LINE_DECODER_WORK_PER_BYTE: u64 = 6;

/// Feeds `stream` to a [`LineDecoder`] with cap `cap` in the chunks `cuts` describes
/// (chunk length, whether to take the available lines after it), and checks it against
/// the reference splitter: the same lines for any chunking; an oversize line reported
/// as soon as it is known to be over, not before; never more than `cap + 1` bytes of an
/// unfinished line held once the available lines are taken (the last of them a CR when
/// `cap + 1`); `has_partial` telling the truth; and work linear in the bytes pushed.
/// Panics on a difference.
pub fn check_line_decoder(stream: &[u8], cap: usize, cuts: &[(usize, bool)]) {
    let mut dec = LineDecoder::new(cap);
    let mut got = Vec::new();
    let mut pos = 0;
    let mut cuts = cuts.iter().copied().cycle();
    let mut stopped = false;
    let overflow_at = overflow_known_at(stream, cap);
    while pos < stream.len() && !stopped {
        let (len, take) = cuts.next().unwrap_or((stream.len(), true));
        let end = (pos + len.max(1)).min(stream.len());
        dec.push(&stream[pos..end]);
        pos = end;
        if take || pos == stream.len() {
            stopped = drain_lines(&mut dec, &mut got);
            let known = overflow_at.is_some_and(|at| pos >= at);
            assert_eq!(stopped, known, "TooLarge after {pos} bytes (known at {overflow_at:?})");
            if !stopped {
                let held = dec.buffered();
                assert!(
                    held <= cap + 1,
                    "decoder holds {held} bytes of an unfinished line (cap {cap})"
                );
                assert!(
                    held <= cap || stream[pos - 1] == b'\r',
                    "decoder holds cap + 1 bytes not ending in CR (cap {cap})"
                );
                assert_eq!(
                    dec.has_partial(),
                    partial_at(stream, pos, overflow_at),
                    "has_partial after {pos} bytes"
                );
            }
        }
        assert!(
            dec.work() <= LINE_DECODER_WORK_PER_BYTE * pos as u64,
            "decoder did {} units of work for {pos} bytes",
            dec.work()
        );
    }
    if !stopped {
        drain_lines(&mut dec, &mut got);
    }
    let want = split_lines(stream, cap);
    assert_eq!(got, want.lines, "lines differ from the reference (cap {cap})");
}

/// Fuzz entry: the line decoder against the reference splitter. Byte 0 picks the cap,
/// byte 1 the chunking, the rest is the stream.
#[doc(hidden)]
pub fn fuzz_line_decoder(data: &[u8]) {
    let [c, k, stream @ ..] = data else { return };
    let cap = 1 + usize::from(c % 64);
    let mut rng = Rng::new(u64::from(*k));
    let cuts: Vec<(usize, bool)> =
        (0..16).map(|_| (rng.range_usize(1, 24), rng.chance(1, 2))).collect();
    check_line_decoder(stream, cap, &cuts);
}

/// Encodes a decoded request back into a request line with every field explicit.
pub fn encode_request(r: &Request) -> Vec<u8> {
    let p = &r.params;
    let mut m = Map::new();
    m.insert("id".into(), r.id.clone().into());
    m.insert("stream".into(), r.stream.into());
    m.insert("messages".into(), serde_json::to_value(&p.messages).unwrap_or(Value::Null));
    m.insert("temperature".into(), json!(f64::from(p.temperature)));
    m.insert("top_p".into(), json!(f64::from(p.top_p)));
    m.insert("top_k".into(), json!(p.top_k));
    m.insert("max_tokens".into(), json!(p.max_tokens));
    m.insert("grammar".into(), json!(p.grammar));
    if let Some(b) = p.image_token_budget {
        m.insert("image_token_budget".into(), json!(b));
    }
    if let Some(s) = p.seed {
        m.insert("seed".into(), json!(s));
    }
    serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
}

/// Checks what the request decoder made of `line`: an accepted request obeys the
/// documented ranges and re-encodes to itself; an undecodable line carries the
/// salvaged id. Panics on a violation.
pub fn check_decoded_request(line: &[u8]) {
    match wire::decode_request(line) {
        Ok(req) => {
            let p = &req.params;
            assert!(!p.messages.is_empty(), "accepted a request without messages");
            assert!(
                p.temperature.is_finite() && p.temperature >= 0.0,
                "accepted temperature {} (not finite and >= 0) from {:?}",
                p.temperature,
                String::from_utf8_lossy(line)
            );
            assert!(
                p.top_p > 0.0 && p.top_p <= 1.0,
                "accepted top_p {} (outside (0, 1]) from {:?}",
                p.top_p,
                String::from_utf8_lossy(line)
            );
            if let Some(b) = p.image_token_budget {
                assert!(wire::IMAGE_TOKEN_BUDGETS.contains(&b));
            }
            assert!(p.grammar.len() <= wire::MAX_GRAMMAR_BYTES);
            let again = encode_request(&req);
            let back = wire::decode_request(&again)
                .unwrap_or_else(|e| panic!("re-encoded request does not decode: {e}"));
            assert_eq!(back, req, "request does not survive re-encoding");
        }
        Err(DecodeError::Undecodable { id, .. }) => {
            assert_eq!(id, wire::salvage_id(line), "undecodable line: id is not the salvaged one");
            // Spec §2: the id is echoed only when the line is a JSON object.
            if !line.trim_ascii_start().starts_with(b"{") {
                assert_eq!(id, "", "an id salvaged from a line that is not a JSON object");
            }
        }
        Err(DecodeError::Invalid { .. }) => {}
    }
    // Spec §2: invalid UTF-8 anywhere in the line (an ignored value, a key) makes it
    // undecodable, not merely invalid, and certainly not accepted.
    if std::str::from_utf8(line).is_err() {
        assert!(
            matches!(wire::decode_request(line), Err(DecodeError::Undecodable { .. })),
            "a line with invalid UTF-8 was not undecodable: {:?}",
            String::from_utf8_lossy(line)
        );
    }
}

/// Secrets of each shape `redact` knows, each with the part that must not survive.
pub const PLANTED_SECRETS: &[(&str, &str)] = &[
    ("sk-proj-AbC123dEf456GhI789jKl0", "AbC123dEf456GhI789jKl0"),
    ("sk-abc123def456", "abc123def456"),
    ("mysk-proj-AbC123dEf456GhI789jKl0", "AbC123dEf456GhI789jKl0"),
    ("hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456", "AbCdEfGhIjKlMnOpQrStUvWxYz0123456"),
    ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "abcdefghijklmnopqrstuvwxyz0123456789"),
    ("AKIAIOSFODNN7EXAMPLE", "IOSFODNN7EXAMPLE"),
    ("https://user:hunter2pw@example.com/x", "hunter2pw"),
    ("password=hunter2pw", "hunter2pw"),
    ("Bearer abcdefgh12345678", "abcdefgh12345678"),
    (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIsecretPEMbody\n-----END RSA PRIVATE KEY-----",
        "MIIsecretPEMbody",
    ),
];

/// Checks `redact` on `text`: unchanged text is borrowed, changed text carries the mask,
/// and a secret of every known shape planted in the text (between spaces, at its start,
/// middle and end) does not survive, whatever the text around it. Panics on a failure.
pub fn check_redact(text: &str) {
    let out = redact(text);
    if let std::borrow::Cow::Owned(o) = &out {
        assert!(o.contains(MASK), "changed without a mask: {text:?} -> {o:?}");
    }
    let middle = (0..=text.len() / 2).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    for &(secret, part) in PLANTED_SECRETS {
        let before = text.matches(part).count();
        for at in [0, middle, text.len()] {
            let planted = format!("{} {secret} {}", &text[..at], &text[at..]);
            let out = redact(&planted);
            let after = out.matches(part).count();
            assert!(after <= before, "{secret:?} survived in {planted:?}: {out:?}",);
        }
    }
}

/// Fuzz entry: redaction of arbitrary text (invalid UTF-8 is read lossily).
#[doc(hidden)]
pub fn fuzz_redact(data: &[u8]) {
    check_redact(&String::from_utf8_lossy(data));
}

/// Fuzz entry: the request decoder on arbitrary bytes.
#[doc(hidden)]
pub fn fuzz_request_decoder(data: &[u8]) {
    check_decoded_request(data);
}

/// Fuzz entry: the config file parser on arbitrary UTF-8.
#[doc(hidden)]
pub fn fuzz_config_parser(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(s) = Settings::from_json(text) {
        let _ = s.resolved_backends();
        if let Ok(cfg) = s.daemon_config() {
            assert!(cfg.active_permits >= 1, "config with zero active permits");
            assert!(cfg.max_frame_bytes >= 1024, "config with a frame cap under 1024");
        }
        let mut base = Settings::default();
        base.merge(s.clone());
        assert_eq!(base.resolved_backends(), s.resolved_backends());
    }
}

/// Re-encodes a parsed response frame with the daemon's encoders.
pub fn reencode_frame(f: &Frame) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match f {
        Frame::Token { id, content } => wire::encode_token(&mut out, id, content),
        Frame::Done { id, content, usage, stop_reason, backend, timings } => wire::encode_done(
            &mut out,
            &DoneFrame {
                id,
                content,
                usage: *usage,
                stop_reason: *stop_reason,
                backend,
                timings: *timings,
            },
        ),
        Frame::Error { id, code, message } => wire::encode_error(&mut out, id, *code, message),
        Frame::Unknown => return None,
    }
    Some(out)
}

fn assert_one_frame(out: &[u8]) -> Value {
    assert_eq!(out.last(), Some(&b'\n'), "frame without its LF");
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1, "raw LF inside a frame");
    serde_json::from_slice(out).unwrap_or_else(|e| panic!("encoded frame is not JSON: {e}"))
}

/// Fuzz entry: each line parsed as a response frame and as JSON, re-encoded, parsed
/// again; its text also goes into admin events, which must come out as flat JSON.
#[doc(hidden)]
pub fn fuzz_admin_frames(data: &[u8]) {
    for line in data.split(|&b| b == b'\n') {
        if let Ok(f) = Frame::parse(line)
            && let Some(out) = reencode_frame(&f)
        {
            assert_one_frame(&out);
            let back = Frame::parse(&out[..out.len() - 1])
                .unwrap_or_else(|e| panic!("re-encoded frame does not parse: {e}"));
            assert_eq!(back, f, "frame does not survive re-encoding");
        }
        if let Ok(v) = serde_json::from_slice::<Value>(line) {
            let out = serde_json::to_vec(&v).unwrap_or_default();
            let back: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
            // serde_json parses some floats one ulp off unless built with
            // `float_roundtrip`, which this project does not need: compare floats loosely.
            assert!(same_json(&back, &v), "JSON value does not survive re-encoding: {v}");
        }
    }
    // The input's text as one kind of admin event, picked by the first byte: checking
    // every kind for every input made this target ten times slower for no extra reach.
    let text = String::from_utf8_lossy(&data[..data.len().min(512)]).into_owned();
    let kind = data.first().map_or(0, |&b| usize::from(b) % ADMIN_EVENT_KINDS);
    check_admin_event(&text, kind);
}

/// Equal JSON values, with floats equal to within a relative 1e-15.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            x == y || (x - y).abs() <= 1e-15 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// How many kinds of admin event [`check_admin_event`] knows: every state (starting,
/// ready, draining, and loading/restarting in each load phase), capabilities, stats.
pub const ADMIN_EVENT_KINDS: usize = 3 + 2 * 6 + 2;

/// Puts `text` into every kind of admin event; see [`check_admin_event`].
pub fn check_admin_events(text: &str) {
    for kind in 0..ADMIN_EVENT_KINDS {
        check_admin_event(text, kind);
    }
}

/// Puts `text` into admin event kind `kind` (`0..ADMIN_EVENT_KINDS`) and checks the
/// envelope, the flat fields and the absence of `null` (except `download.total_bytes`).
pub fn check_admin_event(text: &str, kind: usize) {
    let phase = |i: usize| match i {
        0 => LoadPhase::CheckingLocal { path: text.into() },
        1 => LoadPhase::Download {
            downloaded_bytes: text.len() as u64,
            total_bytes: None,
            source_url: text.into(),
        },
        2 => LoadPhase::Verify { path: text.into() },
        3 => LoadPhase::Quarantine {
            path: text.into(),
            expected_sha256: text.into(),
            actual_sha256: text.into(),
            quarantine_path: text.into(),
        },
        4 => LoadPhase::Mmap { path: text.into() },
        _ => LoadPhase::KvCache { n_ctx: text.len() as u32 },
    };
    let state = match kind {
        0 => Some(AdminState::Starting),
        1 => Some(AdminState::Ready),
        2 => Some(AdminState::Draining),
        k if k < 3 + 6 => Some(AdminState::LoadingModel(phase(k - 3))),
        k if k < 3 + 12 => Some(AdminState::Restarting(phase(k - 9))),
        _ => None,
    };
    if let Some(s) = state {
        let mut out = Vec::new();
        admin::encode_state(&mut out, &s);
        let v = assert_one_frame(&out);
        assert_eq!(v["id"], "admin");
        assert_eq!(v["type"], "status");
        for (k, val) in v.as_object().into_iter().flatten() {
            assert!(!val.is_null() || k == "total_bytes", "null {k} in {v}");
            assert!(!val.is_object() && !val.is_array(), "nested {k} in {v}");
        }
    } else if kind == ADMIN_EVENT_KINDS - 2 {
        let mut caps = Capabilities::text_cpu();
        caps.backend = text.into();
        let mut out = Vec::new();
        admin::encode_capabilities(&mut out, &caps);
        assert_eq!(assert_one_frame(&out)["backend"], text);
    } else {
        let other = format!("{text}#2");
        let mut out = Vec::new();
        admin::encode_stats(
            &mut out,
            &StatsEvent {
                breakers: vec![(text, "open"), (&other, "closed")],
                ..StatsEvent::default()
            },
        );
        let v = assert_one_frame(&out);
        assert_eq!(v["breakers"][text], "open", "{v}");
    }
}

/// Fuzz entry: the whole `Daemon` in the simulator, the fuzz bytes as its random stream.
#[doc(hidden)]
pub fn fuzz_daemon(data: &[u8]) {
    if let Err(f) = sim::run_bytes(data) {
        panic!("{f}");
    }
}
