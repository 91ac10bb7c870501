//! `splitvisor run`: its flags (the VM ones shared with `launch` as `VmArgs`), the `VmConfig`
//! they make, and running the VM under its registered name.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, FromArgMatches};
use splitvisor_confine::SeccompMode;
use splitvisor_vmm::api::upgrade_answer::PendingAnswer;
use splitvisor_vmm::config::{
    ByteSize, DiskConfig, KernelSource, NetConfig, SerialConfig, VmConfig,
};
use splitvisor_vmm::snapshot::format::DeviceData;
use splitvisor_vmm::snapshot::Manifest;
use splitvisor_vmm::upgrade::resume::Handoff;
use splitvisor_vmm::upgrade::Relaunch;
use splitvisor_vmm::vm::{RestoreFrom, Vm};

use crate::registry::{self, Registration, RegistryError};

// `run --incoming`: the destination of a live migration.
mod incoming;

/// What the VM is made of and how it runs, apart from its devices: shared by `run` and `launch`
/// (flattened into both, so the flags are spelled and documented once).
#[derive(Clone, Debug, Args, PartialEq)]
pub struct VmArgs {
    /// Guest memory, with an optional K, M, G or T suffix (e.g. 256M, 1G); a whole number of MiB.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub memory: ByteSize,

    /// Allocate all guest memory before boot instead of at the guest's first touch: slower to
    /// start, no page-fault cost while the guest runs (each first touch is expensive on PVM hosts).
    #[arg(long)]
    pub prefault: bool,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u8,

    /// Kernel to boot, told apart by its content: a Linux bzImage, a Linux vmlinux (ELF), or
    /// the project's guest (ELF). Default: the guest embedded in this binary. Linux needs a
    /// VMX/SVM host: on a PVM host it is emulated far too slowly to boot.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk (initramfs) for a Linux kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line. For the project's guest, the task to run: `selftest`, `exit=N`, ...
    /// For Linux the default is `console=ttyS0 reboot=k panic=1`.
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,

    /// ACPI tables for a Linux guest (devices, CPUs, power off and reset): on or off. Off: the
    /// virtio-mmio devices go on the kernel command line, the CPUs in the MP table, and only
    /// reboot (reboot=k, the i8042 reset) ends the VM; poweroff halts it.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub acpi: bool,

    /// Where the serial console goes: stdio, file=PATH, or none. With stdio, stdin is the
    /// guest's input (a terminal goes raw: Ctrl-A x quits, Ctrl-A h lists the escapes).
    #[arg(long, value_name = "DEST", default_value = "stdio")]
    pub serial: SerialConfig,

    /// After the VM ends, print one line `VMM-STATS {json}` on stdout: exits by kind and by
    /// device, interrupts per virtio device.
    #[arg(long)]
    pub stats: bool,

    /// Seconds to keep retrying a backend socket that does not accept connections yet.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub connect_timeout: u64,

    /// Serve the control API (HTTP/1.1 + JSON, see docs/api.yaml) on this Unix socket,
    /// created with mode 0600 and removed when the VMM exits. `splitvisor ctl` is its client.
    /// Default: api.sock in the VM's directory under the runtime directory (see --name).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// seccomp filters on the VMM's threads, each allowed only the system calls its kind
    /// needs: `on` kills the VMM with SIGSYS on any other call (saying which), `log` lets it
    /// through but logs it in the kernel log (dmesg, type=1326), `off` does not filter.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeccompMode::On)]
    pub seccomp: SeccompMode,

    /// Live upgrades (`splitvisor ctl NAME upgrade`): on or off. On keeps one thread,
    /// "upgrader", outside the seccomp filter - a filter survives execve and would confine the
    /// new VMM - so a compromised VMM thread could ask it to run another program. Off starts
    /// no such thread (every thread filtered) and refuses upgrades with 409.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub live_upgrade: bool,
}

impl VmArgs {
    /// The same settings as `run` flags, for a VMM started by another command (`launch`).
    /// A field added above must be added here too (the round-trip test below checks it).
    pub fn to_run_flags(&self) -> Vec<OsString> {
        let mut flags: Vec<OsString> = vec![
            "--memory".into(),
            self.memory.to_string().into(),
            "--vcpus".into(),
            self.vcpus.to_string().into(),
            "--serial".into(),
            serial_flag(&self.serial),
            "--connect-timeout".into(),
            self.connect_timeout.to_string().into(),
            "--seccomp".into(),
            self.seccomp.to_string().into(),
        ];
        if let Some(kernel) = &self.kernel {
            flags.extend(["--kernel".into(), kernel.into()]);
        }
        if let Some(initramfs) = &self.initramfs {
            flags.extend(["--initramfs".into(), initramfs.into()]);
        }
        if let Some(cmdline) = &self.cmdline {
            flags.extend(["--cmdline".into(), cmdline.into()]);
        }
        if !self.acpi {
            flags.extend(["--acpi".into(), "off".into()]);
        }
        if !self.live_upgrade {
            flags.extend(["--live-upgrade".into(), "off".into()]);
        }
        if self.prefault {
            flags.push("--prefault".into());
        }
        if self.stats {
            flags.push("--stats".into());
        }
        if let Some(api_socket) = &self.api_socket {
            flags.extend(["--api-socket".into(), api_socket.into()]);
        }
        flags
    }
}

/// `on`/`off` (and the usual spellings of a boolean) for switches such as `--acpi`.
fn parse_on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("'{value}': expected on or off")),
    }
}

/// `--serial` as written on the command line.
fn serial_flag(serial: &SerialConfig) -> OsString {
    match serial {
        SerialConfig::Stdio => "stdio".into(),
        SerialConfig::None => "none".into(),
        SerialConfig::File(path) => {
            let mut flag = OsString::from("file=");
            flag.push(path);
            flag
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The VM's name, for `splitvisor list` and `splitvisor ctl NAME` (letters, digits, '.',
    /// '-', '_'); default: vm-PID, printed at start. Without --api-socket the API socket is
    /// $XDG_RUNTIME_DIR/splitvisor/NAME/api.sock (else under /run/splitvisor/).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    #[command(flatten)]
    pub vm: VmArgs,

    /// A disk (repeatable; ids default to disk0, disk1, ...). `socket=PATH[,id=NAME]`: a
    /// virtio-blk device served by a vhost-user backend (e.g. splitvisor-blk) listening on PATH.
    /// `path=IMAGE,emulated=ata[,readonly][,id=NAME]`: the image as a legacy ATA disk emulated
    /// inside the VMM (every register access traps: slow on purpose, for comparison); image= and
    /// ro are aliases of path= and readonly, as in `launch`.
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<DiskConfig>,

    /// A network card served by a vhost-user backend (e.g. splitvisor-net), repeatable:
    /// `socket=PATH[,mac=52:54:00:xx:xx:xx][,id=NAME]` (ids default to net0, net1, ...).
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<NetConfig>,

    /// Seconds to wait for a backend that went away (crashed, restarted) to come back on the
    /// same socket. Meanwhile the device keeps its state: a block backend with inflight
    /// tracking resubmits the requests it had in flight, a network card reports its link down.
    /// When the time is up the device fails (DEVICE_NEEDS_RESET). 0: fail at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub reconnect_timeout: u64,

    /// Continue the VM saved in DIR by `splitvisor ctl NAME snapshot DIR` instead of booting:
    /// its memory, vCPUs, interrupt controllers, clock and devices as they were. Memory size
    /// and vCPU count are the snapshot's (--memory and --vcpus are ignored). The guest's kernel
    /// and command line are in the snapshot's memory. Without --disk/--net the devices connect
    /// to the backend sockets the snapshot names; with them, give the same ids in the same
    /// order. Each backend resumes the rings where the snapshot stopped them.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initramfs", "cmdline"])]
    pub restore: Option<PathBuf>,

    /// Internal, hidden: this process is a live upgrade's new VMM (`ctl NAME upgrade`), exec'd
    /// by the old one with the rest of its command line; FD is the memfd holding the state it
    /// left (see `splitvisor_vmm::upgrade`). Not for users: without the old process's
    /// descriptors it fails.
    #[arg(long, value_name = "FD", hide = true)]
    pub resume_upgrade: Option<i32>,
    /// Wait on unix:PATH or tcp:HOST:PORT for a VM that `splitvisor ctl NAME migrate ADDR`
    /// sends, then continue it here. --memory and --vcpus must be the VM's (a mismatch is
    /// refused and the source keeps running); --disk/--net as for --restore.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["kernel", "initramfs", "cmdline", "restore"])]
    pub incoming: Option<String>,
}

/// The hidden flag of `RunArgs::resume_upgrade`, as the old process adds it.
const RESUME_FLAG: &str = "--resume-upgrade";

impl RunArgs {
    pub fn to_config(&self) -> VmConfig {
        let vm = &self.vm;
        VmConfig {
            memory: vm.memory,
            prefault: vm.prefault,
            vcpus: vm.vcpus,
            kernel: match &vm.kernel {
                Some(path) => KernelSource::File(path.clone()),
                None => KernelSource::Embedded,
            },
            initramfs: vm.initramfs.clone(),
            cmdline: vm.cmdline.clone(),
            acpi: vm.acpi,
            serial: vm.serial.clone(),
            disks: self.disk.clone(),
            nets: self.net.clone(),
            connect_timeout: std::time::Duration::from_secs(vm.connect_timeout),
            reconnect_timeout: std::time::Duration::from_secs(self.reconnect_timeout),
            api_socket: vm.api_socket.clone(),
        }
    }
}

/// `splitvisor run`: boots the VM and runs it until it ends; the exit status is the guest's.
pub fn run(args: &RunArgs) -> Result<u8, Box<dyn std::error::Error>> {
    if let Some(fd) = args.resume_upgrade {
        return resume_upgrade(args, fd);
    }
    let mut config = args.to_config();
    let manifest = args.restore.as_deref().map(Manifest::read).transpose()?;
    if let Some(manifest) = &manifest {
        take_manifest_shape(&mut config, manifest);
    }
    config.validate()?;
    // Dropped after the VM ends: removes the VM's entry (and its API socket with it).
    let _registration = register(args, &mut config, true)?;
    splitvisor_vmm::seccomp::set_mode(args.vm.seccomp);
    let explicit_devices = !(config.disks.is_empty() && config.nets.is_empty());
    let vm = match (&args.restore, &manifest) {
        _ if args.incoming.is_some() => {
            let address = args.incoming.as_deref().unwrap_or_default();
            incoming::receive_vm(address, &mut config, explicit_devices)?
        }
        (Some(dir), Some(manifest)) => {
            let start = std::time::Instant::now();
            let vm = Vm::restore(&config, &RestoreFrom { dir, manifest })?;
            splitvisor_vmm::eprintln_whole!(
                "splitvisor: restored {} MiB and {} vCPU(s) from {} in {} ms",
                manifest.memory.size >> 20,
                manifest.vcpus.len(),
                dir.display(),
                start.elapsed().as_millis()
            );
            vm
        }
        _ => Vm::new(&config)?,
    };
    finish(args, vm)
}

/// Runs the VM, upgradable, to its end; the exit status is the guest's.
fn finish(args: &RunArgs, mut vm: Vm) -> Result<u8, Box<dyn std::error::Error>> {
    if args.vm.live_upgrade {
        vm.enable_upgrade(relaunch());
    }
    let (end, stats) = vm.run()?;
    if let Some(message) = end.describe() {
        splitvisor_vmm::eprintln_whole!("splitvisor: {message}");
    }
    if args.vm.stats {
        println!("{}{stats}", splitvisor_vmm::api::stats::STATS_PREFIX);
    }
    Ok(end.exit_status())
}

/// Memory size, vCPU count and (unless --disk/--net gave them) devices are the snapshot's.
fn take_manifest_shape(config: &mut VmConfig, manifest: &Manifest) {
    config.memory = ByteSize(manifest.memory.size);
    config.vcpus = u8::try_from(manifest.vcpus.len()).unwrap_or(u8::MAX);
    if config.disks.is_empty() && config.nets.is_empty() {
        (config.disks, config.nets) = snapshot_backends(manifest);
    }
}

/// A live upgrade keeps each vhost-user device on the backend it had: a swap may have moved
/// it off the socket the command line names.
fn follow_swaps(config: &mut VmConfig, manifest: &Manifest) {
    let saved = |id: &str| {
        manifest
            .devices
            .iter()
            .filter(|d| d.id == id)
            .find_map(|d| match &d.state {
                DeviceData::VirtioMmio(state) => state.vhost_user.as_ref(),
                _ => None,
            })
            .map(|backend| PathBuf::from(&backend.socket))
    };
    let disk_ids = config.disk_ids();
    for (disk, id) in config.disks.iter_mut().zip(disk_ids) {
        if let (DiskConfig::VhostUser { socket, .. }, Some(now)) = (disk, saved(&id)) {
            *socket = now;
        }
    }
    let net_ids = config.net_ids();
    for (net, id) in config.nets.iter_mut().zip(net_ids) {
        if let Some(now) = saved(&id) {
            net.socket = now;
        }
    }
}

/// This command line again, for a live upgrade: without `argv[0]` and the resume flag of an
/// earlier upgrade (the old process adds a fresh one).
fn relaunch() -> Relaunch {
    let mut args = Vec::new();
    let mut skip_value = false;
    for arg in std::env::args_os().skip(1) {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if arg == RESUME_FLAG {
            skip_value = true;
            continue;
        }
        if arg
            .to_str()
            .is_some_and(|a| a.starts_with("--resume-upgrade="))
        {
            continue;
        }
        args.push(arg);
    }
    Relaunch {
        args,
        resume_flag: RESUME_FLAG,
    }
}

/// `run --resume-upgrade FD`: takes the VM over from the process this one replaced and runs
/// it. A failure here loses the guest: the old process is gone. It is said on stderr and to
/// the client waiting for the upgrade's answer, and the exit status is 1.
fn resume_upgrade(args: &RunArgs, fd: i32) -> Result<u8, Box<dyn std::error::Error>> {
    let handoff = Handoff::take(fd).map_err(|e| lost(&e))?;
    let answer = PendingAnswer::for_handoff(&handoff).map_err(|e| lost(&e))?;
    let mut config = args.to_config();
    take_manifest_shape(&mut config, &handoff.state.manifest);
    follow_swaps(&mut config, &handoff.state.manifest);
    let built = config
        .validate()
        .map_err(Box::<dyn std::error::Error>::from)
        .and_then(|()| Ok(register(args, &mut config, false)?))
        .and_then(|registration| {
            splitvisor_vmm::seccomp::set_mode(args.vm.seccomp);
            Ok((registration, Vm::resume_upgrade(&config, handoff)?))
        });
    let (_registration, mut vm) = match built {
        Ok(built) => built,
        Err(e) => {
            let message = lost(e.as_ref());
            answer.fail(&message);
            // The inherited API socket is this process's, whether or not it got to serve it.
            if let Some(path) = &config.api_socket {
                let _ = std::fs::remove_file(path);
            }
            return Err(message.into());
        }
    };
    vm.answer_upgrade(answer);
    finish(args, vm)
}

/// A failure of the new process in a live upgrade, said as what it costs.
fn lost(error: &dyn std::error::Error) -> String {
    format!(
        "live upgrade: the new VMM could not take the VM over, the guest is lost: {}",
        splitvisor_vmm::error_chain(error)
    )
}

/// The vhost-user backends a snapshot's devices had, as --disk and --net would give them
/// (same ids, sockets and MAC), in the snapshot's order.
pub fn snapshot_backends(manifest: &Manifest) -> (Vec<DiskConfig>, Vec<NetConfig>) {
    let (mut disks, mut nets) = (Vec::new(), Vec::new());
    for device in &manifest.devices {
        let state = match &device.state {
            DeviceData::VirtioMmio(state) => state,
            DeviceData::Ata(ata) => {
                disks.push(DiskConfig::Ata {
                    id: Some(device.id.clone()),
                    path: PathBuf::from(&ata.path),
                    readonly: ata.readonly,
                });
                continue;
            }
            _ => continue,
        };
        let Some(backend) = &state.vhost_user else {
            continue;
        };
        let (id, socket) = (Some(device.id.clone()), PathBuf::from(&backend.socket));
        match device.kind.as_str() {
            "net" => nets.push(NetConfig {
                id,
                socket,
                mac: backend.mac,
                stats: None,
            }),
            _ => disks.push(DiskConfig::VhostUser {
                id,
                socket,
                stats: None,
            }),
        }
    }
    (disks, nets)
}

/// Registers the VM under its name and points the API socket into its entry unless
/// --api-socket chose one. Without --name, a VM that cannot be registered (no usable runtime
/// directory) still runs, as before names existed, without an API unless --api-socket.
/// `announce`: say the name and socket on stderr (not again after a live upgrade).
fn register(
    args: &RunArgs,
    config: &mut VmConfig,
    announce: bool,
) -> Result<Option<Registration>, RegistryError> {
    let name = args.name.clone().unwrap_or_else(registry::generated_name);
    match registry::register(&name, config.api_socket.as_deref()) {
        Ok(registration) => {
            if announce {
                splitvisor_vmm::eprintln_whole!(
                    "splitvisor: VM {name}, API socket {} (`splitvisor ctl {name} status`)",
                    registration.api_socket().display()
                );
            }
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

/// Parses one subcommand's arguments alone, as `splitvisor NAME` would (`argv[0]` is not an
/// argument): `launch` checks the VMM command line it builds with this before starting
/// anything, without depending on the whole command line.
pub fn parse_subcommand<T: Args + FromArgMatches, I, A>(
    name: &'static str,
    argv: I,
) -> Result<T, clap::Error>
where
    I: IntoIterator<Item = A>,
    A: Into<OsString> + Clone,
{
    let mut command =
        T::augment_args(clap::Command::new(name).bin_name(format!("splitvisor {name}")));
    let mut matches = command.try_get_matches_from_mut(argv)?;
    T::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut command))
}
