//! `eva`: parse, run, print the error, exit with its code (2 usage, 1 data).

use clap::Parser;
use eva::cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let result = match &cli.command {
        Command::Init(args) => eva::cli::init::run(args),
        Command::Inspect(args) => eva::cli::inspect::run(args),
        Command::Report(args) => eva::cli::report::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every message already carries its cause: one line per error.
            eva::cli::progress::say(&format!("eva: error: {e}"));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
