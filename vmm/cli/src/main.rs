//! The `splitvisor` binary: parse the command line, run the subcommand, turn the outcome into
//! an exit status, and print any error chain once.

mod bench;
mod cli;
mod ctl;
mod ctl_backends;
mod launch;
mod list;
mod registry;

use std::process::ExitCode;

use crate::cli::{BenchArgs, Cli, Command, CtlArgs, ListArgs, RunArgs};
use crate::registry::{Registration, RegistryError};
use clap::Parser;
use splitvisor_vmm::config::VmConfig;
use splitvisor_vmm::vm::Vm;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args),
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

fn run(args: &RunArgs) -> Result<u8, Box<dyn std::error::Error>> {
    let mut config = args.to_config();
    config.validate()?;
    // Dropped after the VM ends: removes the VM's entry (and its API socket with it).
    let _registration = register(args, &mut config)?;
    splitvisor_vmm::seccomp::set_mode(args.vm.seccomp);
    let (end, stats) = Vm::new(&config)?.run()?;
    if let Some(message) = end.describe() {
        splitvisor_vmm::eprintln_whole!("splitvisor: {message}");
    }
    if args.vm.stats {
        println!("{}{stats}", splitvisor_vmm::api::stats::STATS_PREFIX);
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
            splitvisor_vmm::eprintln_whole!(
                "splitvisor: VM {name}, API socket {} (`splitvisor ctl {name} status`)",
                registration.api_socket().display()
            );
            config.api_socket = Some(registration.api_socket().to_path_buf());
            Ok(Some(registration))
        }
        Err(e) if args.name.is_none() => {
            splitvisor_vmm::eprintln_whole!(
                "splitvisor: warning: running unnamed: {}",
                splitvisor_vmm::error_chain(&e)
            );
            Ok(None)
        }
        Err(e) => Err(e),
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
    let all_passed = summary["paths"]
        .as_object()
        .is_some_and(|paths| paths.values().all(|p| p["status"] == "pass"));
    Ok(if all_passed { 0 } else { 1 })
}
