//! `splitvisor launch`: one command that starts the backend daemons and the VMM from one
//! description and supervises them. The order of things: read and check the description,
//! create the runtime directory, start the daemons and wait for their sockets, start the VMM
//! (`splitvisor run` connected to those sockets), restart daemons that die while it runs, and at
//! the end stop the VMM first, then the daemons, then remove the runtime directory.
//!
//! Files: `args` (flags), `spec` (flags or TOML into a checked description), `plan` (command
//! lines), `rundir` (the runtime directory), `supervisor` (daemon processes), `restart` (the
//! restart policy), `signals` (the one wait for signals and children).

mod args;
mod daemon;
mod devflags;
mod plan;
mod restart;
mod rundir;
mod signals;
mod spec;
mod supervisor;

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

pub use args::{LaunchArgs, LAUNCH_HELP};
pub use restart::RestartPolicy;
pub use rundir::RuntimeDir;

use crate::registry::{self, RegistryError};
use daemon::{DaemonError, Pidfile};
use plan::{BackendDir, Plan, PlanError};
use rundir::RunDirError;
use signals::{signal_name, SignalWait, Wakeup};
use spec::{LaunchSpec, SpecError};
use supervisor::{describe_exit, prepare_child, wait_until, StartError, Supervisor};

/// How long the VMM gets to stop the guest after SIGTERM before SIGKILL.
pub const VMM_STOP_GRACE: Duration = Duration::from_secs(10);
/// The exit status after SIGINT/SIGTERM (the shell's 128 + SIGINT, like `run`).
pub const STATUS_INTERRUPTED: u8 = 130;
/// The longest the supervision loop sleeps without looking (signals wake it sooner).
const IDLE_WAKE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error("cannot block SIGINT, SIGTERM and SIGCHLD for supervision")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Name(#[from] RegistryError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("cannot start the VMM {exe}")]
    SpawnVmm {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How the supervised run ended.
enum Ending {
    /// The VMM exited by itself.
    VmmExited(ExitStatus),
    /// launch got SIGINT or SIGTERM.
    Interrupted(libc::c_int),
}

/// Runs the launch; returns the exit status (the VMM's, or 130 after an interrupt).
pub fn run(args: &LaunchArgs) -> Result<u8, LaunchError> {
    let spec = LaunchSpec::from_args(args)?;
    let backends = BackendDir::locate(args.backend_dir.as_deref())?;
    let exe = std::env::current_exe().map_err(PlanError::CurrentExe)?;
    let name = vm_name(args)?;
    if args.daemonize && !args.daemon_child {
        return Ok(daemon::start(
            &name,
            args.name.is_some(),
            ready_wait(args, &spec),
        )?);
    }
    // Before any child exists, so that no SIGCHLD or interrupt is missed.
    let signals = SignalWait::install().map_err(LaunchError::Signals)?;
    let policy = RestartPolicy::DEFAULT;
    let socket_timeout = Duration::from_secs(spec.socket_timeout.unwrap_or(args.socket_timeout));
    let rundir = RuntimeDir::create(args.runtime_dir.as_deref())?;
    splitvisor_vmm::eprintln_whole!("launch: runtime directory {}", rundir.path().display());
    let _pidfile = announce(args, &name, &rundir)?;
    let reconnect = spec
        .reconnect_timeout
        .unwrap_or_else(|| policy.reconnect_timeout_secs(socket_timeout));
    let mut plan = Plan::new(&spec, &rundir, &backends, reconnect)?;
    plan.vmm_args
        .splice(1..1, ["--name".into(), OsString::from(&name)]);

    let mut supervisor = Supervisor::new(plan.daemons.clone(), policy, socket_timeout);
    if let Err(error) = supervisor.start_all(&signals) {
        supervisor.stop_all();
        remove_rundir(rundir);
        return match error {
            StartError::Interrupted(signal) => {
                splitvisor_vmm::eprintln_whole!(
                    "launch: {} received while starting; stopped",
                    signal_name(signal)
                );
                Ok(STATUS_INTERRUPTED)
            }
            other => Err(other.into()),
        };
    }
    let mut vmm = match spawn_vmm(&exe, &plan.vmm_args) {
        Ok(vmm) => vmm,
        Err(error) => {
            supervisor.stop_all();
            remove_rundir(rundir);
            return Err(error);
        }
    };
    let status = match supervise(&signals, &mut supervisor, &mut vmm) {
        Ending::VmmExited(status) => {
            splitvisor_vmm::eprintln_whole!(
                "launch: the VMM {}; stopping the backends",
                describe_exit(status)
            );
            exit_status(status)
        }
        Ending::Interrupted(signal) => {
            splitvisor_vmm::eprintln_whole!(
                "launch: {} received; stopping the VMM (pid {}), then the backends",
                signal_name(signal),
                vmm.id()
            );
            stop_vmm(&mut vmm);
            STATUS_INTERRUPTED
        }
    };
    supervisor.stop_all();
    if supervisor.had_trouble() {
        match rundir.keep_logs() {
            Ok(dir) => splitvisor_vmm::eprintln_whole!(
                "launch: a backend died while the VM ran; its log is kept in {}",
                dir.display()
            ),
            Err(e) => splitvisor_vmm::eprintln_whole!(
                "launch: cannot clean up the runtime directory: {e}"
            ),
        }
    } else {
        remove_rundir(rundir);
    }
    Ok(status)
}

/// Says which VM this is (or, in the background, sends the output to launch.log) and writes
/// the pidfile.
fn announce(
    args: &LaunchArgs,
    name: &str,
    rundir: &RuntimeDir,
) -> Result<Option<Pidfile>, LaunchError> {
    if args.daemon_child {
        daemon::redirect_output(&rundir.log("launch"))?;
    } else {
        splitvisor_vmm::eprintln_whole!("launch: VM {name}");
    }
    Ok(args.pidfile.as_deref().map(Pidfile::write).transpose()?)
}

/// The VM's name: --name, else vm-PID; refused early when a running VM has it.
fn vm_name(args: &LaunchArgs) -> Result<String, RegistryError> {
    let name = args.name.clone().unwrap_or_else(registry::generated_name);
    registry::check_name(&name)?;
    if let Ok(entry) = registry::find(&name) {
        return Err(RegistryError::NameTaken {
            name,
            pid: entry.pid,
        });
    }
    Ok(name)
}

/// How long `--daemonize` waits for the VM: each daemon may take --socket-timeout to come
/// up, the VMM --connect-timeout for each backend, and then sets the VM up.
fn ready_wait(args: &LaunchArgs, spec: &LaunchSpec) -> Duration {
    let daemons = (spec.disks.len() + spec.nets.len()) as u64;
    Duration::from_secs(
        args.socket_timeout * (daemons + 1) + spec.vm.connect_timeout * daemons.max(1) + 30,
    )
}

/// Starts `splitvisor run ...` with the guest console on launch's own stdout and stderr, in
/// launch's process group (a terminal's Ctrl-C reaches it too, and stops the VM).
fn spawn_vmm(exe: &Path, vmm_args: &[OsString]) -> Result<Child, LaunchError> {
    let mut command = Command::new(exe);
    command.args(vmm_args);
    prepare_child(&mut command);
    let child = command.spawn().map_err(|source| LaunchError::SpawnVmm {
        exe: exe.to_path_buf(),
        source,
    })?;
    let line: Vec<String> = std::iter::once(exe.as_os_str())
        .chain(vmm_args.iter().map(OsString::as_os_str))
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    splitvisor_vmm::eprintln_whole!(
        "launch: started the VMM (pid {}): {}",
        child.id(),
        line.join(" ")
    );
    Ok(child)
}

/// Keeps the daemons alive until the VMM exits or launch is told to stop.
fn supervise(signals: &SignalWait, supervisor: &mut Supervisor, vmm: &mut Child) -> Ending {
    loop {
        let next = supervisor.tend();
        match vmm.try_wait() {
            Ok(Some(status)) => return Ending::VmmExited(status),
            Ok(None) => {}
            // ECHILD cannot happen for our own unreaped child; if waiting fails anyway, stop
            // everything rather than supervise a VMM we cannot see.
            Err(e) => {
                splitvisor_vmm::eprintln_whole!("launch: cannot wait for the VMM: {e}");
                return Ending::Interrupted(libc::SIGTERM);
            }
        }
        let timeout = next
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(IDLE_WAKE)
            .min(IDLE_WAKE);
        if let Wakeup::Stop(signal) = signals.wait(timeout) {
            return Ending::Interrupted(signal);
        }
    }
}

/// SIGTERM (the VMM stops the guest and exits), SIGKILL after `VMM_STOP_GRACE`.
fn stop_vmm(vmm: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(vmm.id()) {
        // SAFETY: kill() takes no pointers; the VMM is our child and not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    match wait_until(vmm, Instant::now() + VMM_STOP_GRACE) {
        Ok(status) => splitvisor_vmm::eprintln_whole!("launch: the VMM {}", describe_exit(status)),
        Err(why) => {
            splitvisor_vmm::eprintln_whole!(
                "launch: the VMM (pid {}) did not stop within {} s of SIGTERM ({why}); killing it",
                vmm.id(),
                VMM_STOP_GRACE.as_secs()
            );
            let _ = vmm.kill();
            let _ = vmm.wait();
        }
    }
}

/// The VMM's status as launch's: its exit code, or 128 + the signal that killed it.
fn exit_status(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.wrapping_add(signal as u8),
        _ => 1,
    }
}

fn remove_rundir(rundir: RuntimeDir) {
    let path = rundir.path().to_path_buf();
    if let Err(e) = rundir.remove() {
        splitvisor_vmm::eprintln_whole!("launch: cannot remove {}: {e}", path.display());
    }
}
