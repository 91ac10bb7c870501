//! The `splitvisor` binary: parse the command line, run the subcommand, turn the outcome into
//! an exit status, and print any error chain once.

use std::process::ExitCode;

use clap::Parser;
use splitvisor::cli::{Cli, Command, RunArgs};
use splitvisor::vm::Vm;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(error) => {
            eprintln!("splitvisor: {}", error_chain(error.as_ref()));
            ExitCode::from(1)
        }
    }
}

fn run(args: &RunArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let config = args.to_config();
    config.validate()?;
    let end = Vm::new(&config)?.run()?;
    if let Some(message) = end.describe() {
        eprintln!("splitvisor: {message}");
    }
    Ok(end.exit_status())
}

/// "what failed: because: because", each cause once.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}
