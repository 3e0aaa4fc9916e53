//! Relay benchmark: what the `openai-compat` backend costs. Daemon A serves a llama
//! model with its HTTP API; daemon B has one backend, `openai-compat` pointing at A.
//! The same streamed greedy request goes over the Unix socket to A directly and to B
//! (which relays it to A over HTTP), alternating, in one run. Reported: tokens/s and
//! time to first token of each, and their ratios (target: B/A >= 0.95 tokens/s, TTFT
//! at most 2 ms more).
//!
//! ```text
//! cargo build --release -p inferd --bin inferd -p inferd-bench
//! target/release/relaybench                                # the committed tiny model
//! target/release/relaybench --model /tmp/gemma3-270m.gguf --max-tokens 128 --threads 2
//! ```

use std::fs;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use inferd_bench::{Client, Daemon, DaemonSpec, TempDir, median, sibling_binary};
use inferd_core::wire::Frame;

#[derive(Parser, Debug)]
#[command(name = "relaybench", about = "openai-compat relay overhead: B -> A against A")]
struct Args {
    /// The GGUF model [default: the committed tests/fixtures/tiny-scripted.gguf].
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// The user message [default: one ending in "again" for the tiny model, a story
    /// request for any other].
    #[arg(long)]
    prompt: Option<String>,
    /// Most tokens per generation [default: 1000 for the tiny model, else 128].
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Decoding threads of daemon A.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Timed runs of each path (after one untimed warm-up each).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// The daemon binary [default: `inferd` next to this binary].
    #[arg(long, value_name = "PATH")]
    daemon_bin: Option<PathBuf>,
}

/// Daemon B, started with its own config file (the backend list), stopped on drop.
struct Relay {
    child: Child,
    socket: PathBuf,
    dir: TempDir,
}

impl Relay {
    fn start(bin: &Path, base_url: &str) -> Result<Relay, String> {
        let dir = TempDir::new("relay").map_err(|e| format!("temp dir: {e}"))?;
        let config = dir.path().join("config.json");
        let text = serde_json::json!({"backends": [{
            "kind": "openai-compat", "name": "upstream", "base_url": base_url,
            "model": "bench", "timeout_secs": 60, "max_concurrency": 1,
        }]});
        fs::write(&config, text.to_string()).map_err(|e| e.to_string())?;
        let stderr = fs::File::create(dir.path().join("stderr.log")).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--runtime-dir")
            .arg(dir.path())
            .arg("--log-dir")
            .arg(dir.path().join("logs"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut relay = Relay { child, socket: dir.path().join("infer.sock"), dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&relay.socket).is_err() {
            if let Ok(Some(status)) = relay.child.try_wait() {
                let log =
                    fs::read_to_string(relay.dir.path().join("stderr.log")).unwrap_or_default();
                return Err(format!("relay daemon exited ({status}):\n{log}"));
            }
            if Instant::now() > deadline {
                return Err("relay daemon not serving after 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(relay)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Sample {
    tps: f64,
    ttft_ms: f64,
    tokens: u32,
}

fn measure(client: &mut Client, request: &[u8]) -> Result<Sample, String> {
    let x = client.exchange(request).map_err(|e| e.to_string())?;
    if !x.ok {
        return Err(format!("request failed: {}", String::from_utf8_lossy(client.last_line())));
    }
    // The done frame's count, not the token frames: an upstream may put several tokens
    // in one event when its client falls behind.
    let tokens = match Frame::parse(client.last_line()).map_err(|e| e.to_string())? {
        Frame::Done { usage, .. } => usage.completion_tokens,
        other => return Err(format!("expected done, got {other:?}")),
    };
    Ok(Sample {
        tps: f64::from(tokens) / x.terminal.as_secs_f64(),
        ttft_ms: x.first.as_secs_f64() * 1000.0,
        tokens,
    })
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("relaybench: {e}");
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
    let max_tokens = args.max_tokens.unwrap_or(if is_tiny { 1000 } else { 128 });
    let model = model.canonicalize().map_err(|e| format!("{}: {e}", model.display()))?;
    let bin = args.daemon_bin.clone().unwrap_or_else(|| sibling_binary("inferd"));
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let addr = format!("127.0.0.1:{port}");
    println!(
        "relaybench: {} | prompt {prompt:?} | max_tokens {max_tokens} | threads {} | {} runs each, alternating",
        model.display(),
        args.threads,
        args.runs
    );
    let spec = DaemonSpec {
        bin: bin.clone(),
        subcommand: Some("serve".into()),
        args: vec![
            "--backend".into(),
            "llamacpp".into(),
            "--model-path".into(),
            model.display().to_string(),
            "--n-threads".into(),
            args.threads.to_string(),
            "--n-parallel".into(),
            "1".into(),
            "--http".into(),
            addr.clone(),
        ],
        ready_timeout: Duration::from_secs(300),
    };
    let a = Daemon::start(&spec, "A")?;
    let b = Relay::start(&bin, &format!("http://{addr}"))?;
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
    let mut direct = Client::connect(&a.socket).map_err(|e| e.to_string())?;
    let mut relayed = Client::connect(&b.socket).map_err(|e| e.to_string())?;
    // Warm-ups: model pages, B's connection to A (kept alive afterwards).
    let wa = measure(&mut direct, &request)?;
    let wb = measure(&mut relayed, &request)?;
    if wa.tokens != wb.tokens {
        println!("note: A generated {} tokens, B {}", wa.tokens, wb.tokens);
    }
    println!("  run  A tok/s  B tok/s  ratio   A ttft ms  B ttft ms  +ms");
    let (mut ta, mut tb, mut fa, mut fb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.runs {
        // Alternate which goes first, so drift on the shared machine hits both.
        let (x, y) = if i % 2 == 0 {
            let x = measure(&mut direct, &request)?;
            (x, measure(&mut relayed, &request)?)
        } else {
            let y = measure(&mut relayed, &request)?;
            (measure(&mut direct, &request)?, y)
        };
        println!(
            "  {:>3}  {:>7.1}  {:>7.1}  {:>5.3}   {:>9.2}  {:>9.2}  {:>+5.2}",
            i + 1,
            x.tps,
            y.tps,
            y.tps / x.tps,
            x.ttft_ms,
            y.ttft_ms,
            y.ttft_ms - x.ttft_ms
        );
        ta.push(x.tps);
        tb.push(y.tps);
        fa.push(x.ttft_ms);
        fb.push(y.ttft_ms);
    }
    let ratio = median(&tb) / median(&ta);
    let extra = median(&fb) - median(&fa);
    println!(
        "median: A {:.1} tok/s, B {:.1} tok/s, B/A {ratio:.3} (target >= 0.95: {}); TTFT A {:.2} ms, B {:.2} ms, +{extra:.2} ms (target <= +2 ms: {})",
        median(&ta),
        median(&tb),
        if ratio >= 0.95 { "met" } else { "MISSED" },
        median(&fa),
        median(&fb),
        if extra <= 2.0 { "met" } else { "MISSED" }
    );
    drop(relayed);
    drop(direct);
    drop(b);
    drop(a);
    Ok(())
}
