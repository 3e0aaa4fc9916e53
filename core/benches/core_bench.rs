//! Microbenchmarks of the sans-IO core, std only (no harness):
//!
//! - `decode_request`: one small request line through `wire::decode_request`;
//! - `decode_large`: one request line with 64 KiB of mixed ASCII and multi-byte text
//!   (where a check of the whole line's UTF-8 would show), and beside it the cost of
//!   that check alone (`std::str::from_utf8` over the line) as a share of the decode;
//! - `redact_hostile`: `redact::redact` on texts built to make a scanner go quadratic
//!   (runs of key prefixes, `eyJ=` chains, PEM headers, URL starts), as ns per byte
//!   against plain text of the same size, at 64 KiB and at 512 KiB: a linear pass keeps
//!   both ratios alike (a quadratic one would grow eightfold);
//! - `small_request`: one whole one-token request through the `Daemon` on a connection
//!   accepted once (`Received` → outputs → one `Token` → `Done` → outputs → `Flushed`);
//! - `stream_token`: 10,000 tokens of about 4 bytes streamed to one connection, flushed
//!   every 16 tokens the way a shell's writer would.
//!
//! Each benchmark runs several timed rounds and prints the median (and the spread).
//! Run with `cargo bench -p inferd-core --bench core_bench`; pass `--quick` for fewer rounds.
// Measuring wall time is what a benchmark is for; the core's clippy.toml forbids clocks.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use inferd_core::engine::{Capabilities, Completion, EngineEvent};
use inferd_core::redact::redact;
use inferd_core::wire::{self, StopReason, Usage};
use inferd_core::{
    BackendId, ConnId, Daemon, DaemonConfig, GenId, Input, ListenerKind, Output, Peer, Time,
    Transport,
};

const LINE: &[u8] =
    br#"{"id":"r1","messages":[{"role":"user","content":"hello there"}],"max_tokens":16}"#;
const STREAM_TOKENS: usize = 10_000;
const FLUSH_EVERY: usize = 16;
const TARGET_TOKEN_NS: f64 = 300.0;
const TARGET_REQUEST_NS: f64 = 5_000.0;

/// A fake monotonic clock advancing 1 µs per step, so timestamps vary as in a real run.
struct Clock(u64);

impl Clock {
    fn tick(&mut self) -> Time {
        self.0 += 1_000;
        Time::from_nanos(self.0)
    }
}

/// What a shell would do with the outputs, reduced to bookkeeping.
#[derive(Default)]
struct Sink {
    sends: usize,
    bytes: usize,
    started: Option<GenId>,
}

impl Sink {
    fn drain(&mut self, d: &mut Daemon) {
        while let Some(o) = d.poll_output() {
            match o {
                Output::Send { bytes, .. } => {
                    self.sends += 1;
                    self.bytes += black_box(bytes).len();
                }
                Output::Start { generation, request, .. } => {
                    black_box(request);
                    self.started = Some(generation);
                }
                Output::Activity(line) => {
                    black_box(line);
                }
                Output::Exit { reason } => panic!("daemon exited: {reason}"),
                other => {
                    black_box(other);
                }
            }
        }
    }
}

fn ready_daemon(clock: &mut Clock) -> (Daemon, Sink, ConnId) {
    let cfg = DaemonConfig { backends: vec!["mock".into()], ..DaemonConfig::default() };
    let mut d = Daemon::new(cfg, clock.tick(), 1_795_781_093_000);
    let mut sink = Sink::default();
    d.handle(
        clock.tick(),
        Input::BackendLoaded { backend: BackendId(0), capabilities: Capabilities::text_cpu() },
    );
    sink.drain(&mut d);
    assert!(d.is_ready(), "daemon not ready after BackendLoaded");
    let conn = ConnId(1);
    let peer =
        Peer { transport: Transport::Unix, addr: "unix".into(), uid: Some(1000), pid: Some(4242) };
    d.handle(clock.tick(), Input::Accepted { conn, listener: ListenerKind::Inference, peer });
    sink.drain(&mut d);
    (d, sink, conn)
}

fn done(tokens: u32) -> EngineEvent {
    EngineEvent::Done(Completion::new(
        Usage { prompt_tokens: 5, completion_tokens: tokens },
        StopReason::End,
    ))
}

/// Starts one request on `conn`; returns its generation.
fn start_request(d: &mut Daemon, sink: &mut Sink, clock: &mut Clock, conn: ConnId) -> GenId {
    sink.started = None;
    let mut line = LINE.to_vec();
    line.push(b'\n');
    d.handle(clock.tick(), Input::Received { conn, bytes: line.clone() });
    sink.drain(d);
    sink.started.take().expect("the request started")
}

/// ns per decoded request line, over `iters` lines.
fn bench_decode(iters: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        let r = wire::decode_request(black_box(LINE));
        black_box(r.expect("line decodes"));
    }
    start.elapsed().as_nanos() as f64 / f64::from(iters)
}

/// A request whose content is about 64 KiB of text, a quarter of it multi-byte.
fn large_line() -> Vec<u8> {
    let content = "plain ascii words and some accents é à ü, a crab 🦀 ".repeat(1200);
    let req = serde_json::json!({
        "id": "big",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
    });
    serde_json::to_vec(&req).expect("a JSON value encodes")
}

/// ns per decoded large request line, over `iters` lines.
fn bench_decode_large(line: &[u8], iters: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        let r = wire::decode_request(black_box(line));
        black_box(r.expect("line decodes"));
    }
    start.elapsed().as_nanos() as f64 / f64::from(iters)
}

/// Texts built to defeat a redaction scanner, by name.
const HOSTILE: [(&str, &str); 8] = [
    ("sk- prefixes", "sk-"),
    ("glued sk-", "xsk-"),
    ("short sk- keys", " sk-abc1"),
    ("eyJ= chains", "eyJ="),
    ("PEM headers", "-----BEGIN "),
    ("URL starts", "a://b:c"),
    ("key separators", "password :"),
    ("bearer words", "bearer "),
];

/// ns per byte of `redact` over `text`, best of a few passes.
fn redact_ns_per_byte(text: &str) -> f64 {
    let passes = (4 << 20) / text.len().max(1) + 1;
    let start = Instant::now();
    for _ in 0..passes {
        black_box(redact(black_box(text)));
    }
    start.elapsed().as_nanos() as f64 / (passes * text.len()) as f64
}

/// `redact_hostile`: per pattern, the ns per byte relative to plain text, at two sizes.
fn bench_redact_hostile(n_rounds: usize) {
    let sizes = [64 << 10, 512 << 10];
    let fill = |unit: &str, n: usize| unit.repeat(n / unit.len() + 1)[..n].to_owned();
    let plain: Vec<String> = sizes.iter().map(|&n| fill("plain text: words. ", n)).collect();
    println!("redact_hostile  ns/byte over plain text of the same size, at 64 KiB and 512 KiB");
    for (name, unit) in HOSTILE {
        let mut ratios = Vec::new();
        for (k, &n) in sizes.iter().enumerate() {
            let text = fill(unit, n);
            let s = rounds(n_rounds, || redact_ns_per_byte(&text) / redact_ns_per_byte(&plain[k]));
            ratios.push(s.median);
        }
        println!(
            "                {name:<15} {:>6.2}x  {:>6.2}x  (growth {:.2}; 8 would be quadratic)",
            ratios[0],
            ratios[1],
            ratios[1] / ratios[0]
        );
    }
}

/// ns of core time per whole one-token request, over `iters` requests.
fn bench_small_request(iters: u32) -> f64 {
    let mut clock = Clock(0);
    let (mut d, mut sink, conn) = ready_daemon(&mut clock);
    let mut line = LINE.to_vec();
    line.push(b'\n');
    let start = Instant::now();
    for _ in 0..iters {
        d.handle(clock.tick(), Input::Received { conn, bytes: line.clone() });
        sink.drain(&mut d);
        let generation = sink.started.take().expect("the request started");
        let event = EngineEvent::Token(b"hello".to_vec());
        d.handle(clock.tick(), Input::Engine { generation, event });
        d.handle(clock.tick(), Input::Engine { generation, event: done(1) });
        sink.drain(&mut d);
        d.handle(clock.tick(), Input::Flushed { conn });
        sink.drain(&mut d);
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(iters);
    assert_eq!(d.stats().served, u64::from(iters), "every request served");
    assert_eq!(sink.sends, iters as usize, "one write per request");
    ns
}

/// ns of core time per streamed token, for one request of `STREAM_TOKENS` tokens.
fn bench_stream(tokens: &[&[u8]]) -> (f64, usize) {
    let mut clock = Clock(0);
    let (mut d, mut sink, conn) = ready_daemon(&mut clock);
    let generation = start_request(&mut d, &mut sink, &mut clock, conn);
    sink.sends = 0;
    let mut in_flight = false;
    let start = Instant::now();
    for (i, t) in tokens.iter().enumerate() {
        let event = EngineEvent::Token(t.to_vec());
        d.handle(clock.tick(), Input::Engine { generation, event });
        if (i + 1) % FLUSH_EVERY == 0 && in_flight {
            d.handle(clock.tick(), Input::Flushed { conn });
            in_flight = false;
        }
        let before = sink.sends;
        sink.drain(&mut d);
        in_flight |= sink.sends > before;
    }
    d.handle(clock.tick(), Input::Engine { generation, event: done(tokens.len() as u32) });
    if in_flight {
        d.handle(clock.tick(), Input::Flushed { conn });
    }
    sink.drain(&mut d);
    d.handle(clock.tick(), Input::Flushed { conn });
    sink.drain(&mut d);
    let ns = start.elapsed().as_nanos() as f64 / tokens.len() as f64;
    assert_eq!(d.stats().served, 1);
    (ns, sink.sends)
}

struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

fn rounds(n: usize, mut f: impl FnMut() -> f64) -> Summary {
    let mut v: Vec<f64> = (0..n).map(|_| f()).collect();
    v.sort_by(f64::total_cmp);
    Summary { median: v[v.len() / 2], min: v[0], max: v[v.len() - 1] }
}

fn report(name: &str, unit: &str, s: &Summary, target: Option<f64>) {
    let verdict = match target {
        Some(t) if s.median < t => format!("target < {t:.0} ns: met"),
        Some(t) => format!("target < {t:.0} ns: MISSED"),
        None => String::new(),
    };
    println!(
        "{name:<15} median {:>9.1} ns/{unit:<8} (min {:>9.1}, max {:>9.1})  {verdict}",
        s.median, s.min, s.max
    );
}

fn main() {
    // `cargo bench` passes `--bench`; ignore whatever we do not know.
    let quick = std::env::args().any(|a| a == "--quick");
    let (n_rounds, decode_iters, request_iters) =
        if quick { (3, 20_000, 5_000) } else { (9, 200_000, 50_000) };
    println!("inferd-core microbenchmarks: {n_rounds} rounds each, median (min, max)");

    // Warm-up so the first round does not pay for page faults and cold caches.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(200) {
        black_box(bench_decode(1_000));
        black_box(bench_small_request(500));
    }

    let s = rounds(n_rounds, || bench_decode(decode_iters));
    report("decode_request", "request", &s, None);

    let large = large_line();
    let s = rounds(n_rounds, || bench_decode_large(&large, decode_iters / 100));
    report("decode_large", "request", &s, None);
    let decode_ns = s.median;
    let s = rounds(n_rounds, || {
        let iters = decode_iters / 10;
        let start = Instant::now();
        for _ in 0..iters {
            black_box(std::str::from_utf8(black_box(&large)).is_ok());
        }
        start.elapsed().as_nanos() as f64 / f64::from(iters)
    });
    report("utf8_check", "request", &s, None);
    println!(
        "                ({} bytes a line; the UTF-8 check is {:.1}% of decode_large)",
        large.len(),
        100.0 * s.median / decode_ns
    );

    bench_redact_hostile(n_rounds.min(5));

    let s = rounds(n_rounds, || bench_small_request(request_iters));
    report("small_request", "request", &s, Some(TARGET_REQUEST_NS));

    let words: [&[u8]; 4] = [b" the", b" fox", b" dog", b" sun"];
    let tokens: Vec<&[u8]> = (0..STREAM_TOKENS).map(|i| words[i % words.len()]).collect();
    let mut sends = 0;
    let s = rounds(n_rounds, || {
        let (ns, n) = bench_stream(&tokens);
        sends = n;
        ns
    });
    report("stream_token", "token", &s, Some(TARGET_TOKEN_NS));
    println!(
        "                ({STREAM_TOKENS} tokens of 4 bytes, a flush every {FLUSH_EVERY} tokens: {sends} writes)"
    );
}
