//! Load benchmark: the daemon binary with the mock engine against a minimal
//! thread-per-connection echo server (the transport + JSON limit), with the same client
//! code in the same run.
//!
//! ```text
//! cargo build --release -p inferd --bin inferd -p inferd-bench
//! target/release/loadbench --clients 1,8,32 --tokens 1,256 --seconds 5
//! target/release/loadbench --idle 1000
//! target/release/loadbench --long-line 64
//! target/release/loadbench --compare-bin target/release/inferd-tokio
//! target/release/loadbench --http --clients 1,8,32 --tokens 1,256 --no-echo
//! ```
//!
//! With `--http` every daemon also serves its OpenAI-compatible API and each cell runs
//! it (streamed chat completions over keep-alive connections) beside the NDJSON socket,
//! reported as a ratio to the same daemon's NDJSON figures.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use inferd_bench::{
    Client, Daemon, DaemonSpec, Exchange, HttpClient, TempDir, clock_ticks_per_second, cpu_ticks,
    fd_count, percentile, pingpong, raise_fd_limit, sibling_binary, ticks_to_micros,
};
use serde::Serialize;

/// The prompt every client sends; the mock echoes its words, cycled to `--tokens`.
const PROMPT: &str = "hello world from the bench";

#[derive(Parser, Debug)]
#[command(name = "loadbench", about = "Requests/s, latency, CPU and memory of the inferd daemon")]
struct Args {
    /// The daemon binary [default: `inferd` next to this binary].
    #[arg(long, value_name = "PATH")]
    daemon_bin: Option<PathBuf>,
    /// A second daemon binary (e.g. target/release/inferd-tokio) run in the same run.
    #[arg(long, value_name = "PATH")]
    compare_bin: Option<PathBuf>,
    /// The subcommand both binaries take before the serve flags; "" for none.
    #[arg(long, default_value = "serve")]
    subcommand: String,
    /// Client thread counts, comma-separated [default: 1,8,32; none with only --idle or
    /// --long-line].
    #[arg(long, value_delimiter = ',')]
    clients: Option<Vec<usize>>,
    /// Tokens per request (the mock's --mock-tokens), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,256")]
    tokens: Vec<u32>,
    /// Measured seconds per cell.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Unmeasured warm-up seconds per cell (connections open, requests flowing).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Rounds per cell, servers in rotating order; the round with the median
    /// requests/s is reported for each server.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Skip the echo server.
    #[arg(long)]
    no_echo: bool,
    /// Also measure each daemon over its HTTP API (`--http` on a loopback port).
    #[arg(long)]
    http: bool,
    /// Open this many idle connections and report the daemon's memory per connection.
    #[arg(long, value_name = "N")]
    idle: Option<usize>,
    /// Stream a line of this many MiB without LF (spaces, then `x`) on one connection
    /// and report a normal client's latency meanwhile, against a run with no stream.
    #[arg(long, value_name = "MIB")]
    long_line: Option<usize>,
}

// ---- the echo server --------------------------------------------------------------

/// A naive thread-per-connection NDJSON server answering like the mock daemon: it
/// parses each request into a `serde_json::Value`, then writes `tokens` token frames
/// and one done frame, one `write` per frame.
struct Echo {
    socket: PathBuf,
    tokens: Arc<AtomicU32>,
    tids: Arc<Mutex<Vec<i32>>>,
    stop: Arc<AtomicBool>,
    _dir: TempDir,
}

#[derive(Serialize)]
struct TokenFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u32,
    completion_tokens: u32,
}

#[derive(Serialize)]
struct TimingsOut {
    queued_ms: u64,
    ttft_ms: u64,
    total_ms: u64,
}

#[derive(Serialize)]
struct DoneFrameOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    content: &'a str,
    usage: UsageOut,
    stop_reason: &'static str,
    backend: &'static str,
    timings: TimingsOut,
}

impl Echo {
    fn start() -> io::Result<Echo> {
        let dir = TempDir::new("echo")?;
        let socket = dir.path().join("echo.sock");
        let listener = UnixListener::bind(&socket)?;
        let tokens = Arc::new(AtomicU32::new(1));
        let tids = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, ids, s) = (tokens.clone(), tids.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (t, ids) = (t.clone(), ids.clone());
                std::thread::spawn(move || {
                    if let Ok(mut v) = ids.lock() {
                        v.push(inferd_bench::gettid());
                    }
                    let me = inferd_bench::gettid();
                    let _ = echo_conn(stream, &t);
                    if let Ok(mut v) = ids.lock() {
                        v.retain(|&x| x != me);
                    }
                });
            }
        });
        Ok(Echo { socket, tokens, tids, stop, _dir: dir })
    }

    /// CPU ticks of the live connection threads.
    fn cpu_ticks(&self) -> u64 {
        let pid = std::process::id();
        let tids = self.tids.lock().map(|v| v.clone()).unwrap_or_default();
        tids.iter().filter_map(|&t| cpu_ticks(pid, Some(t)).ok()).sum()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = UnixStream::connect(&self.socket);
    }
}

fn echo_conn(stream: UnixStream, tokens: &AtomicU32) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = &stream;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let v: serde_json::Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let id = v["id"].as_str().unwrap_or("");
        let prompt = v["messages"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .unwrap_or("");
        let words: Vec<&str> = prompt.split_whitespace().collect();
        let n = tokens.load(Ordering::Relaxed);
        let mut content = String::new();
        for i in 0..n as usize {
            let word = if words.is_empty() { "mock" } else { words[i % words.len()] };
            let piece = if i > 0 { format!(" {word}") } else { word.to_owned() };
            content.push_str(&piece);
            let mut frame = serde_json::to_vec(&TokenFrame { kind: "token", id, content: &piece })?;
            frame.push(b'\n');
            out.write_all(&frame)?;
        }
        let mut frame = serde_json::to_vec(&DoneFrameOut {
            kind: "done",
            id,
            content: &content,
            usage: UsageOut { prompt_tokens: words.len() as u32, completion_tokens: n },
            stop_reason: "end",
            backend: "mock",
            timings: TimingsOut { queued_ms: 0, ttft_ms: 0, total_ms: 0 },
        })?;
        frame.push(b'\n');
        out.write_all(&frame)?;
    }
}

// ---- the load generator -----------------------------------------------------------

/// One server under test, as the load generator sees it.
enum Target<'a> {
    Daemon(&'a Daemon),
    Echo(&'a Echo),
    /// A daemon's HTTP API at this address.
    Http(&'a Daemon, &'a str),
}

impl Target<'_> {
    fn connect(&self) -> Result<LoadClient, String> {
        let unix = |socket: &Path| {
            Client::connect(socket)
                .map(LoadClient::Ndjson)
                .map_err(|e| format!("connect {}: {e}", socket.display()))
        };
        match self {
            Target::Daemon(d) => unix(&d.socket),
            Target::Echo(e) => unix(&e.socket),
            Target::Http(_, addr) => HttpClient::connect(addr)
                .map(LoadClient::Http)
                .map_err(|e| format!("connect {addr}: {e}")),
        }
    }

    fn cpu_ticks(&self) -> u64 {
        match self {
            Target::Daemon(d) | Target::Http(d, _) => d.cpu_ticks(),
            Target::Echo(e) => e.cpu_ticks(),
        }
    }

    fn thread_ticks(&self) -> BTreeMap<String, u64> {
        match self {
            Target::Daemon(d) | Target::Http(d, _) => d.thread_ticks(),
            Target::Echo(_) => BTreeMap::new(),
        }
    }
}

/// One load client's connection, NDJSON or HTTP.
enum LoadClient {
    Ndjson(Client),
    Http(HttpClient),
}

impl LoadClient {
    /// One request for [`PROMPT`], named `id`.
    fn exchange(&mut self, id: &str) -> io::Result<Exchange> {
        match self {
            LoadClient::Ndjson(c) => {
                let req = format!(
                    "{{\"id\":\"{id}\",\"messages\":[{{\"role\":\"user\",\"content\":\"{PROMPT}\"}}]}}\n"
                );
                c.exchange(req.as_bytes())
            }
            LoadClient::Http(c) => {
                let body = format!(
                    "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{PROMPT}\"}}],\"stream\":true}}"
                );
                c.exchange(body.as_bytes())
            }
        }
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("probe a port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

#[derive(Clone, Debug)]
struct LoadResult {
    rps: f64,
    tps: f64,
    requests: usize,
    errors: usize,
    /// Token frames per request other than expected.
    miscounted: usize,
    first_us: [u32; 3],
    terminal_us: [u32; 3],
    cpu_us_per_request: f64,
    /// CPU µs per request by thread name (daemons only).
    by_thread: Vec<(String, f64)>,
}

fn run_load(
    target: &Target<'_>,
    clients: usize,
    tokens: u32,
    warmup: Duration,
    window: Duration,
) -> Result<LoadResult, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut threads = Vec::new();
    for c in 0..clients {
        let mut client = target.connect()?;
        let (stop, barrier) = (stop.clone(), barrier.clone());
        threads.push(std::thread::spawn(move || {
            // (end of request, first frame µs, terminal frame µs, token frames, ok)
            let mut log: Vec<(Instant, u32, u32, u32, bool)> = Vec::with_capacity(1 << 16);
            barrier.wait();
            let mut n = 0u64;
            let mut err = None;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("c{c}-{n}");
                n += 1;
                match client.exchange(&id) {
                    Ok(x) => log.push((
                        Instant::now(),
                        x.first.as_micros() as u32,
                        x.terminal.as_micros() as u32,
                        x.tokens,
                        x.ok,
                    )),
                    Err(e) => {
                        err = Some(e.to_string());
                        break;
                    }
                }
            }
            (log, err)
        }));
    }
    barrier.wait();
    std::thread::sleep(warmup);
    let t0 = Instant::now();
    let threads0 = target.thread_ticks();
    let cpu0 = target.cpu_ticks();
    std::thread::sleep(window);
    let cpu1 = target.cpu_ticks();
    let threads1 = target.thread_ticks();
    let t1 = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let mut first = Vec::new();
    let mut terminal = Vec::new();
    let (mut errors, mut miscounted) = (0, 0);
    for t in threads {
        let (log, err) = t.join().map_err(|_| "client thread panicked".to_string())?;
        if let Some(e) = err {
            return Err(format!("client failed: {e}"));
        }
        for (end, f, term, toks, ok) in log {
            if end < t0 || end > t1 {
                continue;
            }
            if !ok {
                errors += 1;
            } else if toks != tokens {
                miscounted += 1;
            }
            first.push(f);
            terminal.push(term);
        }
    }
    first.sort_unstable();
    terminal.sort_unstable();
    let secs = (t1 - t0).as_secs_f64();
    let requests = terminal.len();
    let pct = |v: &[u32]| [percentile(v, 50.0), percentile(v, 90.0), percentile(v, 99.0)];
    Ok(LoadResult {
        rps: requests as f64 / secs,
        tps: requests as f64 * f64::from(tokens) / secs,
        requests,
        errors,
        miscounted,
        first_us: pct(&first),
        terminal_us: pct(&terminal),
        cpu_us_per_request: ticks_to_micros(cpu1.saturating_sub(cpu0)) / requests.max(1) as f64,
        by_thread: threads1
            .iter()
            .map(|(name, t1)| {
                let t0 = threads0.get(name).copied().unwrap_or(0);
                (name.clone(), ticks_to_micros(t1.saturating_sub(t0)) / requests.max(1) as f64)
            })
            .filter(|(_, us)| *us > 0.0)
            .collect(),
    })
}

fn ms(us: u32) -> f64 {
    f64::from(us) / 1000.0
}

fn daemon_spec(args: &Args, bin: &Path, tokens: u32, extra: &[&str]) -> DaemonSpec {
    let mut a: Vec<String> = [
        "--backend",
        "mock",
        "--mock-tokens",
        &tokens.to_string(),
        "--active-permits",
        "1",
        "--queue-depth",
        "64",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    DaemonSpec {
        bin: bin.to_path_buf(),
        subcommand: (!args.subcommand.is_empty()).then(|| args.subcommand.clone()),
        args: a,
        ready_timeout: Duration::from_secs(30),
    }
}

fn label(bin: &Path) -> String {
    bin.file_name().map_or_else(|| bin.display().to_string(), |n| n.to_string_lossy().into())
}

struct Cell {
    clients: usize,
    tokens: u32,
    results: Vec<(String, LoadResult)>,
}

fn print_row(name: &str, r: &LoadResult, echo_rps: Option<f64>) {
    let ratio = echo_rps.map_or_else(|| "-".to_string(), |e| format!("{:.2}", r.rps / e));
    println!(
        "  {name:<14} {:>9.0} {:>10.0} {:>6} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>8.1}{}",
        r.rps,
        r.tps,
        ratio,
        ms(r.first_us[0]),
        ms(r.first_us[1]),
        ms(r.first_us[2]),
        ms(r.terminal_us[0]),
        ms(r.terminal_us[1]),
        ms(r.terminal_us[2]),
        r.cpu_us_per_request,
        if r.errors + r.miscounted > 0 {
            format!("  ({} errors, {} wrong token counts)", r.errors, r.miscounted)
        } else {
            String::new()
        },
    );
    if !r.by_thread.is_empty() {
        let parts: Vec<String> =
            r.by_thread.iter().map(|(name, us)| format!("{name} {us:.1}")).collect();
        println!(
            "  {:<14} CPU µs/request by thread: {} ({} requests)",
            "",
            parts.join(", "),
            r.requests
        );
    }
}

fn load_mode(args: &Args, bins: &[PathBuf], clients: &[usize]) -> Result<Vec<Cell>, String> {
    let echo = if args.no_echo {
        None
    } else {
        Some(Echo::start().map_err(|e| format!("echo server: {e}"))?)
    };
    let warmup = Duration::from_secs_f64(args.warmup);
    let window = Duration::from_secs_f64(args.seconds);
    let mut cells = Vec::new();
    println!(
        "load: {} s measured + {} s warm-up per cell, {} round(s); latencies in ms; CPU = server utime+stime per request",
        args.seconds, args.warmup, args.repeat
    );
    println!(
        "  {:<14} {:>9} {:>10} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8}",
        "server",
        "req/s",
        "tok/s",
        "/echo",
        "1st p50",
        "1st p90",
        "1st p99",
        "end p50",
        "end p90",
        "end p99",
        "CPU µs"
    );
    for &tokens in &args.tokens {
        // Every daemon for this token count runs for the whole row; idle ones cost nothing.
        let mut daemons = Vec::new();
        let mut http_addrs = Vec::new();
        for bin in bins {
            let addr = if args.http { Some(format!("127.0.0.1:{}", free_port()?)) } else { None };
            let extra: Vec<&str> = addr.as_deref().map(|a| vec!["--http", a]).unwrap_or_default();
            daemons.push(Daemon::start(&daemon_spec(args, bin, tokens, &extra), &label(bin))?);
            http_addrs.push(addr);
        }
        if let Some(e) = &echo {
            e.tokens.store(tokens, Ordering::Relaxed);
        }
        for &n in clients {
            let mut targets: Vec<(String, Target<'_>)> = Vec::new();
            if let Some(e) = &echo {
                targets.push(("echo".into(), Target::Echo(e)));
            }
            for (d, addr) in daemons.iter().zip(&http_addrs) {
                targets.push((d.label.clone(), Target::Daemon(d)));
                if let Some(addr) = addr {
                    targets.push((format!("{}/http", d.label), Target::Http(d, addr)));
                }
            }
            let mut rounds: Vec<Vec<LoadResult>> = vec![Vec::new(); targets.len()];
            for round in 0..args.repeat.max(1) {
                for k in 0..targets.len() {
                    let i = (k + round) % targets.len();
                    let r = run_load(&targets[i].1, n, tokens, warmup, window)?;
                    rounds[i].push(r);
                }
            }
            let results: Vec<(String, LoadResult)> = targets
                .iter()
                .zip(rounds)
                .map(|((name, _), mut rs)| {
                    rs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
                    (name.clone(), rs[rs.len() / 2].clone())
                })
                .collect();
            println!("clients {n}, tokens {tokens}:");
            let echo_rps = results.iter().find(|(n, _)| n == "echo").map(|(_, r)| r.rps);
            for (name, r) in &results {
                print_row(name, r, echo_rps.filter(|_| name != "echo"));
            }
            for (name, r) in results.iter().filter(|(n, _)| n.ends_with("/http")) {
                let base = name.trim_end_matches("/http");
                if let Some((_, nd)) = results.iter().find(|(n, _)| n == base) {
                    println!(
                        "  {name} / {base}: req/s {:.2}, tok/s {:.2}, CPU/request {:.2}, p50 end {:.2}",
                        r.rps / nd.rps,
                        r.tps / nd.tps,
                        r.cpu_us_per_request / nd.cpu_us_per_request,
                        f64::from(r.terminal_us[0]) / f64::from(nd.terminal_us[0].max(1))
                    );
                }
            }
            let ds: Vec<&(String, LoadResult)> =
                results.iter().filter(|(n, _)| n != "echo" && !n.ends_with("/http")).collect();
            if ds.len() >= 2 {
                let (a, b) = (&ds[0], &ds[1]);
                println!(
                    "  {} / {}: req/s {:.2}, CPU/request {:.2}, p50 end {:.2}",
                    b.0,
                    a.0,
                    b.1.rps / a.1.rps,
                    b.1.cpu_us_per_request / a.1.cpu_us_per_request,
                    f64::from(b.1.terminal_us[0]) / f64::from(a.1.terminal_us[0].max(1))
                );
            }
            cells.push(Cell { clients: n, tokens, results });
        }
        for d in &mut daemons {
            if !d.is_running() {
                return Err(format!("{} died during the run:\n{}", d.label, d.stderr_tail()));
            }
        }
    }
    Ok(cells)
}

/// Opens `n` idle connections and reports the daemon's RSS growth per connection.
fn idle_mode(args: &Args, bin: &Path, n: usize) -> Result<(u64, u64, f64), String> {
    let max = (n + 64).to_string();
    let spec = daemon_spec(args, bin, 1, &["--max-connections", &max]);
    let d = Daemon::start(&spec, &label(bin))?;
    // Warm the daemon up with a few requests so pools and buffers exist.
    let mut c = Client::connect(&d.socket).map_err(|e| e.to_string())?;
    let req =
        format!("{{\"id\":\"w\",\"messages\":[{{\"role\":\"user\",\"content\":\"{PROMPT}\"}}]}}\n");
    for _ in 0..200 {
        c.exchange(req.as_bytes()).map_err(|e| e.to_string())?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let fds0 = fd_count(d.pid).map_err(|e| e.to_string())?;
    let rss0 = d.rss_kib();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(UnixStream::connect(&d.socket).map_err(|e| format!("idle connect: {e}"))?);
    }
    // Wait until the daemon has accepted them all (one descriptor each).
    let deadline = Instant::now() + Duration::from_secs(20);
    while fd_count(d.pid).unwrap_or(0) < fds0 + n {
        if Instant::now() > deadline {
            return Err(format!(
                "daemon holds {} descriptors, expected {}",
                fd_count(d.pid).unwrap_or(0),
                fds0 + n
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    // The daemon still answers with every idle connection open.
    c.exchange(req.as_bytes()).map_err(|e| format!("request with idle connections open: {e}"))?;
    let rss1 = d.rss_kib();
    drop(conns);
    let per_conn = (rss1.saturating_sub(rss0) * 1024) as f64 / n as f64;
    Ok((rss0, rss1, per_conn))
}

// ---- a long line without LF next to a normal client --------------------------------

/// What a normal client saw while another connection streamed a long line.
struct LongLine {
    requests: usize,
    p50_us: u32,
    p99_us: u32,
    max_us: u32,
    /// Daemon CPU (utime + stime) over the measurement, in ms.
    cpu_ms: f64,
    /// How the streamer ended: the time its line took to send, or why it stopped.
    stream: String,
}

/// One normal client doing 1-token requests back to back, while (with `fill`) another
/// connection writes `mib` MiB of `fill` in 1 MiB writes, never an LF. Without `fill`
/// it measures for two seconds.
fn long_line_run(
    args: &Args,
    bin: &Path,
    fill: Option<u8>,
    mib: usize,
) -> Result<LongLine, String> {
    let mut d = Daemon::start(&daemon_spec(args, bin, 1, &[]), &label(bin))?;
    let mut c = Client::connect(&d.socket).map_err(|e| e.to_string())?;
    let req =
        format!("{{\"id\":\"n\",\"messages\":[{{\"role\":\"user\",\"content\":\"{PROMPT}\"}}]}}\n");
    for _ in 0..200 {
        c.exchange(req.as_bytes()).map_err(|e| e.to_string())?;
    }
    let done = Arc::new(AtomicBool::new(false));
    let streamer = fill.map(|b| {
        let (socket, done) = (d.socket.clone(), done.clone());
        std::thread::spawn(move || {
            let result = (|| -> io::Result<(Duration, UnixStream)> {
                let mut s = UnixStream::connect(&socket)?;
                let chunk = vec![b; 1 << 20];
                let t = Instant::now();
                for _ in 0..mib {
                    s.write_all(&chunk)?;
                }
                Ok((t.elapsed(), s))
            })();
            done.store(true, Ordering::Release);
            result
        })
    });
    let cpu0 = d.cpu_ticks();
    let t0 = Instant::now();
    let mut lat = Vec::new();
    // With a streamer: until its line is sent (or refused); at least one request.
    while lat.is_empty()
        || if streamer.is_some() {
            !done.load(Ordering::Acquire)
        } else {
            t0.elapsed() < Duration::from_secs(2)
        }
    {
        let e = c.exchange(req.as_bytes()).map_err(|e| format!("normal client: {e}"))?;
        if !e.ok {
            return Err("normal client: request failed".into());
        }
        lat.push(e.terminal.as_micros().min(u128::from(u32::MAX)) as u32);
    }
    let cpu_ms = ticks_to_micros(d.cpu_ticks().saturating_sub(cpu0)) / 1000.0;
    // The stream stays open until here, so the daemon held the whole line meanwhile.
    let stream = match streamer.map(|t| t.join()) {
        None => "-".to_string(),
        Some(Ok(Ok((took, _open)))) => format!("{mib} MiB sent in {:.2} s", took.as_secs_f64()),
        Some(Ok(Err(e))) => format!("stopped: {e}"),
        Some(Err(_)) => "streamer panicked".to_string(),
    };
    if !d.is_running() {
        return Err(format!("{} died:\n{}", d.label, d.stderr_tail()));
    }
    lat.sort_unstable();
    Ok(LongLine {
        requests: lat.len(),
        p50_us: percentile(&lat, 50.0),
        p99_us: percentile(&lat, 99.0),
        max_us: lat.last().copied().unwrap_or(0),
        cpu_ms,
        stream,
    })
}

/// `--long-line`: a normal client's latency with no stream, next to a line of `x`, next
/// to a line of spaces (which once cost quadratic CPU); the spaces/`x` ratios should be
/// about 1.
fn long_line_mode(args: &Args, bin: &Path, mib: usize) -> Result<(), String> {
    println!("long line: {mib} MiB without LF on one connection, 1-token requests on another");
    println!(
        "  {:<10} {:>8} {:>9} {:>9} {:>9} {:>9}  stream",
        "line", "requests", "p50 ms", "p99 ms", "max ms", "CPU ms"
    );
    let mut rows = Vec::new();
    for (name, fill) in [("none", None), ("x", Some(b'x')), ("spaces", Some(b' '))] {
        let r = long_line_run(args, bin, fill, mib)?;
        println!(
            "  {name:<10} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>9.1}  {}",
            r.requests,
            ms(r.p50_us),
            ms(r.p99_us),
            ms(r.max_us),
            r.cpu_ms,
            r.stream
        );
        rows.push(r);
    }
    let (x, sp) = (&rows[1], &rows[2]);
    let ratio = |a: u32, b: u32| f64::from(a) / f64::from(b.max(1));
    println!(
        "  spaces / x: p50 {:.2}, p99 {:.2}, max {:.2}, daemon CPU {:.2} (about 1 expected)",
        ratio(sp.p50_us, x.p50_us),
        ratio(sp.p99_us, x.p99_us),
        ratio(sp.max_us, x.max_us),
        sp.cpu_ms / x.cpu_ms.max(f64::MIN_POSITIVE)
    );
    Ok(())
}

fn main() {
    let args = Args::parse();
    raise_fd_limit();
    let daemon_bin = args.daemon_bin.clone().unwrap_or_else(|| sibling_binary("inferd"));
    let mut bins = vec![daemon_bin];
    bins.extend(args.compare_bin.clone());
    for b in &bins {
        if !b.exists() {
            eprintln!(
                "loadbench: {} not found (cargo build --release -p inferd --bin inferd)",
                b.display()
            );
            std::process::exit(2);
        }
    }
    println!(
        "loadbench: {} (CLK_TCK {})",
        bins.iter().map(|b| b.display().to_string()).collect::<Vec<_>>().join(" vs "),
        clock_ticks_per_second(),
    );
    let clients = match (&args.clients, args.idle.or(args.long_line)) {
        (Some(c), _) => c.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => vec![1, 8, 32],
    };
    let (wall, cpu) = pingpong(20_000);
    println!(
        "calibration: one Unix-socket wake-up round trip between two threads costs {wall:.1} µs wall, {cpu:.1} µs CPU (the floor of any request/response)"
    );
    let mut failed = false;
    let calibrate_again = || {
        let (wall, cpu) = pingpong(20_000);
        println!("calibration at the end: {wall:.1} µs wall, {cpu:.1} µs CPU per round trip");
    };
    if !clients.is_empty() {
        match load_mode(&args, &bins, &clients) {
            Ok(cells) => targets_summary(&cells),
            Err(e) => {
                eprintln!("loadbench: {e}");
                failed = true;
            }
        }
    }
    if let Some(n) = args.idle {
        println!("idle: {n} idle connections");
        for bin in &bins {
            match idle_mode(&args, bin, n) {
                Ok((rss0, rss1, per)) => println!(
                    "  {:<14} RSS {rss0} KiB -> {rss1} KiB: {:.1} KiB per idle connection (target <= 20 KiB: {})",
                    label(bin),
                    per / 1024.0,
                    if per <= 20.0 * 1024.0 { "met" } else { "MISSED" }
                ),
                Err(e) => {
                    eprintln!("loadbench: idle {}: {e}", label(bin));
                    failed = true;
                }
            }
        }
    }
    if let Some(mib) = args.long_line {
        for bin in &bins {
            if let Err(e) = long_line_mode(&args, bin, mib) {
                eprintln!("loadbench: long line {}: {e}", label(bin));
                failed = true;
            }
        }
    }
    calibrate_again();
    if failed {
        std::process::exit(1);
    }
}

/// Prints whether the load targets were met, for the primary daemon.
fn targets_summary(cells: &[Cell]) {
    let Some(primary) = cells.first().and_then(|c| c.results.iter().find(|(n, _)| n != "echo"))
    else {
        return;
    };
    let name = primary.0.clone();
    println!("targets ({name}):");
    for c in cells.iter().filter(|c| c.tokens == 1) {
        let get = |n: &str| c.results.iter().find(|(x, _)| x == n).map(|(_, r)| r);
        let Some(d) = get(&name) else { continue };
        if let Some(e) = get("echo")
            && c.clients == 32
        {
            let ratio = d.rps / e.rps;
            println!(
                "  1-token req/s at 32 clients >= 0.8 x echo: {ratio:.2} x ({})",
                if ratio >= 0.8 { "met" } else { "MISSED" }
            );
        }
        let vs_echo = get("echo").map_or_else(String::new, |e| {
            format!(", {:.1} x echo's CPU per request", d.cpu_us_per_request / e.cpu_us_per_request)
        });
        println!(
            "  CPU per 1-token request <= 10 µs at {} clients: {:.1} µs ({}){vs_echo}",
            c.clients,
            d.cpu_us_per_request,
            if d.cpu_us_per_request <= 10.0 { "met" } else { "MISSED" }
        );
    }
}
