//! `inferd`: the daemon (`serve`) and its command-line client.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use inferd::SmolRuntime;
use inferd::client::{self, ClientArgs, GenerateArgs, StatusArgs};
use inferd_host::driver::{Driver, Event};
use inferd_serve::ServeArgs;

/// A local LLM inference daemon: one warm model, served over a Unix socket in NDJSON.
#[derive(Parser, Debug)]
#[command(name = "inferd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: load the backends, then serve until SIGTERM/SIGINT/SIGHUP.
    Serve(Box<ServeArgs>),
    /// Send a prompt to the daemon and stream the answer to stdout.
    Generate {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: GenerateArgs,
    },
    /// Follow the daemon's admin socket: state, load progress and stats.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: StatusArgs,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Generate { client, args } => client::generate(&client, &args),
        Command::Status { client, args } => client::status(&client, &args),
        Command::Version => {
            println!("inferd {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let prepared = match inferd_serve::prepare(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("inferd: {}", e.message);
            return ExitCode::from(e.code as u8);
        }
    };
    let ex = Arc::new(smol::Executor::new());
    let driver = Driver::new(SmolRuntime::new(), prepared.setup);
    let events = driver.handle().events();
    use async_signal::Signal;
    // SIGHUP drains like SIGTERM: the terminal or session the daemon ran in is gone, and
    // its default action would kill the daemon with the sockets left behind.
    // SIGXFSZ is caught and passed over: a log write past the file size limit then
    // fails with EFBIG (reported and counted) instead of killing the daemon.
    let signals =
        match async_signal::Signals::new([Signal::Term, Signal::Int, Signal::Hup, Signal::Xfsz]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("inferd: cannot install signal handlers: {e}");
                return ExitCode::from(1);
            }
        };
    ex.spawn(async move {
        use futures_lite::StreamExt;
        let mut signals = signals;
        let mut seen = 0;
        while let Some(Ok(signal)) = signals.next().await {
            if signal == Signal::Xfsz {
                continue;
            }
            seen += 1;
            if seen == 1 {
                if signal == Signal::Hup {
                    // The terminal that hung up may be stderr: a failed write must
                    // not panic (eprintln! would) in the middle of the drain.
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "inferd: SIGHUP: draining as for SIGTERM");
                }
                let _ = events.send(Event::Shutdown).await;
            } else {
                // A second signal: the operator wants out now.
                eprintln!("inferd: second signal, exiting without draining");
                std::process::exit(130);
            }
        }
    })
    .detach();
    eprintln!(
        "inferd: admin socket {}; inference socket {} once ready",
        prepared.paths.admin.display(),
        prepared.paths.infer.display()
    );
    let (code, message) = smol::block_on(ex.run(driver.run()));
    drop(prepared.lock);
    if !message.is_empty() {
        eprintln!("inferd: {message}");
    }
    ExitCode::from(code.clamp(0, 255) as u8)
}
