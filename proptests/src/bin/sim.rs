//! The simulator runner: runs seeds of the deterministic simulation and reports failures.
//!
//! ```text
//! cargo run -p inferd-proptests --release --bin sim -- --seeds 20000
//! cargo run -p inferd-proptests --release --bin sim -- --seed 1234      # replay one seed
//! cargo run -p inferd-proptests --release --bin sim -- --seeds 500 --start 10000
//! cargo run -p inferd-proptests --release --bin sim -- --seed 1234 --trace          # every event
//! cargo run -p inferd-proptests --release --bin sim -- --seed 1234 --trace --conn 3 # one client
//! ```

use std::process::ExitCode;
use std::time::Instant;

use inferd_proptests::sim;

const USAGE: &str = "usage: sim [--seeds N] [--start K] [--seed S [--trace [--conn N]]] [--max-failures M]\n\
  --seeds N         run N seeds (default 1000)\n\
  --start K         first seed (default 0)\n\
  --seed S          run only seed S (replay)\n\
  --trace           with --seed: print the run's configuration and every event, with its\n\
                    simulated time (-> input to the daemon, <- its output, .. the world);\n\
                    identical on every run and machine\n\
  --conn N          with --trace: only the events of connection cN and its generations\n\
  --max-failures M  print the full report of at most M failures (default 5)";

fn parse(args: &[String], i: usize, flag: &str) -> Result<u64, String> {
    let v = args.get(i + 1).ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse().map_err(|_| format!("{flag}: not a number: {v}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut start, mut count, mut max_reports) = (0u64, 1000u64, 5usize);
    let (mut seed, mut trace, mut conn) = (None, false, None);
    let mut i = 0;
    while i < args.len() {
        let r = match args[i].as_str() {
            "--trace" => {
                trace = true;
                i += 1;
                continue;
            }
            "--conn" => parse(&args, i, "--conn").map(|v| conn = Some(v)),
            "--seeds" => parse(&args, i, "--seeds").map(|v| count = v),
            "--start" => parse(&args, i, "--start").map(|v| start = v),
            "--seed" => parse(&args, i, "--seed").map(|v| {
                start = v;
                count = 1;
                seed = Some(v);
            }),
            "--max-failures" => parse(&args, i, "--max-failures").map(|v| max_reports = v as usize),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => Err(format!("unknown argument {other}")),
        };
        if let Err(e) = r {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
        i += 2;
    }
    if trace || conn.is_some() {
        let Some(seed) = seed.filter(|_| trace) else {
            eprintln!("--trace needs --seed, and --conn needs --trace\n{USAGE}");
            return ExitCode::from(2);
        };
        return print_trace(seed, conn);
    }
    sim::install_panic_hook();
    let t0 = Instant::now();
    let (mut requests, mut steps) = (0u64, 0u64);
    let mut coverage = sim::Coverage::default();
    let mut failed = Vec::new();
    for seed in start..start.saturating_add(count) {
        match sim::run_seed(seed) {
            Ok(s) => {
                requests += s.requests;
                steps += s.steps;
                coverage.add(&s.coverage);
            }
            Err(f) => {
                if failed.len() < max_reports {
                    println!("{f}");
                } else {
                    println!("seed {seed} FAILED: {}", f.message);
                }
                failed.push((seed, f.message));
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    println!(
        "{count} seeds, {requests} simulated requests, {:.0} requests/s real time \
         ({:.0} seeds/s, {steps} steps, {:.1} s)",
        requests as f64 / secs,
        count as f64 / secs,
        secs
    );
    println!("coverage: {coverage}");
    if failed.is_empty() {
        return ExitCode::SUCCESS;
    }
    println!("{} of {count} seeds FAILED:", failed.len());
    for (seed, msg) in &failed {
        let first = msg.lines().next().unwrap_or("");
        println!("  seed {seed}: {first}");
        println!("    replay: cargo run -p inferd-proptests --release --bin sim -- --seed {seed}");
        println!(
            "    trace:  cargo run -p inferd-proptests --release --bin sim -- --seed {seed} --trace"
        );
    }
    ExitCode::FAILURE
}

/// `--seed S --trace [--conn N]`: the run's story on stdout, then how it ended.
fn print_trace(seed: u64, conn: Option<u64>) -> ExitCode {
    let mode = conn.map_or(sim::TraceMode::Full, sim::TraceMode::Conn);
    let (config, lines, result) = sim::trace_seed(seed, mode);
    println!("seed {seed}");
    println!("config: {config}");
    println!("events (-> input to the daemon, <- its output, .. the simulated world):");
    for l in &lines {
        println!("  {l}");
    }
    match result {
        Ok(s) => {
            println!(
                "seed {seed} passed: {} requests, {} steps, {} ms simulated",
                s.requests, s.steps, s.sim_ms
            );
            ExitCode::SUCCESS
        }
        Err(f) => {
            println!("seed {seed} FAILED: {}", f.message);
            ExitCode::FAILURE
        }
    }
}
