//! From a launch description to command lines: one daemon per disk and per TAP, one per
//! switch shared by its cards, and the `splitvisor run` command line that connects the VMM to
//! their sockets. The VMM's command line is checked with `run`'s own parser before anything
//! starts.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::args::ENV_BACKEND_DIR;
use super::rundir::{RunDirError, RuntimeDir};
use super::spec::{switch_daemon_name, DiskSpec, LaunchSpec, NetBackend, NetOptions};
use super::supervisor::DaemonSpec;
use crate::run::{parse_subcommand, RunArgs};

pub const BLK_BINARY: &str = "splitvisor-blk";
pub const NET_BINARY: &str = "splitvisor-net";

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot find the running splitvisor executable")]
    CurrentExe(#[source] std::io::Error),
    #[error("backend binary {path} does not exist ({hint})")]
    MissingBinary { path: PathBuf, hint: &'static str },
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    #[error("the VMM would reject its command line: {0}")]
    VmmCommandLine(String),
}

/// Where the backend binaries are.
#[derive(Clone, Debug)]
pub struct BackendDir {
    dir: PathBuf,
    hint: &'static str,
}

impl BackendDir {
    /// `--backend-dir`, else `$SPLITVISOR_BACKEND_DIR`, else the running executable's directory.
    pub fn locate(flag: Option<&Path>) -> Result<BackendDir, PlanError> {
        if let Some(dir) = flag {
            return Ok(BackendDir {
                dir: dir.to_path_buf(),
                hint: "given by --backend-dir",
            });
        }
        if let Some(dir) = std::env::var_os(ENV_BACKEND_DIR) {
            return Ok(BackendDir {
                dir: PathBuf::from(dir),
                hint: "given by $SPLITVISOR_BACKEND_DIR",
            });
        }
        let exe = std::env::current_exe().map_err(PlanError::CurrentExe)?;
        Ok(BackendDir {
            dir: exe.parent().unwrap_or(Path::new("/")).to_path_buf(),
            hint: "launch looks next to the splitvisor executable; install it there or set \
                   --backend-dir or $SPLITVISOR_BACKEND_DIR",
        })
    }

    /// The binary's path, if it exists.
    pub fn binary(&self, name: &str) -> Result<PathBuf, PlanError> {
        let path = self.dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(PlanError::MissingBinary {
                path,
                hint: self.hint,
            })
        }
    }
}

/// The processes of one launch.
#[derive(Clone, Debug)]
pub struct Plan {
    pub daemons: Vec<DaemonSpec>,
    /// `run ...`: the arguments of the VMM (the running executable).
    pub vmm_args: Vec<OsString>,
}

impl Plan {
    pub fn new(
        spec: &LaunchSpec,
        rundir: &RuntimeDir,
        backends: &BackendDir,
        reconnect_timeout_secs: u64,
    ) -> Result<Plan, PlanError> {
        let mut daemons = Vec::new();
        let mut vmm_args: Vec<OsString> = vec!["run".into()];
        vmm_args.extend(spec.vm.to_run_flags());
        for disk in &spec.disks {
            let socket = rundir.socket(&disk.id)?;
            let stats = api_socket(rundir, &disk.id)?;
            daemons.push(blk_daemon(disk, &socket, &stats, rundir, backends)?);
            let flag = device_flag(&socket, &disk.id, None, &stats);
            vmm_args.extend(["--disk".into(), flag]);
        }
        for net in &spec.nets {
            let socket = rundir.socket(&net.id)?;
            let stats = match &net.backend {
                NetBackend::Tap(tap) => {
                    let stats = api_socket(rundir, &net.id)?;
                    let mut args: Vec<OsString> = vec![
                        "--tap".into(),
                        tap.into(),
                        "--socket".into(),
                        socket.clone().into(),
                        "--api-socket".into(),
                        stats.clone().into(),
                    ];
                    args.extend(net_options(&net.options));
                    daemons.push(DaemonSpec {
                        name: net.id.clone(),
                        program: backends.binary(NET_BINARY)?,
                        args,
                        sockets: vec![socket.clone(), stats.clone()],
                        log: rundir.log(&net.id),
                    });
                    stats
                }
                NetBackend::Switch(switch) => add_switch_port(
                    &mut daemons,
                    (switch, &net.options),
                    &socket,
                    rundir,
                    backends,
                )?,
            };
            let flag = device_flag(&socket, &net.id, net.mac.as_deref(), &stats);
            vmm_args.extend(["--net".into(), flag]);
        }
        vmm_args.extend([
            "--reconnect-timeout".into(),
            reconnect_timeout_secs.to_string().into(),
        ]);
        check_vmm_args(&vmm_args)?;
        Ok(Plan { daemons, vmm_args })
    }
}

/// A daemon's `--api-socket` in the runtime directory: `NAME.api.sock`.
fn api_socket(rundir: &RuntimeDir, name: &str) -> Result<PathBuf, PlanError> {
    Ok(rundir.socket(&format!("{name}.api"))?)
}

/// `splitvisor-blk --socket SOCKET --image IMAGE --api-socket STATS [--readonly] [--queues N]
/// [--direct] [--queue-size N] [--serial ID] [--share] [--poll-us N]`.
fn blk_daemon(
    disk: &DiskSpec,
    socket: &Path,
    stats: &Path,
    rundir: &RuntimeDir,
    backends: &BackendDir,
) -> Result<DaemonSpec, PlanError> {
    let mut args: Vec<OsString> = vec![
        "--socket".into(),
        socket.into(),
        "--image".into(),
        disk.image.clone().into(),
        "--api-socket".into(),
        stats.into(),
    ];
    if disk.readonly {
        args.push("--readonly".into());
    }
    if let Some(queues) = disk.queues {
        args.extend(["--queues".into(), queues.to_string().into()]);
    }
    if disk.options.direct {
        args.push("--direct".into());
    }
    if let Some(size) = disk.options.queue_size {
        args.extend(["--queue-size".into(), size.to_string().into()]);
    }
    if let Some(disk_id) = &disk.options.disk_id {
        args.extend(["--serial".into(), disk_id.into()]);
    }
    if disk.options.share {
        args.push("--share".into());
    }
    if let Some(poll_us) = disk.options.poll_us {
        args.extend(["--poll-us".into(), poll_us.to_string().into()]);
    }
    Ok(DaemonSpec {
        name: disk.id.clone(),
        program: backends.binary(BLK_BINARY)?,
        args,
        sockets: vec![socket.to_path_buf(), stats.to_path_buf()],
        log: rundir.log(&disk.id),
    })
}

/// Adds `--socket SOCKET` to the switch's daemon, creating `splitvisor-net --switch
/// --api-socket NAME.api.sock` for the switch's first card; returns the daemon's stats socket.
fn add_switch_port(
    daemons: &mut Vec<DaemonSpec>,
    (switch, options): (&str, &NetOptions),
    socket: &Path,
    rundir: &RuntimeDir,
    backends: &BackendDir,
) -> Result<PathBuf, PlanError> {
    let name = switch_daemon_name(switch);
    let stats = api_socket(rundir, &name)?;
    let index = match daemons.iter().position(|d| d.name == name) {
        Some(index) => index,
        None => {
            daemons.push(DaemonSpec {
                name: name.clone(),
                program: backends.binary(NET_BINARY)?,
                // The switch's MTU (its cards agree on it: `LaunchSpec::check`).
                args: [
                    "--switch".into(),
                    "--api-socket".into(),
                    stats.clone().into(),
                ]
                .into_iter()
                .chain(net_options(options))
                .collect(),
                sockets: vec![stats.clone()],
                log: rundir.log(&name),
            });
            daemons.len() - 1
        }
    };
    let daemon = &mut daemons[index];
    daemon.args.extend(["--socket".into(), socket.into()]);
    daemon.sockets.push(socket.to_path_buf());
    Ok(stats)
}

/// `[--mtu N] [--queues N]` for splitvisor-net.
fn net_options(options: &NetOptions) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    if let Some(mtu) = options.mtu {
        args.extend(["--mtu".into(), mtu.to_string().into()]);
    }
    if let Some(queues) = options.queues {
        args.extend(["--queues".into(), queues.to_string().into()]);
    }
    args
}

/// `socket=PATH,id=ID[,mac=MAC],stats=STATS` for `run --disk` / `--net`.
fn device_flag(socket: &Path, id: &str, mac: Option<&str>, stats: &Path) -> OsString {
    let mut flag = OsString::from("socket=");
    flag.push(socket);
    flag.push(format!(",id={id}"));
    if let Some(mac) = mac {
        flag.push(format!(",mac={mac}"));
    }
    flag.push(",stats=");
    flag.push(stats);
    flag
}

/// Parses the VMM's arguments as `splitvisor run` will and validates the resulting config, so
/// a bad setting (say, too little memory) is reported before any daemon starts.
fn check_vmm_args(vmm_args: &[OsString]) -> Result<(), PlanError> {
    if vmm_args.first().is_none_or(|command| command != "run") {
        return Err(PlanError::VmmCommandLine(format!(
            "not a run command line: {vmm_args:?}"
        )));
    }
    // The leading `run` takes the place of the program name.
    let run = parse_subcommand::<RunArgs, _, _>("run", vmm_args).map_err(|e| {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        PlanError::VmmCommandLine(first.trim_start_matches("error: ").to_string())
    })?;
    run.to_config()
        .validate()
        .map_err(|e| PlanError::VmmCommandLine(e.to_string()))
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
