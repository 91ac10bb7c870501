//! The `splitvisor` binary: parse the command line, run the subcommand, turn the outcome into
//! an exit status, and print any error chain once.

use std::process::ExitCode;

use clap::Parser;
use splitvisor::cli::{BenchArgs, Cli, Command, CtlArgs, ListArgs, RunArgs};
use splitvisor::config::VmConfig;
use splitvisor::registry::{self, Registration, RegistryError};
use splitvisor::vm::Vm;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Bench(args) => bench(&args),
        Command::Launch(args) => splitvisor::launch::run(&args).map_err(Into::into),
        Command::Ctl(args) => ctl(&args),
        Command::List(args) => list(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(error) => {
            splitvisor_wire::host::error::report("splitvisor", error.as_ref());
            ExitCode::from(1)
        }
    }
}

fn run(args: &RunArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let mut config = args.to_config();
    config.validate()?;
    // Dropped after the VM ends: removes the VM's entry (and its API socket with it).
    let _registration = register(args, &mut config)?;
    splitvisor::seccomp::set_mode(args.vm.seccomp);
    let (end, stats) = Vm::new(&config)?.run()?;
    if let Some(message) = end.describe() {
        splitvisor::eprintln_whole!("splitvisor: {message}");
    }
    if args.vm.stats {
        println!("{}{stats}", splitvisor::stats::STATS_PREFIX);
    }
    Ok(end.exit_status())
}

/// Registers the VM under its name and points the API socket into its entry unless
/// --api-socket chose one. Without --name, a VM that cannot be registered (no usable runtime
/// directory) still runs, as before names existed, without an API unless --api-socket.
fn register(args: &RunArgs, config: &mut VmConfig) -> Result<Option<Registration>, RegistryError> {
    let name = args.name.clone().unwrap_or_else(registry::generated_name);
    match registry::register(&name, config.api_socket.as_deref()) {
        Ok(registration) => {
            splitvisor::eprintln_whole!(
                "splitvisor: VM {name}, API socket {} (`splitvisor ctl {name} status`)",
                registration.api_socket().display()
            );
            config.api_socket = Some(registration.api_socket().to_path_buf());
            Ok(Some(registration))
        }
        Err(e) if args.name.is_none() => {
            splitvisor::eprintln_whole!(
                "splitvisor: warning: running unnamed: {}",
                splitvisor::error_chain(&e)
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn list(args: &ListArgs) -> Result<u8, Box<dyn std::error::Error>> {
    println!("{}", splitvisor::list::run(args)?);
    Ok(0)
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
