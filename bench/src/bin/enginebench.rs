//! Engine benchmark: tokens/s of the llama.cpp engine served by the daemon against the
//! same model driven directly through the same bindings
//! (`inferd_engine_llama::raw_generate`), runs alternating in one process run.
//!
//! ```text
//! cargo build --release -p inferd --bin inferd -p inferd-bench
//! target/release/enginebench                                  # the committed tiny model
//! target/release/enginebench --model /work/gemma3-270m.gguf   # a real model
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use inferd_bench::{Client, Daemon, DaemonSpec, median, sibling_binary};
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
