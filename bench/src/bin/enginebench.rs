//! Engine benchmark: tokens/s of the llama.cpp engine served by the daemon against the
//! same model driven directly through the same bindings
//! (`inferd_engine_llama::raw_generate`), runs alternating in one process run.
//!
//! ```text
//! cargo build --release -p inferd --bin inferd -p inferd-bench
//! target/release/enginebench                                  # the committed tiny model
//! target/release/enginebench --model /work/gemma3-270m.gguf   # a real model
//! target/release/enginebench --model /work/gemma3-270m.gguf --threads 2 \
//!     --llama-server /opt/llama/llama-server                  # and against llama-server -np N
//! ```
//!
//! With `--llama-server`, the same run then compares the daemon (`--n-parallel N`) with
//! llama.cpp's own server (`-np N`, same model and threads, started by the bench with
//! `LD_LIBRARY_PATH` set to its directory): aggregate completion tokens/s and mean time
//! to first token with 1, 4 and 8 concurrent clients (greedy, distinct prompts), and the
//! time to first token of each turn of a chat whose history is resent every turn. Both
//! get the same plain-text prompt (llama-server's `/completion`, the daemon's fallback
//! for models without a template it knows) and cache prompts.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use inferd_bench::{Client, Daemon, DaemonSpec, FrameKind, frame_kind, median, sibling_binary};
use inferd_core::wire::{Frame, Message, Role};
use inferd_engine_llama::{LlamaConfig, raw_generate};

#[derive(Parser, Debug)]
#[command(name = "enginebench", about = "llama.cpp tokens/s through the daemon vs raw")]
struct Args {
    /// The GGUF model [default: the committed tests/fixtures/tiny-scripted.gguf].
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// The user message [default: one ending in "again" for the tiny model, a story
    /// request for any other].
    #[arg(long)]
    prompt: Option<String>,
    /// Most tokens per generation [default: 2000 for the tiny model, else 256].
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Context length.
    #[arg(long, default_value_t = 4096)]
    n_ctx: u32,
    /// Decoding threads, for both sides.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Timed runs of each side (after one untimed warm-up each).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The daemon binary [default: `inferd` next to this binary].
    #[arg(long, value_name = "PATH")]
    daemon_bin: Option<PathBuf>,
    /// The subcommand before the serve flags; "" for none.
    #[arg(long, default_value = "serve")]
    subcommand: String,
    /// llama.cpp's `llama-server` binary: also compare against it (see the module doc).
    #[arg(long, value_name = "PATH")]
    llama_server: Option<PathBuf>,
    /// Parallel sequences of both servers in the comparison.
    #[arg(long, default_value_t = 4)]
    parallel: u32,
    /// Client counts of the comparison.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    clients: Vec<usize>,
    /// Tokens per request in the comparison.
    #[arg(long, default_value_t = 96)]
    compare_tokens: u32,
    /// Turns of the comparison's chat.
    #[arg(long, default_value_t = 6)]
    turns: usize,
    /// Skip the raw comparison (only run the llama-server one).
    #[arg(long)]
    skip_raw: bool,
}

struct Run {
    tokens: u32,
    secs: f64,
}

impl Run {
    fn tps(&self) -> f64 {
        f64::from(self.tokens) / self.secs
    }
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("enginebench: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    if !args.skip_raw {
        against_raw(&args)?;
    }
    if let Some(server) = &args.llama_server {
        against_llama_server(&args, server)?;
    }
    Ok(())
}

fn against_raw(args: &Args) -> Result<(), String> {
    let tiny =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-scripted.gguf");
    let model = args.model.clone().unwrap_or(tiny);
    let is_tiny = model.file_name().is_some_and(|n| n == "tiny-scripted.gguf");
    let prompt = args.prompt.clone().unwrap_or_else(|| {
        if is_tiny {
            "Say it again and again".into()
        } else {
            "Write a long story about a dragon.".into()
        }
    });
    let max_tokens = args.max_tokens.unwrap_or(if is_tiny { 2000 } else { 256 });
    let model = model.canonicalize().map_err(|e| format!("{}: {e}", model.display()))?;
    let bin = args.daemon_bin.clone().unwrap_or_else(|| sibling_binary("inferd"));
    println!(
        "enginebench: {} | prompt {prompt:?} | max_tokens {max_tokens} | n_ctx {} | threads {} | {} runs each, alternating",
        model.display(),
        args.n_ctx,
        args.threads,
        args.runs
    );

    let mut config = LlamaConfig::new(&model);
    config.n_ctx = args.n_ctx;
    config.n_threads = args.threads;
    let messages = vec![Message { role: Role::User, content: prompt.clone() }];

    let spec = DaemonSpec {
        bin: bin.clone(),
        subcommand: (!args.subcommand.is_empty()).then(|| args.subcommand.clone()),
        args: vec![
            "--backend".into(),
            "llamacpp".into(),
            "--model-path".into(),
            model.display().to_string(),
            "--n-threads".into(),
            args.threads.to_string(),
            "--n-ctx".into(),
            args.n_ctx.to_string(),
        ],
        ready_timeout: Duration::from_secs(300),
    };
    let started = Instant::now();
    let daemon = Daemon::start(&spec, "inferd")?;
    println!("daemon {} serving after {:.2} s", bin.display(), started.elapsed().as_secs_f64());
    let mut client = Client::connect(&daemon.socket).map_err(|e| e.to_string())?;
    let request = {
        let v = serde_json::json!({
            "id": "bench",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": true,
        });
        let mut line = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
        line.push(b'\n');
        line
    };

    let raw_run = || -> Result<Run, String> {
        let out =
            raw_generate(&config, &messages, max_tokens, 0.0, None).map_err(|e| e.to_string())?;
        Ok(Run { tokens: out.n_tokens, secs: out.generate_time.as_secs_f64() })
    };
    let mut daemon_run = || -> Result<(Run, u64), String> {
        let start = Instant::now();
        let x = client.exchange(&request).map_err(|e| e.to_string())?;
        if !x.ok {
            return Err(format!("daemon failed: {}", String::from_utf8_lossy(client.last_line())));
        }
        let secs = start.elapsed().as_secs_f64();
        match Frame::parse(client.last_line()).map_err(|e| e.to_string())? {
            Frame::Done { usage, timings, .. } => {
                let total_ms = timings.map_or(0, |t| t.total_ms);
                Ok((Run { tokens: usage.completion_tokens, secs }, total_ms))
            }
            other => Err(format!("daemon answered {other:?}")),
        }
    };

    // One untimed warm-up of each side.
    let w = raw_run()?;
    let (dw, _) = daemon_run()?;
    if w.tokens != dw.tokens {
        println!("note: raw made {} tokens, the daemon {}", w.tokens, dw.tokens);
    }

    let (mut raw, mut served, mut server_ms) = (Vec::new(), Vec::new(), Vec::new());
    println!("  run  raw tok/s  daemon tok/s  ratio   (tokens raw/daemon, daemon's own total_ms)");
    for i in 0..args.runs {
        let r = raw_run()?;
        let (d, total_ms) = daemon_run()?;
        println!(
            "  {:>3}  {:>9.1}  {:>12.1}  {:>5.3}   ({}/{}, {} ms vs client {:.0} ms)",
            i + 1,
            r.tps(),
            d.tps(),
            d.tps() / r.tps(),
            r.tokens,
            d.tokens,
            total_ms,
            d.secs * 1000.0
        );
        raw.push(r.tps());
        served.push(d.tps());
        server_ms.push(total_ms as f64);
    }
    drop(client);
    drop(daemon);
    let (mr, md) = (median(&raw), median(&served));
    let ratio = md / mr;
    println!(
        "median: raw {mr:.1} tok/s, daemon {md:.1} tok/s, daemon/raw {ratio:.3} (target >= 0.98: {})",
        if ratio >= 0.98 { "met" } else { "MISSED" }
    );
    let pairwise: Vec<f64> = raw.iter().zip(&served).map(|(r, d)| d / r).collect();
    let best = |v: &[f64]| v.iter().copied().fold(f64::MIN, f64::max);
    println!(
        "median of per-pair ratios: {:.3}; best run: raw {:.1}, daemon {:.1} tok/s, ratio {:.3}",
        median(&pairwise),
        best(&raw),
        best(&served),
        best(&served) / best(&raw)
    );
    Ok(())
}

/// What one streamed request measured.
#[derive(Clone, Debug)]
struct Timed {
    /// To the first token's bytes.
    ttft: Duration,
    /// Completion tokens.
    tokens: u32,
    /// The generated text.
    text: String,
}

/// A server under comparison.
#[derive(Clone)]
enum Target {
    Inferd(PathBuf),
    LlamaServer(u16),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Inferd(_) => "inferd",
            Target::LlamaServer(_) => "llama-server",
        }
    }

    /// One greedy, streamed generation of at most `max_tokens` for `prompt`.
    fn generate(&self, prompt: &str, max_tokens: u32) -> Result<Timed, String> {
        match self {
            Target::Inferd(socket) => inferd_generate(socket, prompt, max_tokens),
            Target::LlamaServer(port) => server_generate(*port, prompt, max_tokens),
        }
    }
}

fn inferd_generate(socket: &Path, prompt: &str, max_tokens: u32) -> Result<Timed, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    let v = serde_json::json!({
        "id": "cmp",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
    });
    let mut line = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
    line.push(b'\n');
    let start = Instant::now();
    stream.write_all(&line).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let (mut ttft, mut text) = (None, String::new());
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(|e| e.to_string())? == 0 {
            return Err("inferd closed the connection".into());
        }
        match frame_kind(&buf) {
            FrameKind::Token => {
                ttft.get_or_insert_with(|| start.elapsed());
                if let Ok(Frame::Token { content, .. }) = Frame::parse(&buf) {
                    text.push_str(&content);
                }
            }
            FrameKind::Done => {
                let tokens = match Frame::parse(&buf).map_err(|e| e.to_string())? {
                    Frame::Done { usage, .. } => usage.completion_tokens,
                    _ => 0,
                };
                let ttft = ttft.unwrap_or_else(|| start.elapsed());
                return Ok(Timed { ttft, tokens, text });
            }
            FrameKind::Error => return Err(String::from_utf8_lossy(&buf).into_owned()),
            FrameKind::Other => {}
        }
    }
}

fn server_generate(port: u16, prompt: &str, max_tokens: u32) -> Result<Timed, String> {
    let body = serde_json::json!({
        "prompt": prompt,
        "n_predict": max_tokens,
        "temperature": 0,
        "stream": true,
        "cache_prompt": true,
    })
    .to_string();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let request = format!(
        "POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let start = Instant::now();
    stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let (mut ttft, mut text, mut tokens) = (None, String::new(), 0u32);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("llama-server closed the connection before the end".into());
        }
        // Server-sent events; the chunked encoding's size lines are skipped.
        let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else { continue };
        if let Some(content) = v["content"].as_str().filter(|c| !c.is_empty()) {
            ttft.get_or_insert_with(|| start.elapsed());
            text.push_str(content);
            tokens += 1;
        }
        if v["stop"].as_bool() == Some(true) {
            let tokens = v["tokens_predicted"].as_u64().map_or(tokens, |n| n as u32);
            let ttft = ttft.unwrap_or_else(|| start.elapsed());
            return Ok(Timed { ttft, tokens, text });
        }
    }
}

/// `llama-server`, killed on drop.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_llama_server(
    bin: &Path,
    model: &Path,
    args: &Args,
    port: u16,
) -> Result<ServerProcess, String> {
    let dir = bin.parent().unwrap_or(Path::new("."));
    let log = std::env::temp_dir().join(format!("enginebench-llama-server-{port}.log"));
    let log = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(bin)
        .env("LD_LIBRARY_PATH", dir)
        .args(["-m", &model.display().to_string()])
        .args(["-t", &args.threads.to_string(), "-tb", &args.threads.to_string()])
        .args(["-np", &args.parallel.to_string()])
        .args(["-c", &(args.n_ctx * args.parallel).to_string()])
        .args(["--port", &port.to_string(), "--host", "127.0.0.1", "--no-webui"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let server = ServerProcess(child);
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let healthy = TcpStream::connect(("127.0.0.1", port)).ok().and_then(|mut s| {
            s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut status = String::new();
            BufReader::new(s).read_line(&mut status).ok()?;
            Some(status.contains(" 200 "))
        });
        if healthy == Some(true) {
            return Ok(server);
        }
        // A benchmark binary, not a test: polling for readiness is fine here.
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("llama-server did not become healthy within 300 s".into())
}

/// Aggregate tokens/s and mean time to first token of `clients` concurrent requests.
fn concurrent(target: &Target, clients: usize, max_tokens: u32) -> Result<(f64, f64), String> {
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let target = target.clone();
            let prompt = format!("Write a long story about a dragon called number {i}.");
            std::thread::spawn(move || target.generate(&prompt, max_tokens))
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.join().map_err(|_| "client thread panicked".to_string())??);
    }
    let wall = start.elapsed().as_secs_f64();
    let tokens: u32 = results.iter().map(|r| r.tokens).sum();
    let ttft = results.iter().map(|r| r.ttft.as_secs_f64() * 1000.0).sum::<f64>()
        / results.len().max(1) as f64;
    Ok((f64::from(tokens) / wall, ttft))
}

/// Time to first token (ms) of each turn of a chat whose history is resent every turn.
fn chat(target: &Target, turns: usize, max_tokens: u32) -> Result<Vec<f64>, String> {
    let mut history = vec!["Tell me about the history of Rome.".to_string()];
    let mut ttfts = Vec::new();
    for turn in 0..turns {
        let prompt = history.join("\n");
        let t = target.generate(&prompt, max_tokens)?;
        ttfts.push(t.ttft.as_secs_f64() * 1000.0);
        history.push(t.text);
        history.push(format!(
            "Interesting. Now tell me more about part {} of that, please.",
            turn + 1
        ));
    }
    Ok(ttfts)
}

fn against_llama_server(args: &Args, server_bin: &Path) -> Result<(), String> {
    let tiny =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-scripted.gguf");
    let model = args.model.clone().unwrap_or(tiny);
    let model = model.canonicalize().map_err(|e| format!("{}: {e}", model.display()))?;
    let bin = args.daemon_bin.clone().unwrap_or_else(|| sibling_binary("inferd"));
    println!(
        "\ncomparison: {} | n_parallel / -np {} | threads {} | n_ctx per sequence {} | {} tokens per request",
        model.display(),
        args.parallel,
        args.threads,
        args.n_ctx,
        args.compare_tokens
    );
    let spec = DaemonSpec {
        bin,
        subcommand: (!args.subcommand.is_empty()).then(|| args.subcommand.clone()),
        args: vec![
            "--backend".into(),
            "llamacpp".into(),
            "--model-path".into(),
            model.display().to_string(),
            "--n-threads".into(),
            args.threads.to_string(),
            "--n-ctx".into(),
            args.n_ctx.to_string(),
            "--n-parallel".into(),
            args.parallel.to_string(),
        ],
        ready_timeout: Duration::from_secs(300),
    };
    let daemon = Daemon::start(&spec, "inferd")?;
    let port = 18_000 + (std::process::id() % 1000) as u16;
    let server = start_llama_server(server_bin, &model, args, port)?;
    let targets = [Target::Inferd(daemon.socket.clone()), Target::LlamaServer(port)];
    // Warm both up.
    for t in &targets {
        t.generate("Hello.", 8)?;
    }
    let mut rows: Vec<(String, f64, f64, bool)> = Vec::new();
    for &clients in &args.clients {
        let mut tps = [0.0; 2];
        let mut ttft = [0.0; 2];
        for (i, t) in targets.iter().enumerate() {
            let (a, b) = concurrent(t, clients, args.compare_tokens)?;
            println!("  {:<12} {clients} clients: {a:>7.1} tok/s, mean ttft {b:>7.0} ms", t.name());
            tps[i] = a;
            ttft[i] = b;
        }
        rows.push((format!("{clients} clients, aggregate tokens/s"), tps[0], tps[1], true));
        rows.push((
            format!("{clients} clients, mean time to first token (ms)"),
            ttft[0],
            ttft[1],
            false,
        ));
    }
    let mut chats = Vec::new();
    for t in &targets {
        let c = chat(t, args.turns, args.compare_tokens)?;
        println!(
            "  {:<12} chat ttft per turn (ms): {:?}",
            t.name(),
            c.iter().map(|x| x.round()).collect::<Vec<_>>()
        );
        chats.push(c);
    }
    for (turn, (a, b)) in chats[0].iter().zip(&chats[1]).enumerate() {
        rows.push((format!("chat turn {}, time to first token (ms)", turn + 1), *a, *b, false));
    }
    drop(server);
    drop(daemon);
    println!("\n| | inferd | llama-server | inferd / llama-server |");
    println!("|---|---|---|---|");
    for (name, a, b, higher_better) in rows {
        let ratio = a / b;
        println!(
            "| {name} | {a:.1} | {b:.1} | {ratio:.2}{} |",
            if higher_better { "" } else { " (lower is better)" }
        );
    }
    Ok(())
}
