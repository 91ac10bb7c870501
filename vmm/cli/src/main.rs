//! The `splitvisor` binary: parse the command line, run the subcommand, turn the outcome into
//! an exit status, and print any error chain once.

mod bench;
mod cli;
mod ctl;
mod ctl_backends;
mod launch;
mod list;
mod registry;
mod run;

use std::process::ExitCode;

use crate::bench::BenchArgs;
use crate::cli::{Cli, Command};
use crate::ctl::CtlArgs;
use crate::list::ListArgs;
use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Bench(args) => bench(&args),
        Command::Launch(args) => crate::launch::run(&args).map_err(Into::into),
        Command::Ctl(args) => ctl(&args),
        Command::List(args) => list(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(error) => {
            splitvisor_vmm::eprintln_whole!(
                "splitvisor: {}",
                splitvisor_vmm::error_chain(error.as_ref())
            );
            ExitCode::from(1)
        }
    }
}

fn list(args: &ListArgs) -> Result<u8, Box<dyn std::error::Error>> {
    println!("{}", crate::list::run(args)?);
    Ok(0)
}

fn ctl(args: &CtlArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let text =
        crate::ctl::run(args).map_err(|e| format!("ctl: {}", splitvisor_vmm::error_chain(&e)))?;
    println!("{text}");
    Ok(0)
}

fn bench(args: &BenchArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let summary = crate::bench::run(args)?;
    crate::bench::print_table(&summary);
    println!("BENCH {summary}");
    // Every path at every queue depth, not only the headline rows of `paths`.
    let all_passed = summary["results"]
        .as_array()
        .is_some_and(|results| results.iter().all(|r| r["status"] == "pass"));
    Ok(if all_passed { 0 } else { 1 })
}
