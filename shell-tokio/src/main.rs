//! `inferd-tokio`: the daemon (`serve`) on a current-thread tokio runtime.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use inferd_tokio::ServeArgs;

/// inferd on tokio: one warm model, served over a Unix socket in NDJSON.
#[derive(Parser, Debug)]
#[command(name = "inferd-tokio", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: load the backends, then serve until SIGTERM/SIGINT/SIGHUP.
    Serve(Box<ServeArgs>),
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
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::Version => {
            println!("inferd-tokio {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
    };
    // One thread, like the smol shell's single executor; engines have threads of their own.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("inferd: cannot start the tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // The exit statuses: 0 after an orderly drain, 1 when serving failed, and the start
    // error's own (2 for a usage mistake).
    match rt.block_on(inferd_tokio::serve(&args)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("inferd: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("inferd: {e}");
            ExitCode::from(e.kind.exit_status())
        }
    }
}
