//! The client side for people at a terminal: `inferd generate` and `inferd status`.
//!
//! Exit codes: 0 ok, 1 the request failed, 2 usage error, 3 the daemon is not reachable.

use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use inferd_core::wire::Frame;
use inferd_host::paths;
use serde_json::{Value, json};

/// Where the daemon's sockets are.
// clap turns these doc comments into `--help` text, where `<runtime-dir>` is a
// placeholder, not an HTML tag.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Runtime directory the daemon uses [default: the spec's chain].
    #[arg(long, env = "INFERD_RUNTIME_DIR", value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// Inference socket [default: <runtime-dir>/infer.sock].
    #[arg(long, env = "INFERD_UDS", value_name = "PATH")]
    pub uds: Option<PathBuf>,
    /// Admin socket [default: <runtime-dir>/admin.sock].
    #[arg(long, env = "INFERD_ADMIN_ADDR", value_name = "PATH")]
    pub admin_addr: Option<PathBuf>,
}

impl ClientArgs {
    fn dir(&self) -> PathBuf {
        self.runtime_dir.clone().unwrap_or_else(paths::runtime_dir)
    }
    fn infer(&self) -> PathBuf {
        self.uds.clone().unwrap_or_else(|| self.dir().join(paths::INFER_SOCKET))
    }
    fn admin(&self) -> PathBuf {
        self.admin_addr.clone().unwrap_or_else(|| self.dir().join(paths::ADMIN_SOCKET))
    }
}

/// `inferd generate` options.
#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// The prompt; `-` reads it from stdin.
    pub prompt: String,
    /// A system message to put first.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Sampling seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print the raw response frames (NDJSON) instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// `inferd status` options.
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Print one snapshot and exit.
    #[arg(long)]
    pub once: bool,
}

fn unreachable(path: &std::path::Path, e: &io::Error) -> ExitCode {
    eprintln!(
        "inferd: the daemon is not reachable at {} ({e}).\n  Is it running? Start it with `inferd serve`, or point --runtime-dir/--uds at its sockets.",
        path.display()
    );
    ExitCode::from(3)
}

/// Sends one prompt and streams the answer.
pub fn generate(client: &ClientArgs, args: &GenerateArgs) -> ExitCode {
    let prompt = if args.prompt == "-" {
        let mut s = String::new();
        if let Err(e) = io::stdin().read_to_string(&mut s) {
            eprintln!("inferd: cannot read the prompt from stdin: {e}");
            return ExitCode::from(2);
        }
        s
    } else {
        args.prompt.clone()
    };
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": prompt}));
    let mut req = json!({"id": "cli", "messages": messages});
    if let Some(n) = args.max_tokens {
        req["max_tokens"] = n.into();
    }
    if let Some(t) = args.temperature {
        req["temperature"] = t.into();
    }
    if let Some(s) = args.seed {
        req["seed"] = s.into();
    }
    let path = client.infer();
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => return unreachable(&path, &e),
    };
    let mut line = req.to_string();
    line.push('\n');
    if let Err(e) = stream.write_all(line.as_bytes()) {
        return unreachable(&path, &e);
    }
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let reader = BufReader::new(stream);
    for raw in reader.split(b'\n') {
        let raw = match raw {
            Ok(r) => r,
            Err(e) => {
                eprintln!("inferd: connection lost: {e}");
                return ExitCode::from(1);
            }
        };
        if raw.is_empty() {
            continue;
        }
        if args.json {
            let _ = out.write_all(&raw);
            let _ = out.write_all(b"\n");
            let _ = out.flush();
        }
        match Frame::parse(&raw) {
            Ok(Frame::Token { content, .. }) => {
                if !args.json {
                    let _ = out.write_all(content.as_bytes());
                    let _ = out.flush();
                }
            }
            Ok(Frame::Done { .. }) => {
                if !args.json {
                    let _ = out.write_all(b"\n");
                }
                return ExitCode::SUCCESS;
            }
            Ok(Frame::Error { code, message, .. }) => {
                eprintln!("inferd: request failed: {} ({message})", code.as_str());
                return ExitCode::from(1);
            }
            Ok(Frame::Unknown) => {}
            Err(e) => {
                eprintln!("inferd: bad frame from the daemon: {e}");
                return ExitCode::from(1);
            }
        }
    }
    eprintln!("inferd: the daemon closed the connection before the answer was complete");
    ExitCode::from(1)
}

/// Follows the admin socket, printing state, load progress and stats.
pub fn status(client: &ClientArgs, args: &StatusArgs) -> ExitCode {
    let path = client.admin();
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => return unreachable(&path, &e),
    };
    let tty = io::stderr().is_terminal();
    let reader = BufReader::new(stream);
    let mut progress_shown = false;
    for raw in reader.split(b'\n') {
        let Ok(raw) = raw else { break };
        let Ok(v) = serde_json::from_slice::<Value>(&raw) else { continue };
        let status = v["status"].as_str().unwrap_or("?");
        match status {
            "capabilities" => println!(
                "backend {}: accelerator {}, gpu layers {}",
                v["backend"].as_str().unwrap_or("?"),
                v["accelerator"].as_str().unwrap_or("?"),
                v["gpu_layers"]
            ),
            "loading_model" | "restarting" => {
                let phase = v["phase"].as_str().unwrap_or("?");
                if phase == "download" && tty {
                    let done = v["downloaded_bytes"].as_u64().unwrap_or(0);
                    let bar = match v["total_bytes"].as_u64() {
                        Some(total) if total > 0 => {
                            let filled = (done.min(total) * 30 / total) as usize;
                            format!(
                                "[{}{}] {done}/{total} bytes",
                                "#".repeat(filled),
                                " ".repeat(30 - filled)
                            )
                        }
                        _ => format!("{done} bytes"),
                    };
                    eprint!("\r\x1b[2K{status}: download {bar}");
                    progress_shown = true;
                } else {
                    if progress_shown {
                        eprintln!();
                        progress_shown = false;
                    }
                    let detail = v
                        .get("path")
                        .or_else(|| v.get("n_ctx"))
                        .map(|d| d.to_string())
                        .unwrap_or_default();
                    println!("{status}: {phase} {detail}");
                }
            }
            "stats" => println!(
                "stats: queued {} active {} connections {} served {} rejected {} breakers {}",
                v["queued"],
                v["active"],
                v["connections"],
                v["served"],
                v["rejected"],
                v["breakers"]
            ),
            other => {
                if progress_shown {
                    eprintln!();
                    progress_shown = false;
                }
                println!("{other}");
                if args.once {
                    return ExitCode::SUCCESS;
                }
            }
        }
        let _ = io::stdout().flush();
    }
    if args.once {
        eprintln!("inferd: the admin socket closed before a snapshot arrived");
        return ExitCode::from(3);
    }
    ExitCode::SUCCESS
}
