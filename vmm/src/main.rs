//! The `splitvisor` binary: parse the command line, run the subcommand, turn the outcome into
//! an exit status, and print any error chain once.

use std::process::ExitCode;

use clap::Parser;
use splitvisor::cli::{BenchArgs, Cli, Command, CtlArgs, RunArgs};
use splitvisor::vm::Vm;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Bench(args) => bench(&args),
        Command::Launch(args) => splitvisor::launch::run(&args).map_err(Into::into),
        Command::Ctl(args) => ctl(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(error) => {
            eprintln!("splitvisor: {}", splitvisor::error_chain(error.as_ref()));
            ExitCode::from(1)
        }
    }
}

fn run(args: &RunArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let config = args.to_config();
    config.validate()?;
    splitvisor::seccomp::set_mode(args.vm.seccomp);
    let (end, stats) = Vm::new(&config)?.run()?;
    if let Some(message) = end.describe() {
        eprintln!("splitvisor: {message}");
    }
    if args.vm.stats {
        println!("{}{stats}", splitvisor::stats::STATS_PREFIX);
    }
    Ok(end.exit_status())
}

fn ctl(args: &CtlArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let text =
        splitvisor::ctl::run(args).map_err(|e| format!("ctl: {}", splitvisor::error_chain(&e)))?;
    println!("{text}");
    Ok(0)
}

fn bench(args: &BenchArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let summary = splitvisor::bench::run(args)?;
    splitvisor::bench::print_table(&summary);
    println!("BENCH {summary}");
    let all_passed = summary["paths"]
        .as_object()
        .is_some_and(|paths| paths.values().all(|p| p["status"] == "pass"));
    Ok(if all_passed { 0 } else { 1 })
}
