//! `inferd`: the daemon (`serve`) and its command-line client.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use inferd::SmolRuntime;
use inferd::client::{self, ClientArgs, GenerateArgs, StatusArgs};
use inferd_core::Input;
use inferd_host::driver::Driver;
use inferd_host::signals::{
    Caught, SECOND_SIGNAL_EXIT_STATUS, SignalAction, SignalPolicy, startup_banner,
};
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
            eprintln!("inferd: {e}");
            return ExitCode::from(e.kind.exit_status());
        }
    };
    let ex = Arc::new(smol::Executor::new());
    let driver = Driver::new(SmolRuntime::new(), prepared.setup);
    let events = driver.handle().events();
    use async_signal::Signal;
    // The policy (host::signals::SignalPolicy) is shared with the tokio shell; this only
    // names the signals in async-signal's terms.
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
        let mut policy = SignalPolicy::default();
        while let Some(Ok(signal)) = signals.next().await {
            let caught = match signal {
                Signal::Xfsz => Caught::FileSizeLimit,
                Signal::Hup => Caught::HangUp,
                Signal::Int => Caught::Interrupt,
                _ => Caught::Terminate,
            };
            match policy.on_signal(caught) {
                SignalAction::Ignore => {}
                SignalAction::Drain => {
                    let _ = events.send(Input::Shutdown).await;
                }
                SignalAction::ExitNow => std::process::exit(SECOND_SIGNAL_EXIT_STATUS),
            }
        }
    })
    .detach();
    eprintln!("{}", startup_banner(&prepared.paths.admin, &prepared.paths.infer));
    let result = smol::block_on(ex.run(driver.run()));
    drop(prepared.lock);
    // 0 after an orderly drain, 1 when serving failed.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inferd: {e}");
            ExitCode::from(1)
        }
    }
}
