//! What the simulated clients send and what the simulated engines answer.

use std::collections::VecDeque;
use std::time::Duration;

use inferd_core::engine::{Completion, EngineError, GenerateRequest, Message, Role, StopReason};
use inferd_core::wire::{IMAGE_TOKEN_BUDGETS, Usage};
use serde_json::{Map, Value, json};

use crate::rng::Rng;

/// What the daemon must answer to one line a client wrote (blank lines expect nothing).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Expect {
    /// A valid request: tokens, then exactly one terminal frame (request index).
    Request(usize),
    /// Decodable but invalid: `invalid_request` with this id, connection stays open.
    Invalid(String),
    /// Undecodable: `invalid_request` with this id, then close.
    Undecodable(String),
    /// Over the frame cap: `frame_too_large` with id "", then close.
    Oversize,
    /// A failed TCP authentication: silent close, no frame at all.
    AuthBad,
    /// A malformed HTTP request head: a 400 answer, then close.
    HttpMalformed,
    /// An HTTP request that is not a completion (`GET /health`): one whole answer.
    HttpOther,
}

impl Expect {
    /// Whether the daemon answers it with a terminal frame.
    pub(crate) fn answered(&self) -> bool {
        !matches!(self, Expect::AuthBad)
    }
}

/// One step of a client's script.
#[derive(Clone, Debug)]
pub(crate) enum Action {
    /// Write bytes, `chunk_max` at a time with gaps of up to `gap_ms` between chunks.
    /// `marks` are (offset just past the line's LF, what that line expects).
    Write { bytes: Vec<u8>, marks: Vec<(usize, Expect)>, chunk_max: usize, gap_ms: u64 },
    /// Wait until every line written so far is answered; give up (hang up) after
    /// `patience_ms` if set.
    Await { patience_ms: Option<u64> },
    /// Do nothing for a while.
    Sleep(u64),
    /// Shut down the write side (the reply is still wanted).
    HalfClose,
    /// Close the connection entirely.
    HangUp,
    /// Stop reading for this long (`None`: forever).
    Stall(Option<u64>),
    /// Stay connected doing nothing until the end of the run.
    Idle,
}

/// A request as the simulation generated it.
#[derive(Clone, Debug)]
pub(crate) struct ReqSpec {
    pub id: String,
    pub stream: bool,
    pub params: GenerateRequest,
}

/// What a client script generator needs to know.
pub(crate) struct Ctx<'a> {
    /// Prompt markers are `PROMPT-<tag>-<n>`.
    pub tag: u64,
    pub cap: usize,
    pub read_timeout_ms: u64,
    pub api_key: Option<&'a str>,
    /// Counter for ids of invalid lines.
    pub next_bad: &'a mut u64,
    /// Requests registered so far (index = request number).
    pub reqs: &'a mut Vec<ReqSpec>,
}

const WORDS: &[&str] = &[
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "över",
    "lazy",
    "dög",
    "日本語",
    "🦀",
    "naïve",
    "x",
    "\"quoted\"",
    "back\\slash",
    "tab\there",
    "a/b",
    "€100",
    "zero",
];

fn filler(rng: &mut Rng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(rng.pick::<&str>(WORDS));
    }
    s
}

fn filler_bytes(rng: &mut Rng, len: usize) -> String {
    let mut s = filler(rng, 4);
    while s.len() < len {
        s.push(' ');
        s.push_str(rng.pick::<&str>(WORDS));
    }
    s
}

const ID_SUFFIXES: &[&str] = &["", "", "", "-é", "-\"q\"", "-\\b", "-🦀", "-\t", " sp", "-/"];

/// A valid request line (no LF) and its expectation; `Oversize` if it came out over the cap.
pub(crate) fn valid_request(rng: &mut Rng, ctx: &mut Ctx<'_>) -> (Vec<u8>, Expect) {
    let n = ctx.reqs.len();
    let mut id = format!("r{n}{}", rng.pick(ID_SUFFIXES));
    // Now and then a long id, to probe the cap on frames the daemon writes.
    if rng.chance(1, 40) && ctx.cap > 600 {
        // Either side of the longest id the daemon echoes (a quarter of the cap).
        let len = if rng.chance(1, 2) {
            rng.range_usize(ctx.cap / 8, ctx.cap / 4)
        } else {
            rng.range_usize(ctx.cap - 300, ctx.cap - 60)
        };
        while id.len() < len {
            id.push('x');
        }
    }
    let marker = format!("PROMPT-{}-{n} ", ctx.tag);
    let mut messages = Vec::new();
    if rng.chance(1, 4) {
        messages.push(Message { role: Role::System, content: format!("{marker}be brief") });
    }
    if rng.chance(1, 5) {
        messages.push(Message { role: Role::User, content: format!("{marker}{}", filler(rng, 3)) });
        messages.push(Message {
            role: Role::Assistant,
            content: format!("{marker}{}", filler(rng, 2)),
        });
    }
    let body = match rng.below(10) {
        // A long prompt, close to the cap (and sometimes over it).
        0 => {
            let len = rng.range_usize(ctx.cap / 2, ctx.cap + 64);
            filler_bytes(rng, len)
        }
        1 => String::new(),
        _ => {
            let words = rng.range_usize(1, 12);
            filler(rng, words)
        }
    };
    messages.push(Message { role: Role::User, content: format!("{marker}{body}") });

    let mut params = GenerateRequest { messages: messages.clone(), ..GenerateRequest::default() };
    let mut m = Map::new();
    m.insert("id".into(), id.clone().into());
    m.insert("messages".into(), serde_json::to_value(&messages).unwrap_or(Value::Null));
    if rng.chance(1, 2) {
        let t = rng.below(200) as f64 / 100.0;
        m.insert("temperature".into(), json!(t));
        params.temperature = t as f32;
    }
    if rng.chance(1, 3) {
        let p = rng.range(1, 100) as f64 / 100.0;
        m.insert("top_p".into(), json!(p));
        params.top_p = p as f32;
    }
    if rng.chance(1, 3) {
        let k = rng.below(100) as u32;
        m.insert("top_k".into(), json!(k));
        params.top_k = k;
    }
    if rng.chance(3, 4) {
        let mt = if rng.chance(1, 15) { 0 } else { rng.range(1, 40) as u32 };
        m.insert("max_tokens".into(), json!(mt));
        params.max_tokens = mt;
    }
    let stream = !rng.chance(1, 4);
    if !stream || rng.chance(1, 3) {
        m.insert("stream".into(), json!(stream));
    }
    if rng.chance(1, 10) {
        let b = *rng.pick(&IMAGE_TOKEN_BUDGETS);
        m.insert("image_token_budget".into(), json!(b));
        params.image_token_budget = Some(b);
    }
    if rng.chance(1, 10) {
        let g = "root ::= \"yes\" | \"no\"".to_string();
        m.insert("grammar".into(), json!(g));
        params.grammar = g;
    }
    if rng.chance(1, 10) {
        let s = rng.next_u64();
        m.insert("seed".into(), json!(s));
        params.seed = Some(s);
    }
    if rng.chance(1, 10) {
        m.insert("x_future_field".into(), json!({"nested": [1, "two", null]}));
    }
    let mut line = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
    if rng.chance(1, 10) {
        line.insert(0, b' ');
    }
    if line.len() > ctx.cap {
        return (line, Expect::Oversize);
    }
    // Ids too long to echo under the frame cap are refused with an empty id [ours].
    if id.len() > (ctx.cap / 4).min(4096) {
        return (line, Expect::Invalid(String::new()));
    }
    ctx.reqs.push(ReqSpec { id, stream, params });
    (line, Expect::Request(n))
}

/// A decodable request with one value out of range (answered, connection stays open).
fn invalid_request(rng: &mut Rng, ctx: &mut Ctx<'_>) -> (Vec<u8>, Expect) {
    *ctx.next_bad += 1;
    let id = format!("v{}", ctx.next_bad);
    let prompt = format!("PROMPT-{}-invalid{}", ctx.tag, ctx.next_bad);
    let msgs = json!([{"role": "user", "content": prompt}]);
    let v = match rng.below(7) {
        0 => json!({"id": id, "messages": []}),
        1 => json!({"id": id, "messages": msgs, "temperature": -1.5}),
        2 => json!({"id": id, "messages": msgs, "top_p": 0}),
        3 => json!({"id": id, "messages": msgs, "top_p": 1.5}),
        4 => json!({"id": id, "messages": msgs, "top_k": -3}),
        5 => json!({"id": id, "messages": msgs, "max_tokens": -1}),
        _ => json!({"id": id, "messages": msgs, "image_token_budget": 99}),
    };
    (serde_json::to_vec(&v).unwrap_or_default(), Expect::Invalid(id))
}

/// An undecodable line (answered, then the connection closes).
fn undecodable_line(rng: &mut Rng, ctx: &mut Ctx<'_>) -> (Vec<u8>, Expect) {
    *ctx.next_bad += 1;
    let id = format!("u{}", ctx.next_bad);
    let prompt = format!("PROMPT-{}-undecodable{}", ctx.tag, ctx.next_bad);
    let (line, id) = match rng.below(9) {
        0 => (b"not json at all".to_vec(), String::new()),
        1 => (b"[1,2,3]".to_vec(), String::new()),
        2 => (format!(r#"{{"id":"{id}","messages":"{prompt}"}}"#).into_bytes(), id),
        3 => (
            format!(r#"{{"id":"{id}","messages":[{{"role":"robot","content":"{prompt}"}}]}}"#)
                .into_bytes(),
            id,
        ),
        4 => (format!(r#"{{"id":"{id}"}}"#).into_bytes(), id),
        5 => {
            let mut l = format!(r#"{{"id":"{id}","messages":[{{"role":"user","content":""#)
                .into_bytes();
            l.extend_from_slice(b"\xff\xfe");
            l.extend_from_slice(b"\"}]}");
            (l, String::new())
        }
        6 => (format!(r#"{{"id":7,"messages":[],"p":"{prompt}"}}"#).into_bytes(), String::new()),
        7 => (format!(r#"{{"id":"{id}","messages":[{{"role":"user""#).into_bytes(), String::new()),
        _ => (
            format!(r#"{{"id":"{id}","stream":"yes","messages":[{{"role":"user","content":"{prompt}"}}]}}"#)
                .into_bytes(),
            id,
        ),
    };
    // Which id comes back is the salvage rule's business (tested on its own); the
    // simulation checks the daemon applies it.
    let _ = id;
    let id = inferd_core::wire::salvage_id(&line);
    (line, Expect::Undecodable(id))
}

fn blank(rng: &mut Rng) -> &'static [u8] {
    const BLANKS: [&[u8]; 4] = [b"\n", b"  \n", b"\r\n", b"\t \r\n"];
    BLANKS[rng.below(4) as usize]
}

fn eol(rng: &mut Rng) -> &'static [u8] {
    if rng.chance(1, 5) { b"\r\n" } else { b"\n" }
}

/// Builds one `Write` from lines; blank lines sprinkled in.
struct WriteBuilder {
    bytes: Vec<u8>,
    marks: Vec<(usize, Expect)>,
    cap: usize,
}

impl WriteBuilder {
    fn new(cap: usize) -> Self {
        WriteBuilder { bytes: Vec::new(), marks: Vec::new(), cap }
    }

    fn line(&mut self, rng: &mut Rng, (line, expect): (Vec<u8>, Expect)) {
        if rng.chance(1, 8) {
            self.bytes.extend_from_slice(blank(rng));
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&line);
        self.bytes.extend_from_slice(eol(rng));
        self.mark(start, expect);
    }

    /// Records what the line that started at `start` and ends here expects. The daemon
    /// may answer an oversize line as soon as `cap + 1` of its bytes arrived (`cap + 2`
    /// when the last of those is a CR), before the rest (or an LF) is written.
    fn mark(&mut self, start: usize, expect: Expect) {
        let mut at = self.bytes.len();
        if expect == Expect::Oversize {
            let reveal = if self.bytes.get(start + self.cap) == Some(&b'\r') { 2 } else { 1 };
            at = at.min(start + self.cap + reveal);
        }
        self.marks.push((at, expect));
    }

    fn raw(&mut self, b: &[u8]) {
        self.bytes.extend_from_slice(b);
    }

    fn action(mut self, chunk_max: usize, gap_ms: u64) -> Action {
        self.marks.sort_by_key(|m| m.0);
        Action::Write { bytes: self.bytes, marks: self.marks, chunk_max, gap_ms }
    }
}

fn one_line(rng: &mut Rng, cap: usize, l: (Vec<u8>, Expect)) -> Action {
    let mut w = WriteBuilder::new(cap);
    w.line(rng, l);
    // Usually one write; sometimes a few pieces in quick succession.
    if rng.chance(1, 4) {
        w.action(rng.range_usize(1, 64), rng.below(5))
    } else {
        w.action(usize::MAX, 0)
    }
}

fn ending(rng: &mut Rng, script: &mut Vec<Action>) {
    match rng.below(8) {
        0..=3 => script.push(Action::HangUp),
        4 | 5 => script.push(Action::HalfClose),
        6 => {
            script.push(Action::Sleep(rng.range(100, 5000)));
            script.push(Action::HangUp);
        }
        _ => script.push(Action::Idle),
    }
}

fn patience(rng: &mut Rng) -> Option<u64> {
    if rng.chance(1, 6) { Some(rng.range(1, 3000)) } else { None }
}

/// One chat completion over HTTP (head and body) and the request it registers. The
/// body maps onto exactly the [`GenerateRequest`] the engine must be given; the daemon
/// names HTTP requests itself, so the spec's id is filled in when the daemon takes it.
fn http_chat(rng: &mut Rng, ctx: &mut Ctx<'_>) -> (Vec<u8>, Expect) {
    let n = ctx.reqs.len();
    let marker = format!("PROMPT-{}-{n} ", ctx.tag);
    let mut messages = Vec::new();
    if rng.chance(1, 4) {
        messages.push(Message { role: Role::System, content: format!("{marker}be brief") });
    }
    let words = rng.range_usize(1, 12);
    messages.push(Message { role: Role::User, content: format!("{marker}{}", filler(rng, words)) });
    let mut params = GenerateRequest { messages: messages.clone(), ..GenerateRequest::default() };
    let mut m = Map::new();
    m.insert("model".into(), json!("anything"));
    m.insert("messages".into(), serde_json::to_value(&messages).unwrap_or(Value::Null));
    if rng.chance(1, 2) {
        let t = rng.below(200) as f64 / 100.0;
        m.insert("temperature".into(), json!(t));
        params.temperature = t as f32;
    }
    if rng.chance(1, 3) {
        let p = rng.range(1, 100) as f64 / 100.0;
        m.insert("top_p".into(), json!(p));
        params.top_p = p as f32;
    }
    if rng.chance(3, 4) {
        let mt = if rng.chance(1, 15) { 0 } else { rng.range(1, 40) as u32 };
        let name = if rng.chance(1, 2) { "max_tokens" } else { "max_completion_tokens" };
        m.insert(name.into(), json!(mt));
        params.max_tokens = mt;
    }
    if rng.chance(1, 10) {
        let s = rng.next_u64();
        m.insert("seed".into(), json!(s));
        params.seed = Some(s);
    }
    // OpenAI's default is a whole answer.
    let stream = rng.chance(2, 3);
    if stream || rng.chance(1, 2) {
        m.insert("stream".into(), json!(stream));
    }
    if stream && rng.chance(1, 2) {
        m.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let body = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
    let auth = match ctx.api_key {
        Some(key) => format!("Authorization: Bearer {key}\r\n"),
        None => String::new(),
    };
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    ctx.reqs.push(ReqSpec { id: format!("http-pending-{n}"), stream, params });
    (req, Expect::Request(n))
}

/// The script of an HTTP client: keep-alive chat completions, streamed or not, one at a
/// time; sometimes `GET /health`, a client that goes away mid-answer, or a malformed head.
pub(crate) fn http_client_script(rng: &mut Rng, ctx: &mut Ctx<'_>) -> Vec<Action> {
    let mut s = Vec::new();
    for _ in 0..rng.range(1, 4) {
        let (bytes, expect) = match rng.below(10) {
            0 => {
                let auth = match ctx.api_key {
                    Some(key) => format!("Authorization: Bearer {key}\r\n"),
                    None => String::new(),
                };
                let get = format!("GET /health HTTP/1.1\r\nHost: sim\r\n{auth}\r\n");
                (get.into_bytes(), Expect::HttpOther)
            }
            _ => http_chat(rng, ctx),
        };
        let len = bytes.len();
        let (chunk_max, gap_ms) =
            if rng.chance(1, 4) { (rng.range_usize(1, 64), rng.below(5)) } else { (usize::MAX, 0) };
        s.push(Action::Write { bytes, marks: vec![(len, expect)], chunk_max, gap_ms });
        match rng.below(8) {
            // Goes away while the answer is queued, generating or streaming.
            0 => {
                s.push(Action::Sleep(rng.range(0, 300)));
                s.push(Action::HangUp);
                return s;
            }
            1 => s.push(Action::Stall(Some(rng.range(1, 400)))),
            _ => {}
        }
        s.push(Action::Await { patience_ms: patience(rng) });
    }
    if rng.chance(1, 6) {
        let bad: &[u8] = match rng.below(3) {
            0 => b"NOT HTTP AT ALL\r\n\r\n",
            1 => b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 12x\r\n\r\n",
            _ => b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n",
        };
        s.push(Action::Write {
            bytes: bad.to_vec(),
            marks: vec![(bad.len(), Expect::HttpMalformed)],
            chunk_max: usize::MAX,
            gap_ms: 0,
        });
        s.push(Action::Await { patience_ms: None });
    }
    ending(rng, &mut s);
    s
}

/// A client's whole script, and whether it comes over TCP.
pub(crate) fn client_script(rng: &mut Rng, ctx: &mut Ctx<'_>) -> (Vec<Action>, bool) {
    let mut s = Vec::new();
    let tcp = ctx.api_key.is_some() && rng.chance(1, 3);
    let mut auth_prefix: Option<(Vec<u8>, Option<Expect>)> = None;
    if tcp {
        let key = ctx.api_key.unwrap_or_default();
        auth_prefix = Some(match rng.below(5) {
            0 => (br#"{"type":"auth","key":"wrong"}"#.to_vec(), Some(Expect::AuthBad)),
            1 => (Vec::new(), Some(Expect::AuthBad)),
            _ => (format!(r#"{{"type":"auth","key":"{key}"}}"#).into_bytes(), None),
        });
    }
    if let Some((line, bad)) = auth_prefix {
        if let Some(bad) = bad {
            // Authentication fails: the daemon closes silently whatever follows.
            let mut w = WriteBuilder::new(ctx.cap);
            if line.is_empty() {
                let (req, _) = valid_request(rng, ctx);
                w.raw(&req);
            } else {
                w.raw(&line);
            }
            w.raw(b"\n");
            w.marks.push((w.bytes.len(), bad));
            if rng.chance(1, 2) {
                let l = valid_request(rng, ctx);
                w.raw(&l.0);
                w.raw(b"\n");
            }
            s.push(w.action(usize::MAX, 0));
            s.push(Action::Idle);
            return (s, true);
        }
        let mut w = WriteBuilder::new(ctx.cap);
        if rng.chance(1, 4) {
            // Blank lines before the key line are skipped, never taken for it.
            for _ in 0..rng.range(1, 3) {
                let blanks: [&[u8]; 3] = [b"\n", b" \r\n", b"\t\n"];
                let blank = rng.pick::<&[u8]>(&blanks);
                w.raw(blank);
            }
        }
        w.raw(&line);
        w.raw(b"\n");
        if rng.chance(1, 2) {
            // Pipelined right behind the auth line.
            let l = valid_request(rng, ctx);
            w.line(rng, l);
            s.push(w.action(usize::MAX, 0));
            s.push(Action::Await { patience_ms: None });
        } else {
            s.push(w.action(usize::MAX, 0));
        }
    }
    match rng.below(100) {
        // Well-behaved: one request at a time.
        0..=39 => {
            for _ in 0..rng.range(1, 4) {
                let l = valid_request(rng, ctx);
                s.push(one_line(rng, ctx.cap, l));
                s.push(Action::Await { patience_ms: patience(rng) });
                if rng.chance(1, 2) {
                    s.push(Action::Sleep(rng.below(300)));
                }
            }
            ending(rng, &mut s);
        }
        // Pipelining: several requests in one chunk.
        40..=49 => {
            let mut w = WriteBuilder::new(ctx.cap);
            for _ in 0..rng.range(2, 5) {
                let l = valid_request(rng, ctx);
                w.line(rng, l);
            }
            s.push(w.action(usize::MAX, 0));
            s.push(Action::Await { patience_ms: patience(rng) });
            ending(rng, &mut s);
        }
        // Half-close right after sending, then wait for the replies.
        50..=57 => {
            let mut w = WriteBuilder::new(ctx.cap);
            for _ in 0..rng.range(1, 3) {
                let l = valid_request(rng, ctx);
                w.line(rng, l);
            }
            s.push(w.action(usize::MAX, 0));
            s.push(Action::HalfClose);
            s.push(Action::Await { patience_ms: None });
            s.push(Action::Idle);
        }
        // Slow sender: tiny chunks with gaps, sometimes never finishing the line.
        58..=65 => {
            let l = valid_request(rng, ctx);
            let gap = rng.range(1, (ctx.read_timeout_ms / 100).max(5));
            if rng.chance(1, 3) {
                let cut = rng.range_usize(1, l.0.len().saturating_sub(1).max(1));
                let mut w = WriteBuilder::new(ctx.cap);
                w.raw(&l.0[..cut]);
                let over = cut > ctx.cap + 1 || (cut == ctx.cap + 1 && l.0[cut - 1] != b'\r');
                if over {
                    // Even unfinished, the line is already known to be over the cap.
                    w.mark(0, Expect::Oversize);
                }
                s.push(w.action(rng.range_usize(1, 8), gap));
                // The request never completes; the read timeout should close it.
                s.push(Action::Idle);
            } else {
                let mut w = WriteBuilder::new(ctx.cap);
                w.line(rng, l);
                s.push(w.action(rng.range_usize(1, 8), gap));
                s.push(Action::Await { patience_ms: None });
                ending(rng, &mut s);
            }
        }
        // Disconnects at a random point.
        66..=77 => {
            if rng.chance(1, 5) {
                s.push(Action::HangUp);
                return (s, tcp);
            }
            let l = valid_request(rng, ctx);
            s.push(one_line(rng, ctx.cap, l));
            s.push(Action::Sleep(rng.below(400)));
            s.push(Action::HangUp);
        }
        // Malformed and invalid lines mixed with valid ones.
        78..=87 => {
            let mut w = WriteBuilder::new(ctx.cap);
            for _ in 0..rng.range(1, 4) {
                let l = match rng.below(6) {
                    0 | 1 => invalid_request(rng, ctx),
                    2 => undecodable_line(rng, ctx),
                    3 => {
                        w.raw(blank(rng));
                        continue;
                    }
                    _ => valid_request(rng, ctx),
                };
                w.line(rng, l);
            }
            s.push(w.action(usize::MAX, 0));
            s.push(Action::Await { patience_ms: patience(rng) });
            ending(rng, &mut s);
        }
        // An oversize line, sent in pieces.
        88..=91 => {
            let mut w = WriteBuilder::new(ctx.cap);
            if rng.chance(1, 2) {
                let l = valid_request(rng, ctx);
                w.line(rng, l);
            }
            let big = rng.range_usize(ctx.cap + 1, ctx.cap * 2);
            let mut line = br#"{"id":"big","messages":[{"role":"user","content":""#.to_vec();
            while line.len() < big {
                line.push(b'a');
            }
            line.extend_from_slice(b"\"}]}");
            if rng.chance(1, 3) {
                // Never terminated: the cap must trip without an LF.
                let start = w.bytes.len();
                w.raw(&line);
                w.mark(start, Expect::Oversize);
            } else {
                w.line(rng, (line, Expect::Oversize));
            }
            s.push(w.action(rng.range_usize(256, 4096), rng.below(20)));
            s.push(Action::Await { patience_ms: None });
            ending(rng, &mut s);
        }
        // Slow reader: stalls for a while or forever, then behaves.
        _ => {
            let stall = if rng.chance(1, 3) { None } else { Some(rng.range(100, 20_000)) };
            s.push(Action::Stall(stall));
            for _ in 0..rng.range(1, 3) {
                let l = valid_request(rng, ctx);
                s.push(one_line(rng, ctx.cap, l));
                s.push(Action::Await { patience_ms: patience(rng) });
            }
            ending(rng, &mut s);
        }
    }
    (s, tcp)
}

/// One step of a simulated engine.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    Token(Vec<u8>),
    Done(Completion),
    Fail(EngineError),
    /// Never answers (until cancelled, and maybe not even then).
    Hang,
}

const PIECES: &[&str] =
    &["Hel", "lo", " ", "wörld", "🦀", "日本", "\"", "\\", "\n", "\t", "é", "ok", "\u{1}", "."];

/// A generation's behaviour: (delay before the step in ms, step).
pub(crate) fn engine_script(
    rng: &mut Rng,
    req: &GenerateRequest,
    backend_down: bool,
    gen_id: u64,
) -> VecDeque<(u64, Step)> {
    let mut text = Vec::new();
    let max_words = if rng.chance(1, 10) { 200 } else { 16 };
    let words = rng.below(max_words);
    for i in 0..words {
        if i == 1 && rng.chance(1, 4) {
            text.extend_from_slice(format!("GEN-OUTPUT-{gen_id}").as_bytes());
        }
        text.extend_from_slice(rng.pick(PIECES).as_bytes());
    }
    if rng.chance(1, 30) {
        // Bytes that never become valid UTF-8, or a truncated trailing character.
        let pos = rng.range_usize(0, text.len());
        text.insert(pos, 0xff);
        if rng.chance(1, 2) {
            text.extend_from_slice(&"🦀".as_bytes()[..2]);
        }
    }
    // Split the bytes anywhere (also inside a character).
    let mut tokens: Vec<Vec<u8>> = Vec::new();
    let mut rest = &text[..];
    while !rest.is_empty() {
        let n = rng.range_usize(1, 5).min(rest.len());
        tokens.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    if rng.chance(1, 20) {
        tokens.insert(rng.range_usize(0, tokens.len()), Vec::new());
    }
    let mut stop = StopReason::End;
    if tokens.len() > req.max_tokens as usize {
        tokens.truncate(req.max_tokens as usize);
        stop = StopReason::Length;
    }
    let slow = rng.chance(1, 10);
    let delay = |rng: &mut Rng| -> u64 {
        if slow {
            rng.range(100, 3000)
        } else if rng.chance(1, 3) {
            0
        } else {
            rng.range(1, 30)
        }
    };
    let usage = |n: usize, rng: &mut Rng| Usage {
        prompt_tokens: rng.range(1, 300) as u32,
        completion_tokens: n as u32,
    };
    let mut script = VecDeque::new();
    let behaviour = if backend_down { rng.below(4) } else { rng.range(4, 100) };
    match behaviour {
        // Failure before the stream (a down backend mostly does this).
        0..=2 | 4..=9 => {
            // A client error only the engine can see (bad grammar, prompt too long) must
            // never move the breaker, even on a down backend's half-open trial.
            let e = match rng.below(6) {
                0 => EngineError::internal("simulated internal error"),
                // One decode failing a whole batch: the generations started around the
                // same time share the incident, and the breaker counts it once.
                5 => EngineError::unavailable("simulated batch failure").in_incident(gen_id / 4),
                1 => EngineError::invalid_request("simulated invalid grammar"),
                // An upstream's 429 or 503 with `Retry-After`: counted, and the breaker
                // must stay open at least that long once it opens.
                2 => EngineError::unavailable("simulated upstream 429")
                    .with_retry_after(Duration::from_millis(rng.range(1, 120_000))),
                _ => EngineError::unavailable("simulated outage"),
            };
            script.push_back((delay(rng), Step::Fail(e)));
        }
        // Failure in the middle of the stream.
        10..=14 if tokens.len() > 1 => {
            let cut = rng.range_usize(1, tokens.len() - 1);
            for t in tokens.drain(..cut) {
                script.push_back((delay(rng), Step::Token(t)));
            }
            let e = if rng.chance(1, 2) {
                EngineError::internal("simulated crash mid-stream")
            } else {
                EngineError::unavailable("simulated disconnect mid-stream")
            };
            script.push_back((delay(rng), Step::Fail(e)));
        }
        // Hangs (maybe after a few tokens) until cancelled.
        15..=19 => {
            let keep = rng.range_usize(0, tokens.len().min(3));
            for t in tokens.drain(..keep) {
                script.push_back((delay(rng), Step::Token(t)));
            }
            script.push_back((0, Step::Hang));
        }
        _ => {
            let n = tokens.len();
            for t in tokens {
                script.push_back((delay(rng), Step::Token(t)));
            }
            let stop = if stop == StopReason::End && rng.chance(1, 10) {
                StopReason::Length
            } else {
                stop
            };
            script.push_back((delay(rng), Step::Done(Completion::new(usage(n, rng), stop))));
        }
    }
    script
}

/// What an engine does once its cancel flag is raised.
pub(crate) fn after_cancel(rng: &mut Rng, tokens_so_far: u32) -> VecDeque<(u64, Step)> {
    let mut s = VecDeque::new();
    match rng.below(20) {
        // Never reports back.
        0 | 1 => s.push_back((0, Step::Hang)),
        2 | 3 => s.push_back((rng.below(50), Step::Fail(EngineError::unavailable("aborted")))),
        _ => {
            for _ in 0..rng.below(3) {
                s.push_back((rng.below(5), Step::Token(b"late".to_vec())));
            }
            let usage = Usage { prompt_tokens: 7, completion_tokens: tokens_so_far };
            s.push_back((rng.below(60), Step::Done(Completion::new(usage, StopReason::Cancelled))));
        }
    }
    s
}
