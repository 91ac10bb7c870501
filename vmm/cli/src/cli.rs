//! The `splitvisor` command line: subcommands and their flags, turned into configs.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use splitvisor_confine::SeccompMode;

use splitvisor_vmm::config::{
    ByteSize, DiskConfig, KernelSource, NetConfig, SerialConfig, VmConfig,
};

const EXIT_STATUS_HELP: &str = exit_status_help();

const fn exit_status_help() -> &'static str {
    "Exit status:\n  \
     0-255  the status the guest wrote to the debug-exit port (0xf4); the project's guest uses\n         \
     0 = pass, 1 = fail, 2 = bad command line, 3 = CPU exception\n  \
     0      also: a Linux guest powered off (poweroff, ACPI S5)\n  \
     1      also: the VM could not be set up (the message says why)\n  \
     120    the guest rebooted (reboot, or a Linux panic with panic=N); start it again\n  \
     121    the guest triple-faulted or reset\n  \
     122    KVM could not run the guest (internal error / emulation failure)\n  \
     123    a vCPU thread failed\n  \
     130    stopped by SIGINT, SIGTERM, the control API (PUT /vm/shutdown) or Ctrl-A x\n\n\
     Environment:\n  \
     SPLITVISOR_KVM_DEVICE  the KVM device to open (default /dev/kvm)\n  \
     RUST_LOG               log level for the VMM's messages on stderr (default: warn)"
}

#[derive(Debug, Parser)]
#[command(
    name = "splitvisor",
    version,
    about = "A KVM virtual machine monitor whose disk and network devices run as separate vhost-user backend daemons",
    long_about = "A KVM virtual machine monitor whose disk and network devices run as separate \
                  vhost-user backend daemons. The VMM handles only CPU and memory through KVM; \
                  without --kernel it boots the project's own guest, embedded in this binary."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and run it until the guest exits; the exit status is the guest's.
    #[command(after_long_help = EXIT_STATUS_HELP)]
    Run(RunArgs),
    /// Measure guest block I/O through vhost-user-blk (a splitvisor-blk daemon) and through the
    /// emulated ATA disk, one after the other on the same image; prints a table and one line
    /// `BENCH {json}` with IOPS, MB/s, latency, and VM exits, kicks and interrupts per request.
    /// With `--paths net-switch,net-tap`: a guest UDP stream through splitvisor-net, VM to VM
    /// through its switch and guest to a TAP (as root, in a private network namespace), with
    /// packets/s, Gbit/s and kicks per packet, and Linux ping's round trip to the guest.
    Bench(BenchArgs),
    /// Start the backend daemons (splitvisor-blk, splitvisor-net) and the VMM from one
    /// description (flags or a TOML file) and supervise them until the guest exits; the exit
    /// status is the guest's.
    #[command(after_long_help = crate::launch::LAUNCH_HELP)]
    Launch(crate::launch::LaunchArgs),
    /// Talk to a running VM's control API, by its name (`splitvisor ctl NAME VERB`) or its
    /// socket (`splitvisor ctl --api-socket PATH VERB`): show its state, pause, resume or stop
    /// it, swap a device's backend, read its counters.
    Ctl(CtlArgs),
    /// Show every VM running on this host (started by `run` or `launch`, named with --name or
    /// not): name, VMM pid, state, vCPUs, memory, uptime, and each device with its backend's
    /// state. Entries of VMMs that are gone are removed.
    #[command(after_long_help = LIST_HELP)]
    List(ListArgs),
}

const LIST_HELP: &str = "\
Each VMM registers itself in $XDG_RUNTIME_DIR/splitvisor/NAME/ (else /run/splitvisor/NAME/):
vm.json (its pid and API socket) and, without --api-socket, the API socket api.sock. Device
states: connected, reconnecting (the backend went away and the VMM waits for it), failed,
needs-reset, busy (a swap or recovery in progress), emulated (inside the VMM).";

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print a JSON array (name, pid, api_socket, state, and the VM as GET /vm reports it)
    /// instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(subcommand_precedence_over_arg = true)]
pub struct CtlArgs {
    /// The VM's name (`run --name`, `launch --name`; `splitvisor list` shows them).
    #[arg(value_name = "NAME", required_unless_present = "api_socket")]
    pub name: Option<String>,
    /// The API socket the VM was started with (`run --api-socket PATH`), instead of its name.
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    pub api_socket: Option<PathBuf>,
    /// Print the API's JSON answer instead of a readable summary.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub verb: CtlVerb,
}

#[derive(Debug, Subcommand)]
pub enum CtlVerb {
    /// The VM's state, vCPUs, memory, and each device with its backend socket, connection
    /// state, swaps, recoveries and counters (GET /vm).
    Status,
    /// Stop running the vCPUs; backends finish what the guest already queued (PUT /vm/pause).
    Pause,
    /// Run the vCPUs again (PUT /vm/resume).
    Resume,
    /// Stop the VM; `run` then exits with status 130 (PUT /vm/shutdown).
    Shutdown,
    /// Move device ID to the vhost-user backend listening on SOCKET while the guest runs; on
    /// failure the device keeps its backend (PUT /devices/ID/backend).
    Swap {
        /// The device id, e.g. disk0 or net0 (see `status`).
        id: String,
        /// The new backend's Unix socket.
        socket: PathBuf,
    },
    /// Exits by kind and by device, per-device completed requests and interrupts (GET /metrics).
    Metrics,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which paths to measure, in order. Block: virtio, ata. Network: net-switch (two VMs on a
    /// `splitvisor-net --switch`, one sending a UDP stream, one receiving), net-tap (one VM
    /// sending to a TAP owned by `splitvisor-net --tap` in a private network namespace that is
    /// deleted afterwards; needs root; also pings the guest from the namespace with
    /// `ping -c 20 -i 0.01`).
    #[arg(long, value_delimiter = ',', default_value = "virtio,ata", value_parser = ["virtio", "ata", "net-switch", "net-tap"])]
    pub paths: Vec<String>,
    /// Access pattern: read, write, randread, randwrite.
    #[arg(long, default_value = "randread", value_parser = ["read", "write", "randread", "randwrite"])]
    pub rw: String,
    /// Request size (4k to 1M).
    #[arg(long, default_value = "4k")]
    pub bs: String,
    /// Requests in flight (the ATA path is always 1).
    #[arg(long, default_value_t = 32)]
    pub qd: u32,
    /// virtio queues (the backend gets one worker thread per queue).
    #[arg(long, default_value_t = 1)]
    pub queues: u32,
    /// Region of the image the guest works in.
    #[arg(long, default_value = "64M")]
    pub size: String,
    /// Seconds each path runs (each network stream too).
    #[arg(long, default_value_t = 5)]
    pub seconds: u32,
    /// Network paths: UDP payload sizes in bytes, one stream each (64 to 1500; port 9).
    #[arg(long, value_delimiter = ',', default_value = "64,1500", value_parser = clap::value_parser!(u32).range(64..=1500))]
    pub net_sizes: Vec<u32>,
    /// Image to use; default: a sparse file of --image-size on tmpfs (/dev/shm), removed after.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Size of the default image.
    #[arg(long, default_value = "256M")]
    pub image_size: ByteSize,
    /// Guest memory.
    #[arg(long, default_value = "256M")]
    pub memory: ByteSize,
    /// The splitvisor-blk binary; default: the one next to this executable.
    #[arg(long, value_name = "PATH")]
    pub backend: Option<PathBuf>,
    /// The splitvisor-net binary; default: the one next to this executable.
    #[arg(long, value_name = "PATH")]
    pub net_backend: Option<PathBuf>,
}

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
}

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

/// The statuses documented above, checked against the code that produces them.
#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use splitvisor_vmm::vm_end;

    #[test]
    fn help_documents_every_vmm_status() {
        for status in [
            vm_end::STATUS_SHUTDOWN,
            vm_end::STATUS_INTERNAL_ERROR,
            vm_end::STATUS_VCPU_FAILED,
            vm_end::STATUS_INTERRUPTED,
            vm_end::STATUS_REBOOT,
        ] {
            assert!(
                EXIT_STATUS_HELP.contains(&format!("  {status} ")),
                "{status}"
            );
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_boot_the_embedded_guest() {
        let cli = Cli::try_parse_from(["splitvisor", "run", "--cmdline", "selftest"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        let config = args.to_config();
        assert_eq!(config.memory, ByteSize(256 << 20));
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.kernel, KernelSource::Embedded);
        assert_eq!(config.serial, SerialConfig::Stdio);
    }

    #[test]
    fn vm_args_survive_the_trip_through_run_flags() {
        // Every flag set away from its default, so a field missing from to_run_flags shows.
        let cli = Cli::try_parse_from([
            "splitvisor",
            "run",
            "--memory",
            "1G",
            "--prefault",
            "--vcpus",
            "3",
            "--kernel",
            "/boot/guest.elf",
            "--initramfs",
            "/boot/initrd.gz",
            "--acpi",
            "off",
            "--cmdline",
            "blk-verify,seconds=5 ip=10.0.0.2/24",
            "--serial",
            "file=/tmp/console.log",
            "--stats",
            "--connect-timeout",
            "4",
            "--api-socket",
            "/run/api.sock",
            "--seccomp",
            "log",
        ])
        .unwrap();
        let Command::Run(original) = cli.command else {
            panic!("parsed as another subcommand");
        };
        let defaults = Cli::try_parse_from(["splitvisor", "run"]).unwrap();
        let Command::Run(defaults) = defaults.command else {
            panic!("parsed as another subcommand");
        };
        let fields = format!("{:?}", original.vm);
        let default_fields = format!("{:?}", defaults.vm);
        let differing = fields
            .split(", ")
            .zip(default_fields.split(", "))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differing, fields.split(", ").count(), "{fields}");
        let argv = ["splitvisor".into(), "run".into()]
            .into_iter()
            .chain(original.vm.to_run_flags());
        let Command::Run(again) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(again.vm, original.vm);
    }

    #[test]
    fn launch_help_states_the_restart_policy_in_force() {
        use crate::launch::{RestartPolicy, LAUNCH_HELP};
        let p = RestartPolicy::DEFAULT;
        let socket_timeout = std::time::Duration::from_secs(10);
        for fact in [
            format!("after {} ms, doubling", p.first_backoff.as_millis()),
            format!(
                "within {} ms of its start), up to {} s",
                p.healthy_after.as_millis(),
                p.max_backoff.as_secs()
            ),
            format!("After {} failed runs in a row", p.max_failed_runs),
            format!("or {} restarts within a minute", p.max_restarts_per_window),
            format!("of 10 s: {} s)", p.reconnect_timeout_secs(socket_timeout)),
            format!(
                "then SIGKILL after {} s)",
                crate::launch::VMM_STOP_GRACE.as_secs()
            ),
        ] {
            assert!(LAUNCH_HELP.contains(&fact), "{fact}");
        }
        assert_eq!(p.window, std::time::Duration::from_secs(60));
    }

    #[test]
    fn names_go_with_every_way_of_describing_the_vm() {
        let cli = Cli::try_parse_from([
            "splitvisor",
            "launch",
            "--config",
            "vm.toml",
            "--name",
            "web",
            "--daemonize",
            "--pidfile",
            "/run/web.pid",
        ])
        .unwrap();
        let Command::Launch(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.name.as_deref(), Some("web"));
        assert!(args.daemonize && !args.daemon_child);
        let cli = Cli::try_parse_from(["splitvisor", "run", "--name", "web"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.name.as_deref(), Some("web"));
        // ctl takes a name or a socket, not both.
        let cli = Cli::try_parse_from(["splitvisor", "ctl", "web", "status"]).unwrap();
        let Command::Ctl(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.name.as_deref(), Some("web"));
        assert!(Cli::try_parse_from(["splitvisor", "ctl", "--api-socket", "/a", "status"]).is_ok());
        assert!(
            Cli::try_parse_from(["splitvisor", "ctl", "web", "--api-socket", "/a", "status"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["splitvisor", "ctl", "status"]).is_err());
    }

    #[test]
    fn bench_defaults_compare_both_paths() {
        let cli = Cli::try_parse_from(["splitvisor", "bench"]).unwrap();
        let Command::Bench(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.paths, ["virtio", "ata"]);
        assert_eq!(
            (args.rw.as_str(), args.bs.as_str(), args.qd),
            ("randread", "4k", 32)
        );
        assert!(Cli::try_parse_from(["splitvisor", "bench", "--paths", "nvme"]).is_err());
        assert_eq!(args.net_sizes, [64, 1500]);
    }

    #[test]
    fn bench_takes_net_paths_and_checks_sizes() {
        let cli = Cli::try_parse_from([
            "splitvisor",
            "bench",
            "--paths",
            "net-switch,net-tap",
            "--net-sizes",
            "64,512,1500",
        ])
        .unwrap();
        let Command::Bench(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.paths, ["net-switch", "net-tap"]);
        assert_eq!(args.net_sizes, [64, 512, 1500]);
        for bad in ["63", "1501", "x"] {
            let err = Cli::try_parse_from(["splitvisor", "bench", "--net-sizes", bad]).unwrap_err();
            assert!(err.to_string().contains("--net-sizes"), "{err}");
        }
    }

    #[test]
    fn bad_values_are_reported_with_the_flag() {
        let err = Cli::try_parse_from(["splitvisor", "run", "--memory", "12X"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--memory") && msg.contains("'12X' is not a size"),
            "{msg}"
        );
        let err = Cli::try_parse_from(["splitvisor", "run", "--vcpus", "300"]).unwrap_err();
        assert!(err.to_string().contains("--vcpus"), "{err}");
    }
}
