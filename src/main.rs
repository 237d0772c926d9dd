//! `eva`: parse, run, print the error, exit with its code (2 usage, 1 data).

use clap::Parser;
use eva::cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    // Panics that eva turns into errors (a malformed tokenizer.json) print only the error.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !eva::model::text::panic_is_guarded() {
            default_hook(info)
        }
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::{
                DisplayHelp, DisplayHelpOnMissingArgumentOrSubcommand, DisplayVersion,
            };
            if matches!(
                e.kind(),
                DisplayHelp | DisplayHelpOnMissingArgumentOrSubcommand | DisplayVersion
            ) {
                let _ = e.print();
            } else {
                // One line, like eva's own errors: clap's first paragraph, without its `error: `.
                let text = e.render().to_string();
                let first: Vec<&str> = text
                    .lines()
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect();
                eva::log::say(&format!(
                    "eva: error: {}; see --help",
                    first.join(" ").trim_start_matches("error: ")
                ));
            }
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
            eva::log::say(&format!("eva: error: {e}"));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
